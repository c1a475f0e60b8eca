"""A thin wrapper over a Hugging Face `tokenizers` tokenizer plus its chat template.

A tokenizer lives as two files, in a checkpoint or on its own: `tokenizer.json` (the
`tokenizers` model) and `tokenizer_config.json` (special tokens and the Jinja chat
template, as `transformers.AutoTokenizer` expects them).
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer, decoders

from chipshift.errors import ChipshiftError


class Tokenizer:
    def __init__(self, tok: HFTokenizer, config: dict) -> None:
        self.tok = tok
        self.config = config

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.exists():
            raise ChipshiftError(f"no tokenizer.json in {path}")
        cfg_path = path / "tokenizer_config.json"
        config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        template_file = path / "chat_template.jinja"  # transformers >= 4.43 may store it apart
        if "chat_template" not in config and template_file.exists():
            config["chat_template"] = template_file.read_text()
        return cls(HFTokenizer.from_file(str(tj)), config)

    # -- special tokens ----------------------------------------------------------------
    def _token_str(self, key: str) -> str | None:
        value = self.config.get(key)
        if isinstance(value, dict):  # older configs store AddedToken dicts
            value = value.get("content")
        return value

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    @cached_property
    def bos_id(self) -> int | None:
        return self.token_id(self._token_str("bos_token"))

    @cached_property
    def eos_id(self) -> int | None:
        return self.token_id(self._token_str("eos_token"))

    @cached_property
    def pad_id(self) -> int | None:
        pad = self.token_id(self._token_str("pad_token"))
        return pad if pad is not None else self.eos_id

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return self.config.get("chat_template")

    def stop_ids(self) -> set[int]:
        """Token ids that end a generation: eos plus the end-of-turn token, when present."""
        ids = {self.eos_id} if self.eos_id is not None else set()
        for tok in ("<|im_end|>", "<|end_of_turn|>", "<|eot_id|>", "<|endoftext|>"):
            tid = self.tok.token_to_id(tok)
            if tid is not None:
                ids.add(tid)
        return ids

    # -- text <-> ids ------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _byte_of_char(self) -> dict[str, int] | None:
        """A byte-level BPE's map from the printable characters its pieces are spelled in
        back to the bytes they stand for (GPT-2's table); None for other tokenizers."""
        if not isinstance(self.tok.decoder, decoders.ByteLevel):
            return None
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        others = [b for b in range(256) if b not in printable]
        return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for; a piece of a UTF-8 character stays a piece (the
        log-probabilities of the OpenAI API report tokens so)."""
        piece = self.tok.id_to_token(token_id)
        table = self._byte_of_char
        if piece is not None and table is not None and all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return self.tok.decode([token_id], skip_special_tokens=False).encode()

    def _compiled_template(self):
        """The chat template compiled once (SFT data renders it thousands of times)."""
        source = self.chat_template
        if getattr(self, "_template", (None, None))[0] != source:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(message):
                raise ChipshiftError(f"chat template: {message}")

            env.globals["raise_exception"] = raise_exception
            self._template = (source, env.from_string(source))
        return self._template[1]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render OpenAI-style messages with the tokenizer's own Jinja template."""
        if not self.chat_template:
            raise ChipshiftError("this tokenizer has no chat template")
        return self._compiled_template().render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self._token_str("bos_token") or "",
                               eos_token=self._token_str("eos_token") or "")

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2, ensure_ascii=False))
