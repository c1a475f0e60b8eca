"""The report of a `chipshift run`: RUN/report.html (one self-contained file, figures
embedded as base64 PNG) and RUN/report.md (figures beside it in RUN/report_files/).

Both are rendered from RUN/state.json alone, so a report can be rebuilt at any time and
also explains a run that stopped: per stage its device, dtype, time, tokens/s, MFU, peak
memory and final metrics; the loss curves; the handoff verdicts with their per-layer error
figure; sample answers before and after post-training; versions; the resolved recipe.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

FILES = "report_files"
KEY_METRICS = ("final_loss", "final_val_loss", "identity_accuracy", "preference_accuracy", "reward_acc",
               "val_bpb", "same_greedy_tokens", "completion_tokens", "train_tokens", "vocab_size", "params_M")


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _bytes(n) -> str:
    return "—" if not n else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _seconds(s) -> str:
    if s is None:
        return "—"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def loss_figure(stage: str, rec: dict, path: Path) -> Path | None:
    """Training loss (and validation loss, DPO reward accuracy, GRPO mean reward) against step."""
    from chipshift.train.metrics import read

    metrics_file = (rec.get("result") or {}).get("metrics_file")
    if not metrics_file or not Path(metrics_file).exists():
        return None
    recs = read(Path(metrics_file))
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    if not train:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.2), dpi=100)
    ax.plot(*zip(*train), lw=1, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", ms=3, lw=1.5, label="validation loss")
    key, label = ("reward", "mean reward") if rec.get("kind") == "grpo" else ("reward_acc", "reward accuracy")
    acc = [(r["step"], r[key]) for r in recs if key in r]
    if acc:
        ax2 = ax.twinx()
        ax2.plot(*zip(*acc), color="tab:green", lw=0.8, alpha=0.7, label=label)
        if key == "reward_acc":
            ax2.set_ylim(0, 1.05)
        ax2.set_ylabel(label)
        ax2.legend(loc="center right", fontsize=7)
    ax.set_title(f"{stage} ({rec.get('kind')}, {rec.get('device')} {rec.get('dtype')})", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right" if not acc else "upper center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _stage_rows(stages: dict) -> list[list[str]]:
    rows = []
    for name, rec in stages.items():
        if rec.get("kind") == "handoff":
            continue
        m = (rec.get("result") or {}).get("metrics", {})
        final = ", ".join(f"{k} {_fmt(m[k])}" for k in KEY_METRICS if k in m)
        if rec.get("status") == "failed":
            final = f"FAILED: {rec.get('error', '')}"
        rows.append([name, rec.get("kind", ""), rec.get("status", ""), rec.get("device") or "—",
                     rec.get("dtype") or "—", str(rec.get("nproc", 1)), _seconds(rec.get("seconds")),
                     _seconds(rec.get("cpu_seconds")) if rec.get("nproc", 1) == 1 else "—",
                     f"{m['tokens_per_s']:,.0f}" if m.get("tokens_per_s") else "—",
                     f"{m['mfu']:.1%}" if m.get("mfu") is not None else "—",
                     _bytes(rec.get("peak_memory")), final])
    return rows


def _highlights(stages: dict) -> list[str]:
    """The figures a reader looks for first: did every loss fall, did the handoffs pass, does
    the server compute what the trainer does, did post-training move the measured accuracies."""
    out = []
    losses = []
    for name, rec in stages.items():
        m = (rec.get("result") or {}).get("metrics", {})
        if rec.get("kind") in ("pretrain", "sft", "dpo", "grpo") and "first_loss" in m:
            val = (f", validation {m['first_val_loss']:.3f} → {m['final_val_loss']:.3f}"
                   if m.get("val_points", 0) > 1 else "")
            losses.append(f"{name} {m['first_loss']:.3f} → {m['final_loss']:.3f}{val}")
    if losses:
        out.append("Training loss (first → last logged step): " + "; ".join(losses))
    for name, rec in stages.items():
        if rec.get("kind") == "handoff":
            r = rec["result"]
            out.append(f"Handoff {rec['from_stage']} → {rec['to_stage']} ({r['from']} → {r['to']}): "
                       f"{r['verdict'].upper()}")
        check = (rec.get("result") or {}).get("check") if rec.get("kind") == "serve" else None
        if check:
            from chipshift.parity.serve_check import summary  # torch: only when there is a check

            out.append(f"Serving engine vs training forward ({name}): {summary(check)}")
    for name, rec in stages.items():
        m = (rec.get("result") or {}).get("metrics", {})
        if rec.get("kind") == "grpo" and "pass@1_after" in m:
            out.append(f"GRPO held-out pass@1 ({name}): {m.get('pass@1_before', float('nan')):.0%} → "
                       f"{m['pass@1_after']:.0%}")
    for name, rec in stages.items():
        delta = ((rec.get("result") or {}).get("harness") or {}).get("delta") if rec.get("kind") == "eval" else None
        if delta:
            from chipshift.parity.harness import format_delta

            out += [f"lm-eval ({name}): {line}" for line in format_delta(delta)]
    evals = [(n, rec["result"]["metrics"]) for n, rec in stages.items()
             if rec.get("kind") == "eval" and rec.get("status") == "done"]
    if len(evals) >= 2:
        (first, a), (last, b) = evals[0], evals[-1]
        for key, label in (("identity_accuracy", "Identity accuracy (held-out questions)"),
                           ("preference_accuracy", "Preference accuracy (held-out pairs, per token)"),
                           ("preference_accuracy_sum", "Preference accuracy (held-out pairs, summed log-probs)")):
            if key in a and key in b:
                out.append(f"{label}: {a[key]:.0%} ({first}) → {b[key]:.0%} ({last})")
    return out


STAGE_HEADER = ["stage", "kind", "status", "device", "dtype", "procs", "time", "CPU time", "tokens/s", "MFU",
                "peak memory", "final metrics"]
HANDOFF_HEADER = ["handoff", "from", "to", "verdict", "rule", "first failing", "worst fwd error",
                  "worst bwd error", "loss rel. diff"]


def _handoff_rows(stages: dict) -> list[tuple[list[str], dict]]:
    out = []
    for name, rec in stages.items():
        if rec.get("kind") != "handoff":
            continue
        r = rec["result"]
        first = ", ".join(f"{d}: {n}" for d, n in (r.get("first_failing") or {}).items() if n) or "none"
        worst = r.get("worst_error", {})
        emulated = rec.get("emulated")  # a rehearsal: a prediction, not a measurement on the chip
        out.append(([f"{rec['from_stage']} → {rec['to_stage']}" + (" (rehearsal, emulated)" if emulated else ""),
                     r["from"], r["to"], r["verdict"].upper() + (" (predicted)" if emulated else ""),
                     r.get("rule", ""), first, _fmt(worst.get("forward")), _fmt(worst.get("backward")),
                     _fmt(r.get("loss_max_rel_diff"))], r))
    return out


BENCH_HEADER = ["stage", "task", "metric", "target", "score ± stderr", "delta vs first target", "interval",
                "items that differ"]


def _benchmark_rows(stages: dict) -> list[list[str]]:
    """One row per eval stage, lm-eval task, metric and target; the delta on the second target's row."""
    rows = []
    for name, rec in stages.items():
        harness = (rec.get("result") or {}).get("harness") if rec.get("kind") == "eval" else None
        if not harness:
            continue
        delta = harness.get("delta") or {"tasks": {}}
        for task in harness["runs"][0]["tasks"]:
            for m in ("acc", "acc_norm"):
                for i, run in enumerate(harness["runs"]):
                    row = run["tasks"][task]
                    if m not in row:
                        continue
                    d = delta["tasks"].get(task, {}).get(m) if i else None
                    rows.append([name, task, m, run["target"], f"{row[m]:.4f} ± {row[m + '_stderr'] or 0:.4f}",
                                 f"{d['delta']:+.4f}" if d else "", f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] "
                                 f"({delta['confidence']:.0%}, paired bootstrap)" if d else "",
                                 f"{d['items_differ']} of {d['n']}" if d else ""])
    return rows


def _samples(stages: dict) -> tuple[list[str], list[list[str]]]:
    """One column per stage that produced answers (eval before/after post-training, serve)."""
    cols = [(n, rec["result"]["samples"]) for n, rec in stages.items()
            if rec.get("status") == "done" and (rec.get("result") or {}).get("samples")]
    prompts: list[str] = []
    for _, samples in cols:
        prompts += [s["prompt"] for s in samples if s["prompt"] not in prompts]
    rows = []
    for p in prompts:
        row = [p]
        for _, samples in cols:
            row.append(next((s["answer"].strip() for s in samples if s["prompt"] == p), ""))
        rows.append(row)
    return ["prompt", *(n for n, _ in cols)], rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class='{_cell_class(c)}'>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell_class(c: str) -> str:
    return {"PASS": "pass", "WARN": "warn", "FAIL": "fail", "done": "pass", "failed": "fail",
            "interrupted": "warn", "running": "warn"}.get(str(c), "")


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img src='data:image/png;base64,{data}' alt='{html.escape(path.stem)}'>"


def _status_line(state: dict) -> str:
    stages = state.get("stages", {})
    bad = [(n, r) for n, r in stages.items()
           if r.get("status") in ("failed", "interrupted", "running") and r.get("kind") != "handoff"]
    total = sum(r.get("seconds", 0) or 0 for r in stages.values())
    failed_handoffs = [r for r in stages.values() if r.get("kind") == "handoff" and r.get("status") == "failed"]
    if bad and failed_handoffs:
        r = failed_handoffs[-1]
        first = ", ".join(f"{d} {n}" for d, n in (r["result"].get("first_failing") or {}).items() if n)
        return (f"stopped: the handoff {r['from_stage']} → {r['to_stage']} ({r['result']['from']} → "
                f"{r['result']['to']}) failed, first diverging at {first or 'the loss'}; see Handoffs "
                f"(time so far {_seconds(total)})")
    if bad:
        name, rec = bad[0]
        why = rec.get("error") or ("stopped by a signal; run the same command again to continue"
                                   if rec.get("status") == "interrupted" else rec.get("status"))
        return f"stopped in stage {name}: {why} (time so far {_seconds(total)})"
    return f"all {sum(1 for r in stages.values() if r.get('kind') != 'handoff')} stages done in {_seconds(total)}"


MFU_NOTE = ("time is wall-clock; CPU time is this process's (all threads), steadier on a shared machine. "
            "tokens/s and MFU are means over the logged steps after the first; MFU is against the peak of the "
            "stage's dtype (chip catalogue, or a measured matmul probe on a CPU). A CPU that emulates bfloat16 "
            "runs the loop's bfloat16 matmuls as float32 GEMMs, so there MFU is against the float32 peak. "
            "Peak memory is the process's peak resident set on a CPU, the allocator's peak on an accelerator.")

CSS = """
body{font:14px/1.45 -apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1150px;color:#222}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:3px}
.status{font-size:15px;padding:6px 10px;background:#f3f6fa;border-left:4px solid #4a7bd0}
table{border-collapse:collapse;margin:8px 0;font-size:12.5px} th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f5f5f5} td.pass{background:#e6f4ea;font-weight:600} td.warn{background:#fff4d6;font-weight:600}
td.fail{background:#fde2e1;font-weight:600} .figs img{width:49%;margin:0.3%;border:1px solid #eee}
img{max-width:100%} .handoff img{max-width:860px} pre{background:#f7f7f7;padding:8px;font-size:11.5px;overflow:auto;max-height:420px}
table.samples td{max-width:330px} .note{font-size:11.5px;color:#666}
"""


def write_report(run_dir: str | Path, state: dict) -> Path:
    """Write report.md and report.html in run_dir from the run's state; returns the HTML path."""
    from chipshift.model.checkpoint import versions

    run_dir = Path(run_dir)
    files = run_dir / FILES
    stages = state.get("stages", {})
    recipe = state.get("recipe", {})
    name = recipe.get("recipe", {}).get("name", run_dir.name)
    status = _status_line(state)
    stage_rows = _stage_rows(stages)
    handoffs = _handoff_rows(stages)
    figures = [(n, loss_figure(n, rec, files / f"loss-{n}.png")) for n, rec in stages.items()
               if rec.get("kind") in ("pretrain", "sft", "dpo", "grpo")]
    figures = [(n, p) for n, p in figures if p]
    sample_header, sample_rows = _samples(stages)
    vers = versions()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    commands = [(n, rec["result"]["command"]) for n, rec in stages.items()
                if rec.get("status") == "done" and (rec.get("result") or {}).get("command")]

    highlights = _highlights(stages)
    md = [f"# chipshift run: {name}", "", f"**{status}** — written {when}", "",
          *[f"- {x}" for x in highlights], "", "## Stages", "", _md_table(STAGE_HEADER, stage_rows), "",
          MFU_NOTE, ""]
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>chipshift run: {html.escape(name)}</title>"
         f"<style>{CSS}</style></head><body>", f"<h1>chipshift run: {html.escape(name)}</h1>",
         f"<p class='status'><b>{html.escape(status)}</b> — written {when}</p>",
         "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in highlights) + "</ul>",
         "<h2>Stages</h2>", _html_table(STAGE_HEADER, stage_rows), f"<p class='note'>{html.escape(MFU_NOTE)}</p>"]
    md += ["## Handoffs", ""]
    h.append("<h2>Handoffs</h2>")
    if handoffs:
        md += [_md_table(HANDOFF_HEADER, [r for r, _ in handoffs]), ""]
        h.append("<p>Where device or dtype change between stages, the checkpoint is run on both sides on a fixed "
                 "batch, forward and backward, and every module's output and gradient are compared. The figure "
                 "shows the worst error per layer along the depth of the model.</p>")
        h.append(_html_table(HANDOFF_HEADER, [r for r, _ in handoffs]))
        shown = set()
        for row, r in handoffs:
            fig = Path(r["figure"])
            if fig.exists() and fig not in shown:  # a checkpoint's move is checked (and drawn) once
                shown.add(fig)
                md += [f"![{row[0]}]({fig.resolve()})", ""]
                h.append(f"<p><b>{html.escape(row[0])}</b> ({html.escape(r['from'])} → {html.escape(r['to'])}), "
                         f"full report: <code>{html.escape(r['report'])}</code></p><div class='handoff'>{_img(fig)}</div>")
    else:
        md += ["No stage changed device or dtype.", ""]
        h.append("<p>No stage changed device or dtype.</p>")
    bench = _benchmark_rows(stages)
    if bench:
        md += ["## Benchmarks (lm-evaluation-harness)", "", _md_table(BENCH_HEADER, bench), ""]
        h += ["<h2>Benchmarks (lm-evaluation-harness)</h2><p>lm-eval's tasks against <code>chipshift serve</code> "
              "on each target; the delta's interval resamples the items, paired.</p>",
              _html_table(BENCH_HEADER, bench)]
    md += ["## Loss curves", ""]
    h.append("<h2>Loss curves</h2><div class='figs'>")
    for n, p in figures:
        md += [f"![{n}]({FILES}/{p.name})", ""]
        h.append(_img(p))
    h.append("</div>")
    if sample_rows:
        md += ["## Answers before and after post-training", "", _md_table(sample_header, sample_rows), ""]
        h += ["<h2>Answers before and after post-training</h2><p>Greedy answers of each evaluated model (columns "
              "in pipeline order; the serve column came through the OpenAI-compatible API).</p>",
              _html_table(sample_header, sample_rows, "samples")]
    if commands:
        md += ["## Use the result", ""] + [f"- `{c}`" for _, c in commands] + [""]
        h.append("<h2>Use the result</h2>" + "".join(f"<p><code>{html.escape(c)}</code></p>" for _, c in commands))
    recipe_text = json.dumps(recipe, indent=2, ensure_ascii=False)
    md += ["## Versions", "", _md_table(["package", "version"], [[k, v] for k, v in vers.items()]), "",
           "## Resolved recipe", "", "```json", recipe_text, "```", ""]
    h += ["<h2>Versions</h2>", _html_table(["package", "version"], [[k, v] for k, v in vers.items()]),
          "<h2>Resolved recipe</h2>", f"<pre>{html.escape(recipe_text)}</pre>", "</body></html>"]
    (run_dir / "report.md").write_text("\n".join(md))
    out = run_dir / "report.html"
    out.write_text("\n".join(h))
    return out
