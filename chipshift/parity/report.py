"""Write a comparison as report.json, report.md and two PNG figures."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from chipshift.parity.compare import DIRECTIONS

MAX_TABLE_ROWS = 20


def depth_of(name: str, num_layers: int) -> int:
    """Position along the model: 0 embedding, 1..L the layers, L+1 the final norm and logits."""
    m = re.match(r"layers\.(\d+)(\.|$)", name)
    if m:
        return int(m.group(1)) + 1
    return 0 if name.startswith("embed") else num_layers + 1


def per_depth(rows: list[dict], num_layers: int, key: str) -> list[float]:
    """The worst `key` per depth; NaN (a gap in the plot) where no module was recorded."""
    worst = [math.nan] * (num_layers + 2)
    for r in rows:
        d = depth_of(r["name"], num_layers)
        worst[d] = r[key] if math.isnan(worst[d]) else max(worst[d], r[key])
    return worst


def plot_depth(result: dict, num_layers: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    x = list(range(num_layers + 2))
    keys = ([("err_a_vs_ref", "o-", "A vs reference"), ("err_b_vs_ref", "s-", "B vs reference")]
            if "reference" in result["dumps"] else [("error", "o-", "B vs A")])
    positive = [r[k] for d in DIRECTIONS for r in result["modules"][d] for k, _, _ in keys if r[k] > 0]
    for ax, direction in zip(axes, DIRECTIONS):
        rows = result["modules"][direction]
        for key, style, label in keys:
            ax.plot(x, per_depth(rows, num_layers, key), style, ms=3, label=label)
        bad = sorted({depth_of(r["name"], num_layers) for r in rows if r["verdict"] == "fail"})
        for d in bad:
            ax.axvspan(d - 0.4, d + 0.4, color="red", alpha=0.15, lw=0)
        # symlog so that exact agreement (0) still shows, linear only below the smallest error
        ax.set_yscale("symlog", linthresh=min(positive, default=1e-12))
        ax.set_title(f"{direction} ({'relative L2 error' if result['mode'] == 'tensors' else 'error'}, worst per layer)")
        ax.set_xlabel("depth: 0 = embedding, 1..L = layers, L+1 = norm and logits")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = result["loss"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(loss["a"], "o-", label=f"A: {result['dumps']['a']['label']}")
    ax.plot(loss["b"], "x--", label=f"B: {result['dumps']['b']['label']}")
    if "reference" in loss:
        ax.plot(loss["reference"], ":", color="black", label=f"R: {result['dumps']['reference']['label']}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"loss, max relative difference {loss['max_rel_diff']:.3g}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def markdown(result: dict) -> str:
    d = result["dumps"]
    lines = [f"# Parity report: **{result['verdict'].upper()}**", ""]
    lines += ["| | device | name | chip | dtype | threads | compile | torch | kept tensors |", "|---" * 9 + "|"]
    for key, tag in (("a", "A"), ("b", "B"), ("reference", "R")):
        if key in d:
            x = d[key]
            device = x["device"] + (f" (emulating {x['emulation']['name']})" if x.get("emulation") else "")
            lines.append(f"| {tag} | {device} | {x['device_name']} | {x['chip'] or '-'} | {x['dtype']} | "
                         f"{x['threads']} | {x['compile']} | {x['torch']} | {'no: ' + x['stats_only'] if x['stats_only'] else 'yes'} |")
    lines += ["", f"Judged by **{result['rule']}** ({result['rule_dtype']}); modules compared by "
                  f"**{result['mode']}**.", ""]
    for note in result["notes"]:
        lines += [f"> Note: {note}", ""]
    ff, fw = result["first_failing"], result["first_warning"]
    lines += ["## First divergence", "",
              f"- forward: **{ff['forward'] or 'none'}**" + (f" (first warning: {fw['forward']})" if fw["forward"] else ""),
              f"- backward: **{ff['backward'] or 'none'}**" + (f" (first warning: {fw['backward']})" if fw["backward"] else ""),
              ""]
    loss = result["loss"]
    lines += ["## Loss", "", f"verdict **{loss['verdict']}**, max relative difference {loss['max_rel_diff']:.3g} "
              f"(tolerance {loss['tolerance']:g})", "", "| step | A | B | relative difference |", "|---|---|---|---|"]
    for i, (a, b, r) in enumerate(zip(loss["a"], loss["b"], loss["rel_diff"])):
        lines.append(f"| {i} | {a:.8g} | {b:.8g} | {r:.3g} |")
    lines += ["", "## Summary", "", "| direction | modules | fail | warn | median error | max error | at | min cosine |",
              "|---|---|---|---|---|---|---|---|"]
    for direction in DIRECTIONS:
        s = result["summary"][direction]
        if s:
            lines.append(f"| {direction} | {s['modules']} | {s['fail']} | {s['warn']} | {s['median_error']:.3g} | "
                         f"{s['max_error']:.3g} | {s['max_error_module']} | {_fmt(s.get('min_cosine'))} |")
    lines += ["", "![error along depth](depth.png)", "", "![loss curves](loss.png)", ""]
    cols = (["cosine", "max_abs_err", "rel_l2", "off_0.1%", "off_0.5%"] if result["mode"] == "tensors"
            else ["norm_rel_diff", "mean_diff", "range_diff"])
    if "reference" in d:
        cols += ["err_a_vs_ref", "err_b_vs_ref", "ratio"]
    for direction in DIRECTIONS:
        rows = [r for r in result["modules"][direction] if r["verdict"] != "pass"]
        lines += [f"## {direction.capitalize()}: modules that fail or warn ({len(rows)})", ""]
        if not rows:
            lines += ["none", ""]
            continue
        lines += ["| module | verdict | " + " | ".join(cols) + " | why |", "|---" * (len(cols) + 3) + "|"]
        for r in rows[:MAX_TABLE_ROWS]:
            lines.append(f"| {r['name']} | {r['verdict']} | " + " | ".join(_fmt(r.get(c)) for c in cols)
                         + f" | {r['reason']} |")
        if len(rows) > MAX_TABLE_ROWS:
            lines.append(f"| ... {len(rows) - MAX_TABLE_ROWS} more in report.json | | " + "| " * len(cols) + "|")
        lines.append("")
    th = result["thresholds"]
    lines += ["## Thresholds", "", ", ".join(f"{k}={v:g}" for k, v in th.items()), ""]
    return "\n".join(lines)


def write_report(result: dict, out: str | Path, num_layers: int) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=1))
    (out / "report.md").write_text(markdown(result))
    plot_depth(result, num_layers, out / "depth.png")
    plot_losses(result, out / "loss.png")
    return out
