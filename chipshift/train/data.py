"""Deterministic batches for the training loop.

The loop sees a dataset as an endless, deterministic stream of samples addressed by a
global index: `batch(start, count)` returns samples [start, start + count) as tensors.
The training state keeps one number, the cursor (samples consumed so far over all
processes), so the stream does not depend on how many processes read it: with N
processes, rank r takes its own contiguous part of each global batch, and a checkpoint
written with N processes resumes with M.

`TokenWindows` is the pre-training stream: a flat array of token ids cut into windows of
`seq_len + 1` tokens (the inputs and the labels shifted by one), shuffled per epoch by a
generator seeded with (seed, epoch). SFT and DPO supply their own streams with the same
`batch(start, count)` method.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


class Stream(Protocol):
    def batch(self, start: int, count: int) -> dict[str, torch.Tensor]: ...


class TokenWindows:
    """Windows of seq_len + 1 tokens; shuffled per epoch unless `shuffle` is False."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0, shuffle: bool = True) -> None:
        if tokens.ndim != 1:
            raise ValueError("tokens must be a 1-D array")
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"{len(tokens)} tokens cannot fill one window of {seq_len + 1}")
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.num_windows), epoch
        return self._perm

    def window_start(self, index: int) -> int:
        epoch, i = divmod(index, self.num_windows)
        w = self._order(epoch)[i] if self.shuffle else i
        return int(w) * self.seq_len

    def batch(self, start: int, count: int) -> dict[str, torch.Tensor]:
        T = self.seq_len
        rows = np.stack([np.asarray(self.tokens[s:s + T + 1], dtype=np.int64)
                         for s in (self.window_start(start + k) for k in range(count))])
        rows = torch.from_numpy(rows)
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}


def rank_slice(start: int, global_count: int, rank: int, world: int) -> tuple[int, int]:
    """The (start, count) of rank's contiguous share of a global batch."""
    per_rank = global_count // world
    return start + rank * per_rank, per_rank
