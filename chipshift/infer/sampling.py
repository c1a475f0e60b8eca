"""Per-request sampling settings and one batched, on-device sampling function.

Every row of a batch carries its own temperature, top-k, top-p, repetition penalty and
seed. Nothing here reads a value back to the host: choices that depend on the settings
(is anyone sampling at all? is anyone filtering?) are made by the caller from the Python
settings it already holds.

Log-probabilities (`logprobs`, `prompt_logprobs`) are those of the model's own
distribution, the log-softmax of the raw logits, before repetition penalty, temperature
and top-k/top-p (as vLLM returns them by default): they describe the model, whatever
settings a request samples with. Rows that ask for none cost nothing.

Seeded sampling uses the Gumbel-max trick with counter-based noise: the uniform numbers of
row r at step s are a hash of (seed_r, s, token id), so a request draws the same tokens
whatever else shares its batch, on every device, with no generator state to carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chipshift.errors import ChipshiftError

_MASK32 = 0xFFFFFFFF
# The most alternatives a token's log-probability may come with (OpenAI's chat limit).
MAX_TOP_LOGPROBS = 20


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
    logprobs: int | None = None  # None: off; k: each new token's log-probability and the k likeliest
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (the first has none)

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
        for key in ("logprobs", "prompt_logprobs"):
            k = getattr(self, key)
            if k is not None and (not isinstance(k, int) or not 0 <= k <= MAX_TOP_LOGPROBS):
                raise ChipshiftError(f"{key} = {k!r}: must be None or an integer in [0, {MAX_TOP_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filters(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1)


@dataclass
class TokenLogprob:
    """A token's log-probability under the model and the `top` likeliest tokens at its
    position, (token id, log-probability) in descending order."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Per row of logits (rows, vocab): the log-softmax at `chosen` (rows,) and the `top`
    likeliest entries. One read-back to the host."""
    logp = torch.log_softmax(logits.float(), -1)
    picked = logp.gather(-1, chosen[:, None])[:, 0]
    values, ids = logp.topk(top, -1) if top else (picked[:, None][:, :0], chosen[:, None][:, :0])
    picked, values, ids, chosen = (t.tolist() for t in (picked, values, ids, chosen))
    return [TokenLogprob(c, p, list(zip(i, v))) for c, p, i, v in zip(chosen, picked, ids, values)]


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
