"""`chipshift sft|dpo|grpo CONFIG.toml`: post-training on the one loop.

The commands only: the config, its data and the run are `chipshift.train.posttrain_run`'s
(sft, dpo) and `chipshift.train.grpo_run`'s (grpo), whose docstrings describe the config.
"""

from __future__ import annotations

import argparse

from chipshift.train import grpo_run, posttrain_run
from chipshift.train.cli import add_common_arguments, overrides_from_args
from chipshift.train.posttrain_run import load_posttrain_config, run_posttrain

EPILOG = """examples:
  chipshift {kind} recipes/{recipe}.toml
  chipshift {kind} recipes/{recipe}.toml --set lora.enabled=true --set lora.rank=8
  chipshift {kind} recipes/{recipe}.toml --resume        # continue after a stop or a crash
  torchrun --nproc-per-node 2 -m chipshift {kind} recipes/{recipe}.toml
"""

HELP = {
    "sft": ("supervised fine-tuning on conversations (assistant-only loss, packed; full or LoRA)",
            "Fine-tune a chipshift checkpoint on chat conversations with the one training loop: loss on "
            "assistant tokens only, sequences packed without cross-contamination. Built-in data "
            "(identity, chatterbot, chitchat) or your JSONL. Writes checkpoints (LoRA merged), metrics "
            "and RUN/eval.json (held-out loss, identity-question accuracy before and after)."),
    "dpo": ("direct preference optimisation on (prompt, chosen, rejected) pairs (full or LoRA)",
            "Align a chipshift checkpoint with sigmoid DPO on the one training loop. Reference "
            "log-probabilities are computed once by the init model and cached beside the run. Logs "
            "loss, reward accuracy, margin and chosen/rejected log-probabilities; writes RUN/eval.json "
            "(held-out preference accuracy before and after)."),
    "grpo": ("reinforcement learning with verifiable rewards (GRPO; rollouts from the engine; full or LoRA)",
             "Train a chipshift checkpoint with GRPO on the one training loop: per prompt a group of "
             "completions sampled by the inference engine from the weights being trained, scored by reward "
             "functions (built-in offline tasks: arithmetic, answer tags, identity; or your Python callable), "
             "group-normalised advantages, the clipped ratio objective with an optional KL term. Logs reward, "
             "its spread within groups, completion length, KL, clip fraction and the trainer-to-rollout "
             "log-probability difference; writes RUN/eval.json (held-out pass@1 and mean reward before and "
             "after) and RUN/reward.png."),
}


def register(sub) -> None:
    for kind, (short, description) in HELP.items():
        doc = (grpo_run if kind == "grpo" else posttrain_run).__doc__.split("\n\n", 2)[1]
        recipe = "grpo_smollm2" if kind == "grpo" else f"{kind}_small"
        p = sub.add_parser(kind, help=short, description=description + "\n\n" + doc,
                           epilog=EPILOG.format(kind=kind, recipe=recipe),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_common_arguments(p)
        p.add_argument("--force", action="store_true",
                       help="start even if the init checkpoint's last verified handoff failed")
        p.set_defaults(func=run, kind=kind)


def run(args) -> int:
    overrides = overrides_from_args(args)
    if args.kind == "grpo":
        cfg = grpo_run.load_grpo_config(args.config, overrides)
        result, evaluation = grpo_run.run_grpo(cfg, resume=args.resume, force=args.force,
                                               progress=not args.no_progress)
    else:
        cfg = load_posttrain_config(args.kind, args.config, overrides)
        result, evaluation = run_posttrain(cfg, resume=args.resume, force=args.force,
                                           progress=not args.no_progress)
    if not result.is_main:
        return 0
    if result.stopped == "signal":
        print(f"stopped at step {result.step}; checkpoint {result.checkpoint}; continue with --resume")
        return 130
    summary = ", ".join(f"{k} {evaluation['before'][k]:.3f} -> {v:.3f}"
                        for k, v in evaluation.get("after", {}).items() if isinstance(v, float))
    val = f", val loss {result.last_val_loss:.4f}" if result.last_val_loss is not None else ""
    print(f"done: step {result.step}{val}; " + (f"{summary}; " if summary else "") + f"checkpoint {result.checkpoint}")
    return 0
