"""`chipshift env diff A B`: what differs between the environments of two runs, dumps or
checkpoints, a key per line.

A side is any of:
  a parity dump (its directory or `dump.json`)  the dump's environment (device, plugin and its
                                                version, threads, versions), its dtype and its
                                                run settings (compile, steps, ...)
  a checkpoint (a directory with `chipshift.json`)  producing device, dtype, versions
  a training run directory (`config.resolved.json`)  the run's settings and the device layer's
                                                decisions (compute dtype, precision, upcast,
                                                processes, ...), and its newest checkpoint's

Nested values are compared key by key (`env.versions.torch`); the time a file was written
and the per-file checksums are left out: they differ between any two runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from chipshift.errors import ChipshiftError
from chipshift.model.checkpoint import SIDECAR
from chipshift.parity.dump import DUMP_JSON

# keys that differ between any two runs and say nothing about the environment
NOISE = ("created", "files", "seconds", "records", "losses", "batch", "meta", "handoffs")


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ChipshiftError(f"{path}: not a readable JSON file ({exc})") from None


def _checkpoint_env(sidecar: dict) -> dict:
    return {k: sidecar.get(k) for k in ("device", "dtype", "versions", "quantized") if k in sidecar}


def environment(path: str | Path) -> tuple[str, dict]:
    """(what `path` is, its environment as a nested dict)."""
    path = Path(path)
    if path.is_dir() and (path / DUMP_JSON).is_file():
        path = path / DUMP_JSON
    if path.is_file() and path.name == DUMP_JSON:
        doc = _read(path)
        return "parity dump", {"env": doc.get("env", {}), "dtype": doc.get("dtype"), "run": doc.get("run", {})}
    if path.is_dir() and (path / SIDECAR).is_file():
        return "checkpoint", _checkpoint_env(_read(path / SIDECAR))
    if path.is_dir() and (path / "config.resolved.json").is_file():
        doc = _read(path / "config.resolved.json")
        env = {"run": doc.get("run", {}), "resolved": doc.get("resolved", {})}
        checkpoints = sorted((path / "checkpoints").glob("step_*")) if (path / "checkpoints").is_dir() else []
        if checkpoints and (checkpoints[-1] / SIDECAR).is_file():
            env["checkpoint"] = _checkpoint_env(_read(checkpoints[-1] / SIDECAR))
        return "training run", env
    raise ChipshiftError(f"{path}: not a parity dump ({DUMP_JSON}), a checkpoint ({SIDECAR}) or a training run "
                         f"directory (config.resolved.json)")


def flatten(doc, prefix: str = "") -> dict[str, object]:
    """Nested dicts as dotted keys; lists and scalars are leaves."""
    if not isinstance(doc, dict):
        return {prefix: doc}
    out: dict[str, object] = {}
    for key, value in doc.items():
        if key in NOISE:
            continue
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def diff(a: str | Path, b: str | Path) -> dict:
    """{"a": kind, "b": kind, "differ": [(key, value_a, value_b)], "same": n} over the keys
    either side has (a key only one side has differs, the other value None)."""
    kind_a, env_a = environment(a)
    kind_b, env_b = environment(b)
    fa, fb = flatten(env_a), flatten(env_b)
    differ = [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
    return {"a": kind_a, "b": kind_b, "differ": differ, "same": sum(fa[k] == fb[k] for k in set(fa) & set(fb))}


def format_diff(result: dict, a: str, b: str) -> str:
    lines = [f"A: {a} ({result['a']})", f"B: {b} ({result['b']})"]
    if not result["differ"]:
        lines.append(f"no difference in {result['same']} keys")
        return "\n".join(lines)
    width = max(len(k) for k, _, _ in result["differ"])
    n = len(result["differ"])
    lines.append(f"{n} {'key differs' if n == 1 else 'keys differ'} ({result['same']} the same):")
    for key, va, vb in result["differ"]:
        lines.append(f"  {key:<{width}}  {json.dumps(va)}  ->  {json.dumps(vb)}")
    return "\n".join(lines)
