"""Per-request sampling settings and one batched, on-device sampling function.

Every row of a batch carries its own temperature, top-k, top-p, repetition penalty and
seed. Nothing here reads a value back to the host: choices that depend on the settings
(is anyone sampling at all? is anyone filtering?) are made by the caller from the Python
settings it already holds.

Seeded sampling uses the Gumbel-max trick with counter-based noise: the uniform numbers of
row r at step s are a hash of (seed_r, s, token id), so a request draws the same tokens
whatever else shares its batch, on every device, with no generator state to carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chipshift.errors import ChipshiftError

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingParams:
    """How one request picks its tokens. temperature 0 means greedy."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens already seen (as in HF)
    seed: int | None = None  # None: a fresh random seed
    stop: tuple[str, ...] = ()  # strings that end the output (not included in it)
    stop_ids: tuple[int, ...] | None = None  # token ids that end it; None: the tokenizer's
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ChipshiftError(f"max_tokens = {self.max_tokens!r}: must be a positive integer")
        if self.temperature < 0:
            raise ChipshiftError(f"temperature = {self.temperature}: must be >= 0")
        if self.top_k < 0:
            raise ChipshiftError(f"top_k = {self.top_k}: must be >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            raise ChipshiftError(f"top_p = {self.top_p}: must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ChipshiftError(f"repetition_penalty = {self.repetition_penalty}: must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filters(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (lowbias32) on int64 tensors holding values < 2**32."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """(rows, vocab) float32 uniforms in (0, 1), a pure function of (seed, step, token id)."""
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    row = _hash32(_hash32(seeds) ^ (steps * 0x9E3779B9))
    x = _hash32(row[:, None] ^ (ids[None, :] * 0x85EBCA6B))
    return ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF's rule: a seen token's logit is divided by the penalty if positive, else multiplied."""
    p = penalty[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, steps: torch.Tensor, *, any_sampling: bool, any_filter: bool) -> torch.Tensor:
    """Next token per row, (rows,) int64, on the logits' device.

    logits (rows, vocab) float32; temperature, top_p (rows,) float32 (temperature 0: greedy);
    top_k (rows,) int64 (0: off); seeds, steps (rows,) int64.
    """
    greedy = logits.argmax(-1)
    if not any_sampling:
        return greedy
    vocab = logits.shape[-1]
    scaled = logits / temperature.clamp_min(1e-5)[:, None]
    noise = -torch.log(-torch.log(uniform_noise(seeds, steps, vocab)))
    if any_filter:
        ordered, order = scaled.sort(-1, descending=True)
        rank = torch.arange(vocab, device=logits.device)
        k = torch.where(top_k > 0, top_k, vocab)
        keep = rank[None, :] < k[:, None]
        ordered = ordered.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(ordered, -1)
        keep &= (probs.cumsum(-1) - probs) < top_p[:, None]  # the most likely token always stays
        choice = (ordered.masked_fill(~keep, float("-inf")) + noise).argmax(-1, keepdim=True)
        sampled = order.gather(-1, choice)[:, 0]
    else:
        sampled = (scaled + noise).argmax(-1)
    return torch.where(temperature > 0, sampled, greedy)
