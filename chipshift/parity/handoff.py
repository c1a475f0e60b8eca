"""Verified handoff: prove a checkpoint computes the same on the chip it moves to.

`handoff` verifies the checkpoint's checksums, dumps it on the source, on the target and on
the reference (float64 on the CPU unless named), compares (by the error-ratio rule when the
reference was named, else by the coarser dtype's thresholds), writes the report, appends a
record (pass / warn / fail with the figures) to the `handoffs` list of the checkpoint's
sidecar, and writes the checkpoint's certificate (chipshift.parity.certificate) with the
reference that `parity verify` judges a chip against later; optionally with the
trainer-to-server check on the target and the lm-eval score delta between the two sides.
Every later stage calls `chipshift.model.checkpoint.check_handoff_allowed` before it starts
from a checkpoint: it reads only the sidecar.
"""

from __future__ import annotations

import time
from pathlib import Path

from chipshift.model.checkpoint import read_sidecar, update_sidecar, verify_checkpoint
from chipshift.parity.certificate import DEFAULT_BUDGET_MB, write_certificate
from chipshift.parity.compare import compare_dumps
from chipshift.parity.dump import Dump, dump_checkpoint, parse_target
from chipshift.parity.report import write_report


def handoff(ckpt: str | Path, source: str, target: str, *, reference: str | None = None,
            out: str | Path | None = None, thresholds: dict | None = None, serve_check: bool = False,
            tasks: list[str] | None = None, eval_limit: int | None = None,
            certificate_mb: float = DEFAULT_BUDGET_MB, log=print, **dump_kwargs) -> tuple[dict, dict]:
    """Dump `ckpt` on `source` and `target` ('DEVICE[:DTYPE]') and the reference, compare,
    record the verdict, write the certificate (with the serve check on the target when
    `serve_check`, and the lm-eval delta of `tasks` between the two sides when given).

    Returns (the handoff record written to the sidecar, the full comparison)."""
    ckpt = Path(ckpt)
    sidecar = verify_checkpoint(ckpt)  # once here: the dumps below read what was verified
    out = Path(out) if out is not None else ckpt.with_name(ckpt.name + ".handoff")
    sides = {"a": source, "b": target, "reference": reference or "cpu:float64"}
    dumps = {}
    for key, spec in sides.items():
        device, dtype = parse_target(spec)
        dumps[key] = Dump(dump_checkpoint(ckpt, out / f"dump-{key}", device=device, dtype=dtype, verify=False,
                                          **dump_kwargs))
    # the reference judges by the ratio rule when asked for; it is always kept for the certificate
    result = compare_dumps(dumps["a"], dumps["b"], dumps["reference"] if reference else None, **(thresholds or {}))
    report = write_report(result, out, sidecar["model_config"]["num_layers"])
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "from": source,
        "to": target,
        "reference": reference,
        "from_device": result["dumps"]["a"]["device_name"],
        "to_device": result["dumps"]["b"]["device_name"],
        "verdict": result["verdict"],
        "rule": result["rule"],
        "first_failing": result["first_failing"],
        "loss_max_rel_diff": result["loss"]["max_rel_diff"],
        "summary": result["summary"],
        "report": str((report / "report.md").resolve()),
    }
    handoffs = read_sidecar(ckpt).get("handoffs", [])
    update_sidecar(ckpt, handoffs=[*handoffs, record])
    check = delta = None
    if serve_check:
        from chipshift.parity.serve_check import serve_check as run_serve_check
        device, dtype = parse_target(target)
        check = run_serve_check(ckpt, device, None if dtype == "auto" else dtype, log=log)
    if tasks:
        from chipshift.parity.harness import evaluate_checkpoint, score_delta
        runs = [evaluate_checkpoint(ckpt, tasks, d, None if t == "auto" else t, limit=eval_limit, log=log)
                for d, t in map(parse_target, (source, target))]
        delta = score_delta(*runs)
    record["certificate"] = str(write_certificate(ckpt, sidecar, record, result, dumps, budget_mb=certificate_mb,
                                                  serve_check=check, eval_delta=delta) / "certificate.md")
    return record, result
