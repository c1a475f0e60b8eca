"""Float32 linears through oneDNN, for training on CPUs where its GEMM beats torch's default.

torch's CPU `mm` runs float32 through MKL (or OpenBLAS); oneDNN, which torch ships for its
bfloat16 GEMMs, has float32 kernels too but `mm` only reaches them in reduced-precision
modes (`torch.backends.mkldnn.matmul.fp32_precision`). On the 2-core AMD EPYC AVX512-BF16
CPU its float32 GEMM ran a training step's projections (2048 rows, K = 384 or 1024) at
150-200 GFLOP/s against MKL's 85-150; with the AVX2 instruction set forced the two were even.
The precision policy times both on the machine in hand (`PrecisionPolicy.fp32_gemm`) and
the training loop swaps these in only where oneDNN wins.

`linear(x, w, b)` computes x @ w.T (+ b) in strict float32 (no reduced-precision mode):

    forward        y  = x @ w.T     oneDNN
    backward       dx = dy @ w      oneDNN
                   dw = dy.T @ x    torch.mm (oneDNN measured slower here)

Eager, as an autograd Function; under `torch.compile`, as two opaque operators
(chipshift::onednn_linear, chipshift::onednn_linear_dx) that inductor calls as they are (its
own lowering of oneDNN's linear expects weights it has packed). A custom operator's first
call costs about 1.4 s, which a compiled run pays among its compile time and an eager one
never.

It returns None where it does not apply (not float32, not a CPU tensor, or oneDNN's operator
missing from this torch build): the caller then runs the plain path.
"""

from __future__ import annotations

import torch

_DNN = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def available() -> str | None:
    """None where oneDNN's float32 linear can run here, else why not."""
    if _DNN is None:
        return "this torch build has no oneDNN linear operator"
    return None


def mm_nt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (N, K) @ w (M, K).T -> (N, M), through oneDNN."""
    return _DNN(x, w, None, "none", [], "")


def mm_nn(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """g (N, M) @ w (M, K) -> (N, K), through oneDNN."""
    return _DNN(g, w.t(), None, "none", [], "")


def _grads(needs_input_grad, grad, x, w, dx_op):
    """(dx, dw) of x @ w.T: dx through `dx_op` (oneDNN), dw through torch's mm."""
    return (dx_op(grad, w) if needs_input_grad[0] else None,
            grad.t() @ x if needs_input_grad[1] else None)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return mm_nt(x, w)

    @staticmethod
    def backward(ctx, grad):
        return _grads(ctx.needs_input_grad, grad, *ctx.saved_tensors, mm_nn)


def _opaque(name: str, fn, out_shape):
    """`fn(a, b)` as a custom operator that torch.compile calls as it is."""
    op = torch.library.custom_op(f"chipshift::{name}", fn, mutates_args=(),
                                 schema="(Tensor a, Tensor b) -> Tensor")
    op.register_fake(lambda a, b: a.new_empty(out_shape(a, b)))
    return op


_linear = _opaque("onednn_linear", mm_nt, lambda x, w: (x.shape[0], w.shape[0]))
_linear_dx = _opaque("onednn_linear_dx", mm_nn, lambda g, w: (g.shape[0], w.shape[1]))
_linear.register_autograd(lambda ctx, grad: _grads(ctx.needs_input_grad, grad, *ctx.saved_tensors, _linear_dx),
                          setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    return _DNN is not None and x.dtype == w.dtype == torch.float32 and x.device.type == "cpu" \
        and w.device.type == "cpu" and w.dim() == 2 and x.shape[-1] == w.shape[1] \
        and type(w) in (torch.Tensor, torch.nn.Parameter)  # not a DTensor shard, not a subclass


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor | None:
    """x @ w.T + b through oneDNN, with gradients; None where it does not apply."""
    if not applies(x, w):
        return None
    op = _linear if torch.compiler.is_compiling() else _Linear.apply
    y = op(x.reshape(-1, x.shape[-1]).contiguous(), w.contiguous())
    y = y.view(*x.shape[:-1], w.shape[0])
    return y if b is None else y + b
