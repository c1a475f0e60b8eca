"""Tables and charts for `chipshift plan` and `chipshift bench compare`.

Every printed figure carries its source: a full source text in single-plan output, and a
tag in side-by-side tables whose legend and per-chip source lines follow the table.
"""

from __future__ import annotations

from pathlib import Path

from chipshift.model.memory import PRECISIONS
from chipshift.plan.estimate import Figure, Plan, gb

TAGS = {  # source prefix -> tag used in side-by-side tables
    "datasheet (official)": "D",
    "datasheet (estimate)": "E",
    "measured": "M",
    "assumed": "A",
    "given": "G",
    "derived": "=",
}
LEGEND = ("sources: D datasheet (official), E datasheet (estimate), M measured (bench JSON), "
          "A assumed, G given, = derived")


def tag(source: str) -> str:
    for prefix, t in TAGS.items():
        if source.startswith(prefix):
            return t
    raise ValueError(f"figure source {source!r} names no known kind")


def _sci(v: float) -> str:
    mantissa, _, exp = f"{v:.3g}".partition("e")
    return f"{mantissa}e{int(exp)}" if exp else mantissa


def fmt(fig: Figure) -> str:
    v, unit = fig.value, fig.unit
    if v is None:
        return "-"
    if unit == "FLOP/s":
        return f"{v / 1e12:,.1f} TFLOP/s" if v >= 1e12 else f"{v / 1e9:,.1f} GFLOP/s"
    if unit == "chips" and v == 1:
        return "1 chip"
    if unit == "bytes":
        return gb(v)
    if unit == "$":
        return f"${v:,.0f}"
    if unit == "" and v < 1e4:
        return f"{v:.2f}"
    suffix = f" {unit}" if unit else ""
    if v >= 1e6:
        return _sci(v) + suffix
    if float(v).is_integer() or v >= 1000:
        return f"{v:,.0f}{suffix}"
    return f"{v:.3g}{suffix}"


def _table(head: list[str], rows: list[list[str]], indent: str = "") -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = [head, ["-" * w for w in widths], *rows]
    return "\n".join(indent + "  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in lines)


FIGURE_LABELS = [
    ("compute", [("parameters", "parameters"), ("seq_len", "sequence length"), ("tokens", "training tokens"),
                 ("flops_per_token", "FLOPs per token"), ("flops_dense", "FLOPs, 6ND"),
                 ("flops_attention", "FLOPs, attention"), ("flops_total", "FLOPs, total")]),
    ("speed", [("peak_flops", "peak"), ("mfu", "MFU"), ("achieved_flops", "achieved"),
               ("chip_hours", "chip-hours"), ("chips", "chips"), ("wall_days", "wall-clock time")]),
    ("energy and cost", [("power_w", "board power"), ("energy_mwh", "energy"),
                         ("price_per_chip_hour", "price"), ("cost", "cost")]),
    ("nodes, failures and checkpoints", [
        ("chips_per_node", "chips per node"), ("nodes", "nodes"), ("failure_rate", "failure rate"),
        ("job_mtbf_hours", "job MTBF"), ("expected_failures", "expected failures"),
        ("max_restarts", "--max-restarts"), ("checkpoint_bytes", "checkpoint size"),
        ("checkpoint_gbps", "storage bandwidth"), ("checkpoint_write_s", "checkpoint write"),
        ("checkpoint_interval_min", "checkpoint every"), ("checkpoint_interval_tokens", "  that is"),
        ("restart_launch_min", "restart launch"), ("restart_min", "restart, in all"),
        ("time_lost_hours", "time lost"), ("time_lost_share", "  share")]),
]


def memory_table(plan: Plan) -> str:
    usable = plan.usable_bytes.value
    head = ["strategy", "params", "grads", "optimizer", "gathered", "activations", "total",
            f"fits in {gb(usable)}?", "smallest count"]
    rows = []
    for m, smallest in plan.memory_rows:
        over = m.total - usable
        # the master-weight step's float32 gradients, where they outweigh the (freed) activations
        act = gb(m.activations) + (f" (step {gb(m.master_step)})" if m.master_step > m.activations else "")
        rows.append([m.label, gb(m.params), gb(m.grads), gb(m.optimizer), gb(m.gathered), act, gb(m.total),
                     "yes" if over <= 0 else f"no, short by {gb(over)}", "none" if smallest is None else str(smallest)])
    return _table(head, rows, "  ")


def render_plan(plan: Plan) -> str:
    f, chip = plan.figures, plan.chip
    out = [f"chipshift plan: {plan.model.label}, {fmt(f['tokens'])} on {int(plan.count.value)} x "
           f"{chip.key} ({chip.name})", ""]
    cfg = plan.model.cfg
    out.append(f"model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads "
               f"({cfg.num_kv_heads} kv), SwiGLU {cfg.intermediate_size}, vocab {cfg.vocab_size}  "
               f"[{plan.model.shape_source}]")
    for note in plan.model.notes:
        out.append(f"  - {note}")
    for section, items in FIGURE_LABELS:
        present = [(k, label) for k, label in items if k in f]
        if not present:
            continue
        out.append(f"\n{section}")
        rows = [[label, fmt(f[k]), f[k].source] for k, label in present]
        width = [max(len(r[i]) for r in rows) for i in range(2)]
        out += [f"  {r[0].ljust(width[0])}  {r[1].ljust(width[1])}  {r[2]}" for r in rows]
    out.append(f"\nmemory per chip at {int(plan.count.value)} chips: {PRECISIONS[chip.precision].name}; "
               f"micro-batch {int(plan.micro_batch.value)} x {int(plan.model.seq_len.value)} tokens")
    out.append(memory_table(plan))
    out.append(f"  sources: states = bytes per parameter x {fmt(f['parameters'])} / shards (derived; "
               f"AdamW recipe assumed: {PRECISIONS[chip.precision].name}); activations = tensors autograd "
               f"keeps, or the master-weight step's float32 gradients where larger (derived, docs/plan.md); "
               f"micro-batch {plan.micro_batch.source}; "
               f"chip memory {fmt(chip.memory_bytes)} {chip.memory_bytes.source}; usable {plan.usable_bytes.source}")
    nodes, per_node = int(f["nodes"].value), int(f["chips_per_node"].value)
    if nodes > 1:
        out.append(f"\nlaunch, on each of the {nodes} nodes (docs/train.md): torchrun --nnodes {nodes} "
                   f"--nproc-per-node {per_node} --rdzv-backend c10d --rdzv-endpoint NODE0:29500 "
                   f"--max-restarts {int(f['max_restarts'].value)} -m chipshift pretrain CONFIG")
        if plan.count.value % per_node:
            out.append(f"  the last node would hold {int(plan.count.value) % per_node} chips: torchrun starts the same "
                       f"--nproc-per-node on every node, so use a multiple of {per_node} chips")
    else:
        out.append(f"\nlaunch: one node, torchrun --standalone --nproc-per-node {int(plan.count.value)} "
                   f"--max-restarts {int(f['max_restarts'].value)} -m chipshift pretrain CONFIG")
    verdict = (f"fits at {int(plan.count.value)} chips with {plan.fits}" if plan.fits else
               f"does not fit at {int(plan.count.value)} chips: short by {gb(plan.shortfall_bytes)} per chip")
    out.append(f"\nverdict: {verdict}")
    return "\n".join(out)


COMPARE_COLUMNS = [  # (figure key, header, scale)
    ("peak_flops", "peak TFLOP/s", 1e-12), ("mfu", "MFU", 1.0), ("chip_hours", "chip-hours", 1.0),
    ("chips", "chips", 1.0), ("wall_days", "days", 1.0), ("energy_mwh", "energy MWh", 1.0),
    ("cost", "cost $", 1.0),
]


def render_compare(plans: list[Plan]) -> str:
    """Chips side by side; a tag names each figure's source, given in full below the table."""
    def cell(fig: Figure | None, scale: float) -> str:
        if fig is None:
            return "-"
        v = fig.value * scale
        text = f"{v:.2f}" if v < 10 else f"{v:,.0f}"
        return f"{text} [{tag(fig.source)}]"

    columns = [c for c in COMPARE_COLUMNS if any(c[0] in p.figures for p in plans)]
    head = ["chip"] + [h for _, h, _ in columns] + ["GB/chip*", "fits?"]
    rows = []
    for p in plans:
        lean = p.memory_rows[-1][0]
        rows.append([p.chip.key] + [cell(p.figures.get(k), sc) for k, _, sc in columns]
                    + [f"{lean.total / 1e9:.1f}", "yes" if p.fits else f"short {gb(p.shortfall_bytes)}"])
    first = plans[0]
    out = [f"chipshift plan --compare: {first.model.label}, {fmt(first.figures['tokens'])}, "
           f"{fmt(first.figures['flops_total'])} ({first.figures['flops_total'].source})", ""]
    out.append(_table(head, rows))
    out.append(f"* memory per chip with FSDP/ZeRO-3 + activation checkpointing at that count, "
               f"micro-batch {int(first.micro_batch.value)} x {int(first.model.seq_len.value)} "
               f"(derived, docs/plan.md)")
    out.append(LEGEND)
    shared: dict[str, set[str]] = {}
    for p in plans:
        for k, header, _ in columns:
            if k in p.figures and tag(p.figures[k].source) not in "DE":
                shared.setdefault(header, set()).add(p.figures[k].source)
    for header, sources in shared.items():
        if len(sources) == 1:
            out.append(f"  {header}: {next(iter(sources))}")
    for p in plans:
        own = {p.figures[k].source for k, _, _ in columns if k in p.figures
               and (tag(p.figures[k].source) in "DE" or len(shared.get(dict((c[0], c[1]) for c in columns)[k], ())) > 1)}
        out.append(f"  {p.chip.key}: " + "; ".join(sorted(own)))
    return "\n".join(out)


def bar_chart(path: str | Path, title: str, labels: list[str], panels: list[tuple[str, list[float]]],
              hatched: list[bool] | None = None, footnote: str = "") -> Path:
    """One horizontal bar panel per metric, values printed at the bar ends."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 0.5 * len(labels) * rows + 1.6 * rows),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, values) in zip(axes.flat, panels):
        ys = range(len(labels))
        clean = [v if v is not None else 0.0 for v in values]
        bars = ax.barh(ys, clean, color=[colors[i % len(colors)] for i in ys],
                       hatch=None, edgecolor="black", linewidth=0.5)
        if hatched:
            for bar, h in zip(bars, hatched):
                if h:
                    bar.set_hatch("//")
        ax.set_yticks(list(ys), labels)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=10)
        top = max(clean) if any(clean) else 1.0
        ax.set_xlim(0, top * 1.3)
        for y, v in zip(ys, values):
            text = "n/a" if v is None else (f"{v:,.0f}" if v >= 1000 else f"{v:.3g}")
            ax.text((v or 0) + top * 0.01, y, text, va="center", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    if footnote:
        fig.text(0.01, 0.005, footnote, fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.04 if footnote else 0, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare_chart(plans: list[Plan], path: str | Path) -> Path:
    labels = [p.chip.key for p in plans]
    first = plans[0]
    panels = [
        ("chip-hours", [p.figures["chip_hours"].value for p in plans]),
        ("wall-clock days at the chip count used", [p.figures["wall_days"].value for p in plans]),
        ("chips used", [float(p.figures["chips"].value) for p in plans]),
        ("smallest chip count that fits", [p.memory_rows[-1][1] for p in plans]),
        ("peak bf16 TFLOP/s", [p.figures["peak_flops"].value / 1e12 for p in plans]),
        ("memory per chip, FSDP + act. ckpt (GB)", [p.memory_rows[-1][0].total / 1e9 for p in plans]),
    ]
    if all("energy_mwh" in p.figures for p in plans):
        panels.append(("energy (MWh, chips only)", [p.figures["energy_mwh"].value for p in plans]))
    hatched = [tag(p.figures["peak_flops"].source) != "D" for p in plans]
    mfus = sorted({f"{p.figures['mfu'].value:.2f} [{tag(p.figures['mfu'].source)}]" for p in plans})
    title = f"{first.model.label}, {fmt(first.figures['tokens'])}: MFU {', '.join(mfus)}"
    return bar_chart(path, title, labels, panels, hatched,
                     "hatched: datasheet figures that are estimates (or measured), solid: official datasheet. "
                     + LEGEND)


# -- bench compare ------------------------------------------------------------------------

def _bench_rows(results: list[dict]) -> list[tuple[str, list[float | None], str]]:
    """(metric, one value per result, format) for the bench comparison."""
    dtypes = sorted({d for r in results for d in r["matmul"]}, key=lambda d: (d != "float32", d))
    rows: list[tuple[str, list[float | None], str]] = []
    for d in dtypes:
        rows.append((f"matmul {d} GFLOP/s", [r["matmul"][d]["flops"] / 1e9 if d in r["matmul"] else None
                                             for r in results], ".3g"))
    rows.append(("copy bandwidth GB/s", [r["copy"]["bytes_per_s"] / 1e9 for r in results], ".3g"))
    best = [r["train"]["best"] for r in results]
    rows.append(("train tokens/s (best batch)", [b["tokens_per_s"] if b else None for b in best], ",.0f"))
    rows.append(("train best batch", [b["batch"] if b else None for b in best], "d"))
    rows.append(("train MFU", [b["mfu"] if b else None for b in best], ".3f"))
    rows.append(("train peak memory GB", [b["peak_memory_bytes"] / 1e9 if b else None for b in best], ".3g"))
    for key, label in (("prefill", "prefill"), ("decode", "decode")):
        batches = sorted({m["batch"] for r in results for m in r[key]})
        for b in batches:
            rows.append((f"{label} tokens/s, batch {b}",
                         [next((m["tokens_per_s"] for m in r[key] if m["batch"] == b), None) for r in results],
                         ",.0f"))
    return rows


def bench_label(result: dict, path: str | Path) -> str:
    cat = result.get("catalogue")
    return f"{Path(path).stem} ({cat['key'] if cat else result['device']['type']})"


def render_bench_compare(results: list[dict], paths: list[str | Path]) -> str:
    labels = [bench_label(r, p) for r, p in zip(results, paths)]
    table = []
    for metric, values, spec in _bench_rows(results):
        table.append([metric] + ["-" if v is None else format(v, spec) for v in values])
    head = ["measured"] + labels
    out = [_table(head, table)]
    out.append("")
    for label, r in zip(labels, results):
        s = r["settings"]
        best = r["train"]["best"]
        peak = f"; MFU against {best['peak_source']}" if best else ""
        out.append(f"{label}: {r['device']['name']}; model {s['model']} ({s['params'] / 1e6:.1f}M params), "
                   f"seq {s['seq_len']}, train dtype {r['train']['dtype']}{peak}; torch {r['versions']['torch']}; "
                   f"bench wall time {r['wall_s']:.0f} s")
    models = {(r["settings"]["model"], r["settings"]["seq_len"]) for r in results}
    if len(models) > 1:
        out.append("note: the results were measured on different models or sequence lengths; "
                   "training and inference rows are not like for like")
    return "\n".join(out)


def bench_compare_chart(results: list[dict], paths: list[str | Path], png: str | Path) -> Path:
    labels = [bench_label(r, p) for r, p in zip(results, paths)]
    panels = [(metric, values) for metric, values, _ in _bench_rows(results) if metric != "train best batch"]
    models = sorted({f"{r['settings']['model']} @ seq {r['settings']['seq_len']}" for r in results})
    return bar_chart(png, f"chipshift bench: {', '.join(models)}", labels, panels,
                     footnote="all figures measured by `chipshift bench`; MFU against each result's "
                              "peak source (catalogue datasheet on accelerators, measured matmul ceiling on CPUs)")
