"""`chipshift plan` and `chipshift bench`: estimate a run on any fleet, measure this chip."""

from __future__ import annotations

import argparse
import json

from pathlib import Path

from chipshift.errors import ChipshiftError
from chipshift.plan import report
from chipshift.plan.estimate import make_plan, require_fit, resolve_chip, resolve_model


def _number(text: str) -> float:
    """Accept 7e9, 7B, 2T, 1.5M, 300G-style counts."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
    t = text.strip().lower().replace("_", "")
    try:
        if t and t[-1] in scale:
            return float(t[:-1]) * scale[t[-1]]
        return float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (examples: 7e9, 7B, 2T)") from None


def _integer(text: str) -> int:
    value = _number(text)
    if not float(value).is_integer():
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(value)


PLAN_EPILOG = """examples:
  chipshift plan --params 7e9 --tokens 2e12 --chip ascend-910b --count 1024
  chipshift plan --params 7e9 --tokens 2e12 --compare h100,h800,h20,ascend-910b,ascend-910c
  chipshift plan --model smollm2-135m --tokens 2T --chip bench.json --price-per-hour 2.5
  chipshift plan --layers 32 --hidden 4096 --vocab 128256 --tokens 15T --chip h100 --days 30
  chipshift plan --params 70e9 --tokens 15T --chip h100 --count 2048 --failure-rate 1 --checkpoint-gbps 20

Every figure names its source: given, datasheet (official|estimate) from
chipshift/devices/chips.toml, measured (a `chipshift bench` JSON), assumed (a default
with the flag that overrides it) or derived (with its formula). Formulas: docs/plan.md."""


def register(sub) -> None:
    p = sub.add_parser(
        "plan", help="estimate FLOPs, time, chip-hours, memory, cost and energy of a training run",
        description="Estimate what pre-training a model on a token budget takes on a fleet of chips: "
                    "training FLOPs (6ND + attention), time at an assumed or measured MFU, chip-hours, "
                    "memory per chip under DDP, FSDP/ZeRO-3 and activation checkpointing, the smallest "
                    "chip count that fits, and cost and energy when a price is given.",
        epilog=PLAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model (a preset or checkpoint, or a size)")
    m.add_argument("--model", help="a preset name or a chipshift checkpoint directory")
    m.add_argument("--params", type=_number, help="parameter count (7e9, 7B)")
    m.add_argument("--layers", type=_integer, help="decoder layers")
    m.add_argument("--hidden", type=_integer, help="hidden size")
    m.add_argument("--vocab", type=_integer, help="vocabulary size (default 32000, assumed)")
    m.add_argument("--seq-len", type=_integer, help="training sequence length (default 4096 or the "
                                                   "model's max, assumed)")
    p.add_argument("--tokens", type=_number, required=True, help="training tokens (2e12, 2T)")
    c = p.add_argument_group("fleet")
    c.add_argument("--chip", help="a catalogue key (`chipshift devices` lists the device types; keys are in "
                                  "chipshift/devices/chips.toml) or a `chipshift bench` JSON")
    c.add_argument("--compare", help="comma-separated chips (keys or bench JSONs) to set side by side")
    c.add_argument("--count", type=_integer, help="number of chips (default: the smallest count that fits)")
    c.add_argument("--days", type=_number, help="instead of --count: enough chips to finish in this many days")
    c.add_argument("--mfu", type=float, help="model FLOPs utilisation (default 0.40 assumed, or measured "
                                             "from a bench JSON)")
    c.add_argument("--micro-batch", type=_integer, help="sequences per chip per micro-batch (default 1)")
    c.add_argument("--usable-memory", type=float, help="share of chip memory tensors may use (default 0.9)")
    c.add_argument("--attention", choices=("flash", "math"), default="flash",
                   help="attention kernel for the activation count: fused (flash) or math (stores S x S)")
    r = p.add_argument_group("nodes, failures and checkpoints")
    r.add_argument("--chips-per-node", type=_integer, help="chips in one server, one torchrun agent each (default 8)")
    r.add_argument("--failure-rate", type=float, help="job-stopping failures per 1000 chip-days (default 0.47, "
                                                      "Llama 3's on H100)")
    r.add_argument("--checkpoint-gbps", type=float, help="GB/s from the writing rank to storage (default 2)")
    r.add_argument("--restart-minutes", type=float, help="minutes from a failure to running workers, before "
                                                         "reading the checkpoint (default 5)")
    e = p.add_argument_group("cost and energy")
    e.add_argument("--price-per-hour", type=float, help="price of one chip-hour, for the cost")
    e.add_argument("--power-w", type=float, help="board power per chip in W (default: the catalogue's)")
    p.add_argument("--png", default="plan_compare.png", help="chart written by --compare (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run_plan)
    register_bench(sub)


def run_plan(args) -> int:
    if bool(args.chip) == bool(args.compare):
        raise ChipshiftError("give exactly one of --chip CHIP or --compare CHIP,CHIP,...")
    if args.count is not None and args.days is not None:
        raise ChipshiftError("give --count or --days, not both")
    model = resolve_model(args.model, params=args.params, layers=args.layers, hidden=args.hidden,
                          vocab=args.vocab, seq_len=args.seq_len)
    names = [args.chip] if args.chip else [c.strip() for c in args.compare.split(",") if c.strip()]
    plans = [make_plan(model, args.tokens, resolve_chip(name, args.mfu), count=args.count, days=args.days,
                       micro_batch=args.micro_batch, usable=args.usable_memory,
                       price_per_hour=args.price_per_hour, power_w=args.power_w, attention=args.attention,
                       chips_per_node=args.chips_per_node, failure_rate=args.failure_rate,
                       checkpoint_gbps=args.checkpoint_gbps, restart_minutes=args.restart_minutes)
             for name in names]
    if args.chip:
        require_fit(plans[0])
        print(json.dumps(plans[0].to_dict(), indent=2) if args.json else report.render_plan(plans[0]))
        return 0
    png = report.compare_chart(plans, args.png)
    if args.json:
        print(json.dumps({"plans": [p.to_dict() for p in plans], "png": str(png)}, indent=2))
    else:
        print(report.render_compare(plans))
        print(f"\nchart: {png}")
    return 0


BENCH_EPILOG = """examples:
  chipshift bench                                  # the default model (preset S, seq 256) here
  chipshift bench --device npu --model M --out bench-910b.json
  chipshift bench compare bench-cpu.json bench-910b.json --png bench.png
  chipshift plan --params 7e9 --tokens 2e12 --chip bench-910b.json   # plan with measured MFU"""


def register_bench(sub) -> None:
    from chipshift.plan.bench import BenchSettings
    d = BenchSettings()
    p = sub.add_parser(
        "bench", help="measure this device: matmul ceilings, copy bandwidth, training tokens/s and MFU, "
                      "prefill/decode tokens/s, peak memory",
        description="Measure the local device on a model and write a JSON naming the device, its catalogue "
                    "entry, versions and settings. Training uses the training loop's own step at batch "
                    "sizes 1, 2, 4, ... up to the largest that fits (or --max-batch).",
        epilog=BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="device to measure (default: auto / $CHIPSHIFT_DEVICE)")
    p.add_argument("--model", default=d.model, help="preset or checkpoint directory (default %(default)s)")
    p.add_argument("--seq-len", type=_integer, default=d.seq_len, help="sequence length (default %(default)s)")
    p.add_argument("--max-batch", type=_integer, default=d.max_batch,
                   help="largest training batch to try (default %(default)s)")
    p.add_argument("--steps", type=_integer, default=d.steps, help="timed training steps per batch size "
                                                                   "(default %(default)s)")
    p.add_argument("--dtype", default=d.dtype, help="compute dtype (default: the device layer's choice)")
    p.add_argument("--out", help="result JSON (default bench-<device type>.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_bench)
    sub_bench = p.add_subparsers(dest="bench_command", metavar="compare")
    c = sub_bench.add_parser("compare", help="set bench results side by side: a table and a bar-chart PNG",
                             description="Print the measured figures of several `chipshift bench` JSONs "
                                         "side by side and draw them as bar charts.")
    c.add_argument("results", nargs="+", help="bench JSON files")
    c.add_argument("--png", default="bench_compare.png", help="chart to write (default %(default)s)")
    c.set_defaults(func=run_bench_compare)


def run_bench(args) -> int:
    from chipshift.devices import get_device
    from chipshift.plan.bench import BenchSettings, run_bench as bench

    for name in ("seq_len", "max_batch", "steps"):
        if getattr(args, name) < 1:
            raise ChipshiftError(f"--{name.replace('_', '-')} = {getattr(args, name)}: must be at least 1")
    dev = get_device(args.device)
    settings = BenchSettings(model=args.model, seq_len=args.seq_len, max_batch=args.max_batch,
                             steps=args.steps, dtype=args.dtype)
    result = bench(dev, settings, progress_enabled=not args.no_progress)
    out = Path(args.out or f"bench-{dev.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(report.render_bench_compare([result], [out]))
    print(f"\nwrote {out}")
    return 0


def run_bench_compare(args) -> int:
    results = []
    for path in args.results:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ChipshiftError(f"cannot read bench result {path}: {exc}") from None
        if data.get("format") != "chipshift-bench":
            raise ChipshiftError(f"{path} is not a `chipshift bench` result")
        results.append(data)
    print(report.render_bench_compare(results, args.results))
    png = report.bench_compare_chart(results, args.results, args.png)
    print(f"\nchart: {png}")
    return 0
