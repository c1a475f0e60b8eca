"""The verified handoff before a stage whose model was made on another device or dtype; before
a stage that emulates another chip, the rehearsal of that move (`chipshift parity rehearse`),
recorded beside the handoffs and labelled as emulated: a prediction, which gates nothing."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from chipshift.pipeline.recipe import HANDOFF_DUMP_KEYS, Stage
from chipshift.pipeline.state import Context, HandoffResult, resolved_target


def handoff_before(ctx: Context, st: Stage, chain: str) -> None:
    """Run the verified handoff between st's model and st when device or dtype differ (once;
    recorded in the state), then refuse a checkpoint whose last handoff failed unless --force."""
    from chipshift.model.checkpoint import check_handoff_allowed
    from chipshift.parity.handoff import handoff

    src = ctx.recipe.stage(st.source)
    ckpt = ctx.model_of(st)
    a = resolved_target(src.device, src.dtype, src.emulate)
    b = resolved_target(st.device, st.dtype, st.emulate)
    if st.emulate and (a, src.emulate) != (b, st.emulate):
        rehearsal_before(ctx, st, src, ckpt, chain, a)
    elif a != b:
        key = f"handoff.{st.name}"
        fp = hashlib.sha256(f"{chain}{a}{b}{sorted(st.handoff.items())}".encode()).hexdigest()[:16]
        rec = ctx.state.data["stages"].get(key) or {}
        frm, to = ":".join(a), ":".join(b)
        if rec.get("fingerprint") != fp and _reused(ctx, key, fp, st, ckpt, frm, to,
                                                    f"handoff {src.name} -> {st.name}: verified already"):
            pass  # this checkpoint already made this move: one check is enough
        elif rec.get("fingerprint") != fp or rec.get("status") not in ("done", "failed"):
            print(f"== handoff {src.name} -> {st.name}: {frm} -> {to}", flush=True)
            t0 = time.perf_counter()
            dump, thresholds = _dump_and_thresholds(st.handoff)
            record, result = handoff(ckpt, frm, to, out=ctx.run_dir / "handoffs" / f"{src.name}-to-{st.name}",
                                     thresholds=thresholds, progress=ctx.progress, **dump)
            report_dir = Path(record["report"]).parent
            worst = _worst_errors(result)
            ctx.state.data["stages"][key] = {
                "kind": "handoff", "status": "done" if record["verdict"] != "fail" else "failed",
                "fingerprint": fp, "from_stage": src.name, "to_stage": st.name, "seconds": time.perf_counter() - t0,
                "settings": st.handoff,
                "result": HandoffResult(
                    verdict=record["verdict"], from_target=frm, to_target=to, rule=record["rule"],
                    first_failing=record["first_failing"], loss_max_rel_diff=record["loss_max_rel_diff"],
                    worst_error=worst, report=str(report_dir / "report.md"), figure=str(report_dir / "depth.png"),
                    checkpoint=str(ckpt)).to_json()}
            ctx.state.save()
            print(f"  verdict: {record['verdict']} ({record['rule']})", flush=True)
    check_handoff_allowed(ckpt, force=ctx.force)


def rehearsal_before(ctx: Context, st: Stage, src: Stage, ckpt: Path, chain: str, a: tuple[str, str]) -> None:
    """Rehearse the move of `src`'s model to `st`'s emulated chip (once; recorded in the state)."""
    from chipshift.devices import parse_dtype
    from chipshift.devices.emulate import profile_for_dtype, resolve
    from chipshift.parity.rehearse import rehearse

    trusted = src.emulate or profile_for_dtype(parse_dtype(a[1])).name
    key = f"handoff.{st.name}"
    fp = hashlib.sha256(f"{chain}{trusted}{st.emulate}{sorted(st.handoff.items())}".encode()).hexdigest()[:16]
    rec = ctx.state.data["stages"].get(key) or {}
    if rec.get("fingerprint") == fp and rec.get("status") == "done":
        return
    target = resolve(st.emulate)
    frm, to = f"{':'.join(a)} ({trusted})", f"{st.device} emulating {target.label}"
    if _reused(ctx, key, fp, st, ckpt, frm, to, f"rehearsal (emulated) {src.name} -> {st.name}: rehearsed already"):
        return  # this checkpoint's move was rehearsed already (for another stage)
    print(f"== rehearsal (emulated) {src.name} -> {st.name}: {frm} -> {to}", flush=True)
    t0 = time.perf_counter()
    dump, thresholds = _dump_and_thresholds(st.handoff)
    out = ctx.run_dir / "handoffs" / f"{src.name}-to-{st.name}-rehearsal"
    result = rehearse(ckpt, st.emulate, trusted=trusted, device=a[0], out=out, thresholds=thresholds,
                      progress=ctx.progress, **dump)
    worst = _worst_errors(result)
    ctx.state.data["stages"][key] = {
        "kind": "handoff", "status": "done", "emulated": True, "fingerprint": fp, "from_stage": src.name,
        "to_stage": st.name, "seconds": time.perf_counter() - t0, "settings": st.handoff,
        "result": HandoffResult(
            verdict=result["verdict"], from_target=frm, to_target=to,
            rule=f"rehearsal (emulated): {result['rule']} x{result['rehearsal']['format_gap']:g}",
            first_failing=result["first_failing"], loss_max_rel_diff=result["loss"]["max_rel_diff"],
            worst_error=worst, report=str(out / "report.md"), figure=str(out / "depth.png"),
            checkpoint=str(ckpt)).to_json()}
    ctx.state.save()
    print(f"  predicted: {result['verdict']} (emulated; gates nothing)", flush=True)


def _reused(ctx: Context, key: str, fp: str, st: Stage, ckpt: Path, frm: str, to: str, message: str) -> bool:
    """Record under `key` a finished check of the same move of the same checkpoint (made for
    another stage, with the same settings), if there is one; True when there was."""
    same = [r for k, r in ctx.state.data["stages"].items() if k != key and r.get("kind") == "handoff"
            and r.get("status") == "done" and r["result"]["checkpoint"] == str(ckpt)
            and (r["result"]["from"], r["result"]["to"]) == (frm, to) and r.get("settings", {}) == st.handoff]
    if not same:
        return False
    ctx.state.data["stages"][key] = {**same[0], "fingerprint": fp, "to_stage": st.name, "seconds": 0.0,
                                    "reused": True}
    ctx.state.save()
    print(f"== {message} ({same[0]['result']['verdict']})")
    return True


def _dump_and_thresholds(settings: dict) -> tuple[dict, dict]:
    """A stage's handoff table split into the dump's batch settings and the parity thresholds."""
    dump = {k: v for k, v in settings.items() if k in HANDOFF_DUMP_KEYS}
    return dump, {k: v for k, v in settings.items() if k not in HANDOFF_DUMP_KEYS}


def _worst_errors(result: dict) -> dict:
    """The largest module error per direction (forward, backward) of a comparison."""
    return {d: max((r.get("error", 0.0) or 0.0 for r in result["modules"][d]), default=0.0)
            for d in result["modules"]}
