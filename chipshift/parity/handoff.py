"""Verified handoff: prove a checkpoint computes the same on the chip it moves to.

`handoff` verifies the checkpoint's checksums, dumps it on the source and on the target
(and optionally a float64 reference), compares, writes the report, and appends a record
(pass / warn / fail with the figures) to the `handoffs` list of the checkpoint's sidecar.
Every later stage calls `chipshift.model.checkpoint.check_handoff_allowed` before it starts
from a checkpoint: it reads only the sidecar.
"""

from __future__ import annotations

import time
from pathlib import Path

from chipshift.model.checkpoint import read_sidecar, update_sidecar, verify_checkpoint
from chipshift.parity.compare import compare_dumps
from chipshift.parity.dump import Dump, dump_checkpoint, parse_target
from chipshift.parity.report import write_report


def handoff(ckpt: str | Path, source: str, target: str, *, reference: str | None = None,
            out: str | Path | None = None, thresholds: dict | None = None, **dump_kwargs) -> tuple[dict, dict]:
    """Dump `ckpt` on `source` and `target` ('DEVICE[:DTYPE]'), compare, record the verdict.

    Returns (the handoff record written to the sidecar, the full comparison)."""
    ckpt = Path(ckpt)
    sidecar = verify_checkpoint(ckpt)  # once here: the dumps below read what was verified
    out = Path(out) if out is not None else ckpt.with_name(ckpt.name + ".handoff")
    sides = {"a": source, "b": target, **({"reference": reference} if reference else {})}
    dumps = {}
    for key, spec in sides.items():
        device, dtype = parse_target(spec)
        dumps[key] = Dump(dump_checkpoint(ckpt, out / f"dump-{key}", device=device, dtype=dtype, verify=False,
                                          **dump_kwargs))
    result = compare_dumps(dumps["a"], dumps["b"], dumps.get("reference"), **(thresholds or {}))
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
    return record, result
