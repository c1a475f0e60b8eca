"""The one training loop: pre-training, SFT and DPO differ only in their objective and
data stream.

Public API:
    train(cfg, objective=None, train_stream=None, val_stream=None, *, resume=False,
          model=None, tokenizer_dir=None, bytes_per_token=None) -> TrainResult
        A whole run: set-up (device, dtype, processes, model, optimizer), checkpoints
        every N steps and on SIGTERM/SIGINT, exact `--resume`, evaluation, metrics and
        the loss-curve PNG. With no streams it pre-trains on `cfg.data.dir`.
    Trainer(cfg, objective, train_stream, ...).train_step() -> StepStats
        One optimizer step (forward, backward, gradient average over processes, clip,
        AdamW, zero_grad): the unit `chipshift bench` times. Under torchrun the model is
        replicated (run.parallel = "ddp") or sharded with FSDP2 ("fsdp"); see `distributed`.

An objective is `objective(model, batch) -> (loss, metrics)` (see `objectives`); a stream
is anything with `batch(start, count) -> dict of tensors` (see `data`).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from chipshift.devices import (HALF, Device, dtype_name, get_device, keep_freed_host_memory,
                               return_freed_host_memory)
from chipshift.devices.emulate import refuse
from chipshift.errors import ChipshiftError, ConfigError
from chipshift.model.checkpoint import state_dict_for_save
from chipshift.model.config import ModelConfig
from chipshift.model.flops import model_flops_per_token
from chipshift.model.memory import training_memory
from chipshift.model.transformer import Transformer, build_model
from chipshift.train import distributed, state
from chipshift.train.config import TrainConfig, save_resolved
from chipshift.train.data import Stream, TokenWindows, rank_slice
from chipshift.train.metrics import MetricsLog, plot_loss
from chipshift.train.objectives import LanguageModeling, Objective
from chipshift.train.optim import MasterWeights, build_adamw, lr_at
from chipshift.train.precision import HalfMatmulUpcast


@dataclass
class StepStats:
    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    skipped: bool
    metrics: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped: str  # "done" | "time limit" | "signal"
    checkpoint: Path | None
    last_val_loss: float | None = None
    skipped_steps: int = 0
    png: Path | None = None
    is_main: bool = True  # False on the other processes of a torchrun group


class Trainer:
    """A model, its optimizer and the run's state, on one process of a (maybe 1-process) group."""

    def __init__(self, cfg: TrainConfig, objective: Objective, train_stream: Stream,
                 val_stream: Stream | None = None, *, model: Transformer | None = None,
                 model_cfg: ModelConfig | None = None, device: Device | None = None,
                 world: distributed.World | None = None, log=print) -> None:
        self.cfg, self.objective = cfg, objective
        self.train_stream, self.val_stream = train_stream, val_stream
        self.device = device or get_device(cfg.run.device, cfg.run.emulate)
        self.world = world or distributed.World()
        self.log = log if self.world.is_main else (lambda *a, **k: None)
        self._resolve_precision()
        self._resolve_layout()
        self._build_model(model, model.cfg if model is not None else model_cfg)
        self._build_optimizer()
        self.step = 0
        self.cursor = 0  # samples consumed over all processes
        self.bad_in_row = 0
        self.bad_total = 0
        self.scaler_skips = 0  # float16: steps the loss scaler skipped (inf/nan gradients, scale lowered)
        self.saved_step = -1
        # measured now, before any restore: the CPU probe draws from the global RNG
        self.peak_flops, self.peak_source = self.device.precision.mfu_ceiling(self.dtype, self.upcast)

    # -- set-up steps ------------------------------------------------------------------
    def _resolve_precision(self) -> None:
        """One decision per run, from the device's precision policy, logged: the compute
        dtype, how half precision is held (master weights or autocast), and whether half
        matmuls run as float32 GEMMs."""
        run, policy = self.cfg.run, self.device.precision
        self.dtype, reason = policy.compute_dtype(run.dtype)
        precision = run.precision
        if precision == "auto":
            precision = "master" if self.dtype == torch.bfloat16 else "autocast"
        if self.dtype == torch.float16 and precision == "master":
            raise ConfigError("run.precision = 'master' with float16: float16 needs loss scaling, "
                              "use run.precision = 'autocast'")
        self.precision = precision if self.dtype in HALF else "float32"
        upcast = policy.matmul_upcast(self.dtype) if self.precision == "master" else None
        setting = run.half_matmul_upcast
        if setting == "auto":
            # not under activation checkpointing: its recomputation in backward runs outside
            # the function mode that routes the matmuls, so the two passes would differ
            setting = "on" if upcast is not None and upcast.value and not run.activation_checkpointing else "off"
        if setting == "on" and self.precision != "master":
            raise ConfigError(f"run.half_matmul_upcast = 'on' needs run.precision = 'master' "
                              f"(the run computes in {self.precision})")
        if setting == "on" and run.activation_checkpointing:
            raise ConfigError("run.half_matmul_upcast = 'on' cannot be combined with "
                              "run.activation_checkpointing = true; set one of them off")
        self.upcast = setting == "on"
        if (profile := self.device.emulation) is not None:
            if run.compile == "on":
                raise refuse(profile, "run.compile = 'on'", "emulation runs eager (its function mode is not traced)")
            if run.activation_checkpointing:
                raise refuse(profile, "run.activation_checkpointing = true",
                             "the recomputation in backward would run outside the emulation")
        line = f"compute dtype: {reason}; precision: {self.precision}"
        if self.upcast:
            line += "; " + (upcast.reason if run.half_matmul_upcast == "auto" else
                            "half matmuls as float32 GEMMs on half operands (run.half_matmul_upcast = 'on')")
        self.log(line)

    def _resolve_layout(self) -> None:
        """Batch layout (global batch = micro-batch x accumulation x processes) and whether
        FSDP2 shards (only with more than one process)."""
        cfg = self.cfg
        B, W = cfg.data.batch_size, self.world.size
        self.micro = cfg.data.micro_batch or max(1, B // W)
        if B % (self.micro * W):
            raise ConfigError(f"data.batch_size = {B}: must be a multiple of data.micro_batch "
                              f"({self.micro}) x processes ({W})")
        self.accum = B // (self.micro * W)
        self.sharded = cfg.run.parallel == "fsdp" and self.world.active
        if cfg.run.parallel == "fsdp":
            self.log(f"parallel: fsdp (FSDP2), parameters, gradients and AdamW moments sharded over {W} processes"
                     if self.sharded else "parallel: fsdp with one process: nothing to shard, the model runs whole")
        if self.sharded and cfg.train.eval_batches % W:
            raise ConfigError(f"train.eval_batches = {cfg.train.eval_batches}: with run.parallel = 'fsdp' it must be "
                              f"a multiple of the {W} processes (each runs the sharded model equally often)")
        if self.sharded and self.dtype == torch.float16:
            raise ConfigError("run.parallel = 'fsdp' with float16: its loss scaler would judge each shard's "
                              "gradients alone; use run.dtype = 'bfloat16' or 'float32', or run.parallel = 'ddp'")

    def _build_model(self, model: Transformer | None, model_cfg: ModelConfig) -> None:
        """The model on the device, in the run's parameter dtype, set up for training
        (checkpointing, attention, compile, FSDP2 sharding)."""
        cfg, dev = self.cfg, self.device
        self.fixed_shapes = not getattr(self.train_stream, "variable_shapes", False)
        if dev.is_cpu:
            # fixed-shape batches (pre-training) allocate the same blocks every step: the heap
            # keeps them, with no page faults; varying shapes would grow it step after step
            (keep_freed_host_memory if self.fixed_shapes else return_freed_host_memory)()
        dev.manual_seed(cfg.run.seed)
        if cfg.run.attn_impl == "auto":
            attention = dev.precision.training_attention(self.dtype, self.upcast, self.fixed_shapes)
            self.attn_impl = attention.value
            self.log(f"attention: {attention.value} ({attention.reason})")
        else:
            self.attn_impl = cfg.run.attn_impl
        self._check_memory(model_cfg)
        if model is None:
            model = build_model(model_cfg, dev.torch_device, torch.float32, seed=cfg.run.seed)
        # "master" precision: half-precision params with float32 copies in the optimizer; sharded,
        # the float32 shards are the master copy and FSDP2 all-gathers them in half precision
        self.half_params = self.precision == "master" and not self.sharded
        model = model.to(dev.torch_device, self.dtype if self.half_params else torch.float32)
        model.train()
        model.activation_checkpointing = cfg.run.activation_checkpointing
        model.attn_impl = self.attn_impl
        self.flops_per_token = model_flops_per_token(
            model_cfg, getattr(self.train_stream, "seq_len", model_cfg.max_seq_len))
        self.fp32_gemm = self._resolve_fp32_gemm()
        self._use_fp32_gemm(model, self.fp32_gemm)
        self.compiled = self._resolve_compile()
        if self.compiled:
            model.forward_hidden = torch.compile(model.forward_hidden)
        if self.sharded:
            distributed.shard(model, dev, self.world, self.dtype if self.precision == "master" else None)
        self.model, self.model_cfg = model, model_cfg
        self.params = [p for p in model.parameters() if p.requires_grad]

    def _resolve_fp32_gemm(self) -> str:
        """Float32 runs on a CPU: whether the linears' GEMMs go through oneDNN (run.fp32_gemm, or
        the device layer's probe), logged. Under torchrun only where every process's probe
        chose it, so all compute alike."""
        run, dev = self.cfg.run, self.device
        if self.precision != "float32" or self.sharded or not dev.is_cpu:
            return "torch"
        choice, why = dev.precision.fp32_gemm(run.fp32_gemm)
        if run.fp32_gemm == "auto" and self.world.active:
            agreed = float(distributed.all_mean(torch.tensor([float(choice == "onednn")]), self.world)) == 1.0
            if choice == "onednn" and not agreed:
                choice, why = "torch", f"not every process's probe chose oneDNN ({why})"
        self.log(f"float32 GEMMs: {'oneDNN' if choice == 'onednn' else 'torch'} ({why})")
        return choice

    @staticmethod
    def _use_fp32_gemm(model: Transformer, choice: str) -> None:
        if choice == "onednn":
            from chipshift.devices.kernels import onednn

            model.use_linear_kernel(onednn.linear, (onednn.mm_nt, onednn.mm_nn))
        else:
            model.use_linear_kernel(None)

    def _resolve_compile(self) -> bool:
        """run.compile, or where it is "auto" the device layer's decision for this run (long
        runs of one batch shape), logged. Auto stays eager where compile is untested with the
        run's set-up: FSDP2 sharding, half matmuls routed as float32 GEMMs, checkpointing."""
        run = self.cfg.run
        if run.compile != "auto":
            return run.compile == "on"
        blocked = ("FSDP2 sharding" if self.sharded else "half matmuls as float32 GEMMs" if self.upcast
                   else "activation checkpointing" if run.activation_checkpointing else None)
        if blocked:
            self.log(f"compile: eager (auto: not with {blocked}; run.compile = 'on' forces it)")
            return False
        tokens_per_step = self.cfg.data.batch_size * getattr(self.train_stream, "seq_len", self.cfg.data.seq_len)
        decision = self.device.precision.compile_training(
            self.cfg.train.steps, self.flops_per_token * tokens_per_step / self.world.size, self.dtype, self.upcast,
            self.fixed_shapes)
        self.log(f"compile: {decision.reason}")
        return decision.value

    def _build_optimizer(self) -> None:
        """AdamW over the trainable parameters (their float32 master copies under "master"),
        and a gradient scaler for float16."""
        cfg, dev = self.cfg, self.device
        self.master = MasterWeights(self.model) if self.half_params else None
        named = self.master.named_parameters() if self.master else \
            [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.param_names = [n for n, p in named if p.ndim >= 2] + [n for n, p in named if p.ndim < 2]
        self.opt_params = [p for _, p in named]
        fused = cfg.optim.fused == "on" or (cfg.optim.fused == "auto" and dev.fused_adamw)
        self.optimizer = build_adamw(named, cfg.optim, fused)
        self.scaler = torch.amp.GradScaler(dev.type) if self.dtype == torch.float16 else None

    # -- set-up checks -----------------------------------------------------------------
    def _check_memory(self, model_cfg: ModelConfig) -> None:
        est = training_memory(model_cfg, self.micro, self.cfg.data.seq_len, self.dtype in HALF,
                              self.attn_impl, self.cfg.run.activation_checkpointing,
                              self.world.size if self.sharded else 1, master=self.precision == "master")
        states = est.total - est.activations
        have = self.device.total_memory()
        if est.total > 0.9 * have:
            raise ChipshiftError(
                f"the batch cannot fit: a step needs about {est.total / 2**30:.1f} GiB "
                f"(weights+optimizer {states / 2**30:.1f}, activations {est.activations / 2**30:.1f}) "
                f"and {self.device} has {have / 2**30:.1f} GiB; lower data.micro_batch (now {self.micro}) "
                f"or data.seq_len, or set run.activation_checkpointing = true")

    # -- one step ----------------------------------------------------------------------
    def _context(self):
        stack = contextlib.ExitStack()
        if self.precision == "autocast":
            stack.enter_context(torch.autocast(self.device.type, dtype=self.dtype))
        if self.upcast:
            stack.enter_context(HalfMatmulUpcast())
        stack.enter_context(self.device.numerics())
        return stack

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device.torch_device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def _tokens(self, batch: dict) -> int:
        counter = getattr(self.objective, "tokens", None)
        return int(counter(batch)) if counter else int(batch["input_ids"].numel())

    def train_step(self) -> StepStats:
        """One optimizer step over the next global batch; skipped if anything is non-finite."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg.train.steps, cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        start, share = rank_slice(self.cursor, cfg.data.batch_size, self.world.rank, self.world.size)
        loss_sum = torch.zeros((), device=self.device.torch_device)
        metric_sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for i in range(self.accum):
            distributed.set_gradient_sync(self.model, i == self.accum - 1)
            batch = self._to_device(self.train_stream.batch(start + i * self.micro, self.micro))
            tokens += self._tokens(batch)
            with self._context():
                loss, metrics = self.objective(self.model, batch)
                scaled = loss / self.accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach().float()
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0) + v.detach().float()
        if not self.sharded:  # sharded, FSDP2 reduce-scattered them in the last backward
            distributed.average_gradients(self.params, self.world)
        if self.master:
            self.master.to_master_grads()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        norm = distributed.clip_grad_norm(self.opt_params, clip)
        packed = torch.stack([loss_sum / self.accum, *(v / self.accum for v in metric_sums.values())])
        loss_value, *metric_values = distributed.all_mean(packed, self.world).tolist()
        norm_value = float(norm)
        loss_ok = math.isfinite(loss_value)
        skipped = not loss_ok or (not math.isfinite(norm_value) and self.scaler is None)
        if self.scaler:  # the scaler skips steps with inf/nan gradients itself and lowers its scale
            if loss_ok:
                self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scaler_skips += loss_ok and not math.isfinite(norm_value)
        elif not skipped:
            self.optimizer.step()
        if self.master and not skipped:
            self.master.to_model()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        if skipped:
            self.bad_in_row += 1
            self.bad_total += 1
        else:
            self.bad_in_row = 0
        self.step += 1
        self.cursor += cfg.data.batch_size
        return StepStats(self.step, loss_value, norm_value, lr, tokens * self.world.size, skipped,
                         dict(zip(metric_sums, metric_values)))

    # -- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean objective loss (and metrics) over `eval_batches` fixed validation batches."""
        self.model.eval()
        n = self.cfg.train.eval_batches
        sums = None
        for i in range(self.world.rank, n, self.world.size):
            batch = self._to_device(self.val_stream.batch(i * self.micro, self.micro))
            with self._context():
                loss, metrics = self.objective(self.model, batch)
            row = torch.stack([loss.float(), *(v.float() for v in metrics.values())])
            sums = row if sums is None else sums + row
            keys = ["val_loss", *(f"val_{k}" for k in metrics)]
        self.model.train()
        if self.sharded:  # no backward follows to free the root's gathered parameters
            self.model.reshard()
        if sums is None:
            raise ConfigError(f"train.eval_batches = {n}: too few for {self.world.size} processes")
        counts = torch.tensor(float(len(range(self.world.rank, n, self.world.size))))
        total = distributed.all_mean(torch.cat([sums, counts[None]]), self.world)
        return dict(zip(keys, (total[:-1] / total[-1]).tolist()))

    # -- checkpoints -------------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        """The weights to save, whole, on the CPU (sharded: every process must call this)."""
        adapter = getattr(self.model, "adapter", None)
        if adapter is not None:  # LoRA: saved merged, clean names; the adapter goes in the state
            return adapter.merged_state_dict()
        if self.sharded:
            return {n: distributed.full_tensor(p.detach()).to("cpu").contiguous()
                    for n, p in self.model.named_parameters()}
        if self.master:
            return {n: m.detach().to("cpu").contiguous().clone() for n, m in self.master.named_parameters()}
        return state_dict_for_save(self.model)

    def _trainable(self) -> list[tuple[str, torch.Tensor]]:
        return self.master.named_parameters() if self.master else \
            [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        adapter = {f"trainable.{n}": p.detach().to("cpu").contiguous().clone() for n, p in self._trainable()} \
            if getattr(self.model, "adapter", None) is not None else {}
        device_rng = self.device.get_rng_state()
        return {**state.optimizer_tensors(self.optimizer, self.param_names), "rng.cpu": torch.get_rng_state(),
                **({"rng.device": device_rng} if device_rng is not None else {}), **adapter}

    def meta(self) -> dict:
        return {"data_cursor": self.cursor, "bad_in_row": self.bad_in_row, "bad_total": self.bad_total,
                "global_batch": self.cfg.data.batch_size, "world_size": self.world.size,
                "objective": self.objective.name, "precision": self.precision,
                "compute_dtype": dtype_name(self.dtype), "fp32_gemm": self.fp32_gemm,
                "scaler": self.scaler.state_dict() if self.scaler else None, "scaler_skips": self.scaler_skips}

    def save(self, run_dir: Path, tokenizer_dir=None) -> Path | None:
        path = None
        self.saved_step = self.step
        if self.world.is_main or self.sharded:  # gathering the shards takes every process
            weights, tensors = self.weights(), self.state_tensors()
        if self.world.is_main:
            path = state.save(run_dir, self.step, weights, self.model_cfg, tensors,
                              self.meta(), tokenizer_dir=tokenizer_dir, device=str(self.device),
                              keep_last=self.cfg.train.keep_last)
        distributed.barrier(self.world)
        return path

    @torch.no_grad()
    def restore(self, path: Path, sidecar: dict) -> None:
        weights, tensors = state.load(path)
        meta = sidecar["meta"]
        if meta.get("global_batch") != self.cfg.data.batch_size:
            raise ConfigError(f"data.batch_size = {self.cfg.data.batch_size}: the checkpoint {path.name} "
                              f"was trained with {meta.get('global_batch')}; keep it to resume exactly")
        if getattr(self.model, "adapter", None) is not None:  # frozen base from init, adapter from the state
            for n, p in self._trainable():
                if f"trainable.{n}" not in tensors:
                    raise ChipshiftError(f"checkpoint {path}: no adapter tensor {n}; keep the run's [lora] settings")
                p.copy_(tensors[f"trainable.{n}"])
            if self.master:
                self.master.to_model()
        elif self.master:
            for n, m in self.master.named_parameters():
                m.copy_(weights[n])
            self.master.to_model()
        elif self.sharded:  # each process keeps its shard of the whole tensors
            params = dict(self.model.named_parameters())
            if params.keys() != weights.keys():
                raise ChipshiftError(f"checkpoint {path}: weights do not match the model "
                                     f"(missing {sorted(params.keys() - weights.keys())[:3]}, "
                                     f"unexpected {sorted(weights.keys() - params.keys())[:3]})")
            for n, p in params.items():
                p.copy_(distributed.shard_like(weights[n], p))
        else:
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
            if missing or unexpected:
                raise ChipshiftError(f"checkpoint {path}: weights do not match the model "
                                     f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        state.load_optimizer_tensors(self.optimizer, self.param_names, tensors)
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.device" in tensors:
            written_on = sidecar.get("device", "").partition(":")[0]
            if written_on == self.device.type:
                self.device.set_rng_state(tensors["rng.device"])
            else:
                self.log(f"checkpoint {path.name} was written on {written_on}: the {self.device.type} "
                         f"generator keeps its seeded state")
        if self.scaler and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        if self.cfg.run.fp32_gemm == "auto" and meta.get("fp32_gemm", self.fp32_gemm) != self.fp32_gemm:
            # the probe may decide otherwise in this process: the run keeps the GEMMs it began
            # with, so that it resumes exactly
            self.fp32_gemm = meta["fp32_gemm"]
            self._use_fp32_gemm(self.model, self.fp32_gemm)
            self.log(f"float32 GEMMs: {self.fp32_gemm}, as the run began (checkpoint {path.name})")
        self.step, self.cursor = meta["step"], meta["data_cursor"]
        self.bad_in_row, self.bad_total = meta["bad_in_row"], meta["bad_total"]
        self.scaler_skips = meta.get("scaler_skips", 0)
        self.saved_step = self.step


# -- a whole run -------------------------------------------------------------------------
class _StopSignal:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the step and stops."""

    def __init__(self) -> None:
        self.raised = False
        self._old = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals stay with the caller
            pass
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def pretrain_streams(cfg: TrainConfig, seq_len: int) -> tuple[TokenWindows, TokenWindows, str, float | None]:
    """(train stream, val stream, tokenizer dir, val tokens per byte of text, or None when
    the sample decodes to no bytes) from `cfg.data.dir`."""
    from chipshift.data.shards import check_tokenizer, load_split, read_index
    from chipshift.data.tokenizer import Tokenizer

    if not cfg.data.dir:
        raise ConfigError("data.dir = '': set it to a directory made by `chipshift data prepare`")
    index = read_index(cfg.data.dir)
    tokenizer_dir = cfg.data.tokenizer or index["tokenizer"]
    check_tokenizer(cfg.data.dir, tokenizer_dir)
    train_tokens, val_tokens = load_split(cfg.data.dir, "train"), load_split(cfg.data.dir, "val")
    for split, toks in (("train", train_tokens), ("val", val_tokens)):
        if len(toks) <= seq_len:
            raise ConfigError(f"data.seq_len = {seq_len}: the {split} split of {cfg.data.dir} has only "
                              f"{len(toks)} tokens")
    tok = Tokenizer.load(tokenizer_dir)
    sample = val_tokens[: 2_000_000].tolist()
    text_bytes = len(tok.tok.decode(sample, skip_special_tokens=True).encode("utf-8"))
    return (TokenWindows(train_tokens, seq_len, cfg.run.seed), TokenWindows(val_tokens, seq_len, shuffle=False),
            tokenizer_dir, len(sample) / max(1, text_bytes) if text_bytes else None)


def checkpoint_to_resume(run_dir: Path, resume: bool | str, world: distributed.World) -> tuple[Path, dict] | None:
    """The checkpoint a run continues from, or None to start afresh.

    resume=True   the newest valid checkpoint in run.out; an error when there is none
    resume="auto" that checkpoint when there is one, else a fresh start
    resume=False  a fresh start; but an elastic restart (torchrun --max-restarts brought the
                  workers back, `World.restarted`) resumes as "auto", so a failed worker costs
                  only the steps since the last checkpoint. A fresh run that torchrun may
                  restart refuses a run.out that holds checkpoints already: its restart would
                  continue from them."""
    if resume is True:
        found = state.latest_valid(run_dir)
        if found is None:
            raise ChipshiftError(f"--resume: no valid checkpoint under {state.checkpoint_dir(run_dir)}")
        return found
    if resume == "auto" or world.restarted:
        return state.latest_valid(run_dir)
    existing = state.list_checkpoints(run_dir)
    if existing and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        raise ConfigError(f"run.out = {str(run_dir)!r} holds checkpoints already (newest {existing[-1].name}) and "
                          f"torchrun may restart this run, which would then continue from them: choose an empty "
                          f"run.out, or continue them with --resume (or --resume auto)")
    return None


def train(cfg: TrainConfig, objective: Objective | None = None, train_stream: Stream | None = None,
          val_stream: Stream | None = None, *, resume: bool | str = False, model: Transformer | None = None,
          tokenizer_dir: str | Path | None = None, bytes_per_token: float | None = None,
          progress: bool = True, log=print, device: Device | None = None) -> TrainResult:
    """Run (or resume) a training run; see the module docstring and `checkpoint_to_resume`
    for `resume` (True, "auto" or False). `device`: the Device the caller already resolved
    from `cfg.run.device`, if any. A collective that fails because another rank stopped
    answering (dead, stopped, hung) raises a ChipshiftError naming that rank."""
    objective = objective or LanguageModeling()
    run_dir = Path(cfg.run.out)
    device = device or get_device(cfg.run.device, cfg.run.emulate)
    world = distributed.init(device, cfg.run.collective_timeout_s)
    trainer = None
    try:
        model_cfg = None
        if train_stream is None:
            train_stream, val_stream, tokenizer_dir, tokens_per_byte = pretrain_streams(cfg, cfg.data.seq_len)
            bytes_per_token = 1 / tokens_per_byte if tokens_per_byte else None
            from chipshift.data.tokenizer import Tokenizer
            model_cfg = cfg.model_config(Tokenizer.load(tokenizer_dir).vocab_size)
        elif model is None:
            model_cfg = cfg.model_config()
        found = checkpoint_to_resume(run_dir, resume, world)
        trainer = Trainer(cfg, objective, train_stream, val_stream, model=model, model_cfg=model_cfg,
                          device=device, world=world, log=log)
        return _run(trainer, run_dir, found, tokenizer_dir, bytes_per_token, progress)
    except RuntimeError as exc:  # what a collective raises when its peer is gone or its wait timed out
        where = f"at step {trainer.step}" if trainer is not None else "while setting up"
        message = distributed.collective_failure(world, exc, cfg.run.collective_timeout_s, where) \
            if world.active else None
        if message is None:
            raise
        raise ChipshiftError(message) from exc
    finally:
        distributed.shutdown(world)


def _run(trainer: Trainer, run_dir: Path, resume_from, tokenizer_dir, bytes_per_token, progress) -> TrainResult:
    cfg, world = trainer.cfg, trainer.world

    def log(message: str) -> None:  # through tqdm, so the bar stays intact
        if world.is_main:
            tqdm.write(message) if progress else trainer.log(message)
    metrics = MetricsLog(run_dir, enabled=world.is_main)
    if resume_from is not None:
        trainer.restore(*resume_from)
        if world.is_main:
            state.truncate_jsonl(metrics.path, trainer.step)
        log(f"resumed from {resume_from[0]} (step {trainer.step}, data cursor {trainer.cursor})"
            + (" after an elastic restart" if world.restarted else ""))
    elif world.restarted:
        if world.is_main:
            state.truncate_jsonl(metrics.path, -1)  # the failed attempt's records: all redone
        log("elastic restart before the first checkpoint: starting afresh")
    if world.is_main:
        save_resolved(cfg, run_dir, {"resolved": {
            "model_config": trainer.model_cfg.to_dict(), "device": str(trainer.device),
            "compute_dtype": dtype_name(trainer.dtype), "precision": trainer.precision,
            "emulation": trainer.device.emulation.describe() if trainer.device.emulation else None,
            "half_matmul_upcast": trainer.upcast, "compiled": trainer.compiled, "processes": world.size,
            "sharded": trainer.sharded,
            "micro_batch": trainer.micro, "grad_accum": trainer.accum, "objective": trainer.objective.name,
            "tokenizer": str(tokenizer_dir)}})
    peak, peak_source = trainer.peak_flops, trainer.peak_source
    log(f"model {trainer.model_cfg.num_params() / 1e6:.1f}M params; batch {cfg.data.batch_size} x "
        f"{cfg.data.seq_len} = {world.size} process(es) x {trainer.micro} x {trainer.accum} accumulation; "
        f"peak {peak / 1e12:.2f} TFLOP/s ({peak_source})")
    last_ckpt: Path | None = resume_from[0] if resume_from else None
    last_val = None
    stopped = "done"
    bar = tqdm(total=cfg.train.steps, initial=trainer.step, disable=not (progress and world.is_main),
               unit="step", dynamic_ncols=True)
    window_tokens, window_t0 = 0, time.perf_counter()
    deadline = time.monotonic() + 60 * cfg.train.max_minutes if cfg.train.max_minutes else math.inf

    def do_eval():
        if trainer.val_stream is None:
            return None
        result = trainer.evaluate()
        if bytes_per_token and "val_loss" in result:
            result["val_bpb"] = result["val_loss"] / math.log(2) / bytes_per_token
        metrics.write({"step": trainer.step, **result})
        log(f"step {trainer.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return result.get("val_loss")

    with _StopSignal() as stop:
        if trainer.step == 0 and trainer.val_stream is not None and cfg.train.eval_every:
            last_val = do_eval()
        while trainer.step < cfg.train.steps:
            stats = trainer.train_step()
            window_tokens += stats.tokens
            bar.update(1)
            if trainer.bad_in_row >= cfg.train.max_bad_steps:
                bar.close()
                where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written"
                raise ChipshiftError(
                    f"stopped at step {trainer.step}: {trainer.bad_in_row} steps in a row had a non-finite "
                    f"loss or gradient ({trainer.bad_total} in all); {where}; lower optim.lr or "
                    f"check the data")
            out_of_time = distributed.any_flag(time.monotonic() > deadline, world)
            if trainer.step % cfg.train.log_every == 0 or trainer.step == cfg.train.steps or out_of_time:
                dt = time.perf_counter() - window_t0
                tps = window_tokens / dt
                mfu = tps * trainer.flops_per_token / peak
                record = {"step": trainer.step, "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
                          "tokens_per_s": tps, "mfu": mfu, "skipped_total": trainer.bad_total, **stats.metrics}
                if trainer.scaler:
                    record.update(loss_scale=trainer.scaler.get_scale(), scaler_skipped_total=trainer.scaler_skips)
                metrics.write(record)
                bar.set_postfix(loss=f"{stats.loss:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{mfu:.1%}")
                window_tokens, window_t0 = 0, time.perf_counter()
            if cfg.train.eval_every and trainer.step % cfg.train.eval_every == 0 and trainer.step < cfg.train.steps:
                last_val = do_eval()
            if distributed.any_flag(stop.raised, world):
                last_ckpt = trainer.save(run_dir, tokenizer_dir)
                stopped = "signal"
                log(f"stopped by a signal at step {trainer.step}; checkpoint {last_ckpt}")
                break
            if cfg.train.ckpt_every and trainer.step % cfg.train.ckpt_every == 0:
                last_ckpt = trainer.save(run_dir, tokenizer_dir)
            if out_of_time:
                stopped = "time limit"
                log(f"train.max_minutes = {cfg.train.max_minutes} reached at step {trainer.step}")
                break
    bar.close()
    if trainer.scaler:
        log(f"loss scaling (float16): the scaler skipped {trainer.scaler_skips} of {trainer.step} steps "
            f"(inf/nan gradients); scale now {trainer.scaler.get_scale():g}")
    png = None
    if stopped != "signal":
        last_val = do_eval() if trainer.val_stream is not None else last_val
        if trainer.saved_step != trainer.step:
            last_ckpt = trainer.save(run_dir, tokenizer_dir)
        if world.is_main and metrics.path.exists():
            png = plot_loss(metrics.path, run_dir / "loss.png",
                            f"{trainer.objective.name}: {trainer.model_cfg.num_params() / 1e6:.1f}M params")
    metrics.close()
    return TrainResult(run_dir, trainer.step, stopped, last_ckpt, last_val, trainer.bad_total, png, world.is_main)
