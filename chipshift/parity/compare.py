"""`chipshift parity compare`: judge dump B against dump A, module by module.

Per module and direction (forward outputs, backward input gradients) with tensors kept:

    cosine        <a, b> / (|a| |b|)
    max_abs_err   max |b - a|
    max_err_norm  max |b - a| / max |a|   (scale-free, so gradients, which are orders of
                                           magnitude smaller than activations, meet the
                                           same bar)
    rel_l2        |b - a| / |a|
    off_0.1%, off_0.5%   share of elements with |b - a| > 0.1% (0.5%) of |a|, where |a| is
                         raised to a floor of 1% of the tensor's RMS so that elements near
                         zero do not count as off

With statistics only: the relative difference of the L2 norms (`norm_rel_diff`), of the
means (in units of the RMS) and of the ranges. A verdict per module follows the
thresholds of the coarser of the two dtypes (`DEFAULT_THRESHOLDS`, overridable). With a
reference dump R (float64 on the CPU), the error-ratio rule decides instead: a module's
relative error of B against R, divided by A's; at most 1 passes, up to 2 warns, above 2
fails, so a new chip is judged by whether it is worse than the old one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from chipshift.errors import ChipshiftError
from chipshift.parity.dump import Dump

DIRECTIONS = ("forward", "backward")
# coarsest first: the comparison of two dumps is judged by the coarser one's thresholds
PRECISION_ORDER = ("bfloat16", "float16", "float32", "float64")
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24, "float64": 2.0**-53}
TINY = 1e-30


@dataclass(frozen=True)
class Thresholds:
    """When a module fails or warns. Tensor rule (the field's customary form): fail when
    cosine < cos_fail together with max_err_norm > max_err_fail, or when cosine <
    cos_hard_fail; and, since cosine is blind to a rescale (a wrong RMSNorm epsilon, a
    wrong scale factor), also when rel_l2 > rel_l2_fail; warn when cosine < cos_warn.
    Statistics rule: fail (warn) when the L2 norms differ by more than stats_fail
    (stats_warn). Loss: relative difference per step. Error-ratio rule (with a
    reference): warn above ratio_warn, fail above ratio_fail."""

    cos_fail: float
    max_err_fail: float
    cos_hard_fail: float
    rel_l2_fail: float
    cos_warn: float
    stats_fail: float
    stats_warn: float
    loss_fail: float
    loss_warn: float
    ratio_warn: float = 1.0
    ratio_fail: float = 2.0


# The half-precision rows are the field's customary bar (cosine 0.99 with max error 1e-3,
# or cosine 0.9), plus a relative-L2 bar set above what bfloat16 rounding reaches in the
# deepest gradients of SmolLM2-135M (0.12). float32 and float64 are held to bars well
# above what their rounding produces there (float32 vs float64: relative L2 up to 2e-6
# forward and 2e-4 in the deepest gradients; docs/parity.md), so that kernel-order
# differences pass and a real fault does not.
DEFAULT_THRESHOLDS = {
    "bfloat16": Thresholds(cos_fail=0.99, max_err_fail=1e-3, cos_hard_fail=0.9, rel_l2_fail=0.2, cos_warn=0.995,
                           stats_fail=0.1, stats_warn=0.03, loss_fail=0.02, loss_warn=0.005),
    "float16": Thresholds(cos_fail=0.99, max_err_fail=1e-3, cos_hard_fail=0.9, rel_l2_fail=0.1, cos_warn=0.999,
                          stats_fail=0.03, stats_warn=0.01, loss_fail=5e-3, loss_warn=1e-3),
    "float32": Thresholds(cos_fail=0.99999, max_err_fail=1e-4, cos_hard_fail=0.999, rel_l2_fail=5e-3,
                          cos_warn=0.999999,
                          stats_fail=1e-3, stats_warn=1e-4, loss_fail=1e-4, loss_warn=1e-5),
    "float64": Thresholds(cos_fail=1 - 1e-8, max_err_fail=1e-7, cos_hard_fail=0.99999, rel_l2_fail=1e-6,
                          cos_warn=1 - 1e-10, stats_fail=1e-6, stats_warn=1e-8,
                          loss_fail=1e-8, loss_warn=1e-10),
}


def coarser_dtype(*dtypes: str) -> str:
    for name in PRECISION_ORDER:
        if name in dtypes:
            return name
    raise ChipshiftError(f"no thresholds for dtypes {', '.join(dtypes)}; known: {', '.join(PRECISION_ORDER)}")


def thresholds_for(dtype: str, **overrides) -> Thresholds:
    return dataclasses.replace(DEFAULT_THRESHOLDS[dtype], **{k: v for k, v in overrides.items() if v is not None})


# -- metrics ---------------------------------------------------------------------------
def tensor_metrics(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double().flatten(), b.double().flatten()
    finite = torch.isfinite(a) & torch.isfinite(b)
    a, b = torch.where(finite, a, 0.0), torch.where(finite, b, 0.0)
    diff = b - a
    na, nb = a.norm().item(), b.norm().item()
    if na < TINY and nb < TINY:
        cosine = 1.0
    else:
        cosine = (a @ b).item() / max(na * nb, TINY)
    scale = a.abs().max().item() if a.numel() else 0.0
    max_abs = diff.abs().max().item() if a.numel() else 0.0
    rms = na / math.sqrt(max(a.numel(), 1))
    denom = a.abs().clamp_min(max(0.01 * rms, TINY))
    rel = diff.abs() / denom
    return {
        "cosine": cosine,
        "max_abs_err": max_abs,
        "max_err_norm": max_abs / max(scale, TINY) if max_abs else 0.0,
        "rel_l2": diff.norm().item() / max(na, TINY) if max_abs else 0.0,
        "off_0.1%": (rel > 1e-3).double().mean().item() if a.numel() else 0.0,
        "off_0.5%": (rel > 5e-3).double().mean().item() if a.numel() else 0.0,
    }


def stats_metrics(ra: dict, rb: dict) -> dict:
    rms = ra["l2"] / math.sqrt(max(ra["numel"], 1))
    scale = max(abs(ra["min"]), abs(ra["max"]), TINY)
    return {
        "norm_rel_diff": abs(rb["l2"] - ra["l2"]) / max(ra["l2"], TINY) if rb["l2"] != ra["l2"] else 0.0,
        "mean_diff": abs(rb["mean"] - ra["mean"]) / max(rms, TINY) if rb["mean"] != ra["mean"] else 0.0,
        "range_diff": max(abs(rb["min"] - ra["min"]), abs(rb["max"] - ra["max"])) / scale,
    }


def pair_metrics(da: Dump, ra: dict, db: Dump, rb: dict) -> tuple[str, dict]:
    """('tensors' | 'statistics', metrics) for one module in two dumps."""
    ta, tb = da.tensor(ra), db.tensor(rb)
    if ta is not None and tb is not None:
        return "tensors", tensor_metrics(ta, tb)
    return "statistics", stats_metrics(ra, rb)


def error_of(mode: str, metrics: dict) -> float:
    """The one error figure used along depth and by the error-ratio rule."""
    return metrics["rel_l2"] if mode == "tensors" else metrics["norm_rel_diff"]


def judge(mode: str, m: dict, th: Thresholds) -> tuple[str, str]:
    if mode == "tensors":
        c = m["cosine"]
        if c < th.cos_hard_fail:
            return "fail", f"cosine {c:.6g} < {th.cos_hard_fail:g}"
        if c < th.cos_fail and m["max_err_norm"] > th.max_err_fail:
            return "fail", (f"cosine {c:.6g} < {th.cos_fail:g} and max error "
                            f"{m['max_err_norm']:.3g} of max|A| > {th.max_err_fail:g}")
        if m["rel_l2"] > th.rel_l2_fail:
            return "fail", f"relative L2 error {m['rel_l2']:.3g} > {th.rel_l2_fail:g}"
        if c < th.cos_warn:
            return "warn", f"cosine {c:.6g} < {th.cos_warn:g}"
        return "pass", ""
    d = m["norm_rel_diff"]
    if d > th.stats_fail:
        return "fail", f"L2 norms differ by {d:.3g} > {th.stats_fail:g}"
    if d > th.stats_warn:
        return "warn", f"L2 norms differ by {d:.3g} > {th.stats_warn:g}"
    return "pass", ""


def judge_ratio(ratio: float, th: Thresholds) -> tuple[str, str]:
    if ratio > th.ratio_fail:
        return "fail", f"error vs reference {ratio:.3g}x A's > {th.ratio_fail:g}x"
    if ratio > th.ratio_warn:
        return "warn", f"error vs reference {ratio:.3g}x A's > {th.ratio_warn:g}x"
    return "pass", ""


# -- validation ------------------------------------------------------------------------
def check_comparable(a: Dump, b: Dump, what: str = "A and B") -> None:
    """Raise a ChipshiftError naming the first way in which two dumps cannot be compared."""
    where = f"dumps {what} ({a.path}, {b.path})"
    ca, cb = a.doc["model"]["config"], b.doc["model"]["config"]
    if ca != cb:
        keys = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
        diffs = ", ".join(f"{k} {ca.get(k)!r} vs {cb.get(k)!r}" for k in keys[:4])
        raise ChipshiftError(f"{where} are of different models: {diffs}")
    wa, wb = a.doc["model"].get("weights_sha256"), b.doc["model"].get("weights_sha256")
    if wa != wb:
        raise ChipshiftError(f"{where} are of different weights (sha256 {str(wa)[:12]} vs {str(wb)[:12]})")
    ba, bb = a.doc["batch"], b.doc["batch"]
    if ba["sha256"] != bb["sha256"]:
        raise ChipshiftError(f"{where} ran different batches (shape {ba['shape']} from {ba['source']} vs "
                             f"{bb['shape']} from {bb['source']}); pass the same --batch file to both")
    for key in ("steps", "lr"):
        if a.doc["run"].get(key) != b.doc["run"].get(key):
            raise ChipshiftError(f"{where} ran different --{key}: {a.doc['run'].get(key)} vs {b.doc['run'].get(key)}")
    for direction in DIRECTIONS:
        na = [r["name"] for r in a.records(direction)]
        nb = [r["name"] for r in b.records(direction)]
        if na != nb:
            missing = [n for n in na if n not in set(nb)]
            extra = [n for n in nb if n not in set(na)]
            if missing or extra:
                detail = (f"only in the first: {', '.join(missing[:3]) or '-'}; "
                          f"only in the second: {', '.join(extra[:3]) or '-'}")
            else:
                i = next(i for i, (x, y) in enumerate(zip(na, nb)) if x != y)
                detail = f"the order differs at {direction} record {i}: {na[i]} vs {nb[i]}"
            raise ChipshiftError(f"{where} recorded different {direction} module lists: {detail}")
        for ra, rb in zip(a.records(direction), b.records(direction)):
            if ra["shape"] != rb["shape"]:
                raise ChipshiftError(f"{where}: {direction} {ra['name']} has shape {ra['shape']} vs {rb['shape']}")


# -- the comparison --------------------------------------------------------------------
def compare_dumps(a: Dump, b: Dump, reference: Dump | None = None, ratio_floor: float | None = None,
                  **overrides) -> dict:
    """The full comparison as a JSON-ready dict; `overrides` replace threshold fields;
    `ratio_floor` the least error A is credited with under the error-ratio rule."""
    check_comparable(a, b)
    if reference is not None:
        check_comparable(a, reference, "A and R")
    rule_dtype = coarser_dtype(a.dtype, b.dtype)
    th = thresholds_for(rule_dtype, **overrides)
    # A's error against R can be 0 (A computes in float64 too, or a module is exact); the
    # floor keeps the ratio finite at a tenth of the finer dtype's rounding
    floor = ratio_floor if ratio_floor is not None else 0.1 * min(UNIT_ROUNDOFF[a.dtype], UNIT_ROUNDOFF[b.dtype])
    modules: dict[str, list[dict]] = {}
    modes = set()
    for direction in DIRECTIONS:
        rows = []
        rrecs = reference.records(direction) if reference is not None else None
        for i, (ra, rb) in enumerate(zip(a.records(direction), b.records(direction))):
            mode, m = pair_metrics(a, ra, b, rb)
            if reference is not None:
                rr = rrecs[i]
                mode_ar, m_ar = pair_metrics(reference, rr, a, ra)
                mode_br, m_br = pair_metrics(reference, rr, b, rb)
                if len({mode, mode_ar, mode_br}) > 1:  # judge all three by the same kind of figure
                    mode, m = "statistics", stats_metrics(ra, rb)
                    m_ar, m_br = stats_metrics(rr, ra), stats_metrics(rr, rb)
            row = {"name": ra["name"], "mode": mode, **m, "nonfinite_a": ra["nonfinite"],
                   "nonfinite_b": rb["nonfinite"]}
            if reference is not None:
                err_a, err_b = error_of(mode, m_ar), error_of(mode, m_br)
                ratio = err_b / max(err_a, floor) if err_b > floor else 0.0
                row.update(err_a_vs_ref=err_a, err_b_vs_ref=err_b, ratio=ratio, absolute=judge(mode, m, th)[0])
            if ra["nonfinite"] != rb["nonfinite"]:
                verdict, reason = "fail", f"non-finite values: {ra['nonfinite']} in A, {rb['nonfinite']} in B"
            elif reference is not None:
                verdict, reason = judge_ratio(row["ratio"], th)
            else:
                verdict, reason = judge(mode, m, th)
            row.update(verdict=verdict, reason=reason, error=error_of(row["mode"], m))
            modes.add(row["mode"])
            rows.append(row)
        modules[direction] = rows

    loss = compare_losses(a.doc["losses"], b.doc["losses"], th,
                          reference.doc["losses"] if reference is not None else None)
    first_raw = {d: next((r["name"] for r in modules[d] if r["verdict"] == "fail"), None) for d in DIRECTIONS}
    first = {"forward": first_raw["forward"], "backward": locate_backward(modules, first_raw["forward"])}
    first_warn = {d: next((r["name"] for r in modules[d] if r["verdict"] == "warn"), None) for d in DIRECTIONS}
    verdicts = [r["verdict"] for d in DIRECTIONS for r in modules[d]] + [loss["verdict"]]
    verdict = "fail" if "fail" in verdicts else "warn" if "warn" in verdicts else "pass"
    notes = []
    if modes == {"statistics"}:
        notes.append("statistics only: no tensors were kept in "
                     + ", ".join(d.label for d in (a, b, reference) if d is not None and not d.doc["tensors_file"])
                     + "; modules were compared by L2 norm, mean and range, which cannot see faults "
                       "that keep a tensor's norm (a permutation, a sign flip of a few elements)")
    elif modes == {"statistics", "tensors"}:
        notes.append("some modules were compared by statistics only (no tensors kept for them)")
    return {
        "verdict": verdict,
        "rule": "error ratio against the reference" if reference is not None else f"{rule_dtype} thresholds",
        "rule_dtype": rule_dtype,
        "thresholds": dataclasses.asdict(th),
        "mode": "tensors" if modes == {"tensors"} else "statistics" if modes == {"statistics"} else "mixed",
        "dumps": {k: describe(d) for k, d in (("a", a), ("b", b), ("reference", reference)) if d is not None},
        "first_failing": first,
        "first_failing_in_time": first_raw,
        "first_warning": first_warn,
        "summary": {d: summarise(modules[d]) for d in DIRECTIONS},
        "loss": loss,
        "notes": notes,
        "modules": modules,
    }


def locate_backward(modules: dict[str, list[dict]], first_forward: str | None) -> str | None:
    """The first backward failure that is not a mere consequence of a forward divergence.

    Once the forward pass diverges at module F, every module that runs after F sees
    different activations, so its gradient differs too: the first backward failure in
    time then only says where the backward pass met F's consequences. Like aligning
    forward first and backward second, we skip modules downstream of F (later in forward
    order; they are marked `downstream_of`), and attribute a failure inside F's own
    subtree to F, which cannot be split finer than its forward output.
    """
    rows = modules["backward"]
    if first_forward is None:
        return next((r["name"] for r in rows if r["verdict"] == "fail"), None)
    order = {r["name"]: i for i, r in enumerate(modules["forward"])}
    limit = order[first_forward]
    found = None
    for r in rows:
        inside = r["name"] == first_forward or r["name"].startswith(first_forward + ".")
        if not inside and order.get(r["name"], limit + 1) > limit:
            r["downstream_of"] = first_forward
        elif found is None and r["verdict"] == "fail":
            found = first_forward if inside else r["name"]
    return found


def compare_losses(la: list[float], lb: list[float], th: Thresholds, lr: list[float] | None = None) -> dict:
    # a loss that turned non-finite on one side only is as far off as it gets
    rel = [abs(b - a) / max(abs(a), TINY) if math.isfinite(a) and math.isfinite(b) else 0.0 if a == b else math.inf
           for a, b in zip(la, lb)]
    worst = max(rel, default=0.0)
    bad = next((i for i, r in enumerate(rel) if r > th.loss_fail), None)
    verdict = "fail" if bad is not None else "warn" if worst > th.loss_warn else "pass"
    out = {"a": la, "b": lb, "rel_diff": rel, "max_rel_diff": worst, "verdict": verdict,
           "first_failing_step": bad, "tolerance": th.loss_fail}
    if lr is not None:
        out["reference"] = lr
    return out


def summarise(rows: list[dict]) -> dict:
    if not rows:
        return {}
    errs = sorted(r["error"] for r in rows)
    worst = max(rows, key=lambda r: r["error"])
    out = {"modules": len(rows), "median_error": errs[len(errs) // 2], "max_error": errs[-1],
           "max_error_module": worst["name"],
           "fail": sum(r["verdict"] == "fail" for r in rows), "warn": sum(r["verdict"] == "warn" for r in rows)}
    if rows[0]["mode"] == "tensors" or any(r["mode"] == "tensors" for r in rows):
        t = [r for r in rows if r["mode"] == "tensors"]
        out["min_cosine"] = min(r["cosine"] for r in t)
        out["max_off_0.5%"] = max(r["off_0.5%"] for r in t)
    return out


def describe(d: Dump) -> dict:
    env = d.doc["env"]
    return {"path": str(d.path), "label": d.label, "device": env["device"], "device_name": env["device_name"],
            "chip": (env["chip"] or {}).get("key"), "dtype": d.dtype, "torch": env["torch"],
            "emulation": d.emulation,
            "plugin": env["plugin"], "threads": env["threads"], "compile": d.doc["run"].get("compile", False),
            "stats_only": d.doc["stats_only"], "seconds": d.doc["run"]["seconds"]}
