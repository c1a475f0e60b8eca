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


class LossWorkspace:
    """The chunked cross-entropy's scratch buffers (one chunk's logits in float32 and in the
    compute dtype, a float32 weight-gradient accumulator), kept from one step to the next.
    A fresh buffer of this size (hundreds of MiB) comes from the operating system as new
    pages on every allocation, and touching them cost the M shape about 0.7 s of a 6 s step
    on a 2-core CPU; reused, the pages stay mapped. The buffers exist during the loss
    anyway, when activations peak, so keeping them does not raise a step's peak."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A buffer of at least `shape` rows (the leading dimension), its view of `shape`."""
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.device != device or buf.shape[1:] != shape[1:] \
                or buf.shape[0] < shape[0]:
            self._buffers.pop(name, None)  # the old one goes before the new one comes
            buf = self._buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf[:shape[0]]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of (hidden @ weight.T) against labels, in row chunks.

    Each chunk's logits are computed in the compute dtype, reduced in float32, and turned
    at once into the gradients for hidden and weight (softmax - one-hot), so neither the
    full logits nor their float32 copy ever exist, and backward does no recomputation.
    The chunk's buffers come from a `LossWorkspace`, and the softmax is formed in place
    (max, exp, sum) with no temporary of the chunk's size.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows: int, compute_dtype, need_grad: bool, ws: LossWorkspace,
                gemms=None):
        n, dev = hidden.shape[0], hidden.device
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        half = compute_dtype != torch.float32
        chunks = range(0, n, chunk_rows)
        # half-precision weight-gradient products over several chunks add up in a float32
        # workspace accumulator; otherwise the first chunk's product is the gradient itself
        accumulate_half = half and len(chunks) > 1
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = None
        total = torch.zeros((), dtype=torch.float32, device=dev)
        for s in chunks:
            hc, yc, vc = h[s:s + chunk_rows], labels[s:s + chunk_rows], valid[s:s + chunk_rows]
            r, vocab = hc.shape[0], w.shape[0]  # the first chunk is the largest: it sizes the buffers
            if gemms is not None:  # the device's float32 GEMM (float32 only) writes its own output
                x = gemms[0](hc, w)
            elif half:  # the GEMM writes the compute dtype; its float32 copy is reduced
                x = ws.get("logits", (r, vocab), torch.float32, dev)
                low = ws.get("logits_half", (r, vocab), compute_dtype, dev)
                torch.mm(hc, w.T, out=low)
                x.copy_(low)
            else:
                torch.mm(hc, w.T, out=(x := ws.get("logits", (r, vocab), torch.float32, dev)))
            y = yc.clamp(min=0)
            target = x.gather(1, y[:, None]).squeeze(1)
            top = x.amax(1)
            sums = torch.exp_(x.sub_(top[:, None])).sum(1)
            total += ((top + sums.log() - target) * vc).sum()
            if not need_grad:
                continue
            weight_rows = vc.float() / count  # d loss / d logits = (softmax - one-hot) * weight_row
            x.mul_((weight_rows / sums)[:, None])
            x[torch.arange(r, device=dev), y] -= weight_rows
            g = low.copy_(x) if half else x
            if gemms is not None:
                grad_h[s:s + r] = gemms[1](g, w)
            else:
                torch.mm(g, w, out=grad_h[s:s + r])
            if not accumulate_half:
                grad_w = g.T @ hc if grad_w is None else grad_w.addmm_(g.T, hc)
                continue
            part = torch.mm(g.T, hc, out=ws.get("grad_w_half", tuple(w.shape), compute_dtype, dev))
            if grad_w is None:
                grad_w = ws.get("grad_w", tuple(w.shape), torch.float32, dev).copy_(part)
            else:
                grad_w.add_(part)
        if need_grad:  # a fresh tensor in the weight's dtype: the workspace's accumulator stays behind
            grad_w = torch.zeros(weight.shape, dtype=weight.dtype, device=dev) if grad_w is None else \
                grad_w.to(weight.dtype, copy=accumulate_half)
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
        return gh, gw, None, None, None, None, None, None


def _scaled(grad: torch.Tensor, by: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return grad.mul_(by) if grad.dtype == dtype else (grad * by).to(dtype)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_rows: int | None = None, compute_dtype: torch.dtype | None = None,
                          workspace: LossWorkspace | None = None, gemms=None) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100; hidden (N, H), weight (V, H).
    `chunk_rows` default: `chipshift.model.memory.loss_chunk_rows`, the rule the memory
    estimate counts with. `workspace`: buffers kept across calls (an objective holds one);
    without it the call allocates its own. `gemms`: float32 (x @ w.T, g @ w) the device layer
    chose for the model (`Transformer.head_gemms`), else torch.mm."""
    compute_dtype = compute_dtype or hidden.dtype
    if chunk_rows is None:
        chunk_rows = loss_chunk_rows(weight.shape[0])
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                                labels.reshape(-1), chunk_rows, compute_dtype, need_grad,
                                                workspace or LossWorkspace(),
                                                gemms if compute_dtype == torch.float32 else None)


def reference_cross_entropy(model, input_ids, labels) -> torch.Tensor:
    """The plain path (full float32 logits), kept to test the chunked one against."""
    logits = model(input_ids).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


class LanguageModeling:
    """Next-token prediction over every position whose label is not -100."""

    name = "lm"

    def __init__(self, chunk_rows: int | None = None) -> None:
        self.chunk_rows = chunk_rows
        self.workspace = LossWorkspace()

    def __call__(self, model, batch):
        hidden = model.forward_hidden(batch["input_ids"])
        compute = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else model.output_weight.dtype
        loss = chunked_cross_entropy(hidden, model.output_weight, batch["labels"], self.chunk_rows, compute,
                                     self.workspace, model.head_gemms)
        return loss, {}
