"""LoRA: low-rank adapters on the attention and MLP projections, merged on save.

A targeted `nn.Linear` (q/k/v/o_proj, gate/up/down_proj) becomes a `LoRALinear`: its
`weight` (and bias) stay as they were and are frozen, and it learns two small matrices

    y = x W^T + b + dropout(x) A^T B^T * (alpha / rank),   A: (rank, in), B: (out, rank)

with A ~ N(0, 1/rank) from a seeded generator and B = 0, so training starts from exactly the
base model. Everything else in the model (embeddings, norms) is frozen too.

Checkpoints stay plain chipshift checkpoints with clean Hugging Face names: a LoRA model
is saved merged (W + B A * alpha / rank), so `generate`, `serve`, `export` and every other
tool load it unchanged. The training loop keeps the adapter matrices themselves in its
training state (`adapter.<module>.lora_A/B`) and restores them on `--resume`; the frozen
base weights come back from the `init` checkpoint. The model carries its adapter as
`model.adapter` (a `LoRA`), which is how the loop knows to save it this way.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from chipshift.errors import ConfigError
from chipshift.model.transformer import Transformer

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(TARGETS))

    def check(self) -> None:
        if self.rank <= 0:
            raise ConfigError(f"lora.rank = {self.rank}: must be > 0")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha = {self.alpha}: must be > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout = {self.dropout}: must be in [0, 1)")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"lora.targets = {self.targets!r}: choose from {', '.join(TARGETS)}")


class LoRALinear(nn.Linear):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.zeros(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        self.scale = alpha / rank
        self.dropout = dropout
        self.merged: torch.Tensor | None = None  # W + B A * scale while `LoRA.merged()` lasts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged is not None:
            return F.linear(x, self.merged, self.bias)
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        y = F.linear(x, self.weight, self.bias)
        low = F.linear(h, self.lora_A)
        # y + scale * low @ B.T as one GEMM (its epilogue adds and scales): no product
        # tensor, no separate multiply and add over the output, which cost as much as
        # the low-rank GEMMs themselves in decode steps and short GRPO rows
        out = torch.addmm(y.reshape(-1, y.shape[-1]), low.reshape(-1, low.shape[-1]), self.lora_B.t(),
                          alpha=self.scale)
        return out.view(y.shape)

    def delta(self) -> torch.Tensor:
        """The update B A * scale, in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale


class LoRA:
    """The adapters of one model: named `LoRALinear` modules (clean module names)."""

    def __init__(self, model: Transformer, cfg: LoRAConfig) -> None:
        self.model, self.cfg = model, cfg

    def modules(self) -> dict[str, LoRALinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, LoRALinear)}

    @contextlib.contextmanager
    def disabled(self):
        """The base model alone, for as long as the context lasts (GRPO's reference)."""
        mods = list(self.modules().values())
        scales = [m.scale for m in mods]
        for m in mods:
            m.scale = 0.0
        try:
            yield self.model
        finally:
            for m, scale in zip(mods, scales):
                m.scale = scale

    def can_merge(self) -> bool:
        """Whether `merged()` keeps the update: the weights are float32 (float32 training or
        float32 master weights). A half-precision weight would round most of a small update
        away, and the merged model would no longer be the one being trained."""
        return all(m.weight.dtype == torch.float32 for m in self.modules().values())

    @contextlib.contextmanager
    @torch.no_grad()
    def merged(self):
        """For as long as the context lasts, every adapted layer runs one GEMM with its
        merged weight W + B A * scale (computed on entry, into a buffer kept for the next
        time) instead of three: for inference on the live model (GRPO's rollouts), where the
        low-rank GEMMs and the add cost as much as the layer itself. The same function up to
        float rounding; no gradients (the weights are not leaves). Float32 weights only
        (`can_merge`)."""
        mods = list(self.modules().values())
        if any(m.weight.dtype != torch.float32 for m in mods):  # `can_merge`, on the modules in hand
            dtypes = sorted({str(m.weight.dtype) for m in mods})
            raise ValueError(f"LoRA.merged needs float32 weights; these are {dtypes}")
        for m in mods:
            buf = getattr(m, "_merge_buffer", None)
            if buf is None or buf.shape != m.weight.shape or buf.device != m.weight.device:
                buf = m._merge_buffer = torch.empty_like(m.weight)
            m.merged = torch.addmm(m.weight, m.lora_B, m.lora_A, alpha=m.scale, out=buf)
        try:
            yield self.model
        finally:
            for m in mods:
                m.merged = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter matrices, "<module>.lora_A" / "<module>.lora_B", on the CPU."""
        out = {}
        for name, m in self.modules().items():
            out[f"{name}.lora_A"] = m.lora_A.detach().to("cpu").contiguous().clone()
            out[f"{name}.lora_B"] = m.lora_B.detach().to("cpu").contiguous().clone()
        return out

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        mods = self.modules()
        want = {f"{n}.lora_{ab}" for n in mods for ab in "AB"}
        if set(tensors) != want:
            missing, extra = sorted(want - set(tensors)), sorted(set(tensors) - want)
            raise ConfigError(f"LoRA adapter does not match the model (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}); keep the [lora] settings of the run")
        for name, m in mods.items():
            m.lora_A.copy_(tensors[f"{name}.lora_A"])
            m.lora_B.copy_(tensors[f"{name}.lora_B"])

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """Clean Hugging Face names, every adapter folded into its weight (CPU tensors)."""
        sd = {}
        for k, v in self.model.state_dict().items():
            if k.endswith((".lora_A", ".lora_B")):
                continue
            sd[k.removeprefix("_orig_mod.")] = v.detach().to("cpu").contiguous()
        for name, m in self.modules().items():
            key = f"{name}.weight"
            sd[key] = (sd[key].float() + m.delta().to("cpu")).to(m.weight.dtype).contiguous()
        return sd


def apply_lora(model: Transformer, cfg: LoRAConfig, seed: int = 0) -> LoRA:
    """Freeze `model` and put adapters on the target projections, in place; the model
    carries the result as `model.adapter`."""
    cfg.check()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and not isinstance(mod, LoRALinear)
               and name.rsplit(".", 1)[-1] in cfg.targets]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        lora = LoRALinear(mod, cfg.rank, cfg.alpha, cfg.dropout)
        with torch.no_grad():
            a = torch.empty(lora.lora_A.shape).normal_(0.0, 1.0 / math.sqrt(cfg.rank), generator=gen)
            lora.lora_A.copy_(a.to(lora.lora_A.dtype))
        setattr(model.get_submodule(parent_name), child, lora)
    model.adapter = LoRA(model, cfg)
    return model.adapter


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its weight and put plain `nn.Linear`s back, in place."""
    for name, m in list(model.adapter.modules().items()):
        parent_name, _, child = name.rpartition(".")
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                          device=m.weight.device, dtype=m.weight.dtype)
        plain.weight.copy_((m.weight.float() + m.delta()).to(m.weight.dtype))
        if m.bias is not None:
            plain.bias.copy_(m.bias)
        setattr(model.get_submodule(parent_name), child, plain)
    del model.adapter
    for p in model.parameters():
        p.requires_grad_(True)
    return model
