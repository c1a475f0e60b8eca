"""Trainer-to-server check: does the serving engine compute what the training model computes?

The engine (static KV cache, separate prefill and decode, continuous batching, the device's
native kernels where the precision policy picks them) generates greedily from a few prompts
of different lengths, once each alone (batch 1) and once all together (so that requests
share decode steps at different offsets and cache slots), and records the log-probability of
every prompt token (prefill) and generated token (decode). The training model then runs
teacher-forced over the same tokens (one full-sequence forward, no cache) in the same dtype,
on the same device or on another (`reference_device`), and the two are compared:

  max / mean |engine log p - trainer log p|   per request and phase (prefill, decode)
  greedy agreement                            share of generated tokens that are the
                                              trainer's own argmax at that position

A request fails when its max or mean difference or its agreement is past the dtype's
threshold, and is named (run, index, slot, prompt length); a wrong RoPE offset, a cache row written to the
wrong slot or a mask that lets one request see another's tokens shows up as one failing
request. Thresholds per dtype (`THRESHOLDS`; the measurements behind them: docs/parity.md):

  float32   max |diff| <= 1e-4, request mean <= 1e-5, agreement >= 0.9
  bfloat16  max |diff| <= 1.0,  request mean <= 0.2,  agreement >= 0.85

float32 is the dtype that catches logic faults: a RoPE position off by one for one batched
request moves that request's log-probabilities by 0.2-0.45 (max) and 0.02-0.04 (mean), some
thousand times float32's differences but no more than bfloat16's own rounding differences.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from chipshift.devices import dtype_name, get_device
from chipshift.errors import ChipshiftError


@dataclass(frozen=True)
class ServeThresholds:
    max_abs: float  # largest |difference| of a token's log-probability, per request and phase
    mean_abs: float  # largest mean |difference| of a request
    min_agreement: float  # least share of a request's generated tokens that are the trainer's argmax


# Measured on the CPU (docs/parity.md; SmolLM2-135M-Instruct and a model pre-trained here,
# 16 tokens x 4 prompts x 2 runs): float32 max 3.2e-5, request mean at most 3.7e-6, every
# greedy token agreeing; bfloat16 max 0.34 (a prompt token's: the engine's and torch's
# bfloat16 paths round in other places and orders, and bfloat16 keeps 8 bits), request mean
# at most 0.066 (kernel twin; 0.015 on torch's native bfloat16), one greedy token in 16
# flipped at a near-tie. The thresholds leave about 3x room and one flip in 16 (two in bfloat16).
THRESHOLDS = {torch.float32: ServeThresholds(1e-4, 1e-5, 0.9), torch.bfloat16: ServeThresholds(1.0, 0.2, 0.85)}

# Prompts when the checkpoint has a tokenizer; otherwise seeded random ids of these lengths.
TEXTS = ("The capital of France is",
         "Once upon a time, in a small village by the sea, there lived an old fisherman who",
         "Who are you?",
         "Four score and seven years ago our fathers brought forth on this continent a new nation, conceived "
         "in liberty, and dedicated to the proposition that all men are created equal.")
RANDOM_LENGTHS = (5, 17, 3, 33)


def check_prompts(tokenizer, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Prompts of different lengths: TEXTS (as chat when the tokenizer has a template, the
    way a server sees them) or seeded random ids."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in RANDOM_LENGTHS]
    if tokenizer.chat_template:
        return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": t}])) for t in TEXTS]
    return [tokenizer.encode(t) for t in TEXTS]


@dataclass
class RequestCheck:
    run: str  # "batch 1" or "batched"
    index: int  # the prompt's index
    slot: int  # the engine's cache slot
    prompt_tokens: int
    generated_tokens: int
    prefill_max_abs: float
    decode_max_abs: float
    mean_abs: float
    greedy_agreement: float
    failures: list[str]

    @property
    def name(self) -> str:
        return f"{self.run} request {self.index} (slot {self.slot}, {self.prompt_tokens}-token prompt)"


def _engine_runs(engine, prompts: list[list[int]], max_tokens: int):
    """(run, index, slot, Request) for each prompt alone, then all together."""
    from chipshift.infer.engine import Request
    from chipshift.infer.sampling import SamplingParams

    def params() -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, stop_ids=(), logprobs=0, prompt_logprobs=0)

    out = []
    for i, p in enumerate(prompts):
        req = engine.submit(Request(list(p), params()))
        while not req.done.is_set():
            engine.step()
        out.append(("batch 1", i, 0, req))
    batched = [engine.submit(Request(list(p), params())) for p in prompts]
    while not all(r.done.is_set() for r in batched):
        engine.step()
    out += [("batched", i, i, r) for i, r in enumerate(batched)]
    for *_, req in out:
        if req.finish_reason != "length":
            raise ChipshiftError(f"serve check: a generation ended with {req.finish_reason}: {req.error}")
    return out


def serve_check(ckpt: str | Path, device: str | None = None, dtype: str | None = None, *,
                reference_device: str | None = None, max_tokens: int = 16,
                prompts: list[list[int]] | None = None, thresholds: ServeThresholds | None = None,
                log=print) -> dict:
    """Run the check on checkpoint `ckpt`; the report (JSON-able), its "verdict" pass or fail.

    device, dtype: the engine's (None: as `chipshift serve` picks them); the trainer runs in
    the engine's dtype on `reference_device` (default: the engine's device)."""
    from chipshift.data.tokenizer import Tokenizer
    from chipshift.infer.engine import Engine
    from chipshift.model.checkpoint import load_checkpoint, read_sidecar
    from chipshift.model.config import ModelConfig

    torch_dtype, _ = get_device(device).precision.serving_dtype(dtype)  # as the engine will pick it
    limits = thresholds or THRESHOLDS.get(torch_dtype)
    if limits is None:
        raise ChipshiftError(f"serve check: no thresholds measured for {dtype_name(torch_dtype)}; "
                             f"pass them (--max-abs, --mean-abs, --min-agreement)")
    if prompts is None:
        tokenizer = Tokenizer.load(ckpt) if (Path(ckpt) / "tokenizer.json").exists() else None
        prompts = check_prompts(tokenizer, ModelConfig.from_dict(read_sidecar(ckpt)["model_config"]).vocab_size)
    max_len = max(map(len, prompts)) + max_tokens
    engine = Engine.from_checkpoint(ckpt, device, dtype_name(torch_dtype), max_batch=len(prompts), max_len=max_len)
    described, engine_device = engine.describe(), str(engine.device)
    log(f"serve check: engine {described}")
    runs = _engine_runs(engine, prompts, max_tokens)
    ref_device = get_device(reference_device or engine_device)
    del engine
    trainer, _ = load_checkpoint(ckpt, ref_device.torch_device, torch_dtype)
    trainer.eval()
    log(f"serve check: trainer forward on {ref_device.torch_device} in {dtype_name(torch_dtype)}, "
        f"{len(runs)} requests x {max_tokens} tokens")

    checks, all_diffs, agreed = [], [], 0
    for run, index, slot, req in runs:
        tokens = req.prompt_ids + req.output_ids
        with torch.inference_mode():
            logits = trainer(torch.tensor([tokens[:-1]], device=ref_device.torch_device))[0].float()
        logp = torch.log_softmax(logits, -1).cpu()
        T = len(req.prompt_ids)
        want = logp[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]
        got = torch.tensor([e.logprob for e in req.prompt_logprobs[1:]] + [e.logprob for e in req.logprobs])
        diff = (got - want).abs()
        agree = (logp[T - 1:].argmax(-1) == torch.tensor(req.output_ids)).float().mean().item()
        c = RequestCheck(run, index, slot, T, len(req.output_ids), diff[:T - 1].max().item() if T > 1 else 0.0,
                         diff[T - 1:].max().item(), diff.mean().item(), agree, [])
        for phase, value in (("prefill", c.prefill_max_abs), ("decode", c.decode_max_abs)):
            if not value <= limits.max_abs:  # NaN fails too
                c.failures.append(f"{phase} max |diff| {value:.3g} > {limits.max_abs:g}")
        if not c.mean_abs <= limits.mean_abs:
            c.failures.append(f"mean |diff| {c.mean_abs:.3g} > {limits.mean_abs:g}")
        if agree < limits.min_agreement:
            c.failures.append(f"greedy agreement {agree:.3f} < {limits.min_agreement:g}")
        checks.append(c)
        all_diffs.append(diff)
        agreed += round(agree * len(req.output_ids))
    diffs = torch.cat(all_diffs)
    failing = [f"{c.name}: {'; '.join(c.failures)}" for c in checks if c.failures]
    report = {"checkpoint": str(ckpt), "device": engine_device, "engine": described,
              "dtype": dtype_name(torch_dtype), "reference_device": str(ref_device.torch_device),
              "thresholds": asdict(limits), "max_abs": diffs.max().item(), "mean_abs": diffs.mean().item(),
              "greedy_agreement": agreed / sum(c.generated_tokens for c in checks),
              "requests": [{**asdict(c), "name": c.name} for c in checks], "failures": failing,
              "verdict": "fail" if failing else "pass"}
    log(summary(report))
    for line in failing:
        log(f"  FAIL {line}")
    return report


def summary(report: dict) -> str:
    """One line: the verdict and the figures, as the CLI and the pipeline print it."""
    t = report["thresholds"]
    return (f"serve check {report['verdict'].upper()}: engine on {report['device']} vs trainer on "
            f"{report['reference_device']} in {report['dtype']}, {len(report['requests'])} requests: "
            f"max |diff| {report['max_abs']:.3g} (<= {t['max_abs']:g}), mean {report['mean_abs']:.3g}, "
            f"greedy agreement {report['greedy_agreement']:.3f} (>= {t['min_agreement']:g})")
