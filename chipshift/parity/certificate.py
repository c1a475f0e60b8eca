"""The certificate a handoff writes into the checkpoint, and `parity verify`, which judges a
chip against it later, on a machine that never had the source chip.

    CKPT/certificate/
      certificate.json   checkpoint hashes (sha256 per file), both sides' environments, the
                         module verdict and first diverging module, the trainer-to-server
                         check's figures, the eval delta (when run), and what is stored below
      certificate.md     the same for a reader
      reference/         the float64 reference dump (R) and the trusted sides' dumps: the
                         source always, the target too when the handoff did not fail; each
                         a parity dump directory (dump.json, batch.json, tensors.safetensors)

The stored dumps keep their tensors while all of them fit the budget (`budget_mb`, default
64 MiB), else statistics only (all or nothing, as in a dump: a verdict by value for some
modules and by statistics for others would mislead). A checkpoint copied elsewhere carries
its certificate: every path in it is relative to the checkpoint.

`verify(ckpt, device, dtype)` checks the checkpoint's files against the certificate's
hashes, dumps the checkpoint on the device in the dtype with the stored batch and run
settings, and compares by the error-ratio rule: per module, err(new, R) / err(A, R), where A
is the stored trusted dump of the same dtype (else the source's). At most 1 passes, above 2
fails; the first failing module is named.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from chipshift.errors import ChipshiftError
from chipshift.model.checkpoint import sha256_file
from chipshift.parity.dump import BATCH_JSON, DUMP_JSON, TENSORS, Dump, read_json

FORMAT = "chipshift-certificate"
FORMAT_VERSION = 1
CERT_DIR = "certificate"
CERT_JSON = "certificate.json"
CERT_MD = "certificate.md"
DEFAULT_BUDGET_MB = 64.0


def _store_dump(dump: Dump, dest: Path, keep_tensors: bool, why: str) -> None:
    dest.mkdir(parents=True)
    shutil.copyfile(dump.path / BATCH_JSON, dest / BATCH_JSON)
    doc = json.loads((dump.path / DUMP_JSON).read_text())
    if keep_tensors and doc.get("tensors_file"):
        shutil.copyfile(dump.path / doc["tensors_file"], dest / TENSORS)
        doc["tensors_file"] = TENSORS
    elif doc.get("tensors_file"):
        doc.update(tensors_file=None, stats_only=why)
        for r in doc["records"]:
            r["tensor"] = None
    (dest / DUMP_JSON).write_text(json.dumps(doc, indent=1))


def _serve_figures(report: dict) -> dict:
    keys = ("verdict", "device", "dtype", "engine", "reference_device", "max_abs", "mean_abs", "greedy_agreement",
            "thresholds", "failures")
    return {k: report[k] for k in keys if k in report}


def write_certificate(ckpt: str | Path, sidecar: dict, record: dict, result: dict, dumps: dict[str, Dump], *,
                      budget_mb: float = DEFAULT_BUDGET_MB, serve_check: dict | None = None,
                      eval_delta: dict | None = None) -> Path:
    """Write CKPT/certificate/ (replacing an older one) for a handoff; `dumps` has "a", "b" and
    "reference" (the float64 reference is required: it is what a later verify measures against)."""
    ckpt = Path(ckpt)
    if "reference" not in dumps:
        raise ChipshiftError("a certificate needs a reference dump (--reference cpu:float64)")
    trusted = {"from": dumps["a"]} | ({"to": dumps["b"]} if record["verdict"] != "fail" else {})
    stored = {"reference": dumps["reference"], **trusted}
    sizes = {k: (d.path / d.doc["tensors_file"]).stat().st_size if d.doc.get("tensors_file") else 0
             for k, d in stored.items()}
    has_tensors = all(d.doc.get("tensors_file") for d in stored.values())
    keep = has_tensors and sum(sizes.values()) <= budget_mb * 2**20
    why = (f"the stored dumps' tensors ({sum(sizes.values()) / 2**20:.1f} MiB) exceed the certificate's budget "
           f"of {budget_mb:g} MiB" if has_tensors and not keep else "the handoff's dumps kept statistics only")
    out = ckpt / CERT_DIR
    tmp = ckpt / f".{CERT_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for key, d in stored.items():
        _store_dump(d, tmp / "reference" / key, keep, why)
    stored_bytes = sum(p.stat().st_size for p in (tmp / "reference").rglob("*") if p.is_file())
    doc = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checkpoint": {"files": {name: info["sha256"] for name, info in sidecar["files"].items()},
                       "model_config": sidecar["model_config"]},
        "handoff": {k: record[k] for k in ("from", "to", "reference", "from_device", "to_device", "verdict", "rule",
                                           "first_failing", "loss_max_rel_diff", "summary")},
        "first_warning": result.get("first_warning"),
        "environments": {k: d.doc["env"] | {"dtype": d.dtype, "compile": d.doc["run"].get("compile", False)}
                         for k, d in (("from", dumps["a"]), ("to", dumps["b"]), ("reference", dumps["reference"]))},
        "serve_check": _serve_figures(serve_check) if serve_check else None,
        "eval": dict(eval_delta) if eval_delta else None,
        "reference": {"budget_mb": budget_mb, "mode": "tensors" if keep else "statistics",
                      "stats_only": None if keep else why, "bytes": stored_bytes,
                      "dumps": {k: {"path": f"reference/{k}", "dtype": d.dtype} for k, d in stored.items()}},
    }
    (tmp / CERT_JSON).write_text(json.dumps(doc, indent=1))
    (tmp / CERT_MD).write_text(markdown(doc))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def add_to_certificate(ckpt: str | Path, *, serve_check: dict | None = None, eval_delta: dict | None = None) -> bool:
    """Put a later stage's trainer-to-server figures or eval delta into the checkpoint's
    certificate; False when the checkpoint has none (no handoff made it)."""
    path = Path(ckpt) / CERT_DIR / CERT_JSON
    if not path.is_file():
        return False
    doc = read_certificate(ckpt)
    if serve_check is not None:
        doc["serve_check"] = _serve_figures(serve_check)
    if eval_delta is not None:
        doc["eval"] = dict(eval_delta)
    path.write_text(json.dumps(doc, indent=1))
    (path.parent / CERT_MD).write_text(markdown(doc))
    return True


def read_certificate(ckpt: str | Path) -> dict:
    path = Path(ckpt) / CERT_DIR / CERT_JSON
    if not Path(ckpt).is_dir():
        raise ChipshiftError(f"checkpoint not found: {ckpt}")
    if not path.is_file():
        raise ChipshiftError(f"{ckpt} has no certificate ({CERT_DIR}/{CERT_JSON}): hand it off first "
                             f"(chipshift parity handoff CKPT --from D1:T1 --to D2:T2)")
    doc = read_json(path)
    if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        raise ChipshiftError(f"{path} is not a chipshift certificate of format version {FORMAT_VERSION}")
    return doc


def check_hashes(ckpt: str | Path, cert: dict) -> None:
    """Each file the certificate names must exist with the sha256 it records."""
    for name, want in cert["checkpoint"]["files"].items():
        path = Path(ckpt) / name
        if not path.is_file():
            raise ChipshiftError(f"certificate of {ckpt}: {name} is missing from the checkpoint")
        got = sha256_file(path)
        if got != want:
            raise ChipshiftError(f"certificate of {ckpt}: {name} has sha256 {got[:12]}..., the certificate says "
                                 f"{want[:12]}...: the certificate is not of these weights")


def stored_dump(ckpt: str | Path, cert: dict, key: str) -> Dump:
    entry = cert["reference"]["dumps"].get(key)
    if entry is None:
        raise ChipshiftError(f"certificate of {ckpt}: no stored {key} dump")
    path = Path(ckpt) / CERT_DIR / entry["path"]
    if not (path / DUMP_JSON).is_file():
        raise ChipshiftError(f"certificate of {ckpt}: the stored {key} dump ({CERT_DIR}/{entry['path']}) is missing")
    return Dump(path)


def verify(ckpt: str | Path, device: str = "cpu", dtype: str = "auto", *, out: str | Path | None = None,
           thresholds: dict | None = None, progress: bool = True) -> dict:
    """Judge `device` in `dtype` against the certificate's stored reference (error-ratio rule).
    Returns the comparison (compare_dumps' dict) with "baseline" (which stored dump was A) and
    "report" (the report folder)."""
    from chipshift.devices import dtype_name, get_device
    from chipshift.parity.compare import compare_dumps
    from chipshift.parity.dump import dump_checkpoint
    from chipshift.parity.report import write_report

    ckpt = Path(ckpt)
    cert = read_certificate(ckpt)
    check_hashes(ckpt, cert)
    ref = stored_dump(ckpt, cert, "reference")
    trusted = {k: stored_dump(ckpt, cert, k) for k in ("from", "to") if k in cert["reference"]["dumps"]}
    dev = get_device(device)
    want = dtype_name(dev.precision.compute_dtype(dtype).value)
    key = next((k for k, d in trusted.items() if d.dtype == want), "from")
    baseline = trusted[key]
    out = Path(out) if out is not None else ckpt.with_name(f"{ckpt.name}.verify") / f"{dev}-{want}".replace(":", "-")
    run = ref.doc["run"]
    keep = ref.doc.get("tensors_file") is not None
    new = Dump(dump_checkpoint(ckpt, out / "dump", device=device, dtype=want, batch_file=ref.path / BATCH_JSON,
                               steps=run.get("steps", 0), lr=run.get("lr", 1e-3),
                               max_tensor_mb=run.get("max_tensor_mb", 32.0) if keep else 0.0, verify=False,
                               progress=progress))
    result = compare_dumps(baseline, new, ref, **(thresholds or {}))
    result["baseline"] = {"stored": key, "target": cert["handoff"][key], "dtype": baseline.dtype}
    result["report"] = str(write_report(result, out / "report", cert["checkpoint"]["model_config"]["num_layers"]))
    return result


def _f(x) -> str:
    return "—" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


def markdown(doc: dict) -> str:
    h, ref = doc["handoff"], doc["reference"]
    ff = h["first_failing"]
    lines = [f"# Certificate: handoff {h['from']} → {h['to']}: **{h['verdict'].upper()}**", "",
             f"Written {doc['created']} by chipshift. Judge another chip against it: "
             f"`chipshift parity verify CKPT --device D [--dtype T]`.", "",
             "## Checkpoint", "", "| file | sha256 |", "|---|---|"]
    lines += [f"| {name} | `{digest}` |" for name, digest in doc["checkpoint"]["files"].items()]
    lines += ["", "## Module parity", "",
              f"- rule: {h['rule']}; first diverging module: forward {ff['forward'] or 'none'}, backward "
              f"{ff['backward'] or 'none'}", f"- loss: max relative difference {_f(h['loss_max_rel_diff'])}"]
    for direction, s in h["summary"].items():
        if s:
            lines.append(f"- {direction}: {s['modules']} modules, {s['fail']} fail, {s['warn']} warn, median error "
                         f"{_f(s['median_error'])}, max {_f(s['max_error'])} at {s['max_error_module']}")
    lines += ["", "## Environments", "", "| key | from | to | reference |", "|---|---|---|---|"]
    envs = doc["environments"]
    for key in ("device", "device_name", "dtype", "torch", "threads", "compile", "host"):
        lines.append(f"| {key} | " + " | ".join(str(envs[s].get(key)) for s in ("from", "to", "reference")) + " |")
    sc = doc.get("serve_check")
    lines += ["", "## Serving engine vs training forward", ""]
    lines.append(f"{sc['verdict'].upper()} on {sc['device']} in {sc['dtype']}: max |diff| {_f(sc['max_abs'])}, mean "
                 f"{_f(sc['mean_abs'])}, greedy agreement {_f(sc['greedy_agreement'])}" if sc else "not run")
    ev = doc.get("eval")
    lines += ["", "## Evaluation (lm-evaluation-harness)", ""]
    if ev:
        from chipshift.parity.harness import format_delta
        lines += [f"- {line}" for m in ("acc", "acc_norm") for line in format_delta(ev, m)]
    else:
        lines.append("not run")
    stored = ", ".join(f"{k} ({v['dtype']})" for k, v in ref["dumps"].items())
    lines += ["", "## Stored reference", "",
              f"{stored}: {ref['mode']}, "
              f"{ref['bytes'] / 2**20:.2f} MiB (budget {ref['budget_mb']:g} MiB)"
              + (f"; {ref['stats_only']}" if ref["stats_only"] else ""), ""]
    return "\n".join(lines)
