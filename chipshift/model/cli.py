"""`chipshift import`, `chipshift export` and `chipshift generate`."""

from __future__ import annotations

import sys
from pathlib import Path

from chipshift.errors import ChipshiftError

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def register(sub) -> None:
    from chipshift.devices import known_types

    p = sub.add_parser("import", help="convert a Hugging Face folder or a .gguf file into a chipshift checkpoint",
                       description="Convert SRC, a Hugging Face model folder (LlamaForCausalLM, Qwen2ForCausalLM, "
                                   "MistralForCausalLM; safetensors weights) or a llama.cpp .gguf file (F32, F16, "
                                   "BF16, Q8_0, Q4_0, Q4_1), into a chipshift checkpoint directory OUT.")
    p.add_argument("src", metavar="SRC", help="Hugging Face model folder or .gguf file")
    p.add_argument("out", metavar="OUT", help="checkpoint directory to write")
    p.add_argument("--dtype", choices=DTYPE_CHOICES,
                   help="store the weights in this dtype (default: as in SRC; float32 for GGUF)")
    p.add_argument("--keep-quantized", action="store_true",
                   help="GGUF: keep Q8_0/Q4_0/Q4_1 tensors as their quantized blocks (served with integer "
                        "matmuls, never dequantized in memory); the rest in --dtype (default bfloat16)")
    p.set_defaults(func=run_import)

    p = sub.add_parser("quantize", help="quantize a checkpoint's weights for serving (Q8_0, Q4_0, Q4_1)",
                       description="Write checkpoint CKPT to OUT with its linear layers' weights quantized to "
                                   "FORMAT (GGUF blocks, as llama.cpp's reference quantizers make them) and its "
                                   "embedding to --embedding-format; norms stay bfloat16. `chipshift serve OUT` "
                                   "multiplies the blocks as they are.")
    p.add_argument("ckpt", metavar="CKPT", help="chipshift checkpoint directory")
    p.add_argument("out", metavar="OUT", help="checkpoint directory to write")
    p.add_argument("--format", default="Q4_1", help="Q8_0, Q4_0 or Q4_1 (default: Q4_1)")
    p.add_argument("--embedding-format", default="Q8_0", help="Q8_0 (default), Q4_0, Q4_1, or none")
    p.set_defaults(func=run_quantize)

    p = sub.add_parser("export", help="write a chipshift checkpoint in another format",
                       description="Write checkpoint CKPT as a Hugging Face model folder OUT (config.json, "
                                   "model.safetensors, generation_config.json, tokenizer files with the chat "
                                   "template) that transformers' from_pretrained loads as it is.")
    p.add_argument("ckpt", metavar="CKPT", help="chipshift checkpoint directory")
    p.add_argument("out", metavar="OUT", help="folder to write")
    p.add_argument("--format", choices=("hf",), default="hf", help="output format (default: hf)")
    p.set_defaults(func=run_export)

    p = sub.add_parser("generate", help="complete a prompt with the naive reference generator",
                       description="Generate a continuation of PROMPT with checkpoint CKPT, recomputing the "
                                   "whole sequence each step (the reference the fast engine must match). "
                                   "Greedy unless --temperature > 0.")
    p.add_argument("ckpt", metavar="CKPT", help="chipshift checkpoint directory")
    p.add_argument("prompt", metavar="PROMPT", help="text to continue (or the user message with --chat)")
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the checkpoint's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set reaching this probability")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--device", default=None, help=f"{', '.join(known_types())}, optionally with an index "
                                                  "(default: $CHIPSHIFT_DEVICE or auto-detect)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (default), float32, bfloat16, float16")
    p.add_argument("--emulate", metavar="PROFILE_OR_CHIP",
                   help="generate with another chip's arithmetic: a numerics profile (fp16-only, bf16, tf32, "
                        "fp8-ue8m0, ...) or a chip (ascend-910a, ...); see docs/rehearse.md")
    p.set_defaults(func=run_generate)


def import_model(src: str | Path, out: str | Path, dtype=None, keep_quantized: bool = False) -> Path:
    """Import a .gguf file or a Hugging Face folder; the format is told by what SRC is."""
    from chipshift.model.gguf import import_gguf
    from chipshift.model.hf import import_hf, is_hf_folder

    src = Path(src)
    if not src.exists():
        raise ChipshiftError(f"not found: {src}")
    if src.is_file() and src.suffix == ".gguf":
        return import_gguf(src, out, dtype=dtype, keep_quantized=keep_quantized)
    if keep_quantized:
        raise ChipshiftError("--keep-quantized applies to .gguf files (a Hugging Face folder holds float weights)")
    if is_hf_folder(src):
        return import_hf(src, out, dtype=dtype)
    raise ChipshiftError(f"{src} is neither a .gguf file nor a Hugging Face model folder (with config.json)")


def run_import(args) -> int:
    from chipshift.devices import parse_dtype

    out = import_model(args.src, args.out, parse_dtype(args.dtype) if args.dtype else None,
                       keep_quantized=args.keep_quantized)
    print(f"wrote {out}")
    return 0


def run_quantize(args) -> int:
    import torch

    from chipshift.model.checkpoint import load_checkpoint, save_checkpoint
    from chipshift.model.quant import check_format, quantize_model

    check_format(args.format)
    embedding = None if args.embedding_format.lower() == "none" else check_format(args.embedding_format)
    model, side = load_checkpoint(args.ckpt, dtype=torch.float32)
    if side.get("quantized"):
        raise ChipshiftError(f"{args.ckpt} is quantized already ({', '.join(sorted(set(side['quantized'].values())))})")
    formats = quantize_model(model, args.format, embedding)
    out = save_checkpoint(model.to(torch.bfloat16), args.out, tokenizer_dir=args.ckpt,
                          meta={**side.get("meta", {}), "quantized_from": str(Path(args.ckpt).resolve())})
    print(f"wrote {out} ({len(formats)} weights quantized: {args.format}, embedding {embedding or 'bfloat16'})")
    return 0


def run_export(args) -> int:
    from chipshift.model.hf import export_hf

    print(f"wrote {export_hf(args.ckpt, args.out)}")
    return 0


def run_generate(args) -> int:
    from chipshift.data.tokenizer import Tokenizer
    from chipshift.devices import get_device
    from chipshift.model.checkpoint import load_checkpoint
    from chipshift.model.generate import encode_prompt, iter_naive, stream_text

    if args.max_new_tokens < 1:
        raise ChipshiftError(f"--max-new-tokens = {args.max_new_tokens}: must be at least 1")
    if args.temperature < 0:
        raise ChipshiftError(f"--temperature = {args.temperature}: must be >= 0")
    dev = get_device(args.device, args.emulate)
    dtype, why = dev.precision.compute_dtype(args.dtype)
    model, _ = load_checkpoint(args.ckpt, device=dev.torch_device, dtype=dtype)  # verifies checksums first
    tok = Tokenizer.load(args.ckpt)
    model.eval()
    print(f"[{dev} {why}]", file=sys.stderr)
    ids = encode_prompt(tok, args.prompt, args.chat)
    with dev.numerics():
        stream_text(tok, iter_naive(model, ids, args.max_new_tokens, temperature=args.temperature,
                                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_ids=tok.stop_ids()))
    return 0

