"""`chipshift parity dump | compare | handoff | train | serve-check | verify`, `chipshift env diff` and
`chipshift eval`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from chipshift.devices import known_types
from chipshift.errors import ChipshiftError
from chipshift.parity.certificate import DEFAULT_BUDGET_MB
from chipshift.parity.compare import Thresholds, compare_dumps
from chipshift.parity.dump import DEFAULT_MAX_TENSOR_MB, Dump, dump_checkpoint
from chipshift.parity.handoff import handoff
from chipshift.parity.rehearse import DEFAULT_REHEARSE_MB
from chipshift.parity.report import write_report

THRESHOLD_HELP = {
    "cos_fail": "fail when cosine is below this together with max error above --max-err-fail",
    "max_err_fail": "max |B - A| / max |A| above which a cosine under --cos-fail fails",
    "cos_hard_fail": "fail when cosine is below this, whatever the max error",
    "rel_l2_fail": "fail when |B - A| / |A| exceeds this (cosine alone is blind to a rescale)",
    "cos_warn": "warn when cosine is below this",
    "stats_fail": "statistics only: fail when L2 norms differ by more than this (relative)",
    "stats_warn": "statistics only: warn when L2 norms differ by more than this",
    "loss_fail": "fail when a step's losses differ by more than this (relative)",
    "loss_warn": "warn when a step's losses differ by more than this",
    "ratio_warn": "with --reference: warn when B's error vs R exceeds this multiple of A's",
    "ratio_fail": "with --reference: fail when B's error vs R exceeds this multiple of A's",
}


def _add_dump_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the run that is dumped")
    g.add_argument("--batch", metavar="FILE", help='JSON token ids: [[...], ...] or {"input_ids": ...} '
                   "(default: a built-in text through the checkpoint's tokenizer, else seeded random ids); "
                   "a dump's batch.json can be passed to reproduce its batch")
    g.add_argument("--batch-size", type=int, default=2, help="rows of the default batch (default 2)")
    g.add_argument("--seq-len", type=int, default=32, help="tokens per row of the default batch (default 32)")
    g.add_argument("--seed", type=int, default=0, help="seed of the default batch and of the run (default 0)")
    g.add_argument("--steps", type=int, default=0, help="AdamW steps after the recorded pass; their losses "
                   "make the loss curve (default 0)")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate for --steps (default 1e-3)")
    g.add_argument("--max-tensor-mb", type=float, default=DEFAULT_MAX_TENSOR_MB,
                   help=f"keep the tensors themselves when they all fit in this many MiB, else statistics "
                        f"only; 0 = statistics only (default {DEFAULT_MAX_TENSOR_MB:g})")
    g.add_argument("--compile", action="store_true", help="run the model through torch.compile")
    g.add_argument("--threads", type=int, help="torch.set_num_threads for the run")
    g.add_argument("--no-deterministic", action="store_true",
                   help="do not ask torch for deterministic algorithms")


def _dump_kwargs(args) -> dict:
    return dict(batch_file=args.batch, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                steps=args.steps, lr=args.lr, max_tensor_mb=args.max_tensor_mb, compile=args.compile,
                threads=args.threads, deterministic=not args.no_deterministic)


def _add_threshold_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("thresholds (defaults depend on the coarser dtype; see docs/parity.md)")
    for f in dataclasses.fields(Thresholds):
        g.add_argument("--" + f.name.replace("_", "-"), type=float, dest=f.name, help=THRESHOLD_HELP[f.name])


def _overrides(args) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(Thresholds)}


def register(sub) -> None:
    ev = sub.add_parser("eval", help="benchmark scores through lm-evaluation-harness against chipshift serve",
                        description="Serve CKPT with `chipshift serve` on --device in --dtype and run the lm-eval "
                                    "library's tasks against it (its local-completions model: echo + logprobs). "
                                    "Offline tasks ship with chipshift (tag `chipshift`: "
                                    "chipshift_sanguo_cloze, chipshift_shakespeare_cloze, chipshift_identity, "
                                    "chipshift_preference); any folder of lm-eval YAML tasks works with "
                                    "--include-path. With --compare, the same tasks run on a second target and "
                                    "each score's difference gets a paired bootstrap confidence interval.")
    ev.add_argument("checkpoint", help="chipshift checkpoint directory (with a tokenizer)")
    ev.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names, "
                                                   "e.g. chipshift or chipshift_sanguo_cloze,chipshift_identity")
    ev.add_argument("--device", help="the server's device (default: auto-detected)")
    ev.add_argument("--dtype", help="the server's dtype (default: as `chipshift serve` picks it)")
    ev.add_argument("--compare", metavar="DEVICE[:DTYPE]", help="also run on this target and report the delta")
    ev.add_argument("--include-path", action="append", default=[], metavar="DIR",
                    help="a folder of lm-eval YAML tasks (repeatable)")
    ev.add_argument("--limit", type=int, help="at most this many items per task")
    ev.add_argument("--concurrency", type=int, default=4, help="requests in flight, batched by the server "
                                                               "(default 4)")
    ev.add_argument("--json", metavar="FILE", help="also write the scores (and the delta) as JSON")
    ev.set_defaults(func=run_eval)
    e = sub.add_parser("env", help="what differs between two runs', dumps' or checkpoints' environments",
                       description="Compare the environments two runs, parity dumps or checkpoints were made in: "
                                   "device, plugin, threads, versions, compile, dtype decisions.")
    esub = e.add_subparsers(dest="env_command", metavar="SUBCOMMAND", required=True)
    d = esub.add_parser("diff", help="print the keys whose values differ between A and B")
    d.add_argument("a", help="a parity dump, a checkpoint or a training run directory")
    d.add_argument("b", help="the same kinds")
    d.add_argument("--json", action="store_true", help="print the result as JSON")
    d.set_defaults(func=run_env_diff)
    p = sub.add_parser("parity", help="dump, compare and hand off between chips, module by module",
                       description="Prove that two chips (or dtypes, or compilers) compute the same: "
                                   "dump every module's outputs and gradients, compare two dumps, name "
                                   "the first module that diverges, verify a checkpoint handoff.")
    psub = p.add_subparsers(dest="parity_command", metavar="SUBCOMMAND", required=True)

    d = psub.add_parser("dump", help="record every module's output and input gradient on a fixed batch",
                        description="Load CKPT on --device in --dtype, run a fixed seeded batch forward and "
                                    "backward (and --steps AdamW steps) with every module hooked, and write "
                                    "dump.json (statistics, losses, environment), tensors.safetensors (while "
                                    "they fit --max-tensor-mb) and batch.json to --out.")
    d.add_argument("checkpoint", help="chipshift checkpoint directory")
    d.add_argument("--device", default="cpu", help=f"{', '.join(known_types())}, optionally with :INDEX (default cpu)")
    d.add_argument("--dtype", default="auto", help="float64 (a CPU reference), float32, bfloat16, float16, "
                   "or auto: the device's compute dtype (default auto)")
    d.add_argument("--out", required=True, help="dump directory to write")
    d.add_argument("--emulate", metavar="PROFILE_OR_CHIP",
                   help="compute with another chip's arithmetic: a numerics profile (fp16-only, bf16, tf32, "
                        "fp8-ue8m0, ...) or a chip (ascend-910a, h100-sxm:fp8-e4m3, ...); see docs/rehearse.md")
    _add_dump_options(d)
    d.set_defaults(func=run_dump)

    c = psub.add_parser("compare", help="compare two dumps; name the first diverging module; exit 1 on failure",
                        description="Compare dump B with dump A per module, forward then backward, judge each "
                                    "by thresholds for the coarser dtype (or, with --reference R, by the "
                                    "error-ratio rule err(B,R)/err(A,R)), compare the loss curves, write "
                                    "report.md, report.json, depth.png and loss.png, and exit 1 when the "
                                    "verdict is fail.")
    c.add_argument("a", help="dump A (the baseline: the chip you trust)")
    c.add_argument("b", help="dump B (the chip under test)")
    c.add_argument("--reference", metavar="R", help="a float64 CPU dump: apply the error-ratio rule")
    c.add_argument("--out", help="report directory (default: B/report)")
    _add_threshold_options(c)
    c.set_defaults(func=run_compare)

    h = psub.add_parser("handoff", help="verify a checkpoint on a new chip and record the verdict in it",
                        description="Verify CKPT's checksums, dump it on --from and on --to, compare, write "
                                    "the report and append the verdict to the checkpoint's sidecar; later "
                                    "stages refuse a checkpoint whose last handoff failed unless --force.")
    h.add_argument("checkpoint", help="chipshift checkpoint directory")
    h.add_argument("--from", dest="source", required=True, metavar="DEVICE[:DTYPE]",
                   help="where the checkpoint was made, e.g. cpu:float32; an index may follow the device "
                        "(DEVICE:1:bfloat16); no dtype = the device's compute dtype")
    h.add_argument("--to", dest="target", required=True, metavar="DEVICE[:DTYPE]",
                   help="where it moves, e.g. npu:bfloat16")
    h.add_argument("--reference", metavar="DEVICE[:DTYPE]", help="also dump a reference (cpu:float64) and "
                   "judge by the error-ratio rule")
    h.add_argument("--out", help="directory for the dumps and the report (default: CKPT.handoff)")
    g = h.add_argument_group("the certificate (CKPT/certificate: hashes, environments, verdicts, the reference)")
    g.add_argument("--certificate-mb", type=float, default=DEFAULT_BUDGET_MB,
                   help=f"keep the stored dumps' tensors while they fit in this many MiB, else statistics only "
                        f"(default {DEFAULT_BUDGET_MB:g})")
    g.add_argument("--serve-check", action="store_true", help="also run the trainer-to-server check on --to")
    g.add_argument("--tasks", help="also run these lm-eval tasks on both sides and record the score delta "
                                   "(comma-separated, e.g. chipshift)")
    g.add_argument("--limit", type=int, help="with --tasks: at most this many items per task")
    _add_dump_options(h)
    _add_threshold_options(h)
    h.set_defaults(func=run_handoff)

    v = psub.add_parser("verify", help="judge a device against the reference stored in the checkpoint's certificate",
                        description="Check CKPT's files against its certificate's hashes, dump CKPT on --device in "
                                    "--dtype with the stored batch, and judge it by the error-ratio rule against "
                                    "the stored float64 reference and the stored trusted dump of the same dtype "
                                    "(else the handoff's source): no source chip needed. Exit 1 on fail, 2 on bad "
                                    "input (no certificate, hashes that do not match, a stored dump missing).")
    v.add_argument("checkpoint", help="a chipshift checkpoint with a certificate (written by parity handoff)")
    v.add_argument("--device", default="cpu", help="the device to judge (default cpu)")
    v.add_argument("--dtype", default="auto", help="its dtype (default: the device's compute dtype)")
    v.add_argument("--out", help="directory for the new dump and the report (default: CKPT.verify/DEVICE-DTYPE)")
    _add_threshold_options(v)
    v.set_defaults(func=run_verify)

    t = psub.add_parser("train", help="train the same config on two targets and compare the loss curves",
                        description="Run the training config CONFIG for --steps steps on --a and then on --b "
                                    "(same seed, so the same initial weights and data order; only device and "
                                    "dtype differ), log the loss every step, compare the curves step by step "
                                    "with the coarser dtype's loss tolerance, write report.md, report.json and "
                                    "loss.png to --out, and exit 1 when they disagree.")
    t.add_argument("config", help="training config (TOML, as for `chipshift pretrain`)")
    t.add_argument("--a", required=True, metavar="DEVICE[:DTYPE]", help="baseline target, e.g. cpu:float32")
    t.add_argument("--b", required=True, metavar="DEVICE[:DTYPE]", help="target under test, e.g. npu:bfloat16")
    t.add_argument("--steps", type=int, required=True, help="optimizer steps on each side")
    t.add_argument("--out", required=True, help="directory for the two runs and the report (must be new)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value on both sides, e.g. --set data.batch_size=4")
    t.add_argument("--loss-fail", type=float, help="fail when a step's losses differ by more than this (relative)")
    t.add_argument("--loss-warn", type=float, help="warn when a step's losses differ by more than this")
    t.set_defaults(func=run_train)

    r = psub.add_parser("rehearse", help="predict what diverges on a chip you do not have (emulated); exit 1 "
                                         "on a predicted failure",
                        description="Dump CKPT in float64, under the trusted chip's numerics and under the target's "
                                    "(both emulated on --device), judge the target by the error-ratio rule with the "
                                    "bars raised by the gap between their formats, list the modules whose values "
                                    "overflow or flush to zero in the target's dtype, the loss drift over --steps "
                                    "AdamW steps and a mitigation per problem; write report.md, report.json, "
                                    "depth.png and loss.png. See docs/rehearse.md.")
    r.add_argument("checkpoint", help="chipshift checkpoint directory")
    r.add_argument("--chip", required=True, metavar="TARGET",
                   help="a numerics profile (fp16-only, bf16, tf32, hf32, fp8-ue8m0, mxfp8, ...) or a chip "
                        "(ascend-910a, h100-sxm:fp8-e4m3, ...) of chipshift/devices/numerics.toml")
    r.add_argument("--trusted", metavar="SOURCE", help="the profile or chip you trust (default: the device in hand's)")
    r.add_argument("--device", default="cpu", help="where the emulated dumps run (default cpu)")
    r.add_argument("--out", help="directory for the dumps and the report (default: CKPT.rehearse-PROFILE)")
    _add_dump_options(r)
    r.set_defaults(max_tensor_mb=DEFAULT_REHEARSE_MB)
    _add_threshold_options(r)
    r.set_defaults(func=run_rehearse)

    s = psub.add_parser("serve-check", help="the serving engine's log-probabilities against the training "
                                            "forward's; exit 1 on failure",
                        description="Generate greedily from a few prompts with the inference engine on --device "
                                    "in --dtype, each alone and all batched together, recording every prompt "
                                    "and generated token's log-probability; run the training model "
                                    "teacher-forced over the same tokens in the same dtype on "
                                    "--reference-device; report max and mean |difference| and the share of "
                                    "greedy tokens that agree, per request, against the dtype's thresholds "
                                    "(docs/parity.md).")
    s.add_argument("checkpoint", help="chipshift checkpoint directory")
    s.add_argument("--device", help="the engine's device (default: auto-detected)")
    s.add_argument("--dtype", help="the engine's dtype (default: as `chipshift serve` picks it)")
    s.add_argument("--reference-device", help="where the training forward runs (default: the engine's device)")
    s.add_argument("--max-tokens", type=int, default=16, help="tokens generated per prompt (default 16)")
    s.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    g = s.add_argument_group("thresholds (all three, or none for the dtype's defaults)")
    g.add_argument("--max-abs", type=float, help="fail above this |difference| of a token's log-probability")
    g.add_argument("--mean-abs", type=float, help="fail above this mean |difference| of a request")
    g.add_argument("--min-agreement", type=float, help="fail below this share of agreeing greedy tokens")
    s.set_defaults(func=run_serve_check)


def run_dump(args) -> int:
    out = dump_checkpoint(args.checkpoint, args.out, device=args.device, dtype=args.dtype, emulate=args.emulate,
                          **_dump_kwargs(args))
    dump = Dump(out)
    kept = "statistics only: " + dump.doc["stats_only"] if dump.doc["stats_only"] else "tensors kept"
    print(f"wrote {out}: {len(dump.doc['records'])} records on {dump.label}, {kept}; "
          f"losses {', '.join(f'{x:.6g}' for x in dump.doc['losses'])}")
    return 0


def _print_result(result: dict, out: Path, seconds: float) -> None:
    ff, s = result["first_failing"], result["summary"]
    print(f"verdict: {result['verdict'].upper()} ({result['rule']}, compared by {result['mode']})")
    print(f"first failing module: forward {ff['forward'] or 'none'}, backward {ff['backward'] or 'none'}")
    for direction in ("forward", "backward"):
        x = s[direction]
        print(f"{direction}: {x['modules']} modules, {x['fail']} fail, {x['warn']} warn, median error "
              f"{x['median_error']:.3g}, max {x['max_error']:.3g} at {x['max_error_module']}")
    print(f"loss: max relative difference {result['loss']['max_rel_diff']:.3g} ({result['loss']['verdict']})")
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"report: {out / 'report.md'} ({seconds:.1f} s)")


def run_compare(args) -> int:
    t0 = time.perf_counter()
    a, b = Dump(args.a), Dump(args.b)
    ref = Dump(args.reference) if args.reference else None
    result = compare_dumps(a, b, ref, **_overrides(args))
    out = write_report(result, args.out or Path(args.b) / "report", a.doc["model"]["config"]["num_layers"])
    _print_result(result, out, time.perf_counter() - t0)
    return 1 if result["verdict"] == "fail" else 0


def run_handoff(args) -> int:
    t0 = time.perf_counter()
    if args.limit is not None and args.limit < 1:
        raise ChipshiftError(f"--limit = {args.limit}: must be at least 1")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    record, result = handoff(args.checkpoint, args.source, args.target, reference=args.reference,
                             out=args.out, thresholds=_overrides(args), serve_check=args.serve_check, tasks=tasks,
                             eval_limit=args.limit, certificate_mb=args.certificate_mb, **_dump_kwargs(args))
    _print_result(result, Path(record["report"]).parent, time.perf_counter() - t0)
    print(f"recorded handoff {record['from']} -> {record['to']}: {record['verdict']} in {args.checkpoint}")
    print(f"certificate: {record['certificate']}")
    return 1 if record["verdict"] == "fail" else 0


def run_verify(args) -> int:
    from chipshift.parity.certificate import verify

    t0 = time.perf_counter()
    result = verify(args.checkpoint, args.device, args.dtype, out=args.out, thresholds=_overrides(args))
    b = result["baseline"]
    print(f"judged {result['dumps']['b']['label']} against the certificate's reference: float64 R and the "
          f"stored {b['stored']} side ({b['target']}) as A")
    _print_result(result, Path(result["report"]), time.perf_counter() - t0)
    return 1 if result["verdict"] == "fail" else 0


def run_rehearse(args) -> int:
    from chipshift.parity.rehearse import rehearse

    t0 = time.perf_counter()
    result = rehearse(args.checkpoint, args.chip, trusted=args.trusted, device=args.device, out=args.out,
                      thresholds={k: v for k, v in _overrides(args).items() if v is not None},
                      **_dump_kwargs(args))
    r = result["rehearsal"]
    out = Path(result["dumps"]["b"]["path"]).parent
    _print_result(result, out, time.perf_counter() - t0)
    print(f"rehearsal (emulated): {r['target']['name']} against {r['trusted']['name']} (format gap "
          f"{r['format_gap']:g}x); overflow at {', '.join(s['name'] for s in r['overflow']) or 'none'}; "
          f"flush to zero at {', '.join(s['name'] for s in r['underflow'][:5]) or 'none'}"
          + (f" and {len(r['underflow']) - 5} more" if len(r["underflow"]) > 5 else ""))
    for m in r["mitigations"]:
        print(f"  mitigation: {m}")
    return 1 if result["verdict"] == "fail" else 0


def run_train(args) -> int:
    from chipshift.parity.train import train_pair
    from chipshift.train.config import load_config

    if args.steps < 1:
        raise ChipshiftError(f"--steps = {args.steps}: must be at least 1")
    report = train_pair(load_config(args.config, args.set), args.a, args.b, args.steps, args.out,
                        thresholds={"loss_fail": args.loss_fail, "loss_warn": args.loss_warn})
    loss = report["loss"]
    print(f"verdict: {report['verdict'].upper()}: max relative loss difference {loss['max_rel_diff']:.3g} over "
          f"{args.steps} steps (tolerance {loss['tolerance']:g}, {report['rule_dtype']})")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 1 if report["verdict"] == "fail" else 0


def run_serve_check(args) -> int:
    from chipshift.parity.serve_check import ServeThresholds, serve_check

    given = [args.max_abs, args.mean_abs, args.min_agreement]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise ChipshiftError("--max-abs, --mean-abs and --min-agreement go together (or none of them)")
    if args.max_tokens < 1:
        raise ChipshiftError(f"--max-tokens = {args.max_tokens}: must be at least 1")
    report = serve_check(args.checkpoint, args.device, args.dtype, reference_device=args.reference_device,
                         max_tokens=args.max_tokens, thresholds=ServeThresholds(*given) if given[0] is not None
                         else None)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if report["verdict"] == "fail" else 0


def run_env_diff(args) -> int:
    from chipshift.parity.envdiff import diff, format_diff

    result = diff(args.a, args.b)
    print(json.dumps(result) if args.json else format_diff(result, args.a, args.b))
    return 0


def run_eval(args) -> int:
    from chipshift.parity.dump import parse_target
    from chipshift.parity.harness import evaluate_checkpoint, format_delta, score_delta

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.limit is not None and args.limit < 1:
        raise ChipshiftError(f"--limit = {args.limit}: must be at least 1")
    if args.concurrency < 1:
        raise ChipshiftError(f"--concurrency = {args.concurrency}: must be at least 1")
    kw = dict(include_path=args.include_path, limit=args.limit, concurrency=args.concurrency)
    result = {"runs": [evaluate_checkpoint(args.checkpoint, tasks, args.device, args.dtype, **kw)]}
    if args.compare:
        device, dtype = parse_target(args.compare)
        result["runs"].append(evaluate_checkpoint(args.checkpoint, tasks, device,
                                                  None if dtype == "auto" else dtype, **kw))
        result["delta"] = score_delta(*result["runs"])
    for run in result["runs"]:
        for task, row in run["tasks"].items():
            print(f"{run['target']}  {task}: " + ", ".join(
                f"{m} {row[m]:.4f} ± {row[m + '_stderr'] or 0:.4f}" for m in ("acc", "acc_norm") if m in row)
                + f" ({row['n']} items)")
    if "delta" in result:
        for metric in ("acc", "acc_norm"):
            for line in format_delta(result["delta"], metric):
                print("delta  " + line)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0
