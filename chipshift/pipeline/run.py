"""Running a recipe: stage after stage, skipping what is done, handing off between devices,
recording the state and rewriting the report after every stage."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from chipshift.errors import ChipshiftError
from chipshift.pipeline.handoff import handoff_before
from chipshift.pipeline.recipe import MAKES_MODEL, TRAINING, USES_MODEL, Recipe
from chipshift.pipeline.stages import (run_data, run_eval, run_export, run_import, run_posttrain_stage,
                                       run_pretrain, run_serve, run_tokenizer)
from chipshift.pipeline.state import Context, Interrupted, RunState, resolved_target

RUNNERS = {"tokenizer": run_tokenizer, "data": run_data, "import": run_import, "pretrain": run_pretrain,
           "sft": run_posttrain_stage, "dpo": run_posttrain_stage, "grpo": run_posttrain_stage, "eval": run_eval,
           "serve": run_serve, "export": run_export}


def run_recipe(recipe: Recipe, *, force: bool = False, progress: bool = True) -> Path:
    """Run every stage not already finished; returns the report's path. Raises
    KeyboardInterrupt after a signal (the state and report are written first)."""
    from chipshift.devices import get_device
    from chipshift.pipeline.report import write_report

    recipe.out.mkdir(parents=True, exist_ok=True)
    state = RunState(recipe.out)
    state.data["recipe"] = recipe.raw
    ctx = Context(recipe, state, force, progress)
    # A stage's fingerprint covers its settings and those of every earlier stage that makes
    # something later stages use (tokenizer, data, a model); once such a stage runs again,
    # every later stage runs again too. eval, serve and export feed nothing forward.
    chain, ran = "", False
    for i, st in enumerate(recipe.stages, 1):
        fingerprint = st.fingerprint(chain)
        feeds_forward = st.kind in MAKES_MODEL | {"tokenizer", "data"}
        if feeds_forward:
            chain = fingerprint
        if not ran and state.finished(st.name, fingerprint):
            print(f"== [{i}/{len(recipe.stages)}] {st.name}: done earlier, outputs verified; skipped", flush=True)
            continue
        try:
            if st.source:
                handoff_before(ctx, st, fingerprint)
            ran = ran or feeds_forward
            rec = state.record(st.name)
            resumed = rec.get("status") in ("interrupted", "running") and rec.get("fingerprint") == fingerprint
            if rec.get("fingerprint") not in (None, fingerprint) and ctx.stage_dir(st).exists():
                shutil.rmtree(ctx.stage_dir(st))  # its settings changed: start over, never resume across them
            rec.update(kind=st.kind, status="running", fingerprint=fingerprint,
                       seconds_before=rec.get("seconds", 0.0) if resumed else 0.0)
            on_device = st.kind in TRAINING | USES_MODEL
            if on_device:
                rec["device"], rec["dtype"] = resolved_target(st.device, st.dtype, st.emulate)
                if st.emulate:  # the report's device column says so
                    rec["device"] += f" emulating {st.emulate}"
            else:
                rec["device"], rec["dtype"] = "host", None
            rec["nproc"] = st.nproc
            state.save()
            print(f"== [{i}/{len(recipe.stages)}] {st.name} ({st.kind}"
                  + (f" on {rec['device']} {rec['dtype']}" if on_device else "")
                  + (f", {st.nproc} processes" if st.nproc > 1 else "") + ")", flush=True)
            dev = get_device(rec["device"].split()[0] if on_device else "cpu")
            dev.reset_peak_memory()
            t0, cpu0 = time.perf_counter(), time.process_time()
            try:
                result = RUNNERS[st.kind](ctx, st)
            finally:
                rec["seconds"] = rec["seconds_before"] + time.perf_counter() - t0
                # this process's CPU time (all its threads): on a shared machine, steadier than wall time
                rec["cpu_seconds"] = time.process_time() - cpu0
            rec.update(status="done", result=result.to_json(),
                       peak_memory=dev.max_memory_allocated() if st.nproc == 1 else None)
            state.save()
        except (Interrupted, KeyboardInterrupt) as exc:
            state.record(st.name).update(kind=st.kind, status="interrupted")
            state.save()
            write_report(recipe.out, state.data)
            print(f"interrupted in stage {st.name} ({str(exc) or 'Ctrl-C'}); run the same command again to "
                  f"continue", file=sys.stderr)
            raise KeyboardInterrupt from None
        except ChipshiftError as exc:
            rec = state.record(st.name)
            rec.update(kind=st.kind, status="failed", error=str(exc))
            state.save()
            write_report(recipe.out, state.data)
            raise ChipshiftError(f"stage {st.name}: {exc} (report: {recipe.out / 'report.html'})") from None
        write_report(recipe.out, state.data)
    return write_report(recipe.out, state.data)

