"""The `chipshift` command.

Each part of the library registers its own subcommands (a `register(subparsers)`
function in its `cli` module); this file only assembles them and turns a
`ChipshiftError` into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from chipshift.errors import ChipshiftError

# Modules with a `register(subparsers)` function, in the order their commands are listed.
COMMAND_MODULES = (
    "chipshift.devices.cli",
    "chipshift.model.cli",
    "chipshift.demo",
    "chipshift.data.cli",
    "chipshift.plan.cli",
    "chipshift.train.cli",
    "chipshift.train.posttrain_cli",
    "chipshift.infer.cli",
    "chipshift.parity.cli",
    "chipshift.pipeline.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chipshift",
        description="Pre-train, post-train and serve language models on any accelerator, "
                    "move a model between chips at any stage, and prove the results agree.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ChipshiftError as exc:
        print(f"chipshift {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"chipshift {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
