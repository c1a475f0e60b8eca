"""Train chipshift's own tokenizer: byte-level BPE with chat tokens reserved from the start.

Choices, each measured (see docs/data.md for the figures):
- Byte-level: every UTF-8 string maps to tokens and back exactly (no normaliser, no
  unknown token, a decoder that only reverses the byte mapping).
- Pre-tokenisation by the GPT-4 (cl100k) pattern, then bytes. Unlike GPT-2's pattern it
  lets one punctuation mark lead a run of letters ("，曹操" stays one piece) and caps digit
  runs at three; a run of Chinese characters is one piece, so BPE learns whole characters
  and frequent words. On held-out 三国演义 at 16k it gives ~1.0 token per Chinese
  character (GPT-2's pattern: ~1.08) and slightly longer English tokens.
- Special tokens, ids 0-2, reserved at training time so post-training needs no resize:
  `<|endoftext|>` separates documents and is eos and pad; `<|im_start|>` / `<|im_end|>`
  open and close a chat turn; roles are plain text after `<|im_start|>` (ChatML).
- A ChatML chat template in tokenizer_config.json, so `transformers.AutoTokenizer`
  loads the directory and `apply_chat_template` renders what chipshift renders.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from chipshift.data.tokenizer import Tokenizer
from chipshift.errors import ChipshiftError

EOS_TOKEN = "<|endoftext|>"
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, TURN_START, TURN_END)

# GPT-4's cl100k pre-tokenisation pattern.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def new_bpe() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def tokenizer_config(model_max_length: int = 8192) -> dict:
    """tokenizer_config.json as `transformers` reads it (a fast tokenizer with ChatML)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "additional_special_tokens": [TURN_START, TURN_END],
        "clean_up_tokenization_spaces": False,  # decoding must give back the exact text
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, show_progress: bool = True) -> Tokenizer:
    """Byte-level BPE over `texts` (each text a document or a chunk of one)."""
    if vocab_size < MIN_VOCAB:
        raise ChipshiftError(f"vocab size must be at least {MIN_VOCAB} (256 bytes + "
                             f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    tok = new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(texts, trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i, "special tokens must keep ids 0..2"
    return Tokenizer(tok, tokenizer_config())


def tokenizer_hash(path: str | Path) -> str:
    """sha256 of tokenizer.json: shards record it so they are never read with another tokenizer."""
    return hashlib.sha256((Path(path) / "tokenizer.json").read_bytes()).hexdigest()


def train_and_save(texts: list[str], vocab_size: int, out: str | Path, info: dict | None = None) -> dict:
    """Train, save to `out`, and return a summary (also written into tokenizer_config.json
    under `chipshift`, so a tokenizer says what it was trained on)."""
    t0 = time.perf_counter()
    tok = train_tokenizer(texts, vocab_size, show_progress=sys.stderr.isatty())  # its bar is blank lines in a log
    seconds = time.perf_counter() - t0
    summary = {"vocab_size": tok.vocab_size, "train_seconds": round(seconds, 2),
               "train_chars": sum(len(t) for t in texts), **(info or {})}
    tok.config["chipshift"] = summary
    tok.save(out)
    summary["sha256"] = tokenizer_hash(out)
    return summary


def is_cjk(ch: str) -> bool:
    """A CJK unified ideograph (basic block and extension A)."""
    return "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf"


def compression(tok: Tokenizer, texts: list[str]) -> dict:
    """Tokens, characters, characters per token and, when the text has Chinese characters,
    tokens per Chinese character (every token of the text counted, punctuation included)."""
    tokens = sum(len(e.ids) for e in tok.tok.encode_batch(texts, add_special_tokens=False))
    chars = sum(len(t) for t in texts)
    cjk = sum(is_cjk(c) for t in texts for c in t)
    stats = {"tokens": tokens, "chars": chars, "chars_per_token": round(chars / max(tokens, 1), 3)}
    if cjk:
        stats["cjk_chars"] = cjk
        stats["tokens_per_cjk_char"] = round(tokens / cjk, 3)
    return stats
