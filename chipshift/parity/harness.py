"""Benchmark scores through lm-evaluation-harness, served by chipshift, on any device and dtype.

`evaluate_checkpoint` starts `chipshift serve CKPT` on the device and dtype in a subprocess
(a free port on 127.0.0.1) and runs the `lm-eval` library (a pinned release, not a copy)
against it through lm-eval's own OpenAI-compatible model `local-completions`: every
log-likelihood request is one `/v1/completions` call with the tokens as the prompt,
`echo` and `logprobs`, which chipshift's server answers with the engine's log-softmax.
One change, as a registered subclass (`chipshift-completions`): those scoring requests also
send `ignore_eos`. local-completions drops the last returned entry as the one generated
token; when that token was a stop token the server returns no entry for it (stop tokens
are not output), and lm-eval would drop the continuation's last token instead.
lm-eval tokenizes with the checkpoint's own tokenizer, written as a Hugging Face tokenizer
folder (no hub, no network: HF_HUB_OFFLINE and HF_DATASETS_OFFLINE are set for the run).

Tasks: the offline ones shipped in `chipshift/data/lm_eval_tasks` (tag `chipshift`; see
chipshift.data.eval_tasks), lm-eval's own (whose data it cannot download here), and any
folder of YAML tasks passed as `include_path`.

`score_delta(a, b)` compares two runs of the same tasks item by item (the same items in
both): the difference of the means with a paired bootstrap confidence interval.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
import time
from pathlib import Path

from chipshift.errors import ChipshiftError

METRICS = ("acc", "acc_norm")
BOOTSTRAP_ITERS = 2000
CONFIDENCE = 0.95


@contextlib.contextmanager
def _offline():
    """No hub and no dataset downloads for the block (lm-eval and transformers read these)."""
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def task_manager(include_path: list[str | Path] = ()):
    """lm-eval's TaskManager over its own tasks, chipshift's shipped ones and the user's folders."""
    from lm_eval.tasks import TaskManager

    from chipshift.data.eval_tasks import SHIPPED

    for p in include_path:
        if not Path(p).is_dir():
            raise ChipshiftError(f"--include-path {p}: not a folder of lm-eval task YAML files")
    return TaskManager(include_path=[str(SHIPPED), *map(str, include_path)])


def check_tasks(tasks: list[str], manager) -> list[str]:
    """The task names, each known to lm-eval (a task, group or tag), else a one-line error."""
    if not tasks:
        raise ChipshiftError("--tasks: give at least one task, e.g. --tasks chipshift (all of chipshift's)")
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        ours = sorted(t for t in known if t.startswith("chipshift"))
        raise ChipshiftError(f"--tasks: unknown task {unknown[0]!r}; chipshift's offline tasks: {', '.join(ours)} "
                             f"(or any lm-eval task, or a task in an --include-path folder)")
    return list(tasks)


MODEL = "chipshift-completions"


def _register_model() -> None:
    import lm_eval.models  # noqa: F401  (lm-eval fills its registry on first use, unless it is not empty)
    from lm_eval.api.registry import get_model, register_model
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    try:
        get_model(MODEL)
        return
    except ValueError:
        pass

    @register_model(MODEL)
    class ChipshiftCompletions(LocalCompletionsAPI):
        def _create_payload(self, messages, generate=False, gen_kwargs=None, seed=1234, eos=None, **kwargs) -> dict:
            payload = super()._create_payload(messages, generate=generate, gen_kwargs=gen_kwargs, seed=seed, eos=eos,
                                              **kwargs)
            return payload if generate else {**payload, "ignore_eos": True}


def evaluate(model: str, model_args: dict, tasks: list[str], *, include_path: list[str | Path] = (),
             limit: int | None = None, manager=None, log=print) -> dict:
    """lm-eval's `simple_evaluate` with `model` (an lm-eval model name: "local-completions", "hf", ...);
    per task the metrics, their standard errors and, per item in document order, the scores and
    the log-likelihood of every choice."""
    import lm_eval
    from lm_eval import simple_evaluate

    with _offline():
        if manager is None:
            manager = task_manager(include_path)
            check_tasks(tasks, manager)
        t0 = time.perf_counter()
        out = simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), limit=limit,
                              log_samples=True, task_manager=manager, bootstrap_iters=1000,
                              random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    seconds = time.perf_counter() - t0
    results = {}
    for task, samples in out["samples"].items():
        metrics = out["results"][task]
        samples = sorted(samples, key=lambda s: s["doc_id"])
        row = {"n": len(samples), "items": {"loglik": [[float(r[0]) for r in s["filtered_resps"]] for s in samples]}}
        for m in METRICS:
            if f"{m},none" in metrics:
                row[m] = metrics[f"{m},none"]
                stderr = metrics.get(f"{m}_stderr,none")
                row[f"{m}_stderr"] = stderr if isinstance(stderr, float) else None
                row["items"][m] = [float(s[m]) for s in samples]
        results[task] = row
        log(f"  {task}: " + ", ".join(f"{m} {row[m]:.4f} ± {row[f'{m}_stderr'] or 0:.4f}"
                                      for m in METRICS if m in row) + f" ({row['n']} items)")
    return {"model": model, "tasks": results, "limit": limit, "seconds": round(seconds, 1),
            "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None}


def evaluate_checkpoint(ckpt: str | Path, tasks: list[str], device: str | None = None, dtype: str | None = None, *,
                        include_path: list[str | Path] = (), limit: int | None = None, concurrency: int = 4,
                        log=print) -> dict:
    """The tasks through lm-eval's `local-completions` (as `chipshift-completions`) against `chipshift
    serve ckpt` on device and dtype."""
    from chipshift.devices import dtype_name, get_device
    from chipshift.infer.cli import served
    from chipshift.infer.engine import DEFAULT_MAX_LEN
    from chipshift.model.checkpoint import read_sidecar
    from chipshift.model.config import ModelConfig
    from chipshift.model.hf import export_hf_tokenizer

    with _offline():  # a bad task name is reported before the device or the checkpoint is touched
        manager = task_manager(include_path)
        check_tasks(tasks, manager)
    dev = get_device(device)
    torch_dtype, _ = dev.precision.serving_dtype(dtype)
    cfg = ModelConfig.from_dict(read_sidecar(ckpt)["model_config"])
    with tempfile.TemporaryDirectory(prefix="chipshift-eval-") as tmp:
        if not export_hf_tokenizer(ckpt, tmp):
            raise ChipshiftError(f"{ckpt}: has no tokenizer (tokenizer.json); lm-eval needs one to build requests")
        with _offline(), served(ckpt, str(dev), dtype_name(torch_dtype), max_batch=concurrency, model_name="chipshift",
                                log=log) as base_url:
            # lm-eval truncates on the left to the context the server's engine has (its default)
            model_args = {"model": "chipshift", "base_url": f"{base_url}/completions", "tokenizer": tmp,
                          "tokenizer_backend": "huggingface", "max_length": min(cfg.max_seq_len, DEFAULT_MAX_LEN),
                          "num_concurrent": concurrency, "max_retries": 1, "timeout": 600}
            log(f"lm-eval: {', '.join(tasks)} against chipshift serve on {dev} in {dtype_name(torch_dtype)}"
                + (f", at most {limit} items per task" if limit else ""))
            _register_model()
            result = evaluate(MODEL, model_args, tasks, limit=limit, manager=manager, log=log)
    return {**result, "checkpoint": str(ckpt), "device": str(dev), "dtype": dtype_name(torch_dtype),
            "target": f"{dev}:{dtype_name(torch_dtype)}"}


def bootstrap_delta(a: list[float], b: list[float], iters: int = BOOTSTRAP_ITERS, confidence: float = CONFIDENCE,
                    seed: int = 0) -> tuple[float, float, float]:
    """mean(b) - mean(a) over paired items, and its percentile bootstrap interval (items resampled
    with replacement, the same draw for both sides)."""
    if len(a) != len(b) or not a:
        raise ChipshiftError(f"score delta: the two runs scored {len(a)} and {len(b)} items; run the same "
                             f"tasks with the same --limit on both")
    n = len(a)
    diffs = [y - x for x, y in zip(a, b)]
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(iters))
    tail = (1 - confidence) / 2
    lo, hi = means[int(tail * iters)], means[min(iters - 1, int((1 - tail) * iters))]
    return sum(diffs) / n, lo, hi


def score_delta(a: dict, b: dict, iters: int = BOOTSTRAP_ITERS, confidence: float = CONFIDENCE) -> dict:
    """Per task and metric: A's and B's score, B - A and its bootstrap interval, the items that differ."""
    out = {"a": a.get("target") or a.get("model"), "b": b.get("target") or b.get("model"), "confidence": confidence,
           "iters": iters, "tasks": {}}
    for task, ra in a["tasks"].items():
        rb = b["tasks"].get(task)
        if rb is None:
            raise ChipshiftError(f"score delta: task {task} ran on {out['a']} only")
        rows = {}
        for m in METRICS:
            if m in ra["items"] and m in rb["items"]:
                delta, lo, hi = bootstrap_delta(ra["items"][m], rb["items"][m], iters, confidence)
                rows[m] = {"a": ra[m], "b": rb[m], "delta": delta, "ci": [lo, hi], "n": ra["n"],
                           "items_differ": sum(x != y for x, y in zip(ra["items"][m], rb["items"][m]))}
        out["tasks"][task] = rows
    return out


def format_delta(delta: dict, metric: str = "acc") -> list[str]:
    """One line per task: 'task acc A -> B: delta +0.0100 [95% CI -0.0050, +0.0250], 3 of 200 items differ'."""
    lines = []
    for task, rows in delta["tasks"].items():
        r = rows.get(metric)
        if r:
            lines.append(f"{task} {metric} {r['a']:.4f} ({delta['a']}) -> {r['b']:.4f} ({delta['b']}): "
                         f"delta {r['delta']:+.4f} [{delta['confidence']:.0%} CI {r['ci'][0]:+.4f}, "
                         f"{r['ci'][1]:+.4f}], {r['items_differ']} of {r['n']} items differ")
    return lines
