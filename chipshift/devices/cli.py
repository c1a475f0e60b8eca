"""`chipshift devices`: what is present, what works on it, and its peak."""

from __future__ import annotations

import json

from chipshift.devices import device_report, get_device
from chipshift.devices.backends import BACKENDS, is_available


def register(sub) -> None:
    p = sub.add_parser("devices", help="list the devices present, their working dtypes and peaks",
                       description="Print a table of the devices present: type, name, count, memory, "
                                   "dtypes that really work (probed), collective backend and catalogue peak, "
                                   "then each device's precision policy: every half-precision decision "
                                   "and why.")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=run)


def run(args) -> int:
    rows = [device_report(get_device(t)) for t in BACKENDS if is_available(t)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = ["type", "name", "count", "memory GB", "working dtypes", "collective", "catalogue", "peak TFLOP/s"]
    table = [[r["type"], r["name"] + (f" ({r['cpu_class']})" if "cpu_class" in r else ""), str(r["count"]),
              str(r["memory_gb"]), ",".join(r["working_dtypes"]), r["collective"], r["catalogue"] or "-",
              f'{r["peak_tflops"]} ({r["peak_source"]})'] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *table)]
    for row in [head, ["-" * w for w in widths], *table]:
        print("  ".join(x.ljust(w) for x, w in zip(row, widths)))
    for r in rows:
        print(f"\nprecision policy on {r['type']} (pin with CHIPSHIFT_HALF=native|emulated, "
              f"CHIPSHIFT_CPU_KERNELS=off):")
        for key, d in r["precision"].items():
            print(f"  {key:<15} {str(d['value']):<9} {d['reason']}")
    absent = [t for t in BACKENDS if not is_available(t)]
    print(f"\nnot present: {', '.join(absent)}")
    return 0
