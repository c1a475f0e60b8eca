"""`chipshift run RECIPE.toml`: one recipe runs the whole job, stage by stage, each stage on
its own device and dtype, with a verified handoff wherever the two differ.

A recipe (see docs/pipeline.md and recipes/):

    [recipe]                 name, out (default runs/NAME), device, dtype, seed
    [stages.NAME]            one table per stage, run in file order; `kind` defaults to NAME
                             (tokenizer, data, import, pretrain, sft, dpo, eval, serve, export),
                             plus device, dtype, nproc and `from` (the stage whose model it
                             starts from; default the last stage that made a model)

Everything is validated before any stage runs: an unknown key or a bad value stops with
the key, the value and what is allowed. Between a model and the stage that uses it, when
their device or dtype differ, `chipshift.parity.handoff` dumps the checkpoint on both sides
and compares module by module; a failed handoff stops the pipeline (unless --force) and the
report says where the numbers diverged.

Re-running resumes: `runs/NAME/state.json` records each finished stage with a fingerprint of
its settings and the sha256 of its outputs; a stage whose record still matches is skipped. An
interrupted training stage (Ctrl-C, SIGTERM, a kill) continues from its newest checkpoint.
A stage with nproc > 1 runs as `torchrun --nproc-per-node N -m chipshift ...`.

The report (`runs/NAME/report.html`, self-contained, and `report.md`) is rewritten after
every stage, so it also explains a pipeline that stopped.
"""

from chipshift.pipeline.recipe import RECIPES_DIR, Recipe, Stage, find_recipe, load_recipe, parse_recipe
from chipshift.pipeline.run import run_recipe

__all__ = ["RECIPES_DIR", "Recipe", "Stage", "find_recipe", "load_recipe", "parse_recipe", "run_recipe"]
