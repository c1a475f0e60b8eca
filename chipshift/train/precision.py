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
    compute (tested against torch's own bf16 kernel); only the speed differs. Attention
    (`scaled_dot_product_attention`) runs the same way, saving only its half-precision
    inputs and recomputing in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from chipshift.devices.dtypes import HALF


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


class _UpcastAttention(torch.autograd.Function):
    """scaled_dot_product_attention on half q/k/v computed in float32, output rounded to
    half; saves only the half inputs and recomputes the float32 attention in backward."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, enable_gqa):
        ctx.save_for_backward(q, k, v, attn_mask)
        ctx.flags = (is_causal, enable_gqa)
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                             is_causal=is_causal, enable_gqa=enable_gqa)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, g):
        q, k, v, attn_mask = ctx.saved_tensors
        is_causal, enable_gqa = ctx.flags
        with torch.enable_grad():
            q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
            out = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=attn_mask,
                                                 is_causal=is_causal, enable_gqa=enable_gqa)
            gq, gk, gv = torch.autograd.grad(out, (q32, k32, v32), g.float())
        return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype), None, None, None


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
        if func is F.scaled_dot_product_attention and args[0].dtype in HALF and len(args) == 3 \
                and set(kwargs) <= {"attn_mask", "is_causal", "enable_gqa"}:
            return _UpcastAttention.apply(*args, kwargs.get("attn_mask"), kwargs.get("is_causal", False),
                                          kwargs.get("enable_gqa", False))
        if func in self.LINEAR and args[0].dtype in HALF and not kwargs:
            return _UpcastLinear.apply(args[0], args[1], args[2] if len(args) > 2 else None)
        if func in self.MATMUL and len(args) == 2 and not kwargs and isinstance(args[1], torch.Tensor) \
                and args[0].dtype in HALF and args[1].dtype == args[0].dtype:
            return _UpcastMatmul.apply(args[0], args[1])
        return func(*args, **kwargs)
