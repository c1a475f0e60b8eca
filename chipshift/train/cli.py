"""`chipshift pretrain CONFIG.toml`: pre-train a model with the one training loop."""

from __future__ import annotations

import argparse

from chipshift.train.config import load_config

EPILOG = """examples:
  chipshift pretrain recipes/pretrain_small.toml
  chipshift pretrain recipes/pretrain_small.toml --set optim.lr=1e-3 --set train.steps=200
  chipshift pretrain recipes/pretrain_small.toml --resume          # continue after a stop or a crash
  torchrun --nproc-per-node 2 -m chipshift pretrain recipes/pretrain_small.toml
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 --max-restarts 3 \
      -m chipshift pretrain recipes/pretrain_small.toml          # on each node; docs/train.md
"""


def register(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="pre-train a model from a TOML config (resumable, multi-process via torchrun)",
        description="Pre-train a Llama-family model on token shards made by `chipshift data prepare`. "
                    "The config is validated before any work; the resolved config, JSONL metrics, "
                    "TensorBoard logs, checkpoints and a loss-curve PNG are written to run.out.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p)
    p.set_defaults(func=run)


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments every training command shares (pretrain, sft, dpo)."""
    p.add_argument("config", help="TOML config with [run] [model] [data] [optim] [train] sections")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--resume", nargs="?", const=True, default=False, type=_resume_mode,
                   metavar="auto",
                   help="continue from the newest checkpoint in run.out whose checksums verify; `--resume auto`: "
                        "from it if there is one, else start afresh (a relaunched job). Elastic restarts under "
                        "torchrun --max-restarts resume as `auto` by themselves")
    p.add_argument("--device", help="device to train on (same as --set run.device=...)")
    p.add_argument("--emulate", metavar="PROFILE_OR_CHIP",
                   help="compute with another chip's arithmetic: a numerics profile (fp16-only, bf16, tf32, "
                        "fp8-ue8m0, ...) or a chip (ascend-910a, h100-sxm:fp8-e4m3, ...); same as --set run.emulate=...")
    p.add_argument("--out", help="run directory (same as --set run.out=...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs and metrics only)")


def _resume_mode(text: str) -> str:
    if text != "auto":
        raise argparse.ArgumentTypeError(f"--resume takes no value or `auto`, not {text!r}")
    return text


def overrides_from_args(args) -> list[str]:
    """--set values, then the flags that stand for run.* keys."""
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"run.device={args.device!r}")
    if args.emulate:
        overrides.append(f"run.emulate={args.emulate!r}")
    if args.out:
        overrides.append(f"run.out={args.out!r}")
    return overrides


def config_from_args(args):
    return load_config(args.config, overrides_from_args(args))


def run(args) -> int:
    from chipshift.train.loop import train

    cfg = config_from_args(args)
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    if not result.is_main:
        return 0
    if result.stopped == "signal":
        print(f"stopped at step {result.step}; checkpoint {result.checkpoint}; continue with --resume")
        return 130
    val = f", val loss {result.last_val_loss:.4f}" if result.last_val_loss is not None else ""
    print(f"done: step {result.step}{val}; checkpoint {result.checkpoint}; loss curve {result.png}")
    return 0
