"""Token shards: corpora tokenised once into flat memory-mapped arrays.

A data directory holds one flat file per split and an index:

    train.bin    token ids of every training document, each followed by eos
    val.bin      the same for the held-out documents (see `corpora` for the split rule)
    index.json   format, tokenizer sha256 and path, dtype, eos id, per-split file / token /
                 document counts, per-source counts, the validation fraction

Ids are uint16 when the vocabulary fits (< 65536), else uint32. The training loop reads a
split with `load_split(data_dir, split)`: one read-only `numpy.memmap`, no copy.
Files are written to a temporary name, fsynced and renamed, index last, so a data
directory is either complete or has no index.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from chipshift.data.corpora import DEFAULT_VAL_FRACTION, Document, load_corpora
from chipshift.data.tokenizer import Tokenizer
from chipshift.data.tokenizer_train import tokenizer_hash
from chipshift.errors import ChipshiftError

INDEX = "index.json"
FORMAT = 1
SPLITS = ("train", "val")
BATCH_DOCS = 64  # documents per encode_batch call: parallel inside, a progress tick between


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _write_atomic(path: Path, write):
    """Call write(f) on a temporary file, fsync, rename onto `path`; return what write returned."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        result = write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return result


def _encode_split(tok: Tokenizer, docs: list[Document], dtype: np.dtype, f, bar: tqdm) -> dict[str, dict]:
    """Encode documents in batches (the Rust tokenizer runs each batch on all cores), write
    ids + eos per document to `f`; return {source: {"documents", "tokens"}}."""
    counts: dict[str, dict] = {}
    eos = np.array([tok.eos_id], dtype=dtype)
    for start in range(0, len(docs), BATCH_DOCS):
        batch = docs[start:start + BATCH_DOCS]
        encodings = tok.tok.encode_batch([d.text for d in batch], add_special_tokens=False)
        for doc, enc in zip(batch, encodings):
            ids = np.asarray(enc.ids, dtype=dtype)
            f.write(ids.tobytes())
            f.write(eos.tobytes())
            c = counts.setdefault(doc.source, {"documents": 0, "tokens": 0})
            c["documents"] += 1
            c["tokens"] += len(ids) + 1
        bar.update(sum(len(d.text) for d in batch))
    return counts


def prepare(tokenizer_dir: str | Path, out: str | Path, sources: list[str], files: list[str | Path] = (),
            val_fraction: float = DEFAULT_VAL_FRACTION) -> dict:
    """Tokenise the corpora into `out`; return the index (also written to out/index.json)."""
    tok = Tokenizer.load(tokenizer_dir)
    if tok.eos_id is None:
        raise ChipshiftError(f"{tokenizer_dir}: the tokenizer has no eos token to separate documents")
    corpora = load_corpora(sources, files, val_fraction)  # reads and checks every input first
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)  # the directory is incomplete until the index returns
    dtype = token_dtype(tok.vocab_size)
    t0 = time.perf_counter()
    total_chars = sum(len(d.text) for tr, va in corpora.values() for d in tr + va)
    per_source: dict[str, dict] = {name: {} for name in corpora}
    splits = {}
    with tqdm(total=total_chars, unit="char", unit_scale=True, desc="tokenising") as bar:
        for i, split in enumerate(SPLITS):
            docs = [d for tr_va in corpora.values() for d in tr_va[i]]
            counts = _write_atomic(out / f"{split}.bin", lambda f: _encode_split(tok, docs, dtype, f, bar))
            for name in corpora:
                per_source[name][split] = counts.get(name, {"documents": 0, "tokens": 0})
            splits[split] = {"file": f"{split}.bin", "documents": len(docs),
                             "tokens": sum(c["tokens"] for c in counts.values())}
    index = {
        "format": FORMAT,
        "tokenizer": str(Path(tokenizer_dir).resolve()),
        "tokenizer_sha256": tokenizer_hash(tokenizer_dir),
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "eos_id": tok.eos_id,
        "val_fraction": val_fraction,
        "splits": splits,
        "sources": per_source,
        "chars": total_chars,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    _write_atomic(out / INDEX, lambda f: f.write(json.dumps(index, indent=2, ensure_ascii=False).encode()))
    return index


def read_index(data_dir: str | Path) -> dict:
    path = Path(data_dir) / INDEX
    if not path.exists():
        raise ChipshiftError(f"{data_dir}: no {INDEX}; create it with `chipshift data prepare`")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ChipshiftError(f"{path}: unreadable ({exc.msg})") from None
    if index.get("format") != FORMAT:
        raise ChipshiftError(f"{path}: unsupported format {index.get('format')!r} (expected {FORMAT})")
    return index


def load_split(data_dir: str | Path, split: str) -> np.memmap:
    """The token ids of one split as a read-only 1-D memmap (documents separated by eos)."""
    index = read_index(data_dir)
    if split not in index["splits"]:
        raise ChipshiftError(f"{data_dir}: no split {split!r} (have {', '.join(index['splits'])})")
    info = index["splits"][split]
    path = Path(data_dir) / info["file"]
    dtype = np.dtype(index["dtype"])
    expected = info["tokens"] * dtype.itemsize
    size = path.stat().st_size if path.exists() else -1
    if size != expected:
        raise ChipshiftError(f"{path}: {size} bytes on disk, the index says {expected}; "
                             f"prepare the data again")
    if info["tokens"] == 0:
        raise ChipshiftError(f"{data_dir}: split {split!r} is empty")
    return np.memmap(path, dtype=dtype, mode="r", shape=(info["tokens"],))


def check_tokenizer(data_dir: str | Path, tokenizer_dir: str | Path) -> None:
    """Refuse to train on shards made with a different tokenizer than the model's."""
    index = read_index(data_dir)
    actual = tokenizer_hash(tokenizer_dir)
    if actual != index["tokenizer_sha256"]:
        raise ChipshiftError(f"{data_dir} was tokenised with another tokenizer ({index['tokenizer']}, "
                             f"sha256 {index['tokenizer_sha256'][:12]}) than {tokenizer_dir} "
                             f"(sha256 {actual[:12]}); run `chipshift data prepare` with this tokenizer")
