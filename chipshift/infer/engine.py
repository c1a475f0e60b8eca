"""The inference engine: static KV cache, separate prefill and decode, continuous batching.

A request owns one cache slot from its prefill to its last token. Between two decode steps
the scheduler drops cancelled requests, admits waiting ones into free slots (one prefill
each, which also picks the request's first token) and then advances every running request
by one token in a single batched forward pass. Each request keeps its own sampling settings
in per-slot device tensors, so a greedy request and a top-p one share a step.

The host reads the batch's new tokens once per step (it must: they are streamed to clients
and checked against stop strings); sampling itself never waits on the host. The decode step
can be compiled (`compile=True`): it then always runs all slots over the whole cache length,
so its shapes never change.

A request may ask for log-probabilities (`SamplingParams.logprobs`, `prompt_logprobs`): they
are taken from the very logits its tokens were sampled from, whichever path produced them
(the model, a compiled step or the device's native step), and computed for the rows that
ask only. The prompt's need the logits of every prompt position, which a prefill otherwise
skips; they are computed in chunks of `PROMPT_LOGPROB_CHUNK` positions.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from chipshift.devices import Device, dtype_name, get_device
from chipshift.errors import ChipshiftError
from chipshift.infer.cache import KVCache
from chipshift.infer.sampling import (SamplingParams, TokenLogprob, apply_repetition_penalty, sample,
                                      token_logprobs)
from chipshift.model.quant import quantized_modules
from chipshift.model.transformer import Transformer

# Tokens per slot when not set: the model's context, capped so that the preallocated cache
# of a long-context model (Llama 3.2: 131072) stays a sane size.
DEFAULT_MAX_LEN = 4096
# Upper bounds (seconds) of the time-to-first-token histogram buckets.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Prompt positions whose logits are held at once for prompt log-probabilities (x vocab floats).
PROMPT_LOGPROB_CHUNK = 256


@dataclass(eq=False)
class Request:
    """One generation. `on_update(request, new_text, finished)` is called from the engine's
    thread after every token (new_text may be empty while a stop string could still match)."""

    prompt_ids: list[int]
    params: SamplingParams
    on_update: Callable[["Request", str, bool], None] | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # the text released so far
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: str | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token, if asked
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # per prompt token; first None
    stop_token: bool = False  # the last output token is a stop id (its text is not shown)

    def cancel(self) -> None:
        """Ask the engine to drop this request (safe from any thread); its slot frees before
        the next decode step."""
        self.cancelled = True


@dataclass
class EngineStats:
    requests: dict[str, int] = field(default_factory=dict)  # finished requests by finish reason
    prompt_tokens: int = 0
    prompt_tokens_shared: int = 0  # of those, copied from a request with the same prompt (`_prefill`)
    generated_tokens: int = 0
    decode_steps: int = 0
    ttft_buckets: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))
    ttft_sum: float = 0.0
    ttft_count: int = 0

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_sum += seconds
        self.ttft_count += 1
        for i, bound in enumerate(TTFT_BUCKETS):
            if seconds <= bound:
                self.ttft_buckets[i] += 1


class Engine:
    def __init__(self, model: Transformer, tokenizer=None, *, max_batch: int = 8,
                 max_len: int | None = None, compile: bool = False, kernels: bool = True,
                 target: Device | None = None) -> None:
        if max_batch <= 0:
            raise ChipshiftError(f"max_batch = {max_batch}: must be a positive integer")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        self.device, self.dtype = model.norm.weight.device, model.dtype
        self.dtype_reason = dtype_name(self.dtype)  # from_checkpoint says why it was chosen
        self.max_batch = max_batch
        self.max_len = min(max_len or DEFAULT_MAX_LEN, self.cfg.max_seq_len)
        self.default_stop_ids = tuple(sorted(tokenizer.stop_ids())) if tokenizer is not None else ()

        dev, B, V = self.device, max_batch, self.cfg.vocab_size
        self.slots: list[Request | None] = [None] * B
        self.lengths = [0] * B  # tokens held in the cache, per slot
        self.last_token = torch.zeros(B, dtype=torch.int64, device=dev)
        self.temperature = torch.zeros(B, dtype=torch.float32, device=dev)
        self.top_k = torch.zeros(B, dtype=torch.int64, device=dev)
        self.top_p = torch.ones(B, dtype=torch.float32, device=dev)
        self.penalty = torch.ones(B, dtype=torch.float32, device=dev)
        self.seeds = torch.zeros(B, dtype=torch.int64, device=dev)
        self.seen = torch.zeros(B, V, dtype=torch.bool, device=dev)  # for the repetition penalty
        self.span_arange = torch.arange(self.max_len, device=dev)

        self.compiled = compile
        # the device's precision policy may run a twin of the model that shares its weights
        # through native kernels (bfloat16 on CPUs without bfloat16 arithmetic); not under
        # compile, which traces torch's own ops. `target`: the Device the caller resolved.
        self.kernel_note = None
        # the arithmetic prefill and decode run with: an emulated chip's (`target.numerics`), or the device's
        self.numerics = target.numerics if target is not None else contextlib.nullcontext
        if kernels and not compile:
            target = target or get_device(str(self.device))
            self.model, self.kernel_note = target.precision.for_inference(self.model, self.dtype)
        # the model may ask for another cache dtype (the CPU twin attends in float32)
        self.cache = KVCache(self.cfg, max_batch, self.max_len, self.device, self.model.kv_cache_dtype or self.dtype)
        # and may offer a whole decode step in one native call (`_decode`), used up to its max_rows
        self.native_step = None
        if kernels and not compile:
            self.native_step, why = target.precision.decode_step(self.model, self.cache)
            if self.native_step is not None:
                self.kernel_note = f"{self.kernel_note}; {why}"
        self._decode_logits = torch.compile(self._decode_forward, dynamic=False) if compile else self._decode_forward

        self.waiting: deque[Request] = deque()
        self.stats = EngineStats()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False  # a scheduler loop (`run`) is stepping the engine
        self._stopping = False
        # Called on the scheduler's thread once a prefill's or a decode step's `on_update`
        # calls are all made, so that a server can hand them to its event loop in one go
        # (see chipshift.infer.server.Relay).
        self.deliver: Callable[[], None] = lambda: None

    # -- loading -----------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | None = None, dtype: str | None = None,
                        emulate: str | None = None, **kwargs) -> "Engine":
        from chipshift.data.tokenizer import Tokenizer
        from chipshift.model.checkpoint import load_checkpoint

        dev: Device = get_device(device, emulate)
        # compiled, the decode step runs torch's own kernels: no bfloat16 advantage on such a CPU
        torch_dtype, why = dev.precision.serving_dtype(dtype, compiled=kwargs.get("compile", False))
        model, _ = load_checkpoint(path, dev.torch_device, torch_dtype)
        tokenizer = Tokenizer.load(path) if (Path(path) / "tokenizer.json").exists() else None
        engine = cls(model, tokenizer, target=dev, **kwargs)
        engine.dtype_reason = why
        return engine

    def describe(self) -> str:
        quantized = sorted(set(quantized_modules(self.model).values()))
        return (f"{self.cfg.num_params() / 1e6:.1f}M params on {self.device} in {dtype_name(self.dtype)}"
                + (f" with {'/'.join(quantized)} weights (quantized blocks)" if quantized else "") + ", "
                f"{self.max_batch} slots x {self.max_len} tokens "
                f"(KV cache {self.cache.nbytes / 2**20:.1f} MiB in {dtype_name(self.cache.k.dtype)})"
                f"{', decode compiled' if self.compiled else ''}"
                + (f"; {self.kernel_note}" if self.kernel_note else ""))

    # -- public API --------------------------------------------------------------------
    def check(self, prompt_len: int, params: SamplingParams) -> None:
        """Raise ChipshiftError when a request cannot run: bad settings or too long."""
        params.validate()
        if prompt_len == 0:
            raise ChipshiftError("the prompt is empty")
        if prompt_len >= self.max_len:
            raise ChipshiftError(f"the prompt has {prompt_len} tokens; this model's context is "
                                 f"{self.max_len} tokens")
        if prompt_len + params.max_tokens > self.max_len:
            raise ChipshiftError(f"max_tokens = {params.max_tokens} with a {prompt_len}-token prompt exceeds "
                                 f"the context of {self.max_len} tokens (at most {self.max_len - prompt_len})")

    def submit(self, request: Request) -> Request:
        """Queue a request (thread-safe); it joins the running batch between decode steps."""
        self.check(len(request.prompt_ids), request.params)
        if request.params.seed is None:
            request.params.seed = random.getrandbits(31)
        with self._cv:
            self.waiting.append(request)
            self._cv.notify()
        return request

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Generate for several prompts at once (continuous batching); new token ids per prompt."""
        requests = [self.submit(Request(list(p), SamplingParams(**vars(params)))) for p in prompts]
        if not self._running:  # no scheduler loop (`run`, `start`): step here
            while not all(r.done.is_set() for r in requests):
                self.step()
        for r in requests:
            r.done.wait()
            if r.finish_reason == "error":
                raise ChipshiftError(f"generation failed: {r.error}")
        return [r.output_ids for r in requests]

    @property
    def num_active(self) -> int:
        return sum(r is not None for r in self.slots)

    def start(self) -> None:
        """Run the scheduler in a background thread (for the chat and tests). A server
        should rather call `run` on its main thread; see there."""
        if self._thread is None:
            self._stopping = False
            self._running = True  # from now, not once the thread gets going: see generate()
            self._thread = threading.Thread(target=self.run, name="chipshift-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Ask `run` to return (from any thread) and wait for a background scheduler."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- scheduler ---------------------------------------------------------------------
    def run(self, until: Callable[[], bool] | None = None) -> None:
        """The scheduler loop in the calling thread, until `stop()` is called or `until()`
        (checked while idle and between steps) returns True.

        `chipshift serve` runs this on the process's main thread and the HTTP server on a
        second one. Compute libraries' thread pools serve the main thread best: on this
        project's 2-core CPU a SmolLM2 decode step took 55 ms when started from a second
        thread and 39 ms from the main one (libgomp gives each thread that starts parallel
        regions its own team, and with more OpenMP threads than cores it stops keeping
        the workers spinning between regions)."""
        self._running = True
        try:
            self._run(until)
        finally:
            self._running = False

    def _run(self, until: Callable[[], bool] | None) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.waiting and not self.num_active:
                    if until is not None and until():
                        return
                    self._cv.wait(timeout=None if until is None else 0.25)
                if self._stopping:
                    self._stopping = False
                    return
            if until is not None and until():
                return
            try:
                self.step()
            except Exception as exc:  # fail what was running, keep serving the rest
                self._fail_all(f"{type(exc).__name__}: {exc}")

    def step(self) -> None:
        """One scheduler iteration: drop cancelled, admit waiting, one decode step."""
        with self.numerics():
            self._step()

    def _step(self) -> None:
        for slot, req in enumerate(self.slots):
            if req is not None and req.cancelled:
                self._finish(slot, "cancelled")
        shared: dict = {}  # this round's prefills, see _prefill
        while True:
            with self._cv:
                free = next((i for i, r in enumerate(self.slots) if r is None), None)
                if free is None or not self.waiting:
                    break
                req = self.waiting.popleft()
            if req.cancelled:
                self._complete(req, "cancelled")
                continue
            self._prefill(free, req, shared)
            self.deliver()
        if self.num_active:
            self._decode()
        self.deliver()

    def _fail_all(self, message: str) -> None:
        for slot, req in enumerate(self.slots):
            if req is not None:
                req.error = message
                self._finish(slot, "error")
        self.deliver()

    def abort(self, message: str) -> None:
        """End every request, running or waiting, with an error (a server shutting down):
        their clients get an answer instead of waiting forever. Call when `run` has returned."""
        self._fail_all(message)
        with self._cv:
            waiting, self.waiting = list(self.waiting), deque()
        for req in waiting:
            req.error = message
            self._complete(req, "error")
        self.deliver()

    # -- prefill and decode ------------------------------------------------------------
    @torch.inference_mode()
    def _prefill(self, slot: int, req: Request,
                 shared: dict[tuple[int, ...], tuple[int, torch.Tensor]] | None = None) -> None:
        """The prompt into the cache at `slot`, and the request's first token. `shared` maps
        the prompts prefilled earlier in this scheduler round (no decode step in between) to
        (slot, last logits) (none given: nothing to share): a request with the same prompt (n samples of one prompt, a GRPO
        group) copies that slot's keys and values and those logits instead of computing
        them again; the same computation on the same tokens, so the same numbers."""
        self.slots[slot] = req
        p = req.params
        T = len(req.prompt_ids)
        ids = torch.tensor([req.prompt_ids], dtype=torch.int64, device=self.device)
        prompt_k = p.prompt_logprobs
        key, shared = tuple(req.prompt_ids), {} if shared is None else shared
        for k in [k for k, (at, _) in shared.items() if at == slot]:  # this slot is written anew
            del shared[k]
        if key in shared and prompt_k is None:
            source, logits = shared[key]
            self.cache.k[:, slot, :, :T] = self.cache.k[:, source, :, :T]
            self.cache.v[:, slot, :, :T] = self.cache.v[:, source, :, :T]
            self.stats.prompt_tokens_shared += T
        elif self.native_step is not None and T <= self.native_step.max_prefill:
            logits = self.native_step.prefill(slot, ids[0], all_rows=prompt_k is not None)
            before, to_logits = logits[:-1], None
            logits = logits[-1:]
        else:
            positions = self.span_arange[:T][None]
            mask = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()[None, None]
            hidden = self.model.forward_hidden(ids, positions=positions, attn_mask=mask,
                                               cache=self.cache.prefill(slot, T))
            logits = self.model.logits(hidden[:, -1]).float()
            before, to_logits = hidden[0, :-1], self.model.logits
        shared[key] = (slot, logits)
        if prompt_k is not None:
            req.prompt_logprobs = [None]
            for start in range(0, T - 1, PROMPT_LOGPROB_CHUNK):
                block = before[start:start + PROMPT_LOGPROB_CHUNK]
                block = block if to_logits is None else to_logits(block)
                req.prompt_logprobs += token_logprobs(block, ids[0, start + 1:start + 1 + len(block)], prompt_k)
        raw = logits
        self.temperature[slot] = p.temperature
        self.top_k[slot] = p.top_k
        self.top_p[slot] = p.top_p
        self.penalty[slot] = p.repetition_penalty
        self.seeds[slot] = p.seed
        rows = slice(slot, slot + 1)
        if p.repetition_penalty != 1:
            self.seen[slot] = False
            self.seen[slot, ids[0]] = True
            logits = apply_repetition_penalty(logits, self.seen[rows], self.penalty[rows])
        steps = torch.zeros(1, dtype=torch.int64, device=self.device)
        token = sample(logits, self.temperature[rows], self.top_k[rows], self.top_p[rows], self.seeds[rows],
                       steps, any_sampling=not p.greedy, any_filter=p.filters)
        self.last_token[rows] = token
        if p.repetition_penalty != 1:
            self.seen[slot, token] = True
        if p.logprobs is not None:
            req.logprobs += token_logprobs(raw, token, p.logprobs)
        self.lengths[slot] = T
        self.stats.prompt_tokens += T
        self._accept(slot, token.item())

    def _decode_forward(self, ids: torch.Tensor, positions: torch.Tensor, rows: int, span: int) -> torch.Tensor:
        mask = (self.span_arange[:span][None, :] <= positions[:, None])[:, None, None, :]
        hidden = self.model.forward_hidden(ids, positions=positions[:, None], attn_mask=mask,
                                           cache=self.cache.decode(rows, positions, span))
        return self.model.logits(hidden[:, 0]).float()

    @torch.inference_mode()
    def _decode(self) -> None:
        active = [i for i, r in enumerate(self.slots) if r is not None]
        if self.compiled:  # fixed shapes: every slot, the whole cache
            rows, span = self.max_batch, self.max_len
        else:  # only up to the last busy slot and the longest history
            rows = active[-1] + 1
            span = max(self.lengths[i] for i in active) + 1
        # free slots in between decode a dummy token at position 0 of their own row
        positions = torch.tensor(self.lengths[:rows], dtype=torch.int64).to(self.device, non_blocking=True)
        if self.native_step is not None and rows <= self.native_step.max_rows:
            logits = self.native_step(self.last_token[:rows], positions)
        else:
            logits = self._decode_logits(self.last_token[:rows, None], positions, rows, span)
        raw = logits
        params = [r.params for r in self.slots[:rows] if r is not None]
        use_penalty = any(p.repetition_penalty != 1 for p in params)
        if use_penalty:
            logits = apply_repetition_penalty(logits, self.seen[:rows], self.penalty[:rows])
        steps = torch.tensor([len(r.output_ids) if r else 0 for r in self.slots[:rows]],
                             dtype=torch.int64).to(self.device, non_blocking=True)
        tokens = sample(logits, self.temperature[:rows], self.top_k[:rows], self.top_p[:rows],
                        self.seeds[:rows], steps, any_sampling=any(not p.greedy for p in params),
                        any_filter=any(p.filters for p in params))
        self.last_token[:rows] = tokens
        if use_penalty:
            self.seen[torch.arange(rows, device=self.device), tokens] = True
        self.stats.decode_steps += 1
        host_tokens = tokens.tolist()  # the step's one read-back: tokens are streamed and checked
        asking = [i for i in active if self.slots[i].params.logprobs is not None]
        if asking:  # a second read-back, for these rows only
            index = torch.tensor(asking, device=self.device)
            top = max(self.slots[i].params.logprobs for i in asking)
            for i, entry in zip(asking, token_logprobs(raw[index], tokens[index], top)):
                entry.top = entry.top[:self.slots[i].params.logprobs]
                self.slots[i].logprobs.append(entry)
        for i in active:
            self.lengths[i] += 1
            self._accept(i, host_tokens[i])

    # -- bookkeeping -------------------------------------------------------------------
    def _accept(self, slot: int, token: int) -> None:
        req = self.slots[slot]
        p = req.params
        req.output_ids.append(token)
        self.stats.generated_tokens += 1
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
            self.stats.observe_ttft(req.first_token_at - req.submitted_at)
        stop_ids = self.default_stop_ids if p.stop_ids is None else p.stop_ids
        reason = None
        if token in stop_ids and not p.ignore_eos:
            reason, req.stop_token = "stop", True
        elif len(req.output_ids) >= p.max_tokens or self.lengths[slot] >= self.max_len:
            reason = "length"
        delta = ""
        if self.tokenizer is not None:
            delta, hit_stop = self._release_text(req, final=reason is not None)
            if hit_stop:
                reason = "stop"
        if reason is None:
            if req.on_update is not None and delta:
                req.on_update(req, delta, False)
        else:
            self._finish(slot, reason, delta)

    def _release_text(self, req: Request, final: bool) -> tuple[str, bool]:
        """New text that is safe to show, and whether a stop string was hit.

        Text is held back while it ends in an incomplete UTF-8 sequence or could be the start
        of a stop string; a stop string ends the output and is not shown."""
        text = self.tokenizer.decode(req.output_ids)
        stops = req.params.stop
        hit = False
        if stops:
            start = max(0, len(req.text) - max(map(len, stops)))
            found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
            if found:
                text, hit = text[:min(found)], True
        if not (final or hit):
            if text.endswith("\ufffd"):
                text = text.rstrip("\ufffd")
            for s in stops:
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        text = text[:-n]
                        break
        delta = text[len(req.text):] if text.startswith(req.text) and len(text) > len(req.text) else ""
        req.text += delta
        return delta, hit

    def _finish(self, slot: int, reason: str, delta: str = "") -> None:
        req = self.slots[slot]
        self.slots[slot] = None
        self.lengths[slot] = 0
        self._complete(req, reason, delta)

    def _complete(self, req: Request, reason: str, delta: str = "") -> None:
        req.finish_reason = reason
        self.stats.requests[reason] = self.stats.requests.get(reason, 0) + 1
        if req.on_update is not None:
            try:
                req.on_update(req, delta, True)
            finally:
                req.done.set()
        else:
            req.done.set()
