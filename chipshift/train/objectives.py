"""Training objectives: what a batch costs. The loop does not change between them.

An objective is any callable `objective(model, batch) -> (loss, metrics)`:
  - `loss`: a scalar tensor to back-propagate, already averaged over what the batch
    holds (the loop divides by the number of accumulation steps and averages over
    processes);
  - `metrics`: a dict of detached scalar tensors, averaged by the loop over micro-batches
    and logged (e.g. accuracy, margins); never synchronised with the host per step.
It may also define `tokens(batch) -> int`, the tokens a batch trains on (for tokens/s);
by default the loop counts `batch["input_ids"].numel()`.

`LanguageModeling` is the pre-training objective: next-token cross-entropy computed by
`chunked_cross_entropy`, which never materialises the (tokens x vocab) float32 logits.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from chipshift.model.memory import loss_chunk_rows


class Objective(Protocol):
    name: str

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


IGNORE_INDEX = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of (hidden @ weight.T) against labels, in row chunks.

    Each chunk's logits are computed in the compute dtype, reduced in float32, and turned
    at once into the gradients for hidden and weight (softmax - one-hot), so neither the
    full logits nor their float32 copy ever exist, and backward does no recomputation.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows: int, compute_dtype, need_grad: bool):
        n = hidden.shape[0]
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk_rows):
            hc, yc, vc = h[s:s + chunk_rows], labels[s:s + chunk_rows], valid[s:s + chunk_rows]
            logits = (hc @ w.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            y = yc.clamp(min=0)
            target = logits.gather(1, y[:, None]).squeeze(1)
            total += ((lse - target) * vc).sum()
            if need_grad:
                g = torch.exp_(logits.sub_(lse[:, None]))  # softmax, in place
                g[torch.arange(len(y), device=g.device), y] -= 1.0
                g.mul_((vc.float() / count)[:, None])
                g = g.to(compute_dtype)
                grad_h[s:s + chunk_rows] = g @ w
                if g.dtype == torch.float32:
                    grad_w.addmm_(g.T, hc)
                else:  # half-precision product, accumulated over chunks in float32
                    grad_w += (g.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        # scaled in place: a copy of the (vocab x hidden) gradient would come on top of all
        # the activations, at the very start of backward, which is a step's memory peak
        gh = _scaled(grad_h, grad_out, h_dtype) if ctx.needs_input_grad[0] else None
        gw = _scaled(grad_w, grad_out, w_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None


def _scaled(grad: torch.Tensor, by: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return grad.mul_(by) if grad.dtype == dtype else (grad * by).to(dtype)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_rows: int | None = None, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100; hidden (N, H), weight (V, H).
    `chunk_rows` default: `chipshift.model.memory.loss_chunk_rows`, the rule the memory
    estimate counts with."""
    compute_dtype = compute_dtype or hidden.dtype
    if chunk_rows is None:
        chunk_rows = loss_chunk_rows(weight.shape[0])
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                                labels.reshape(-1), chunk_rows, compute_dtype,
                                                torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad))


def reference_cross_entropy(model, input_ids, labels) -> torch.Tensor:
    """The plain path (full float32 logits), kept to test the chunked one against."""
    logits = model(input_ids).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


class LanguageModeling:
    """Next-token prediction over every position whose label is not -100."""

    name = "lm"

    def __init__(self, chunk_rows: int | None = None) -> None:
        self.chunk_rows = chunk_rows

    def __call__(self, model, batch):
        hidden = model.forward_hidden(batch["input_ids"])
        compute = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else model.output_weight.dtype
        loss = chunked_cross_entropy(hidden, model.output_weight, batch["labels"], self.chunk_rows, compute)
        return loss, {}
