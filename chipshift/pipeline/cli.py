"""`chipshift run`: the command."""

from __future__ import annotations

import argparse

from chipshift.pipeline.recipe import MAKES_MODEL, Recipe, load_recipe
from chipshift.pipeline.run import run_recipe
from chipshift.pipeline.state import RunState

EPILOG = """examples:
  chipshift run recipes/demo.toml                  # the whole job; run again to resume
  chipshift run recipes/demo.toml --set stages.pretrain.train.steps=50
  chipshift run recipes/smollm2.toml --check       # validate only
  chipshift run demo                               # a shipped recipe by name
"""


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="run a recipe: tokenizer, data, pre-training, SFT, DPO, eval, serve/export, resumable",
        description="Run the stages of a recipe in order, each on its own device and dtype. Between stages "
                    "whose device or dtype differ, the checkpoint is handed off with a module-by-module "
                    "parity check. Finished stages are skipped on a re-run; an interrupted training stage "
                    "continues from its checkpoint. Writes RUN/report.html and RUN/report.md.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe TOML file (or the name of a shipped recipe: demo, smollm2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set stages.pretrain.train.steps=100 (repeatable)")
    p.add_argument("--force", action="store_true",
                   help="continue past a failed handoff (the report still records the failure)")
    p.add_argument("--check", action="store_true", help="validate the recipe and print the plan; run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.check:
        print(f"recipe {recipe.name}: valid; runs in {recipe.out}")
        for st in recipe.stages:
            where = "on the host" if st.kind in ("tokenizer", "data") else f"device {st.device}, dtype {st.dtype}"
            print(f"  {st.name:<12} {st.kind:<9} {where}"
                  + (f", from {st.source}" if st.source else "") + (f", {st.nproc} processes" if st.nproc > 1 else ""))
        return 0
    report = run_recipe(recipe, force=args.force, progress=not args.no_progress)
    print(f"\nreport: {report.resolve()}  (and {report.with_suffix('.md')})")
    final = final_model(recipe, RunState(recipe.out))
    if final:
        print(f"chat with the result:  chipshift chat {final}\nserve it:              chipshift serve {final}")
    return 0


def final_model(recipe: Recipe, state: RunState) -> str | None:
    models = [s for s in recipe.stages if s.kind in MAKES_MODEL]
    return state.result(models[-1].name).model if models else None
