"""`chipshift parity train`: one training run on two targets, loss curves compared step by step.

Both runs share everything but the device and dtype: the config, so the same seed (the
same initial weights, drawn on the CPU), the same data order and the same schedule. A
regression test for a new device, a new dtype or a new PyTorch version.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from chipshift.errors import ChipshiftError
from chipshift.parity.compare import coarser_dtype, compare_losses, thresholds_for
from chipshift.parity.dump import parse_target
from chipshift.parity.report import plot_losses


def train_pair(cfg, a: str, b: str, steps: int, out: str | Path, *, train_stream=None, val_stream=None,
               thresholds: dict | None = None, progress: bool = True) -> dict:
    """Train `cfg` (a TrainConfig) for `steps` on target `a` then `b` ('DEVICE[:DTYPE]'),
    logging every step; compare the two loss curves; write report.json, report.md, loss.png."""
    from chipshift.train.loop import train
    from chipshift.train.metrics import read

    out = Path(out)
    sides = {}
    for key, spec in (("a", a), ("b", b)):
        device, dtype = parse_target(spec)
        run_dir = out / f"run-{key}"
        if run_dir.exists():
            raise ChipshiftError(f"{run_dir} exists; pick another --out (a fresh run on each side, never a resume)")
        side = copy.deepcopy(cfg)
        side.run.device, side.run.dtype, side.run.out = device, dtype, str(run_dir)
        side.train.steps, side.train.log_every = steps, 1
        result = train(side, train_stream=train_stream, val_stream=val_stream, progress=progress)
        losses = [r["loss"] for r in read(result.run_dir / "metrics.jsonl") if "loss" in r]
        resolved = json.loads((result.run_dir / "config.resolved.json").read_text()).get("resolved", {})
        # the device and dtype the run resolved (once, in the trainer), not resolved again here
        sides[key] = {"label": spec, "device": resolved["device"], "dtype": resolved["compute_dtype"],
                      "run_dir": str(result.run_dir), "losses": losses}
    rule_dtype = coarser_dtype(sides["a"]["dtype"], sides["b"]["dtype"])
    th = thresholds_for(rule_dtype, **(thresholds or {}))
    loss = compare_losses(sides["a"]["losses"], sides["b"]["losses"], th)
    report = {"verdict": loss["verdict"], "steps": steps, "rule_dtype": rule_dtype, "dumps": sides, "loss": loss}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    plot_losses(report, out / "loss.png")
    return report


def markdown(report: dict) -> str:
    loss, a, b = report["loss"], report["dumps"]["a"], report["dumps"]["b"]
    lines = [f"# Training parity: **{report['verdict'].upper()}**", "",
             f"A: {a['label']} ({a['dtype']}), B: {b['label']} ({b['dtype']}), {report['steps']} steps; "
             f"tolerance {loss['tolerance']:g} relative per step ({report['rule_dtype']}); max relative "
             f"difference {loss['max_rel_diff']:.3g}"
             + (f", first over tolerance at step {loss['first_failing_step'] + 1}" if loss["first_failing_step"] is not None else ""),
             "", "![loss curves](loss.png)", "", "| step | A | B | relative difference |", "|---|---|---|---|"]
    for i, (x, y, r) in enumerate(zip(loss["a"], loss["b"], loss["rel_diff"]), start=1):
        lines.append(f"| {i} | {x:.6g} | {y:.6g} | {r:.3g} |")
    return "\n".join(lines) + "\n"
