"""Weight-only quantized layers: weights held as GGUF blocks (Q8_0, Q4_0, Q4_1), as they are.

A quantized matrix of N rows and K columns is a uint8 tensor (N, K / 32 * block bytes): each
row is K / 32 blocks of 32 weights in llama.cpp's layout (little-endian):

    Q8_0   float16 d, 32 int8 q                          w = d * q              34 bytes
    Q4_0   float16 d, 16 bytes of 4-bit q                w = d * (q - 8)        18 bytes
    Q4_1   float16 d, float16 m, 16 bytes of 4-bit q     w = d * q + m          20 bytes

(4-bit: byte j holds weight j in its low nibble and weight j + 16 in its high one). A GGUF
file imported with `--keep-quantized` keeps its blocks byte for byte; `quantize` makes the
same bytes from float weights, as llama.cpp's reference quantizers do.

`QuantLinear` and `QuantEmbedding` stand in for nn.Linear and nn.Embedding (the output
projection, tied or not, included). Their plain path dequantizes one matrix at a time for
the call and lets it go, so the model's memory stays that of its blocks. A device that has
quantized matmuls passes them in through `Transformer.with_kernels(quant_linear=...)`
(chipshift's CPU kernels multiply the blocks with 8-bit integer dot products, never
dequantizing the weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chipshift.errors import CheckpointError

BLOCK = 32
# format -> (ggml type id, bytes per block of 32 weights)
FORMATS = {"Q8_0": (8, 34), "Q4_0": (2, 18), "Q4_1": (3, 20)}


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise CheckpointError(f"quantized format {fmt!r} cannot be served; chipshift serves {', '.join(FORMATS)} "
                              f"(or any format dequantized at import: drop --keep-quantized)")
    return fmt


def block_bytes(fmt: str) -> int:
    return FORMATS[check_format(fmt)][1]


def _check_matrix(w: torch.Tensor, fmt: str, K: int) -> None:
    """w must be a `fmt` matrix with rows of K weights: uint8 (N, K / 32 * bytes)."""
    check_format(fmt)
    if K % BLOCK:
        raise ValueError(f"K = {K} is not a multiple of the block size {BLOCK}")
    width = K // BLOCK * block_bytes(fmt)
    if w.dtype != torch.uint8 or w.dim() != 2 or w.shape[1] != width:
        raise ValueError(f"a {fmt} matrix with K = {K} is uint8 (N, {width}); got {w.dtype} {tuple(w.shape)}")


def _blocks(w: torch.Tensor, fmt: str, K: int) -> torch.Tensor:
    """w (N, K / 32 * bytes) uint8 as (N, K / 32, bytes), after checking its shape."""
    _check_matrix(w, fmt, K)
    return w.contiguous().view(w.shape[0], K // BLOCK, block_bytes(fmt))


def _fp16(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 slice of the blocks -> (..., 1) float32"""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., 16) bytes -> (..., 32) values 0..15: the low halves are elements 0..15"""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def dequantize(w: torch.Tensor, fmt: str, K: int) -> torch.Tensor:
    """A quantized matrix (N, K / 32 * bytes) as float32 (N, K), as ggml dequantizes it."""
    blocks = _blocks(w, fmt, K)
    d = _fp16(blocks[..., 0:2])
    if fmt == "Q8_0":
        values = d * blocks[..., 2:].view(torch.int8).float()
    elif fmt == "Q4_0":
        values = d * (_nibbles(blocks[..., 2:]).float() - 8)
    else:
        values = d * _nibbles(blocks[..., 4:]).float() + _fp16(blocks[..., 2:4])
    return values.reshape(w.shape[0], K)


def _round_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf (halves away from zero), computed as gguf's np_roundf does"""
    a = v.abs()
    floored = a.floor()
    return v.sign() * (floored + (2 * (a - floored)).floor())


def _as_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 (..., 1) -> its fp16 as (..., 2) bytes"""
    return v.to(torch.float16).view(torch.uint8)


def _reciprocal(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def quantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """A float matrix (N, K) in a block format: uint8 (N, K / 32 * bytes), the bytes of
    ggml's reference quantizers (quantize_row_q8_0_ref and friends), computed in float32."""
    check_format(fmt)
    N, K = w.shape
    if K % BLOCK:
        raise ValueError(f"K = {K} is not a multiple of the block size {BLOCK}")
    blocks = w.detach().to("cpu", torch.float32).reshape(N, K // BLOCK, BLOCK)
    if fmt == "Q8_0":
        d = blocks.abs().amax(-1, keepdim=True) / 127
        q = _round_away(blocks * _reciprocal(d)).to(torch.int8).view(torch.uint8)
        parts = [_as_bytes(d), q]
    else:
        if fmt == "Q4_0":  # the value of largest magnitude maps to -8
            d = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)) / -8
            q = (blocks * _reciprocal(d) + 8.5).trunc()
            head = [_as_bytes(d)]
        else:
            lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
            d = (hi - lo) / 15
            q = ((blocks - lo) * _reciprocal(d) + 0.5).trunc()
            head = [_as_bytes(d), _as_bytes(lo)]
        q = q.clamp(0, 15).to(torch.uint8)
        parts = [*head, q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)]
    return torch.cat(parts, dim=-1).reshape(N, K // BLOCK * block_bytes(fmt))


def _matmul(module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if module.kernel is not None:
        y = module.kernel(x, module.weight, module.fmt, bias)
        if y is not None:
            return y
    return F.linear(x, dequantize(module.weight, module.fmt, module.in_features).to(x.dtype), bias)


class QuantLinear(nn.Module):
    """x @ W.T (+ bias) with W held as quantized blocks (buffer `weight`, uint8)."""

    def __init__(self, in_features: int, out_features: int, fmt: str, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, check_format(fmt)
        self.register_buffer("weight", torch.empty(out_features, in_features // BLOCK * block_bytes(fmt),
                                                   dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.kernel = None  # a device's quantized matmul (x, blocks, fmt, bias) -> y or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _matmul(self, x, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.fmt}, bias={self.bias is not None}"


class QuantEmbedding(nn.Module):
    """Embedding rows held as quantized blocks; the looked-up rows come out in the model's
    float dtype (that of a one-element buffer, which `.to(dtype)` converts with the rest).
    `linear` is the tied output projection."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: str) -> None:
        super().__init__()
        self.num_embeddings, self.in_features, self.fmt = num_embeddings, embedding_dim, check_format(fmt)
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim // BLOCK * block_bytes(fmt),
                                                   dtype=torch.uint8))
        self.register_buffer("dtype_of_rows", torch.zeros(()), persistent=False)
        self.kernel = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize(self.weight[ids.reshape(-1)], self.fmt, self.in_features)
        return rows.to(self.dtype_of_rows.dtype).reshape(*ids.shape, self.in_features)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return _matmul(self, x, None)


QUANTIZABLE = (nn.Linear, nn.Embedding)


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """{parameter name: format} of a model's quantized weights."""
    return {f"{name}.weight": m.fmt for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}


def swap_in(model: nn.Module, formats: dict[str, str]) -> None:
    """Replace the modules whose weights `formats` names ({"layers.0.mlp.up_proj.weight":
    "Q4_1", ...}) by empty quantized ones of the same shape, to load blocks into. A tied
    output projection follows the embedding."""
    for pname, fmt in formats.items():
        name = pname.removesuffix(".weight")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr, None)
        if not isinstance(old, QUANTIZABLE):
            raise CheckpointError(f"{pname} is quantized ({fmt}) but names no linear or embedding layer")
        if isinstance(old, nn.Embedding):
            new = QuantEmbedding(old.num_embeddings, old.embedding_dim, fmt)
        else:
            new = QuantLinear(old.in_features, old.out_features, fmt, bias=old.bias is not None)
        if (old.weight.shape[-1] if isinstance(old, nn.Linear) else old.embedding_dim) % BLOCK:
            raise CheckpointError(f"{pname}: {fmt} needs rows of a multiple of {BLOCK} weights")
        float_dtype = old.weight.dtype
        setattr(parent, attr, new.to(device=old.weight.device))
        if isinstance(new, QuantEmbedding):
            new.dtype_of_rows = new.dtype_of_rows.to(float_dtype)
        elif new.bias is not None:
            new.bias.data = new.bias.data.to(float_dtype)


@torch.no_grad()
def quantize_model(model: nn.Module, fmt: str, embedding_fmt: str | None = "Q8_0") -> dict[str, str]:
    """Quantize a float model in place: every linear layer's weight to `fmt`, the embedding
    (and with it a tied output projection) to `embedding_fmt` (None: left in float), as
    llama.cpp's Q4 files do (8-bit embeddings). Returns {name: format} of what changed."""
    check_format(fmt)
    formats = {f"{name}.weight": fmt for name, m in model.named_modules() if type(m) is nn.Linear}
    if embedding_fmt is not None:
        formats.update({f"{name}.weight": check_format(embedding_fmt)
                        for name, m in model.named_modules() if type(m) is nn.Embedding})
    weights = {name: model.get_parameter(name).detach() for name in formats}
    swap_in(model, formats)
    for name, w in weights.items():
        model.get_buffer(name).copy_(quantize(w.float().cpu(), formats[name]))
    return formats
