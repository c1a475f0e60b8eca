"""Decode speed: chipshift's engine against transformers' generate(), and the server's
aggregate rate with 1 and 8 concurrent streams.

    python bench/decode_vs_hf.py [--models M,smollm2] [--dtypes bfloat16,float32]
                                 [--batches 1,8] [--rounds 3] [--server-rounds 3]

For each model (the M shape of the pre-training benchmark with random weights, and
SmolLM2-135M-Instruct imported from its GGUF file), dtype and batch size: a prompt of 32
random tokens per row, exactly 128 new tokens, greedy. Both sides read the same weights
(a chipshift checkpoint and its Hugging Face export) cast to the same dtype, each side runs
in its own process, alternating A B A B over the rounds. Reported: median tokens/s, the
ratio, time to first token, whether the two sides' greedy tokens agree, and the bound set by
bytes moved per decode step (weights + KV cache read) over the measured copy bandwidth.
Then `chipshift serve` on SmolLM2 (a checkpoint with a tokenizer, so tokens stream as text):
aggregate streamed tokens/s with 1 and with 8 concurrent clients. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT_LEN, NEW_TOKENS = 32, 128


def prompts(batch: int, vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(PROMPT_LEN)] for _ in range(batch)]


# -- workers: one measurement in a fresh process, printing one JSON line ---------------------
def worker_chipshift(args) -> dict:
    import torch

    from chipshift.devices import parse_dtype
    from chipshift.infer.engine import Engine
    from chipshift.infer.sampling import SamplingParams
    from chipshift.model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(args.ckpt, "cpu", parse_dtype(args.dtype))
    engine = Engine(model, max_batch=args.batch, max_len=PROMPT_LEN + NEW_TOKENS)
    ids = prompts(args.batch, model.cfg.vocab_size)
    engine.generate(ids, SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    from chipshift.infer.engine import Request

    t0, c0 = time.perf_counter(), time.process_time()
    reqs = [engine.submit(Request(p, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))) for p in ids]
    while not all(r.done.is_set() for r in reqs):
        engine.step()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert all(len(r.output_ids) == NEW_TOKENS for r in reqs)
    ttft = reqs[0].first_token_at - reqs[0].submitted_at
    return {"tok_s": args.batch * NEW_TOKENS / seconds, "cpu_tok_s": args.batch * NEW_TOKENS / cpu,
            "ttft_s": ttft, "tokens": reqs[0].output_ids, "threads": torch.get_num_threads()}


def worker_hf(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from chipshift.devices import parse_dtype

    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=parse_dtype(args.dtype)).eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor(prompts(args.batch, model.config.vocab_size))
    mask = torch.ones_like(ids)

    def run(n):
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0)

    run(4)  # warm-up
    t0 = time.perf_counter()
    run(1)
    ttft = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    out = run(NEW_TOKENS)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert out.shape[1] == PROMPT_LEN + NEW_TOKENS
    return {"tok_s": args.batch * NEW_TOKENS / seconds, "cpu_tok_s": args.batch * NEW_TOKENS / cpu,
            "ttft_s": ttft, "tokens": out[0, PROMPT_LEN:].tolist(), "threads": torch.get_num_threads()}


def spawn(kind: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind] + [f"--{k}={v}" for k, v in kw.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- preparation ------------------------------------------------------------------------------
def prepare(name: str, work: Path) -> tuple[Path, Path]:
    """A chipshift checkpoint and its Hugging Face export, both float32."""
    from chipshift.model.hf import export_hf

    ckpt, hf = work / f"{name}-ckpt", work / f"{name}-hf"
    if name == "M":
        from chipshift.model.checkpoint import save_checkpoint
        from chipshift.model.config import preset
        from chipshift.model.transformer import build_model

        save_checkpoint(build_model(preset("M"), seed=0), ckpt)
    elif name == "smollm2":
        from chipshift.data.packages import smollm2_gguf
        from chipshift.model.gguf import import_gguf

        import_gguf(smollm2_gguf(), ckpt)
    else:
        raise SystemExit(f"unknown model {name!r}: use M or smollm2")
    export_hf(ckpt, hf)
    return ckpt, hf


def copy_bandwidth() -> float:
    """Bytes/s of a large in-place copy (read + write), the ceiling for streaming weights."""
    import torch

    a = torch.ones(32 * 2**20)  # 128 MiB
    b = torch.empty_like(a)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t0)
    return 2 * a.numel() * a.element_size() / statistics.median(times)


def bytes_per_step(ckpt: Path, dtype: str, batch: int) -> int:
    """Weights read once per decode step, plus every row's KV cache at the mean length."""
    from chipshift.devices import parse_dtype
    from chipshift.model.checkpoint import read_sidecar
    from chipshift.model.config import ModelConfig

    import torch

    cfg = ModelConfig.from_dict(read_sidecar(ckpt)["model_config"])
    size = torch.tensor([], dtype=parse_dtype(dtype)).element_size()
    mean_len = PROMPT_LEN + NEW_TOKENS // 2
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * mean_len * size
    return cfg.num_params() * size + batch * kv


# -- server ---------------------------------------------------------------------------------
def server_rates(ckpt: Path, dtype: str, rounds: int, vocab: int) -> dict:
    import httpx

    sys.path.insert(0, str(REPO / "tests"))
    from infer_helpers import live_server

    def stream(url, prompt, ttfts, counts):
        body = {"model": "bench", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
                "ignore_eos": True, "stream": True}
        t0 = time.perf_counter()
        n = 0
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=3600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    if n == 0:
                        ttfts.append(time.perf_counter() - t0)
                    n += 1
        counts.append(n)

    results = {1: [], 8: []}
    ttft = {1: [], 8: []}
    with live_server(ckpt, "--dtype", dtype, "--max-batch", "8", "--max-len", str(PROMPT_LEN + NEW_TOKENS),
                     "--model-name", "bench", timeout=300) as url:
        ids = prompts(8, vocab)
        stream(url, ids[0], [], [])  # warm-up
        for _ in range(rounds):
            for clients in (1, 8):
                ttfts, counts = [], []
                threads = [threading.Thread(target=stream, args=(url, ids[i], ttfts, counts)) for i in range(clients)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                results[clients].append(clients * NEW_TOKENS / wall)
                ttft[clients].append(statistics.median(ttfts))
                print(f"  server {clients} stream(s): {results[clients][-1]:.1f} tok/s aggregate, "
                      f"ttft {ttft[clients][-1] * 1000:.0f} ms", flush=True)
    return {"tok_s_1": statistics.median(results[1]), "tok_s_8": statistics.median(results[8]),
            "ttft_s_1": statistics.median(ttft[1]), "ttft_s_8": statistics.median(ttft[8]),
            "ratio_8_vs_1": statistics.median(results[8]) / statistics.median(results[1])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="M,smollm2")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=3, help="A B rounds per configuration (default 3)")
    p.add_argument("--server-rounds", type=int, default=3, help="0 skips the server measurement")
    p.add_argument("--server-dtype", default="auto", help="serving dtype (default auto: what `chipshift serve` picks)")
    p.add_argument("--server-model", default="smollm2", help="M or smollm2 (default; M has no tokenizer)")
    p.add_argument("--work", default=None, help="keep the prepared checkpoints here (default: a temp dir)")
    p.add_argument("--worker", choices=["chipshift", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--hf", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = (worker_chipshift if args.worker == "chipshift" else worker_hf)(args)
        print(json.dumps(result))
        return 0

    work_ctx = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(args.work or work_ctx.name)
    work.mkdir(parents=True, exist_ok=True)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    from chipshift.devices import machine_facts

    machine = machine_facts()  # figures hold for one CPU class: the JSON names it
    print(f"machine: {machine['cpu']} ({machine['cpu_class']}), {machine['cores']} cores, torch {machine['torch']}")
    summary = {"bench": "decode_vs_hf", "machine": machine, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
               "copy_bandwidth_gbs": round(bandwidth / 1e9, 2), "results": []}
    paths = {}
    for name in args.models.split(","):
        paths[name] = prepare(name, work)
        ckpt, hf = paths[name]
        for dtype in args.dtypes.split(","):
            for batch in map(int, args.batches.split(",")):
                ours, theirs = [], []
                for r in range(args.rounds):
                    ours.append(spawn("chipshift", ckpt=ckpt, dtype=dtype, batch=batch))
                    theirs.append(spawn("hf", hf=hf, dtype=dtype, batch=batch))
                    print(f"  {name} {dtype} batch {batch} round {r + 1}: chipshift {ours[-1]['tok_s']:.1f} "
                          f"tok/s ({ours[-1]['cpu_tok_s']:.1f} per CPU-s), transformers {theirs[-1]['tok_s']:.1f} "
                          f"tok/s ({theirs[-1]['cpu_tok_s']:.1f} per CPU-s)", flush=True)
                a = statistics.median(x["tok_s"] for x in ours)
                b = statistics.median(x["tok_s"] for x in theirs)
                # tokens per CPU-second: steadier than wall time on a shared machine
                ca = statistics.median(x["cpu_tok_s"] for x in ours)
                cb = statistics.median(x["cpu_tok_s"] for x in theirs)
                same = sum(x == y for x, y in zip(ours[0]["tokens"], theirs[0]["tokens"]))
                step_bytes = bytes_per_step(ckpt, dtype, batch)
                row = {"model": name, "dtype": dtype, "batch": batch,
                       "chipshift_tok_s": round(a, 2), "hf_tok_s": round(b, 2), "ratio": round(a / b, 3),
                       "chipshift_cpu_tok_s": round(ca, 2), "hf_cpu_tok_s": round(cb, 2),
                       "cpu_ratio": round(ca / cb, 3),
                       "chipshift_ttft_ms": round(1000 * statistics.median(x["ttft_s"] for x in ours), 1),
                       "hf_ttft_ms": round(1000 * statistics.median(x["ttft_s"] for x in theirs), 1),
                       "greedy_tokens_agree": f"{same}/{NEW_TOKENS}",
                       "bytes_per_step_mb": round(step_bytes / 1e6, 1),
                       "bound_tok_s": round(batch * bandwidth / step_bytes, 1),
                       "fraction_of_bound": round(a / (batch * bandwidth / step_bytes), 3)}
                summary["results"].append(row)
                print(f"{name:8s} {dtype:9s} batch {batch}: chipshift {a:7.1f} tok/s  transformers {b:7.1f} "
                      f"tok/s  ratio {a / b:.2f}x (per CPU-s {ca / cb:.2f}x)  ttft {row['chipshift_ttft_ms']} vs {row['hf_ttft_ms']} ms  "
                      f"agree {row['greedy_tokens_agree']}  bound {row['bound_tok_s']} tok/s "
                      f"({row['bytes_per_step_mb']} MB/step)", flush=True)
    if args.server_rounds > 0:
        from chipshift.model.checkpoint import read_sidecar

        name = args.server_model
        ckpt = paths[name][0] if name in paths else prepare(name, work)[0]
        vocab = read_sidecar(ckpt)["model_config"]["vocab_size"]
        s = server_rates(ckpt, args.server_dtype, args.server_rounds, vocab)
        summary["server"] = {"model": name, "dtype": args.server_dtype, **{k: round(v, 3) for k, v in s.items()}}
        print(f"server {name} {args.server_dtype}: 1 stream {s['tok_s_1']:.1f} tok/s, 8 streams {s['tok_s_8']:.1f} "
              f"tok/s aggregate ({s['ratio_8_vs_1']:.2f}x); ttft {s['ttft_s_1'] * 1000:.0f} / "
              f"{s['ttft_s_8'] * 1000:.0f} ms")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
