"""The training config: TOML sections checked before any work starts.

    [run]    out, seed, device, emulate, dtype, precision, half_matmul_upcast, compile,
             activation_checkpointing, attn_impl, parallel (ddp | fsdp), collective_timeout_s
    [model]  preset and/or any `ModelConfig` field (explicit fields override the preset)
    [data]   dir, tokenizer, seq_len, batch_size (global, in sequences), micro_batch
    [optim]  lr, min_lr_ratio, weight_decay, beta1, beta2, eps, grad_clip, warmup_steps,
             schedule (cosine | wsd | constant), decay_fraction (wsd), fused
    [train]  steps, log_every, eval_every, eval_batches, ckpt_every, keep_last, max_bad_steps,
             max_minutes

`--set section.key=value` overrides any value (the value is parsed as TOML, and read as a
plain string when it is not valid TOML). An unknown key or a bad value raises a
`ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from chipshift.errors import ChipshiftError, ConfigError
from chipshift.model.config import PRESETS, ModelConfig


@dataclass
class RunConfig:
    out: str = "runs/pretrain"
    seed: int = 0
    device: str = "auto"
    # compute with another chip's arithmetic on run.device: a numerics profile or chip
    # (chipshift/devices/numerics.toml, `--emulate`); "" = the device's own
    emulate: str = ""
    dtype: str = "auto"  # auto (the device layer decides) | float32 | bfloat16 | float16
    # how half precision is applied: autocast over fp32 params, or half params with an fp32
    # master copy in the optimizer ("master"); auto = master for bfloat16, autocast for float16
    precision: str = "auto"
    # run half-precision matmuls as fp32 GEMMs on half-rounded operands where the device's
    # native half GEMM is slower than fp32 (same numerics: exact products, fp32 accumulation)
    half_matmul_upcast: str = "auto"  # auto | on | off
    # torch.compile the model's forward: auto = the device layer decides (long fixed-shape
    # runs where inductor generates kernels, `PrecisionPolicy.compile_training`) | on | off
    compile: str = "auto"
    activation_checkpointing: bool = False
    attn_impl: str = "auto"  # auto (the device layer's choice: PrecisionPolicy.training_attention) | sdpa | math
    # float32 runs on a CPU: the linears' GEMMs through oneDNN or torch's default BLAS; auto = the
    # device layer's probe (PrecisionPolicy.fp32_gemm), kept by a resumed run
    fp32_gemm: str = "auto"  # auto | onednn | torch
    # under torchrun: replicate the model and average gradients ("ddp"), or shard parameters,
    # gradients and optimizer state over the processes with FSDP2 ("fsdp")
    parallel: str = "ddp"
    # under torchrun: a collective that waits longer than this ends the run, naming the rank
    # that stopped answering; it must exceed the longest wait of a healthy run (a checkpoint
    # write, an evaluation, a first compiled step); 1800 is torch's own default
    collective_timeout_s: float = 1800.0


@dataclass
class DataConfig:
    dir: str = ""
    tokenizer: str = ""  # default: the tokenizer saved with the data (DIR/tokenizer)
    seq_len: int = 256
    batch_size: int = 8  # sequences per optimizer step, over all processes
    micro_batch: int = 0  # sequences per forward pass per process; 0 = batch_size / processes


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying
    fused: str = "auto"  # auto (where the device has the fused kernel) | on | off


@dataclass
class TrainLoopConfig:
    steps: int = 1000
    log_every: int = 10
    eval_every: int = 100  # 0 = only at the end
    eval_batches: int = 8
    ckpt_every: int = 100  # 0 = only at the end and on a signal
    keep_last: int = 3
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    max_minutes: float = 0.0  # end the run (evaluate, checkpoint, plot) after this long; 0 = no limit


CHOICES = {
    "run.dtype": ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"),
    "run.precision": ("auto", "autocast", "master"),
    "run.half_matmul_upcast": ("auto", "on", "off"),
    "run.attn_impl": ("auto", "sdpa", "math"),
    "run.fp32_gemm": ("auto", "onednn", "torch"),
    "run.compile": ("auto", "on", "off"),
    "run.parallel": ("ddp", "fsdp"),
    "optim.schedule": ("cosine", "wsd", "constant"),
    "optim.fused": ("auto", "on", "off"),
}
POSITIVE = {"data.seq_len", "data.batch_size", "train.steps", "train.log_every", "train.keep_last",
            "train.max_bad_steps", "optim.lr", "train.eval_batches", "run.collective_timeout_s"}
NON_NEGATIVE = {"data.micro_batch", "train.eval_every", "train.ckpt_every", "optim.weight_decay",
                "optim.grad_clip", "optim.warmup_steps", "optim.eps", "run.seed", "train.max_minutes"}
SWITCHES = {"run.compile"}  # on | off | auto, also written as TOML true / false
UNIT_INTERVAL = {"optim.min_lr_ratio", "optim.beta1", "optim.beta2", "optim.decay_fraction"}

SECTIONS = {"run": RunConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainLoopConfig}
MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)} | {"preset"}


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The model shape: the preset, then explicit fields; the tokenizer's vocabulary
        size when neither names one."""
        spec = dict(self.model)
        name = spec.pop("preset", None)
        base = dict(PRESETS[name]) if name else {}
        if vocab_size is not None and "vocab_size" not in spec and (not name or "vocab_size" not in base):
            spec["vocab_size"] = vocab_size
        return ModelConfig.from_dict({**base, **spec})


def _type_ok(value, hint) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


def _check_value(key: str, value, hint) -> object:
    if key in SWITCHES and isinstance(value, bool):
        value = "on" if value else "off"
    if not _type_ok(value, hint):
        raise ConfigError(f"{key} = {value!r}: must be {hint.__name__}")
    if hint is float:
        value = float(value)
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key} = {value!r}: allowed: {', '.join(CHOICES[key])}")
    if key in POSITIVE and value <= 0:
        raise ConfigError(f"{key} = {value!r}: must be > 0")
    if key in NON_NEGATIVE and value < 0:
        raise ConfigError(f"{key} = {value!r}: must be >= 0")
    if key in UNIT_INTERVAL and not 0 <= value <= 1:
        raise ConfigError(f"{key} = {value!r}: must be between 0 and 1")
    return value


def parse_section(raw: dict, name: str, cls, lists: tuple = ()):
    """Validate table `[name]` of a parsed config into the dataclass `cls`; keys named in
    `lists` take a list of names (or a comma-separated string)."""
    section = raw.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"[{name}] must be a table, got {section!r}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in section.items():
        if key not in hints:
            raise ConfigError(f"unknown key {name}.{key} = {value!r}; allowed in [{name}]: "
                              f"{', '.join(hints)}")
        if key in lists:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name}.{key} = {value!r}: must be a list of names")
            values[key] = value
        else:
            values[key] = _check_value(f"{name}.{key}", value, hints[key])
    return cls(**values)


def read_toml(path: str | Path) -> dict:
    """A config file parsed as TOML, or a ConfigError saying why it cannot be."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def from_dict(raw: dict) -> TrainConfig:
    """Validate a nested dict (parsed TOML) into a TrainConfig."""
    unknown = sorted(set(raw) - set(SECTIONS) - {"model"})
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}]; allowed: {', '.join([*SECTIONS, 'model'])}")
    cfg = TrainConfig()
    for name, cls in SECTIONS.items():
        setattr(cfg, name, parse_section(raw, name, cls))
    model = raw.get("model", {"preset": "tiny"})
    for key, value in model.items():
        if key not in MODEL_KEYS:
            raise ConfigError(f"unknown key model.{key} = {value!r}; allowed in [model]: "
                              f"{', '.join(sorted(MODEL_KEYS))}")
    if "preset" in model and model["preset"] not in PRESETS:
        raise ConfigError(f"model.preset = {model['preset']!r}: allowed: {', '.join(PRESETS)}")
    cfg.model = dict(model)
    if cfg.run.emulate:
        from chipshift.devices.emulate import resolve
        try:
            resolve(cfg.run.emulate)
        except ChipshiftError as exc:
            raise ConfigError(f"run.emulate = {cfg.run.emulate!r}: {exc}") from None
    cfg.model_config()  # shape errors surface now, naming the model key
    if cfg.optim.warmup_steps > cfg.train.steps:
        raise ConfigError(f"optim.warmup_steps = {cfg.optim.warmup_steps}: must be <= train.steps "
                          f"= {cfg.train.steps}")
    return cfg


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings to a parsed TOML dict (values parsed as TOML)."""
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. optim.lr=1e-3")
        section, _, name = key.strip().partition(".")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        raw.setdefault(section, {})[name] = value
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    raw = read_toml(path) if path is not None else {}
    return from_dict(apply_overrides(raw, list(overrides)))


def save_resolved(cfg: TrainConfig, out: Path, extra: dict | None = None) -> Path:
    """Write the config as the run resolved it (plus derived facts) beside the run."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.resolved.json"
    path.write_text(json.dumps({**cfg.to_dict(), **(extra or {})}, indent=2))
    return path
