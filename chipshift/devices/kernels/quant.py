"""Weight-only quantized linears on the CPU: weights held in GGUF block formats (see
chipshift.model.quant for the layouts, `quantize` and `dequantize`), bfloat16 activations
in and out.

`quant_linear_many` runs quant.c (llama.cpp's method: x quantized to 8 bits per call,
integer dot products per block; see there for its error) where the kernel library builds,
and otherwise the plain path: the weights dequantized by `dequantize` and a float32 linear.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from chipshift.devices.kernels import MAX_MANY, _library, bf16_linear_status
from chipshift.model.quant import BLOCK, FORMATS, _blocks, _check_matrix, block_bytes, dequantize


@functools.cache
def _kernels() -> ctypes.CDLL:
    lib = _library()
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    lib.quant_linear_many.argtypes = [P, ctypes.c_int, P, P, P, P, I64, I64, ctypes.c_int]
    lib.quant_rows.argtypes = [P, ctypes.c_int, I64, P, I64, P]
    lib.quant_linear_many.restype = lib.quant_rows.restype = None
    return lib


def quant_linear_many(x: torch.Tensor, weights: list[torch.Tensor], fmts: list[str]) -> list[torch.Tensor]:
    """[x @ dequantize(w).T for each w] for bfloat16 x (..., K), each output bfloat16
    (..., N_i), in one pass over all the weights (q/k/v, gate/up). The kernel's x is
    quantized to 8 bits (quant.c); the plain path, where the kernel library is unavailable,
    multiplies the dequantized weights in float32."""
    count = len(weights)
    if count != len(fmts) or not 1 <= count <= MAX_MANY:
        raise ValueError(f"1 to {MAX_MANY} matrices, one format each; got {count} and {len(fmts)}")
    K = x.shape[-1]
    for w, fmt in zip(weights, fmts):
        _check_matrix(w, fmt, K)
    if x.dtype != torch.bfloat16:
        raise ValueError(f"x is bfloat16; got {x.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), K)
    if bf16_linear_status() is not None:
        return [F.linear(x2.float(), dequantize(w, fmt, K)).to(torch.bfloat16).view(*lead, w.shape[0])
                for w, fmt in zip(weights, fmts)]
    x2 = x2.contiguous()
    M = x2.shape[0]
    ws = [w if w.is_contiguous() else w.contiguous() for w in weights]
    ys = [torch.empty(M, w.shape[0], dtype=torch.bfloat16) for w in ws]
    if M:
        arr = ctypes.c_void_p * count
        _kernels().quant_linear_many(
            x2.data_ptr(), count, arr(*(w.data_ptr() for w in ws)), (ctypes.c_int * count)(*(FORMATS[f][0] for f in fmts)),
            arr(*(y.data_ptr() for y in ys)), (ctypes.c_int64 * count)(*(w.shape[0] for w in ws)), M, K,
            torch.get_num_threads())
    return ys if len(lead) == 1 else [y.view(*lead, y.shape[1]) for y in ys]


def quant_linear(x: torch.Tensor, w: torch.Tensor, fmt: str) -> torch.Tensor:
    """x @ dequantize(w).T (see quant_linear_many)."""
    return quant_linear_many(x, [w], [fmt])[0]


def quant_rows(w: torch.Tensor, fmt: str, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (any shape) of a quantized matrix (an embedding) as bfloat16 (*ids.shape, K)."""
    K = w.shape[-1] // block_bytes(fmt) * BLOCK  # checked by _blocks
    blocks = _blocks(w, fmt, K)
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    if flat.numel() and not (0 <= int(flat.min()) and int(flat.max()) < w.shape[0]):
        raise IndexError(f"row ids {int(flat.min())}..{int(flat.max())} outside 0..{w.shape[0] - 1}")
    if bf16_linear_status() is not None:
        out = dequantize(w[flat], fmt, K).to(torch.bfloat16)
    else:
        out = torch.empty(flat.numel(), K, dtype=torch.bfloat16)
        if flat.numel():
            _kernels().quant_rows(blocks.data_ptr(), FORMATS[fmt][0], K, flat.data_ptr(), flat.numel(), out.data_ptr())
    return out.view(*ids.shape, K)
