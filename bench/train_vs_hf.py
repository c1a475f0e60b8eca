"""Training-step throughput: chipshift's loop vs `transformers.LlamaForCausalLM`.

A step is forward, backward, gradient clipping, AdamW and zero_grad at batch 8 x 256,
for the shapes S and M (chipshift presets) in float32 and bfloat16, or `auto`: chipshift's
default (the precision policy's dtype on this machine; float16 on AVX512-FP16 CPUs without
AMX), HF given the same dtype with the mixed precision its Trainer uses for it. Each measurement
runs in its own fresh process, alternating chipshift / HF / chipshift / HF over rounds
(two models in one process distort each other); the parent prints the medians, the ratio,
MFU against a matmul ceiling it measures itself (also in a fresh process), and the peak
memory of each side (resident-set growth on the CPU, allocator peak elsewhere), then ends
with one JSON line.

What each side runs:
  chipshift  `chipshift.train.loop.Trainer.train_step` on random tokens, in a run of the
             default length (1000 steps, so `run.compile = "auto"` compiles where the
             device layer would for a real run; the first, compiling, step is warm-up): bf16 = bf16
             parameters with fp32 master weights (half matmuls as fp32 GEMMs on bf16
             operands where the device's native bf16 GEMM is slower, see
             `chipshift.train.precision`), fp32 = plain fp32; SDPA attention, chunked
             cross-entropy, fused AdamW where the device has it. `--ours-set` passes config
             overrides (e.g. run.attn_impl="math") to this side only.
  HF         LlamaForCausalLM (sdpa attention, tied embeddings like the presets), loss from
             `labels`, torch.optim.AdamW (fused where the device has it, as on our side and
             as the HF Trainer's default `adamw_torch_fused`); bf16 = torch.autocast to
             bf16 over fp32 parameters, as the HF Trainer does with bf16=True.

    python bench/train_vs_hf.py                       # S and M, bf16 and fp32
    python bench/train_vs_hf.py --shapes S --dtypes fp32 --rounds 3 --steps 3
    python bench/train_vs_hf.py --dtypes auto             # the defaults, both shapes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BATCH, SEQ = 8, 256
LR, BETAS, WD, CLIP = 3e-4, (0.9, 0.95), 0.1, 1.0


def _random_tokens(vocab: int, n: int):
    import numpy as np
    return np.random.default_rng(0).integers(0, vocab, n).astype(np.int64)


def worker_ours(shape: str, dtype: str, steps: int, warmup: int, device: str, overrides=()) -> dict:
    import torch

    from chipshift.devices import get_device
    from chipshift.model.config import preset
    from chipshift.train.config import TrainLoopConfig, apply_overrides, from_dict
    from chipshift.train.data import TokenWindows
    from chipshift.train.loop import Trainer
    from chipshift.train.objectives import LanguageModeling

    dev = get_device(device)
    mcfg = preset(shape)
    cfg = from_dict(apply_overrides({"run": {"device": device, "dtype": dtype}, "model": {"preset": shape},
                     "data": {"seq_len": SEQ, "batch_size": BATCH},
                     "optim": {"lr": LR, "beta1": BETAS[0], "beta2": BETAS[1], "weight_decay": WD,
                               "grad_clip": CLIP, "warmup_steps": 0, "schedule": "constant"},
                     # a run of the default length, timed over its first steps: the
                     # device layer's choices for a real run (compile) apply
                     "train": {"steps": max(steps + warmup, TrainLoopConfig.steps)}}, list(overrides)))
    stream = TokenWindows(_random_tokens(mcfg.vocab_size, BATCH * (SEQ + 1) * (steps + warmup + 1)), SEQ)
    base = dev.memory_allocated()
    dev.reset_peak_memory()
    trainer = Trainer(cfg, LanguageModeling(), stream, model_cfg=mcfg, device=dev, log=lambda *a: None)

    def step():
        trainer.train_step()
    return _time(step, steps, warmup, dev, base, {"precision": trainer.precision, "upcast": trainer.upcast,
                                                  "attn_impl": trainer.model.attn_impl, "compiled": trainer.compiled,
                                                  "checkpointing": trainer.model.activation_checkpointing,
                                                  "fp32_gemm": trainer.fp32_gemm, "threads": torch.get_num_threads()})


def worker_hf(shape: str, dtype: str, steps: int, warmup: int, device: str) -> dict:
    import contextlib

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from chipshift.devices import get_device, parse_dtype
    from chipshift.model.config import preset

    dev = get_device(device)
    c = preset(shape)
    hf_cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                         num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
                         max_position_embeddings=c.max_seq_len, rms_norm_eps=c.rms_norm_eps,
                         rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
                         attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "sdpa"
    tokens = torch.from_numpy(_random_tokens(c.vocab_size, BATCH * (SEQ + 1) * (steps + warmup + 1)))
    base = dev.memory_allocated()
    dev.reset_peak_memory()
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_cfg).to(dev.torch_device).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, fused=dev.fused_adamw or None)
    if dtype == "auto":  # the dtype chipshift's policy picks here, with the mixed precision HF's Trainer uses
        dtype = str(dev.precision.compute_dtype().value).removeprefix("torch.")
    half = parse_dtype(dtype) != torch.float32
    # float16: a loss scaler, as the HF Trainer runs fp16=True (and chipshift does)
    scaler = torch.amp.GradScaler(dev.type) if parse_dtype(dtype) == torch.float16 else None
    state = {"i": 0}

    def step():
        i = state["i"]
        state["i"] += 1
        rows = tokens[i * BATCH * (SEQ + 1):(i + 1) * BATCH * (SEQ + 1)].view(BATCH, SEQ + 1).to(dev.torch_device)
        ctx = torch.autocast(dev.type, dtype=parse_dtype(dtype)) if half else contextlib.nullcontext()
        with ctx:
            # HF shifts labels inside the loss: pass the window, predict tokens 1..T
            out = model(input_ids=rows[:, :-1], labels=rows[:, :-1])
        (scaler.scale(out.loss) if scaler else out.loss).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        float(out.loss)
    return _time(step, steps, warmup, dev, base, {"threads": torch.get_num_threads()})


def _time(step, steps, warmup, dev, base, extra) -> dict:
    for _ in range(warmup):
        step()
    dev.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        dev.synchronize()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"tokens_per_s": BATCH * SEQ / med, "step_s": times,
            "peak_mem_bytes": max(0, dev.max_memory_allocated() - base), **extra}


def worker_ceiling(dtype: str, device: str) -> dict:
    """Best measured square-GEMM FLOP/s (n = 512 and 1024) in `dtype`; float32 on a CPU: the better
    of torch's mm and oneDNN's GEMM, which chipshift's float32 training may use."""
    import torch

    from chipshift.devices import cpu_fp32_onednn_flops, get_device, measure_matmul_flops, parse_dtype
    dev = get_device(device)
    best = 0.0
    for n in (512, 1024):
        best = max(best, measure_matmul_flops(dev.torch_device, parse_dtype(dtype), n=n, seconds=0.5,
                                              sync=dev.synchronize))
        if dev.is_cpu and parse_dtype(dtype) == torch.float32:
            best = max(best, cpu_fp32_onednn_flops(n, seconds=0.5))
    return {"flops": best, "threads": torch.get_num_threads()}


def run_worker(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=3600,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])})
    if out.returncode != 0:
        raise SystemExit(f"worker {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="S,M")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--rounds", type=int, default=2, help="A B rounds per shape and dtype")
    p.add_argument("--steps", type=int, default=2, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a chipshift config override for our side, e.g. run.activation_checkpointing=true")
    p.add_argument("--worker", choices=["ours", "hf", "ceiling"], help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker == "ceiling":
        print(json.dumps(worker_ceiling(a.dtype, a.device)))
        return
    if a.worker:
        if a.worker == "ours":
            print(json.dumps(worker_ours(a.shape, a.dtype, a.steps, a.warmup, a.device, a.ours_set)))
        else:
            print(json.dumps(worker_hf(a.shape, a.dtype, a.steps, a.warmup, a.device)))
        return

    from chipshift.model.config import preset
    from chipshift.model.flops import model_flops_per_token as flops_per_token

    from chipshift.devices import machine_facts

    machine = machine_facts()  # figures hold for one CPU class: the JSON names it
    print(f"machine: {machine['cpu']} ({machine['cpu_class']}), {machine['cores']} cores, torch {machine['torch']}")
    dtypes = a.dtypes.split(",")
    resolved = {d: d for d in dtypes}
    if "auto" in dtypes:  # chipshift's default: what the precision policy picks on this machine
        from chipshift.devices import get_device

        resolved["auto"] = str(get_device(a.device).precision.compute_dtype().value).removeprefix("torch.")
        print(f"auto = {resolved['auto']} here (the precision policy's compute dtype)")
    ceilings = {d: run_worker(["--worker", "ceiling", "--dtype", d, "--device", a.device])["flops"]
                for d in sorted(set(resolved.values()) | {"fp32"})}
    print("matmul ceiling (GFLOP/s): " + ", ".join(f"{d} {f / 1e9:.0f}" for d, f in ceilings.items()), flush=True)
    results = []
    for shape in a.shapes.split(","):
        fpt = flops_per_token(preset(shape), SEQ)
        for dtype in dtypes:
            # a bf16-valued GEMM can run no faster than the best of the native bf16 and fp32 kernels
            ceiling = max(ceilings[resolved[dtype]], ceilings["fp32"])
            runs = {"ours": [], "hf": []}
            for r in range(a.rounds):
                for side in ("ours", "hf"):
                    extra = [f"--ours-set={o}" for o in a.ours_set] if side == "ours" else []
                    res = run_worker(["--worker", side, "--shape", shape, "--dtype", dtype, "--steps", str(a.steps),
                                      "--warmup", str(a.warmup), "--device", a.device, *extra])
                    runs[side].append(res)
                    print(f"  {shape} {dtype} round {r + 1} {side:4s}: {res['tokens_per_s']:8.0f} tok/s, "
                          f"peak {res['peak_mem_bytes'] / 2**20:7.0f} MiB", flush=True)
            med = {s: statistics.median(x["tokens_per_s"] for x in runs[s]) for s in runs}
            mem = {s: max(x["peak_mem_bytes"] for x in runs[s]) for s in runs}
            row = {"shape": shape, "dtype": dtype, "resolved_dtype": resolved[dtype],
                   "ours_tokens_per_s": med["ours"], "hf_tokens_per_s": med["hf"],
                   "ratio": med["ours"] / med["hf"], "ours_mfu": med["ours"] * fpt / ceiling,
                   "hf_mfu": med["hf"] * fpt / ceiling, "ceiling_gflops": ceiling / 1e9,
                   "ours_peak_mib": mem["ours"] / 2**20, "hf_peak_mib": mem["hf"] / 2**20,
                   "ours_precision": runs["ours"][0].get("precision"), "ours_upcast": runs["ours"][0].get("upcast"),
                   "ours_attn_impl": runs["ours"][0].get("attn_impl"), "ours_compiled": runs["ours"][0].get("compiled"),
                   "ours_checkpointing": runs["ours"][0].get("checkpointing"),
                   "ours_fp32_gemm": runs["ours"][0].get("fp32_gemm"), "ours_overrides": a.ours_set,
                   "rounds": a.rounds, "steps": a.steps}
            results.append(row)
            print(f"{shape} {dtype}: chipshift {med['ours']:.0f} tok/s vs HF {med['hf']:.0f} tok/s = "
                  f"{row['ratio']:.2f}x; MFU {row['ours_mfu']:.1%} vs {row['hf_mfu']:.1%} "
                  f"(ceiling {ceiling / 1e9:.0f} GFLOP/s); peak {row['ours_peak_mib']:.0f} vs "
                  f"{row['hf_peak_mib']:.0f} MiB", flush=True)
    print(json.dumps({"bench": "train_vs_hf", "machine": machine, "batch": BATCH, "seq": SEQ, "ceilings_gflops":
                      {d: f / 1e9 for d, f in ceilings.items()}, "results": results}))


if __name__ == "__main__":
    main()
