"""Weight-only quantized layers: weights held as GGUF blocks (Q8_0, Q4_0, Q4_1), as they are.

The formats themselves (block layouts, `quantize` and `dequantize`, byte for byte those of
llama.cpp's reference code) live with the kernels that multiply them, in
`chipshift.devices.kernels.quant`, and are re-exported here. A GGUF file imported with
`--keep-quantized` keeps its blocks byte for byte; `quantize_model` makes the same bytes
from float weights (`chipshift quantize`).

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

from chipshift.devices.kernels.quant import (BLOCK, FORMATS, block_bytes, check_format,  # noqa: F401
                                             columns, dequantize, quantize)
from chipshift.errors import CheckpointError


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

    linear = forward  # as QuantEmbedding's: the output projection, tied or not, is `.linear`

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
    return {f"{name}.weight": m.fmt for name, m in model.named_modules()
            if isinstance(m, (QuantLinear, QuantEmbedding))}


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
        if old.weight.shape[-1] % BLOCK:
            raise CheckpointError(f"{pname}: {fmt} needs rows of a multiple of {BLOCK} weights")
        if isinstance(old, nn.Embedding):
            new = QuantEmbedding(old.num_embeddings, old.embedding_dim, fmt)
        else:
            new = QuantLinear(old.in_features, old.out_features, fmt, bias=old.bias is not None)
        # `.to` converts the float tensors (bias, dtype_of_rows) and leaves the uint8 blocks
        setattr(parent, attr, new.to(device=old.weight.device, dtype=old.weight.dtype))


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
