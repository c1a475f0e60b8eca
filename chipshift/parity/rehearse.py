"""`chipshift parity rehearse`: predict what will diverge on a chip you do not have.

The checkpoint is dumped three times on the device in hand (`dump.dump_checkpoint`): in
float64 (the reference R), under the trusted chip's numerics profile (A: by default the
profile of the device in hand) and under the target's (B), both emulated
(`chipshift.devices.emulate`). `compare.compare_dumps` judges B against A by the error-ratio
rule, with both bars raised by the gap between the two profiles' matmul input formats
(unit roundoff of B's over A's, at least 1): a move to a coarser format is expected to lose
that much everywhere, and a module is predicted to diverge when it loses more than twice
that (between bfloat16 and FP8 E4M3 the gap is 16). From the reference dump come the sites
where the target's stored dtype cannot hold the values: overflow (largest |value| over
the dtype's max) and flush to zero (the share of non-zero values below half its smallest
subnormal, among the values within 2^24 of the tensor's largest; gradients under float16
counted at the loss scaler's initial 2^16). Each
problem gets a mitigation; the report is `parity compare`'s (report.md, report.json,
depth.png, loss.png) with the rehearsal in front, labelled as emulated.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from chipshift.devices import dtype_name, get_device
from chipshift.devices.emulate import Profile, load_numerics, profile_for_dtype, resolve
from chipshift.parity.compare import DIRECTIONS, UNIT_ROUNDOFF, compare_dumps
from chipshift.parity.dump import Dump, dump_checkpoint
from chipshift.parity.report import markdown, write_report

LOSS_SCALE = 2.0**16  # torch.amp.GradScaler's initial scale: where float16 gradients start
FLUSH_SHARE = 1e-3  # flag a tensor when more than this share of its non-zero values flush to zero
DEFAULT_REHEARSE_MB = 1024.0  # the tensors themselves, so that modules are compared by value


def in_hand_profile(device: str) -> Profile:
    """The profile of the device in hand: its catalogue chip's, else its compute dtype's."""
    dev = get_device(device)
    if dev.chip is not None and dev.chip.key in load_numerics()[1]:
        return resolve(dev.chip.key)
    return profile_for_dtype(dev.precision.compute_dtype().value)


def spec_of(p: Profile) -> str:
    return f"{p.chip}:{p.name}" if p.chip else p.name


def format_gap(target: Profile, trusted: Profile) -> float:
    return max(1.0, target.format("input").unit_roundoff / trusted.format("input").unit_roundoff)


def range_sites(reference: Dump, target: Profile) -> dict[str, list[dict]]:
    """Every record whose reference values the target's stored dtype cannot hold."""
    fi = torch.finfo(target.dtype)
    half_subnormal = fi.smallest_normal * fi.eps / 2  # below it, rounding gives zero
    sites: dict[str, list[dict]] = {"overflow": [], "underflow": []}
    for direction in DIRECTIONS:
        scale = LOSS_SCALE if direction == "backward" and target.dtype == torch.float16 else 1.0
        for r in reference.records(direction):
            amax = max(abs(r["min"]), abs(r["max"])) * scale
            if amax > fi.max:
                sites["overflow"].append({"name": r["name"], "direction": direction, "max_abs": amax,
                                          "margin": amax / fi.max})
            t = reference.tensor(r)
            if t is None:
                continue
            # values a float32 sum with the tensor's largest would keep (not float64's rounding residue)
            t = t.abs()
            nonzero = t[t > t.max() * 2.0**-24] * scale
            flushed = (nonzero < half_subnormal).double().mean().item() if nonzero.numel() else 0.0
            if flushed > FLUSH_SHARE:
                sites["underflow"].append({"name": r["name"], "direction": direction, "flushed_share": flushed,
                                           "min_abs": nonzero.min().item(), "margin": nonzero.min().item()
                                           / (fi.smallest_normal * fi.eps)})
    return sites


def mitigations(result: dict, sites: dict, target: Profile, trusted: Profile) -> list[str]:
    """One concrete step per predicted problem."""
    stored = dtype_name(target.dtype)
    keep = "float32" if target.dtype == torch.float16 or trusted.dtype == torch.float32 else "bfloat16"
    out = []
    for s in sites["overflow"]:
        k = math.ceil(math.log2(s["margin"])) + 1
        what = "activations" if s["direction"] == "forward" else "gradients"
        out.append(f"{s['name']}: {what} reach {s['max_abs']:.4g}, {s['margin']:.3g}x {stored}'s max: keep it "
                   f"in float32, or scale its weights by 2^-{k} and the consumer's by 2^{k}")
    for s in sites["underflow"]:
        out.append(f"{s['name']}: {s['flushed_share']:.2%} of its {s['direction']} values flush to zero in "
                   f"{stored}: " + ("raise the loss scale above 2^16 or keep it in float32"
                                           if s["direction"] == "backward" else "keep it in float32"))
    first = result["first_failing"]["forward"]
    if first is not None and not any(s["name"] == first for v in sites.values() for s in v):
        row = next(r for r in result["modules"]["forward"] if r["name"] == first)
        finer = " or scale it in finer blocks (mxfp8: 32 elements)" if target.scale != "none" else ""
        out.append(f"{first}: first to diverge ({row['reason']}): keep its GEMM in {keep}{finer}")
    if result["loss"]["verdict"] == "fail":
        loss = result["loss"]
        worst = max(result["modules"]["forward"], key=lambda row: row.get("ratio", 0.0))
        out.append(f"loss: {loss['max_rel_diff']:.3g} relative from the trusted run "
                   + (f"within {len(loss['a']) - 1} steps" if len(loss["a"]) > 1 else "on the batch")
                   + f": keep the GEMMs that lose most in {keep}, first {worst['name']} "
                     f"({worst['ratio']:.3g}x the trusted error), and rehearse again")
    return out


def rehearse(ckpt: str | Path, chip: str, *, trusted: str | None = None, device: str = "cpu",
             out: str | Path | None = None, max_tensor_mb: float = DEFAULT_REHEARSE_MB,
             thresholds: dict | None = None, **dump_kwargs) -> dict:
    """Dump `ckpt` in float64, under `trusted` and under `chip` (profiles or chips), judge,
    find the range problems, write the report; returns the comparison with a `rehearsal` key."""
    target = resolve(chip)
    source = resolve(trusted) if trusted else in_hand_profile(device)
    ckpt = Path(ckpt)
    out = Path(out) if out is not None else ckpt.with_name(f"{ckpt.name}.rehearse-{target.name}")
    kw = dict(max_tensor_mb=max_tensor_mb, **dump_kwargs)
    reference = Dump(dump_checkpoint(ckpt, out / "dump-reference", device="cpu", dtype="float64", **kw))
    a = Dump(dump_checkpoint(ckpt, out / "dump-trusted", device=device, emulate=spec_of(source), verify=False, **kw))
    b = Dump(dump_checkpoint(ckpt, out / "dump-target", device=device, emulate=spec_of(target), verify=False, **kw))
    gap = format_gap(target, source)
    th = {"ratio_warn": gap, "ratio_fail": 2 * gap, **(thresholds or {})}
    # where the trusted run is exact (an embedding lookup), credit it with the error the
    # target's own rounding would have over the gap, not a tenth of the finer dtype's
    result = compare_dumps(a, b, reference, ratio_floor=UNIT_ROUNDOFF[b.dtype] / gap, **th)
    sites = range_sites(reference, target)
    overflowing = {s["name"] for s in sites["overflow"] if s["direction"] == "forward"}
    if overflowing and result["verdict"] != "fail":  # the emulated run may already show it as inf
        result["verdict"] = "fail"
    result["rehearsal"] = {
        "emulated": True, "target": target.describe(), "trusted": source.describe(), "format_gap": gap,
        "first_diverging": result["first_failing"], "overflow": sites["overflow"], "underflow": sites["underflow"],
        "loss_drift": {"steps": len(result["loss"]["a"]) - 1, "max_rel_diff": result["loss"]["max_rel_diff"],
                       "trusted": result["loss"]["a"], "target": result["loss"]["b"]},
        "mitigations": mitigations(result, sites, target, source),
    }
    write_report(result, out, reference.doc["model"]["config"]["num_layers"])
    (out / "report.md").write_text(rehearsal_markdown(result) + "\n" + markdown(result))
    return result


def rehearsal_markdown(result: dict) -> str:
    r = result["rehearsal"]
    t, s = r["target"], r["trusted"]

    def name(p):
        return p["name"] + (f" ({p['chip']})" if p["chip"] else "")

    lines = [f"# Rehearsal (emulated): {name(t)} predicted **{result['verdict'].upper()}**", "",
             f"Emulated on this machine, no {name(t)} was used. Target: {name(t)}, {t['description']}. "
             f"Trusted: {name(s)}, {s['description']}. Judged by the error-ratio rule against float64 with "
             f"both bars raised by the format gap {r['format_gap']:.3g}x (warn above "
             f"{result['thresholds']['ratio_warn']:.3g}x, fail above {result['thresholds']['ratio_fail']:.3g}x the "
             f"trusted error).", "",
             f"- first module predicted to diverge: forward **{r['first_diverging']['forward'] or 'none'}**, "
             f"backward **{r['first_diverging']['backward'] or 'none'}**",
             f"- loss, relative difference from the trusted run: {r['loss_drift']['max_rel_diff']:.3g} "
             + (f"(worst of {r['loss_drift']['steps']} AdamW steps)" if r["loss_drift"]["steps"] else
                "(on the batch; --steps K follows K AdamW steps)"), ""]
    for kind, key in (("overflow", "max_abs"), ("underflow", "flushed_share")):
        lines += [f"## {kind.capitalize()} sites in {t['dtype']} ({len(r[kind])})", ""]
        if r[kind]:
            lines += [f"| module | direction | {key} | margin |", "|---|---|---|---|"]
            lines += [f"| {x['name']} | {x['direction']} | {x[key]:.4g} | {x['margin']:.3g} |" for x in r[kind][:20]]
        else:
            lines.append("none")
        lines.append("")
    lines += ["## Mitigations", ""] + ([f"- {m}" for m in r["mitigations"]] or ["none needed"]) + [""]
    return "\n".join(lines)

