"""`chipshift bench`: how fast is this chip on our model.

On the local device it measures, and writes to one JSON:
  - the matmul ceiling in every dtype that works here (`measure_matmul_flops`);
  - device memory copy bandwidth (a copy into an existing buffer: read + write bytes);
  - training tokens/s and MFU with the training loop's own step
    (`chipshift.train.loop.Trainer.train_step`) at batch sizes 1, 2, 4, ... until the loop's
    memory check refuses one, the device runs out of memory, or the cap is reached, with
    the peak memory of each and the estimate of `chipshift.model.memory` beside it;
  - prefill tokens/s (one forward pass over whole prompts) and decode tokens/s with the
    inference engine (`chipshift.infer.engine.Engine`).
The JSON names the device, its catalogue entry, versions and every setting, so results
from different chips can be set side by side (`chipshift bench compare`) and a plan can
use them (`chipshift plan --chip bench.json`).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from chipshift.devices import Device, cpu_class, dtype_name, get_device, measure_matmul_flops, parse_dtype
from chipshift.errors import ChipshiftError
from chipshift.model import flops, memory
from chipshift.model.checkpoint import load_checkpoint, read_sidecar, versions
from chipshift.model.config import PRESETS, ModelConfig, preset

FORMAT = "chipshift-bench"
FORMAT_VERSION = 1


@dataclass
class BenchSettings:
    model: str = "S"  # a preset or a checkpoint directory
    seq_len: int = 256
    max_batch: int = 8  # the cap of the batch-size search
    steps: int = 2  # timed training steps per batch size (after one warm-up step)
    prefill_batches: tuple[int, ...] = (1, 4)
    decode_batches: tuple[int, ...] = (1, 4)
    decode_tokens: int = 16  # generated tokens per decode measurement
    dtype: str = "auto"
    seed: int = 0


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _timed(fn, sync, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def model_config(spec: str) -> tuple[ModelConfig, str | None]:
    """(config, checkpoint path or None) for a preset name or a checkpoint directory."""
    if spec in PRESETS:
        return preset(spec), None
    if Path(spec).is_dir():
        return ModelConfig.from_dict(read_sidecar(spec)["model_config"]), spec
    raise ChipshiftError(f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory")


# -- ceilings ----------------------------------------------------------------------------

# a CPU GEMM slower than this is emulated (AVX2 bfloat16 runs at 1-2 GFLOP/s, native ones at 50+)
SLOW_CPU_GEMM_FLOPS = 20e9


def matmul_ceilings(dev: Device) -> dict[str, dict]:
    out = {}
    for name in dev.working_dtypes():
        dtype = parse_dtype(name)
        n = (512 if dtype == torch.float64 else 1024) if dev.is_cpu else 8192
        # an emulated GEMM is ~10-100x slower: keep it small, by what a small product takes here
        # (the policy's answer may be pinned, and it speaks for bfloat16, not every half dtype)
        if dev.is_cpu and measure_matmul_flops(dev.torch_device, dtype, n=256, seconds=0) < SLOW_CPU_GEMM_FLOPS:
            n = 256
        out[name] = {"flops": measure_matmul_flops(dev.torch_device, dtype, n=n, seconds=0.3, sync=dev.synchronize),
                     "n": n}
    return out


def copy_bandwidth(dev: Device, seconds: float = 0.3) -> dict:
    """Bytes moved per second by a device-to-device copy into an existing buffer."""
    numel = (16 if dev.is_cpu else 256) * 2**20  # float32: 64 MiB on CPUs, 1 GiB elsewhere
    src = torch.ones(numel, device=dev.torch_device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        best = min(best, min(_timed(lambda: dst.copy_(src), dev.synchronize, 3)))
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    return {"bytes_per_s": nbytes / best, "buffer_bytes": nbytes // 2}


# -- training ----------------------------------------------------------------------------

class RandomTokens:
    """A stream of random token windows for timing (the numbers of a step do not matter)."""

    def __init__(self, vocab: int, seq_len: int, seed: int) -> None:
        self.vocab, self.seq_len = vocab, seq_len
        self.gen = np.random.default_rng(seed)

    def batch(self, start: int, count: int) -> dict[str, torch.Tensor]:
        rows = torch.from_numpy(self.gen.integers(0, self.vocab, (count, self.seq_len + 1), dtype=np.int64))
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}


def train_config(s: BenchSettings, dev: Device, cfg: ModelConfig, batch: int):
    from chipshift.train.config import DataConfig, OptimConfig, RunConfig, TrainConfig, TrainLoopConfig
    return TrainConfig(
        run=RunConfig(out="", seed=s.seed, device=str(dev), dtype=s.dtype),
        model=cfg.to_dict(),
        data=DataConfig(seq_len=s.seq_len, batch_size=batch, micro_batch=batch),
        optim=OptimConfig(warmup_steps=0, schedule="constant"),
        train=TrainLoopConfig(steps=s.steps + 1, log_every=1_000_000, eval_every=0, ckpt_every=0),
    )


def _trainer(dev: Device, s: BenchSettings, cfg: ModelConfig, checkpoint: str | None, batch: int):
    from chipshift.train.loop import Trainer
    from chipshift.train.objectives import LanguageModeling

    model = load_checkpoint(checkpoint, dev.torch_device, torch.float32)[0] if checkpoint else None
    return Trainer(train_config(s, dev, cfg, batch), LanguageModeling(),
                   RandomTokens(cfg.vocab_size, s.seq_len, s.seed), model=model, model_cfg=cfg,
                   device=dev, log=lambda *a, **k: None)


class RunInfo(NamedTuple):
    """How the loop ran one batch size."""
    dtype: str
    precision: str
    attn_impl: str
    cpu_s: float  # host CPU seconds per step
    ceiling: str  # the dtype of the MFU ceiling: float32's where half matmuls run as float32 GEMMs


def _run_batch(dev: Device, s: BenchSettings, cfg: ModelConfig, checkpoint: str | None, batch: int,
               steps: int) -> tuple[list[float], int, RunInfo]:
    """(step times after one warm-up step, peak memory over the resident memory just before
    the model was built, how the loop ran); raises _NoFit."""
    trainer = None
    gc.collect()
    dev.empty_cache()
    baseline = dev.memory_allocated()
    dev.reset_peak_memory()
    try:
        trainer = _trainer(dev, s, cfg, checkpoint, batch)
        trainer.train_step()  # warm-up: allocates the optimizer state
        cpu0 = time.process_time()
        times = _timed(trainer.train_step, dev.synchronize, steps)
        cpu = (time.process_time() - cpu0) / steps
        info = RunInfo(dtype_name(trainer.dtype), trainer.precision, trainer.model.attn_impl, cpu,
                       "float32" if trainer.upcast else dtype_name(trainer.dtype))
    except ChipshiftError as exc:  # the loop's own memory check
        raise _NoFit(f"batch {batch} refused: {exc}") from None
    except RuntimeError as exc:
        if not _is_out_of_memory(exc):
            raise
        raise _NoFit(f"batch {batch} ran out of memory") from None
    finally:
        del trainer
        gc.collect()
    return times, dev.max_memory_allocated() - baseline, info


class _NoFit(Exception):
    pass


# The trainer has glibc keep freed heap pages for fixed-shape batches (no page faults from
# step to step; `devices.keep_freed_host_memory`), so a CPU process's resident-set peak is
# its heap's high-water mark, which overstates live tensors after a few steps. The CPU
# memory pass runs in a child process with a small fixed threshold, where freed tensors go
# back to the OS at once and the peak follows live memory as an accelerator allocator's
# does; the timing process keeps the trainer's own setting.
# (glibc's own variable for what is allocated before the trainer sets it, chipshift's for the trainer)
CPU_MEMORY_ENV = dict.fromkeys(("MALLOC_MMAP_THRESHOLD_", "CHIPSHIFT_MMAP_THRESHOLD"), str(64 * 1024))


def cpu_memory_pass(s: BenchSettings, batches: list[int]) -> dict[int, int]:
    """Peak resident memory per batch size, measured in a child process (see above)."""
    args = json.dumps({"settings": asdict(s), "batches": batches})
    done = subprocess.run([sys.executable, "-m", "chipshift.plan.bench", args], capture_output=True, text=True,
                          env={**os.environ, **CPU_MEMORY_ENV, "CHIPSHIFT_DEVICE": "cpu"})
    if done.returncode != 0:
        raise RuntimeError(f"the CPU memory pass failed:\n{done.stderr[-2000:]}")
    return {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def _memory_child(payload: str) -> None:
    spec = json.loads(payload)
    s = BenchSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["settings"].items()})
    dev = get_device("cpu")
    cfg, checkpoint = model_config(s.model)
    _run_batch(dev, s, cfg, checkpoint, spec["batches"][0], 1)  # fault in code pages and kernels first
    peaks = {b: _run_batch(dev, s, cfg, checkpoint, b, 1)[1] for b in spec["batches"]}
    print(json.dumps(peaks))


def measure_training(dev: Device, s: BenchSettings, cfg: ModelConfig, checkpoint: str | None,
                     peak_flops: dict[str, float], progress) -> dict:
    runs, stopped, batch = [], "cap", 1
    info = None
    per_token = flops.model_flops_per_token(cfg, s.seq_len)
    while batch <= s.max_batch:
        progress.set_postfix_str(f"train batch {batch}")
        try:
            times, peak, info = _run_batch(dev, s, cfg, checkpoint, batch, s.steps)
        except _NoFit as exc:
            stopped = str(exc)
            break
        step = statistics.median(times)
        tokens_per_s = batch * s.seq_len / step
        peak_value, peak_source = dev.peak_flops(info.ceiling) if dev.chip else (
            peak_flops[info.ceiling], f"measured: this run's {info.ceiling} matmul ceiling")
        achieved = tokens_per_s * per_token
        runs.append({
            "batch": batch, "tokens": batch * s.seq_len, "step_s": step, "step_min_s": min(times),
            "step_times_s": times, "step_host_cpu_s": info.cpu_s, "tokens_per_s": tokens_per_s, "achieved_flops": achieved,
            "peak_flops": peak_value, "peak_source": peak_source, "mfu": achieved / peak_value,
            "ceiling_fraction": achieved / peak_flops[info.ceiling],
            "peak_memory_bytes": peak,
            "estimated_memory_bytes": memory.training_memory(cfg, batch, s.seq_len, info.precision != "float32",
                                                             info.attn_impl, master=info.precision == "master").total,
        })
        progress.update(1)
        batch *= 2
    method = "allocator peak minus the allocation before the model was built"
    if dev.is_cpu and runs:
        progress.set_postfix_str("train memory (child process)")
        peaks = cpu_memory_pass(s, [r["batch"] for r in runs])
        for r in runs:
            r["peak_memory_bytes"] = peaks[r["batch"]]
        method = ("resident-set peak (VmHWM) minus the resident set before the model was built, "
                  "one step per batch in a child process with glibc's mmap threshold fixed at 64 KiB")
    best = max(runs, key=lambda r: r["tokens_per_s"]) if runs else None
    return {"dtype": info.dtype if info else None, "precision": info.precision if info else None,
            "attn_impl": info.attn_impl if info else None, "flops_per_token": per_token,
            "flops_formula": "6N + 12*L*A*S (chipshift.model.flops)", "runs": runs, "best": best,
            "largest_batch": runs[-1]["batch"] if runs else None, "stopped": stopped,
            "peak_memory_method": method}


# -- inference ---------------------------------------------------------------------------

@torch.no_grad()
def measure_prefill(dev: Device, model, s: BenchSettings, progress) -> list[dict]:
    out = []
    gen = torch.Generator().manual_seed(s.seed)
    for batch in s.prefill_batches:
        progress.set_postfix_str(f"prefill batch {batch}")
        ids = torch.randint(0, model.cfg.vocab_size, (batch, s.seq_len), generator=gen).to(dev.torch_device)
        model(ids)  # warm-up
        t = statistics.median(_timed(lambda: model(ids), dev.synchronize, 3))
        out.append({"batch": batch, "prompt_tokens": s.seq_len, "tokens_per_s": batch * s.seq_len / t,
                    "seconds": t, "method": "one forward pass over the whole prompts (no KV cache kept)"})
        progress.update(1)
    return out


def measure_decode(dev: Device, model, s: BenchSettings, progress) -> list[dict]:
    """Decode tokens/s with the engine, from the difference of two generation lengths so
    that the prefill cancels: batch * (n_long - n_short) / (t_long - t_short)."""
    from chipshift.infer.engine import Engine
    from chipshift.infer.sampling import SamplingParams

    prompt = max(1, s.seq_len // 2)
    short, long = 2, 2 + s.decode_tokens
    out = []
    gen = torch.Generator().manual_seed(s.seed)
    for batch in s.decode_batches:
        progress.set_postfix_str(f"decode batch {batch}")
        engine = Engine(model, None, max_batch=batch, max_len=prompt + long + 1)
        prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt), generator=gen).tolist()

        def run(n: int):
            engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True, seed=s.seed))

        run(short)  # warm-up
        t_short = statistics.median(_timed(lambda: run(short), dev.synchronize, 3))
        t_long = statistics.median(_timed(lambda: run(long), dev.synchronize, 2))
        out.append({"batch": batch, "prompt_tokens": prompt, "new_tokens": s.decode_tokens,
                    "tokens_per_s": batch * (long - short) / max(t_long - t_short, 1e-9),
                    "method": "chipshift.infer.engine.Engine, greedy, static KV cache; "
                              "time of a long minus a short generation"})
        del engine
        progress.update(1)
    return out


# -- the whole bench ---------------------------------------------------------------------

def run_bench(dev: Device, s: BenchSettings, progress_enabled: bool = True) -> dict:
    t_start = time.perf_counter()
    cfg, checkpoint = model_config(s.model)
    if s.seq_len > cfg.max_seq_len:
        raise ChipshiftError(f"--seq-len = {s.seq_len}: the model's context is {cfg.max_seq_len}")
    n_train = s.max_batch.bit_length()
    total = 3 + n_train + len(s.prefill_batches) + len(s.decode_batches)
    with tqdm(total=total, desc="chipshift bench", unit="part", disable=not progress_enabled) as progress:
        progress.set_postfix_str("matmul ceilings")
        ceilings = matmul_ceilings(dev)
        progress.update(1)
        progress.set_postfix_str("copy bandwidth")
        bandwidth = copy_bandwidth(dev)
        progress.update(1)
        train = measure_training(dev, s, cfg, checkpoint, {k: v["flops"] for k, v in ceilings.items()}, progress)
        progress.update(n_train - len(train["runs"]))
        progress.set_postfix_str("inference model")
        infer_dtype, infer_reason = dev.precision.compute_dtype(s.dtype)
        if checkpoint:
            model = load_checkpoint(checkpoint, dev.torch_device, infer_dtype)[0]
        else:
            from chipshift.model.transformer import build_model
            model = build_model(cfg, dev.torch_device, infer_dtype, seed=s.seed)
        model.eval()
        progress.update(1)
        prefill = measure_prefill(dev, model, s, progress)
        decode = measure_decode(dev, model, s, progress)
    chip = dev.chip
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": time.perf_counter() - t_start,
        "device": {"type": dev.type, "spec": str(dev), "name": dev.name, "count": dev.count,
                   "memory_bytes": dev.total_memory(), "collective": dev.collective,
                   "working_dtypes": dev.working_dtypes(), "threads": torch.get_num_threads(),
                   **({"cpu_class": cpu_class()} if dev.is_cpu else {}), "precision": dev.precision.report()},
        "catalogue": None if chip is None else {
            "key": chip.key, "name": chip.name, "status": chip.status, "source": chip.source,
            "tflops_bf16": chip.tflops_bf16, "memory_gb": chip.memory_gb, "power_w": chip.power_w},
        "versions": versions(),
        "settings": {"model": s.model, "model_config": cfg.to_dict(), "params": cfg.num_params(),
                     "seq_len": s.seq_len, "max_batch": s.max_batch, "steps": s.steps, "dtype": s.dtype,
                     "inference_dtype": dtype_name(infer_dtype), "inference_dtype_reason": infer_reason,
                     "decode_tokens": s.decode_tokens, "seed": s.seed},
        "matmul": ceilings,
        "copy": bandwidth,
        "train": train,
        "prefill": prefill,
        "decode": decode,
    }


if __name__ == "__main__":  # the CPU memory pass (see cpu_memory_pass)
    _memory_child(sys.argv[1])
