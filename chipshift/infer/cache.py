"""A static, preallocated KV cache for continuous batching.

One buffer per K and V of shape (layers, slots, kv_heads, max_len, head_dim) is allocated
once; a request owns one slot (a batch row) from prefill to its last token, so requests
join and leave the running batch without moving anyone else's history.

The model's attention calls `cache.update(layer_idx, k, v) -> (k_all, v_all)`. The two
passes use two small writers over the same buffers:

  prefill(slot, length)        k, v of shape (1, kvh, T, d) go to positions 0..T-1 of one
                               slot; the history returned is that slot's first T rows
  decode(rows, positions, span) one new k, v per row (rows 0..rows-1, at per-row positions);
                               the history returned is a view of the first `span` positions
                               of those rows (no copy), to be masked per row by the caller
"""

from __future__ import annotations

import torch

from chipshift.model.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, max_batch: int, max_len: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (cfg.num_layers, max_batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_batch, self.max_len = max_batch, max_len

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def prefill(self, slot: int, length: int) -> "_PrefillWriter":
        return _PrefillWriter(self, slot, length)

    def decode(self, rows: int, positions: torch.Tensor, span: int) -> "_DecodeWriter":
        return _DecodeWriter(self, rows, positions, span)


class _PrefillWriter:
    def __init__(self, cache: KVCache, slot: int, length: int) -> None:
        self.cache, self.slot, self.length = cache, slot, length

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kc = self.cache.k[layer_idx, self.slot:self.slot + 1, :, :self.length]
        vc = self.cache.v[layer_idx, self.slot:self.slot + 1, :, :self.length]
        kc.copy_(k)
        vc.copy_(v)
        return kc, vc


class _DecodeWriter:
    def __init__(self, cache: KVCache, rows: int, positions: torch.Tensor, span: int) -> None:
        self.cache, self.rows, self.span = cache, rows, span
        self.row_index = torch.arange(rows, device=positions.device)
        self.positions = positions  # (rows,) where each row's new token goes

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]
        # advanced indices around a slice: the indexed shape is (rows, kv_heads, head_dim)
        kc[self.row_index, :, self.positions] = k[:, :, 0].to(kc.dtype)
        vc[self.row_index, :, self.positions] = v[:, :, 0].to(vc.dtype)
        return kc[:self.rows, :, :self.span], vc[:self.rows, :, :self.span]
