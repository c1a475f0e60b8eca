"""How a run computes in half precision, decided once per run and logged.

Three pieces, chosen from the compute dtype the device layer names:
  - `autocast`: float32 parameters, matmuls autocast to the half dtype (float16 always
    uses this, with a gradient scaler);
  - `master`: half-precision parameters, float32 master weights in the optimizer
    (bfloat16 default: no per-step weight casts, half the activation memory);
  - `HalfMatmulUpcast`: where the device's native half GEMM is slower than its float32
    GEMM (CPUs without AVX512-BF16 or AMX emulate it), each half-precision matmul runs as
    a float32 GEMM on the half-precision operands and rounds its output to the half
    dtype. Products of half values are exact in float32 and the accumulation is float32,
    which is what a native bf16 GEMM computes too, so the numbers are those of bf16
    compute (tested against torch's own bf16 kernel); only the speed differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

HALF = (torch.bfloat16, torch.float16)


class _UpcastLinear(torch.autograd.Function):
    """y = x @ w.T (+ b) for half x, w: float32 GEMMs, half inputs saved, half outputs."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        y = F.linear(x.float(), w.float(), None if b is None else b.float())
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        g = gy.float()
        gx = (g @ w.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1]).float()).to(w.dtype)
        gb = g.reshape(-1, g.shape[-1]).sum(0).to(x.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


class _UpcastMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return (a.float() @ b.float()).to(a.dtype)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        g = g.float()
        ga = (g @ b.float().transpose(-1, -2)).to(a.dtype) if ctx.needs_input_grad[0] else None
        gb = (a.float().transpose(-1, -2) @ g).to(b.dtype) if ctx.needs_input_grad[1] else None
        return _unbroadcast(ga, a.shape), _unbroadcast(gb, b.shape)


def _unbroadcast(grad, shape):
    if grad is None or grad.shape == shape:
        return grad
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    dims = [i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    return grad.sum(dims, keepdim=True) if dims else grad


class HalfMatmulUpcast(TorchFunctionMode):
    """Within this mode, linear/matmul on half-precision tensors run as described above."""

    LINEAR = {F.linear}
    MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.mm}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.LINEAR and args[0].dtype in HALF and not kwargs:
            return _UpcastLinear.apply(args[0], args[1], args[2] if len(args) > 2 else None)
        if func in self.MATMUL and len(args) == 2 and not kwargs and isinstance(args[1], torch.Tensor) \
                and args[0].dtype in HALF and args[1].dtype == args[0].dtype:
            return _UpcastMatmul.apply(args[0], args[1])
        return func(*args, **kwargs)
