#!/usr/bin/env bash
# The matmul ceiling and the training MFU of a ~350M-parameter Llama on one NVIDIA GPU,
# bf16 with torch.compile, through chipshift's own training step; under 5 minutes.
#
#   bench/gpu.sh               on the GPU (device cuda:0); prints a short table, then one JSON line
#   bench/gpu.sh --dry-run     the same plumbing on the CPU with a tiny model, fp32, no compile
#
# Part 2 (parity): the real SmolLM2-135M-Instruct dumped on the GPU in bfloat16 and judged
# against a CPU float64 reference by the error-ratio rule, with CPU bfloat16 as the baseline
# ("is the new chip worse than the old one?"). The report lands in $OUT_DIR/parity-report.
#
# Part 4 (rehearsal): the GPU's own numerics profile emulated on the CPU (`parity dump --emulate`)
# against part 2's real GPU dump: per module, how far the predicted error is from the real one.
#
# Part 3 (decode): the inference engine on a ~1B-parameter Llama shape (Llama-3.2-1B: 16 x 2048,
# random weights) in bfloat16, batch 1 and 8, prompt 32, exactly 128 new tokens, greedy; each
# rate against the memory-bandwidth bound (weight + KV bytes read per step / copy bandwidth
# measured on the device).
#
# MFU counts model FLOPs (6 per matmul weight per token + attention, see
# chipshift.model.flops.model_flops_per_token) against both the catalogue peak of the chip and the
# bf16 GEMM ceiling measured here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry ;;
  "") ;;
  *) echo "usage: bench/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac

MODE=$MODE PYTHONPATH=. "$PY" - <<'PYEOF'
import json, os, statistics, time

import numpy as np
import torch

from chipshift.devices import get_device, measure_matmul_flops, parse_dtype
from chipshift.model.config import ModelConfig
from chipshift.train.config import from_dict
from chipshift.train.data import TokenWindows
from chipshift.model.flops import model_flops_per_token as flops_per_token
from chipshift.train.loop import Trainer
from chipshift.train.objectives import LanguageModeling

dry = os.environ["MODE"] == "dry"
if dry:  # plumbing check on the CPU: tiny shape, fp32, eager
    device, dtype, compile_, batch, micro, seq, warmup, steps, gemm_n = "cpu", "float32", False, 4, 4, 64, 1, 2, 256
    shape = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                 intermediate_size=128, max_seq_len=seq)
else:  # ~350M parameters: 24 x 1024, SwiGLU 2816, 16 heads, 32k vocabulary, tied
    device, dtype, compile_, batch, micro, seq, warmup, steps, gemm_n = "cuda:0", "bfloat16", True, 32, 16, 1024, 6, 20, 8192
    shape = dict(vocab_size=32000, hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16,
                 intermediate_size=2816, max_seq_len=seq)

dev = get_device(device)
t_start = time.perf_counter()
ceiling = measure_matmul_flops(dev.torch_device, parse_dtype(dtype), n=gemm_n, seconds=2.0, sync=dev.synchronize)
catalogue, source = dev.peak_flops(dtype)

mcfg = ModelConfig(**shape)
cfg = from_dict({"run": {"device": device, "dtype": dtype, "compile": compile_},
                 "model": shape, "data": {"seq_len": seq, "batch_size": batch, "micro_batch": micro},
                 "optim": {"warmup_steps": 0, "schedule": "constant", "lr": 3e-4},
                 "train": {"steps": warmup + steps}})
tokens = np.random.default_rng(0).integers(0, mcfg.vocab_size, batch * (seq + 1) * (warmup + steps + 1))
trainer = Trainer(cfg, LanguageModeling(), TokenWindows(tokens, seq), model_cfg=mcfg, device=dev, log=lambda *a: None)
dev.reset_peak_memory()
t0 = time.perf_counter()
for _ in range(warmup):  # includes the compile
    trainer.train_step()
dev.synchronize()
compile_s = time.perf_counter() - t0
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    stats = trainer.train_step()  # ends with a host read of the loss: the step is complete
    times.append(time.perf_counter() - t0)
tps = batch * seq / statistics.median(times)
model_flops = tps * flops_per_token(mcfg, seq)
row = {
    "device": dev.name, "dtype": dtype, "compile": compile_, "params_m": round(mcfg.num_params() / 1e6, 1),
    "batch": f"{batch}x{seq} ({micro} per micro-batch)", "gemm_ceiling_tflops": ceiling / 1e12,
    "catalogue_peak_tflops": catalogue / 1e12, "peak_source": source, "tokens_per_s": tps,
    "mfu_vs_catalogue": model_flops / catalogue, "mfu_vs_ceiling": model_flops / ceiling,
    "warmup_and_compile_s": compile_s, "step_s_median": statistics.median(times),
    "peak_memory_gib": dev.max_memory_allocated() / 2**30, "final_loss": stats.loss,
    "total_s": time.perf_counter() - t_start,
}
width = max(map(len, row))
for k, v in row.items():
    print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
print(json.dumps({"bench": "gpu", "dry_run": dry, **row}))
PYEOF

# ---- part 2: parity of the GPU in bfloat16 against a CPU float64 reference -------------
OUT_DIR=${OUT_DIR:-${OUT:-/tmp}/chipshift-gpu}
mkdir -p "$OUT_DIR"
if [ "$MODE" = dry ]; then
  CKPT="$OUT_DIR/tiny"
  "$PY" -c "import sys; from chipshift.model import build_model, preset; from chipshift.model.checkpoint import save_checkpoint; save_checkpoint(build_model(preset('tiny')), sys.argv[1])" "$CKPT"
  TARGET=cpu
else
  CKPT="$OUT_DIR/smollm2"
  [ -f "$CKPT/chipshift.json" ] || "$PY" -m chipshift import "$("$PY" -c 'from chipshift.data.packages import smollm2_gguf; print(smollm2_gguf())')" "$CKPT"
  TARGET=cuda
fi
P="$OUT_DIR/parity"
"$PY" -m chipshift parity dump "$CKPT" --device cpu --dtype float64 --out "$P/R" --max-tensor-mb 2048
"$PY" -m chipshift parity dump "$CKPT" --device cpu --dtype bfloat16 --out "$P/A" --max-tensor-mb 2048 --batch "$P/R/batch.json"
"$PY" -m chipshift parity dump "$CKPT" --device "$TARGET" --dtype bfloat16 --out "$P/B" --max-tensor-mb 2048 --batch "$P/R/batch.json"
set +e
"$PY" -m chipshift parity compare "$P/A" "$P/B" --reference "$P/R" --out "$OUT_DIR/parity-report"
echo "parity verdict exit code: $? (0 pass/warn, 1 fail); report: $OUT_DIR/parity-report/report.md"

# ---- part 4: how good is a rehearsal? The GPU's own profile emulated on the CPU against ---
# the real dump on the GPU (part 2's B): per module, the emulated error against float64
# divided by the real one (1 = the prediction is exact; docs/rehearse.md)
CHIP=$("$PY" -c "import sys; from chipshift.devices import get_device
c = get_device(sys.argv[1]).chip; print(c.key if c else 'bf16')" "$TARGET")
"$PY" -m chipshift parity dump "$CKPT" --device cpu --emulate "$CHIP" --out "$P/E" --max-tensor-mb 2048 \
  --batch "$P/R/batch.json"
PYTHONPATH=. "$PY" - "$P" "$CHIP" <<'PYEOF'
import json, statistics, sys
from chipshift.parity.compare import compare_dumps
from chipshift.parity.dump import Dump

p, chip = sys.argv[1:]
result = compare_dumps(Dump(f"{p}/B"), Dump(f"{p}/E"), Dump(f"{p}/R"))
rows = {d: [r["err_b_vs_ref"] / r["err_a_vs_ref"] for r in result["modules"][d] if r["err_a_vs_ref"] > 0]
        for d in ("forward", "backward")}
out = {"bench": "gpu_rehearsal", "emulated": chip}
for d, ratios in rows.items():
    out[d] = {"modules": len(ratios), "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
              "within_2x": sum(0.5 <= x <= 2 for x in ratios) / len(ratios)}
    print(f"rehearsal {d}: emulated/real error per module median {out[d]['median']:.3g}, range "
          f"{out[d]['min']:.3g}..{out[d]['max']:.3g}, {out[d]['within_2x']:.0%} within 2x")
print(json.dumps(out))
PYEOF

# ---- part 3: decode tokens/s against the memory-bandwidth bound ----------------------------
MODE=$MODE PYTHONPATH=. "$PY" - <<'PYEOF'
import json, os, statistics, time

import torch

from chipshift.devices import get_device
from chipshift.infer.engine import Engine, Request
from chipshift.infer.sampling import SamplingParams
from chipshift.model.config import preset
from chipshift.model.transformer import build_model

dry = os.environ["MODE"] == "dry"
device, name = ("cpu", "tiny") if dry else ("cuda:0", "llama-3.2-1b")
dev = get_device(device)
cfg = preset(name, max_seq_len=256)
model = build_model(cfg, device=dev.torch_device, dtype=torch.bfloat16, seed=0)
PROMPT, NEW = 32, 128

# copy bandwidth: a 1 GiB (dry: 64 MiB) device-to-device copy, read + write bytes
n = (64 if dry else 1024) * 2**20 // 2
a = torch.ones(n, dtype=torch.bfloat16, device=dev.torch_device)
b = torch.empty_like(a)
times = []
for _ in range(10):
    dev.synchronize(); t0 = time.perf_counter(); b.copy_(a); dev.synchronize()
    times.append(time.perf_counter() - t0)
bandwidth = 2 * a.numel() * a.element_size() / statistics.median(times)
del a, b

rows = []
for batch in (1, 8):
    engine = Engine(model, max_batch=batch, max_len=PROMPT + NEW)
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, cfg.vocab_size, (PROMPT,), generator=g).tolist() for _ in range(batch)]
    engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
    dev.synchronize()
    t0 = time.perf_counter()
    reqs = [engine.submit(Request(p, SamplingParams(max_tokens=NEW, ignore_eos=True))) for p in prompts]
    while not all(r.done.is_set() for r in reqs):
        engine.step()
    seconds = time.perf_counter() - t0
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * (PROMPT + NEW // 2) * 2
    step_bytes = cfg.num_params() * 2 + batch * kv
    bound = batch * bandwidth / step_bytes
    tps = batch * NEW / seconds
    rows.append({"batch": batch, "tokens_per_s": tps, "ttft_ms": 1e3 * (reqs[0].first_token_at - reqs[0].submitted_at),
                 "bound_tokens_per_s": bound, "fraction_of_bound": tps / bound})
print(f"decode {name} ({cfg.num_params() / 1e9:.2f}B params) bfloat16 on {dev.name}; "
      f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
print(f"{'batch':>5}  {'tok/s':>8}  {'ttft ms':>8}  {'bound tok/s':>11}  {'of bound':>8}")
for r in rows:
    print(f"{r['batch']:>5}  {r['tokens_per_s']:>8.1f}  {r['ttft_ms']:>8.1f}  {r['bound_tokens_per_s']:>11.1f}  "
          f"{r['fraction_of_bound']:>8.1%}")
print(json.dumps({"bench": "gpu_decode", "dry_run": dry, "model": name, "params_b": cfg.num_params() / 1e9,
                  "copy_bandwidth_gbs": bandwidth / 1e9, "rows": rows}))
PYEOF
