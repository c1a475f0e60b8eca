"""Weight-only quantized linears on the CPU, on GGUF blocks; bfloat16 activations in and out.

A quantized matrix of N rows and K columns is a uint8 tensor (N, K / 32 * block bytes): each
row is K / 32 blocks of 32 weights in llama.cpp's layout (little-endian):

    Q8_0   float16 d, 32 int8 q                          w = d * q              34 bytes
    Q4_0   float16 d, 16 bytes of 4-bit q                w = d * (q - 8)        18 bytes
    Q4_1   float16 d, float16 m, 16 bytes of 4-bit q     w = d * q + m          20 bytes

(4-bit: byte j holds weight j in its low nibble and weight j + 16 in its high one).
`quantize` writes the exact bytes of ggml's reference quantizers and `dequantize` reads them
as ggml does (the tests hold both to the `gguf` package); the model's quantized layers
(chipshift.model.quant) use them.

`quant_linear_many` runs quant.c (llama.cpp's method: x quantized to 8 bits per call,
integer dot products per block; see there for its error) where the kernel library builds,
and otherwise the plain path: the weights dequantized by `dequantize` and a float32 linear.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from chipshift.devices.kernels import MAX_MANY, _library, bf16_linear_status
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


def columns(blocks: torch.Tensor, fmt: str) -> int:
    """K, the weights per row of a quantized matrix (N, K / 32 * block bytes)."""
    return blocks.shape[-1] // block_bytes(fmt) * BLOCK


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
        _library().quant_linear_many(
            x2.data_ptr(), count, arr(*(w.data_ptr() for w in ws)),
            (ctypes.c_int * count)(*(FORMATS[f][0] for f in fmts)),
            arr(*(y.data_ptr() for y in ys)), (ctypes.c_int64 * count)(*(w.shape[0] for w in ws)), M, K,
            torch.get_num_threads())
    return ys if len(lead) == 1 else [y.view(*lead, y.shape[1]) for y in ys]


def quant_linear(x: torch.Tensor, w: torch.Tensor, fmt: str) -> torch.Tensor:
    """x @ dequantize(w).T (see quant_linear_many)."""
    return quant_linear_many(x, [w], [fmt])[0]


def quant_rows(w: torch.Tensor, fmt: str, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (any shape) of a quantized matrix (an embedding) as bfloat16 (*ids.shape, K)."""
    K = columns(w, fmt)  # checked by _blocks
    blocks = _blocks(w, fmt, K)
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    if flat.numel() and not (0 <= int(flat.min()) and int(flat.max()) < w.shape[0]):
        raise IndexError(f"row ids {int(flat.min())}..{int(flat.max())} outside 0..{w.shape[0] - 1}")
    if bf16_linear_status() is not None:
        out = dequantize(w[flat], fmt, K).to(torch.bfloat16)
    else:
        out = torch.empty(flat.numel(), K, dtype=torch.bfloat16)
        if flat.numel():
            _library().quant_rows(blocks.data_ptr(), FORMATS[fmt][0], K, flat.data_ptr(), flat.numel(),
                                  out.data_ptr())
    return out.view(*ids.shape, K)
