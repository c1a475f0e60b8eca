"""AdamW, the learning-rate schedule, and fp32 master weights for half-precision params.

Weight decay applies to matrices (projections, embeddings) and not to norms or biases.
The schedule is linear warm-up, then cosine decay to `min_lr_ratio * lr`, or WSD
(warm-up, stable, then linear decay over the last `decay_fraction` of the steps), or
constant.
"""

from __future__ import annotations

import math

import torch

from chipshift.train.config import OptimConfig


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return cfg.lr
        return floor + (cfg.lr - floor) * (1 - (step - decay_start + 1) / decay_steps)
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_adamw(named_params: list[tuple[str, torch.nn.Parameter]], cfg: OptimConfig,
                fused: bool) -> torch.optim.AdamW:
    decay = [p for n, p in named_params if p.ndim >= 2]
    no_decay = [p for n, p in named_params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused or None, foreach=None if fused else True)


class MasterWeights:
    """Float32 copies of a model's half-precision parameters.

    The model computes with its half params; after backward, `to_master_grads` moves the
    gradients into the float32 copies, the optimizer updates those, and `to_model`
    rounds the result back into the model.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.names, self.params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
        self.master = [torch.nn.Parameter(p.detach().float().clone()) for p in self.params]

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(zip(self.names, self.master))

    @torch.no_grad()
    def to_master_grads(self) -> None:
        """Each half gradient into its float32 master's, then dropped: the step's peak holds the
        float32 gradients and one half gradient, not both sets whole."""
        for m, p in zip(self.master, self.params):
            if m.grad is None:
                m.grad = torch.empty_like(m)
            if p.grad is None:
                m.grad.zero_()
            else:
                m.grad.copy_(p.grad)
                p.grad = None

    @torch.no_grad()
    def to_model(self) -> None:
        torch._foreach_copy_(list(self.params), self.master)
