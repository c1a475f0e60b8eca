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


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 from the last dimension's two bytes, as float32 (..., 1)."""
    return b.contiguous().view(torch.float16).float()


def dequantize(blocks: torch.Tensor, fmt: str, K: int) -> torch.Tensor:
    """float32 (N, K) from a quantized matrix's blocks (N, K / 32 * block bytes)."""
    nb = K // BLOCK
    b = blocks.reshape(blocks.shape[0], nb, block_bytes(fmt))
    if fmt == "Q8_0":
        w = _f16(b[..., :2]) * b[..., 2:].contiguous().view(torch.int8).float()
    else:
        qs = b[..., 4:] if fmt == "Q4_1" else b[..., 2:]
        q = torch.cat((qs & 0xF, qs >> 4), dim=-1).float()
        w = _f16(b[..., :2]) * q + _f16(b[..., 2:4]) if fmt == "Q4_1" else _f16(b[..., :2]) * (q - 8)
    return w.reshape(blocks.shape[0], K)


def _round_away(v: torch.Tensor) -> torch.Tensor:  # C's roundf: halves away from zero
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def quantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """The blocks (uint8, (N, K / 32 * block bytes)) of float weights (N, K), as llama.cpp's
    reference quantizers make them (float32 arithmetic, scales stored as float16)."""
    N, K = w.shape
    if K % BLOCK:
        raise CheckpointError(f"cannot quantize a matrix of {K} columns: not a multiple of {BLOCK}")
    check_format(fmt)
    x = w.float().reshape(N, K // BLOCK, BLOCK)
    if fmt == "Q8_0":
        d = x.abs().amax(-1, keepdim=True) / 127
        q = _round_away(x * torch.where(d == 0, 0, 1 / d)).to(torch.int8).view(torch.uint8)
        head = [d]
    elif fmt == "Q4_0":
        idx = x.abs().argmax(-1, keepdim=True)  # the first of the largest magnitude, with its sign
        d = x.gather(-1, idx) / -8
        q = torch.clamp((x * torch.where(d == 0, 0, 1 / d) + 8.5).trunc(), max=15).to(torch.uint8)
        head = [d]
    else:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        d = (hi - lo) / 15
        q = torch.clamp(((x - lo) * torch.where(d == 0, 0, 1 / d) + 0.5).trunc(), max=15).to(torch.uint8)
        head = [d, lo]
    if fmt != "Q8_0":
        q = q[..., :16] | (q[..., 16:] << 4)
    parts = [h.to(torch.float16).view(torch.uint8) for h in head] + [q]
    return torch.cat(parts, dim=-1).reshape(N, -1).contiguous()


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
