"""The inference engine against the naive reference generator, token for token, plus its
sampling, stop rules and continuous batching."""

import threading

import pytest
import torch

from chipshift.data.tokenizer import Tokenizer
from chipshift.devices import kernels
from chipshift.errors import ChipshiftError
from chipshift.infer.engine import Engine, Request
from chipshift.infer.sampling import SamplingParams, apply_repetition_penalty, sample
from chipshift.model.config import preset
from chipshift.model.generate import generate_naive
from infer_helpers import assert_greedy_agrees_up_to_near_ties
from chipshift.model.transformer import build_model

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], list(range(10, 40)), [3] * 12, [5, 6], [100, 7, 250, 31], [42]]


def tiny(dtype=torch.float32, max_seq_len=96):
    # a wide init so that greedy output wanders instead of repeating one token
    return build_model(preset("tiny", init_std=0.15, max_seq_len=max_seq_len), dtype=dtype, seed=0)


def greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, stop_ids=(), **kw)


def budget(i):
    return 6 + 3 * i  # each prompt its own length, so requests leave at different steps


@pytest.fixture(scope="module")
def reference():
    """The fp32 model and the naive generator's greedy output for each prompt (computed once)."""
    model = tiny()
    return model, [generate_naive(model, p, budget(i)) for i, p in enumerate(PROMPTS)]


@pytest.mark.parametrize("max_batch", [1, 3])
def test_greedy_matches_naive_fp32(max_batch, reference):
    """Single and batched: 7 prompts through 1 or 3 slots, each leaving at its own length,
    so requests join and leave the running batch between decode steps."""
    model, want = reference
    engine = Engine(model, max_batch=max_batch)
    requests = [engine.submit(Request(p, greedy(budget(i)))) for i, p in enumerate(PROMPTS)]
    while not all(r.done.is_set() for r in requests):
        engine.step()
    for i, r in enumerate(requests):
        assert r.output_ids == want[i], f"prompt {i}"
        assert r.finish_reason == "length"
    assert engine.num_active == 0 and engine.stats.generated_tokens == sum(map(len, want))


def test_greedy_rows_unaffected_by_sampling_neighbours(reference):
    model, want = reference
    engine = Engine(model, max_batch=4)
    mixed = [greedy(budget(0)), SamplingParams(max_tokens=20, temperature=0.9, top_k=40, top_p=0.8, seed=1,
                                               repetition_penalty=1.3, stop_ids=()),
             greedy(budget(2)), SamplingParams(max_tokens=20, temperature=1.5, seed=2, stop_ids=())]
    requests = [engine.submit(Request(p, s)) for p, s in zip(PROMPTS, mixed)]
    while not all(r.done.is_set() for r in requests):
        engine.step()
    for i in (0, 2):
        assert requests[i].output_ids == want[i]


@pytest.mark.parametrize("half, kernels_pin", [("native", "off"), ("native", "on"), ("emulated", "auto"),
                                               ("emulated", "off")],
                         ids=["native-bf16", "native-decode-kernel", "emulated-kernel-twin", "emulated-no-compiler"])
def test_greedy_bf16_agrees_up_to_rounding(monkeypatch, half, kernels_pin):
    """In bfloat16 a cached decode (one row) and a full recompute (all rows) round
    differently, so a near-tie may flip: every disagreement must be such a near-tie of the
    reference's own logits, and the first tokens must agree. Under each of the precision
    policy's bfloat16 paths: torch's native kernels, the kernel for decode steps beside
    them, chipshift's kernel twin, torch's emulated kernels (no C compiler)."""
    monkeypatch.setenv("CHIPSHIFT_HALF", half)
    monkeypatch.setenv("CHIPSHIFT_CPU_KERNELS", kernels_pin)
    builds = kernels.bf16_linear_status() is None  # False on a machine without a C compiler
    model = tiny(torch.bfloat16)
    engine = Engine(model, max_batch=4)
    twin = kernels_pin != "off" and builds
    assert (engine.model is not model) is twin
    outputs = engine.generate(PROMPTS[:4], greedy(16))
    assert_greedy_agrees_up_to_near_ties(model, PROMPTS, outputs, 16, tolerance=0.02)


def test_stop_ids_end_like_the_reference(reference):
    model, want = reference
    stop = want[6][7]  # a token the greedy output reaches
    ref = generate_naive(model, PROMPTS[6], budget(6), stop_ids=[stop])
    got = Engine(model, max_batch=2).generate([PROMPTS[6]], SamplingParams(max_tokens=budget(6), stop_ids=(stop,)))
    assert got[0] == ref and ref[-1] == stop and len(ref) <= 8


def test_seeded_sampling_is_reproducible_whatever_the_batch(reference):
    model, _ = reference
    settings = SamplingParams(max_tokens=16, temperature=1.0, top_k=50, top_p=0.95, seed=11, stop_ids=())
    alone = Engine(model, max_batch=1).generate([PROMPTS[0]], settings)[0]
    crowded = Engine(model, max_batch=4).generate(PROMPTS[:4], settings)[0]
    assert alone == crowded
    other_seed = Engine(model, max_batch=1).generate([PROMPTS[0]], SamplingParams(**{**vars(settings), "seed": 12}))
    assert other_seed[0] != alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_requests_with_one_prompt_share_its_prefill_and_sample_as_if_alone(dtype):
    """n samples of one prompt admitted together (a GRPO group): one prefill, its keys and
    values copied to the other slots; each sample's tokens and first log-probabilities are
    exactly those it gets alone. A prompt-logprobs request computes its own prefill."""
    model = tiny(dtype)
    prompts = [PROMPTS[2], PROMPTS[2], PROMPTS[0], PROMPTS[2], PROMPTS[0]]
    params = [SamplingParams(max_tokens=10, temperature=1.0, seed=s, stop_ids=(), logprobs=2) for s in range(5)]
    engine = Engine(model, max_batch=5)
    together = [engine.submit(Request(list(p), sp)) for p, sp in zip(prompts, params)]
    while not all(r.done.is_set() for r in together):
        engine.step()
    assert engine.stats.prompt_tokens_shared == 2 * len(PROMPTS[2]) + len(PROMPTS[0])
    for p, sp, r in zip(prompts, params, together):
        alone = Engine(model, max_batch=1)
        want = alone.submit(Request(list(p), SamplingParams(**vars(sp))))
        while not want.done.is_set():
            alone.step()
        assert r.output_ids == want.output_ids and len(set(map(tuple, (r.output_ids for r in together)))) > 1
        first, rest = r.logprobs[0], r.logprobs[1:]  # the prefill's exactly; decode steps batch 5 rows, not 1
        assert (first.token, first.logprob, first.top) == (want.logprobs[0].token, want.logprobs[0].logprob,
                                                           want.logprobs[0].top)
        near = 1e-5 if dtype == torch.float32 else 5e-2  # bfloat16 GEMMs of 5 rows and of 1 round apart
        assert [e.logprob for e in rest] == pytest.approx([e.logprob for e in want.logprobs[1:]], abs=near)
    engine = Engine(model, max_batch=2)
    asks = [engine.submit(Request(list(PROMPTS[2]), SamplingParams(max_tokens=2, prompt_logprobs=1, stop_ids=())))
            for _ in range(2)]
    while not all(r.done.is_set() for r in asks):
        engine.step()
    assert engine.stats.prompt_tokens_shared == 0 and asks[0].prompt_logprobs == asks[1].prompt_logprobs


def test_sample_follows_the_distribution_and_filters():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]).repeat(8000, 1)
    rows = logits.shape[0]
    seeds, steps = torch.arange(rows), torch.zeros(rows, dtype=torch.int64)

    def draw(temperature, top_k=0, top_p=1.0):
        return sample(logits, torch.full((rows,), temperature), torch.full((rows,), top_k),
                      torch.full((rows,), top_p), seeds, steps, any_sampling=temperature > 0,
                      any_filter=top_k > 0 or top_p < 1)

    freq = torch.bincount(draw(1.0), minlength=5).float() / rows
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.02)
    hot = torch.bincount(draw(2.0), minlength=5).float() / rows
    assert torch.allclose(hot, torch.softmax(logits[0] / 2, -1), atol=0.02)
    assert set(draw(1.0, top_k=2).tolist()) == {0, 1}
    # top_p 0.7: token 0 has p=0.56, so tokens 0 and 1 (cumulative 0.77) are kept
    assert set(draw(1.0, top_p=0.7).tolist()) == {0, 1}
    assert set(draw(0.0).tolist()) == {0}


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    history = torch.tensor([[3, 7, 7, 20], [1, 2, 3, 4]])
    seen = torch.zeros(2, 50, dtype=torch.bool).scatter_(1, history, True)
    want = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, torch.tensor([1.3, 1.3])), want)


def test_stop_string_trims_text_and_streaming_matches(tiny_tokenizer_dir):
    tok = Tokenizer.load(tiny_tokenizer_dir)
    model = build_model(preset("tiny", vocab_size=tok.vocab_size, init_std=0.15, max_seq_len=96), seed=0)
    engine = Engine(model, tok, max_batch=2)
    prompt = tok.encode("hello there")
    full = engine.generate([prompt], SamplingParams(max_tokens=40, ignore_eos=True))[0]
    text = tok.decode(full)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    pieces = []
    req = engine.submit(Request(prompt, SamplingParams(max_tokens=40, ignore_eos=True, stop=(stop,)),
                                on_update=lambda r, delta, done: pieces.append(delta)))
    while not req.done.is_set():
        engine.step()
    assert req.finish_reason == "stop"
    assert req.text == text[:text.find(stop)] == "".join(pieces)
    assert stop not in req.text


def test_cancel_frees_the_slot_and_queue_waits(reference):
    engine = Engine(reference[0], max_batch=1)
    first = engine.submit(Request(PROMPTS[0], greedy(50)))
    second = engine.submit(Request(PROMPTS[1], greedy(3)))
    engine.step()
    engine.step()
    assert engine.slots[0] is first and list(engine.waiting) == [second]
    first.cancel()
    while not second.done.is_set():
        engine.step()
    assert first.finish_reason == "cancelled" and second.finish_reason == "length"
    assert len(second.output_ids) == 3 and engine.num_active == 0


def test_background_thread_serves_submissions(reference):
    model, want = reference
    engine = Engine(model, max_batch=2)
    engine.start()
    try:
        outs = engine.generate(PROMPTS[:3], greedy(budget(0)))
    finally:
        engine.stop()
    assert outs == [w[:budget(0)] for w in want[:3]]


def test_run_in_the_calling_thread_until_told_and_abort_answers_everyone(reference):
    """`chipshift serve` runs the scheduler on its main thread (Engine.run) while another
    thread submits; `until` ends the loop, `abort` ends what is left with an error."""
    model, want = reference
    engine = Engine(model, max_batch=1)
    started, done = threading.Event(), threading.Event()
    results = {}

    def client():
        started.wait()
        results["outs"] = engine.generate(PROMPTS[:2], greedy(budget(0)))
        done.set()

    threading.Thread(target=client, daemon=True).start()
    engine.run(until=lambda: started.set() or done.is_set())
    assert results["outs"] == [w[:budget(0)] for w in want[:2]]
    # stop() from another thread ends an idle run() too
    threading.Timer(0.2, engine.stop).start()
    engine.run()
    running = engine.submit(Request(PROMPTS[0], greedy(20)))
    waiting = engine.submit(Request(PROMPTS[1], greedy(20)))
    engine.step()
    engine.abort("shutting down")
    for req in (running, waiting):
        assert req.done.is_set() and req.finish_reason == "error" and req.error == "shutting down"
    assert engine.num_active == 0 and not engine.waiting


def test_deliver_follows_every_prefill_and_step_with_its_updates_made(reference):
    """A server hands a step's updates to its event loop in one go: `deliver` runs after each
    prefill and each step, once all of that step's `on_update` calls were made."""
    model, want = reference
    engine = Engine(model, max_batch=2)
    log = []
    engine.deliver = lambda: log.append("deliver")
    # without a tokenizer there is no text: on_update comes once, when a request finishes
    reqs = [engine.submit(Request(p, greedy(3 + i), on_update=lambda r, d, f: log.append(r.id)))
            for i, p in enumerate(PROMPTS[:2])]
    engine.step()  # two prefills, then one decode step for both
    assert log == ["deliver"] * 3
    engine.step()  # the first request ends in this step, the second in the next
    engine.step()
    assert log[3:] == [reqs[0].id, "deliver", reqs[1].id, "deliver"]
    assert [r.output_ids for r in reqs] == [want[0][:3], want[1][:4]]
    engine.submit(Request(PROMPTS[0], greedy(5), on_update=lambda r, d, f: log.append(r.error)))
    log.clear()
    engine.abort("bye")  # a waiting request ends with an error: still delivered
    assert log == ["deliver", "bye", "deliver"]


def test_requests_that_cannot_fit_are_refused():
    engine = Engine(tiny(max_seq_len=32), max_batch=1)
    with pytest.raises(ChipshiftError, match="context"):
        engine.submit(Request(list(range(40)), greedy(1)))
    with pytest.raises(ChipshiftError, match="exceeds the context"):
        engine.submit(Request([1, 2, 3], greedy(30)))
    with pytest.raises(ChipshiftError, match="max_tokens"):
        engine.submit(Request([1, 2, 3], greedy(0)))
    with pytest.raises(ChipshiftError, match="empty"):
        engine.submit(Request([], greedy(1)))


@pytest.mark.slow
def test_compiled_decode_matches_naive(reference):
    model, want = reference
    outs = Engine(model, max_batch=2, max_len=48, compile=True).generate(PROMPTS[:3], greedy(budget(0)))
    assert outs == [w[:budget(0)] for w in want[:3]]


def _reference_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)


def test_logprobs_are_the_models_log_softmax_in_prefill_and_decode(reference, monkeypatch):
    """Requests batched together, each with its own wish: the log-probabilities of the tokens
    generated (first from the prefill, then from decode steps) and of the prompt are the
    model's own log-softmax over the whole sequence, with the likeliest alternatives in
    order, whatever temperature or penalty the request samples with; a request that asks for
    none gets none. Prompt rows in chunks smaller than the prompt."""
    monkeypatch.setattr("chipshift.infer.engine.PROMPT_LOGPROB_CHUNK", 7)
    model, want = reference
    engine = Engine(model, max_batch=3)
    wishes = [greedy(budget(0), logprobs=3, prompt_logprobs=2), greedy(budget(1)),
              greedy(budget(2), logprobs=0, prompt_logprobs=0),
              SamplingParams(max_tokens=12, temperature=1.3, repetition_penalty=1.5, seed=3, stop_ids=(), logprobs=5)]
    requests = [engine.submit(Request(p, w)) for p, w in zip(PROMPTS, wishes)]
    while not all(r.done.is_set() for r in requests):
        engine.step()
    assert requests[1].logprobs == [] and requests[1].prompt_logprobs == []
    assert requests[3].prompt_logprobs == []
    for r, w in zip(requests, wishes):
        if w.logprobs is None:
            continue
        if w.greedy:
            assert r.output_ids == want[PROMPTS.index(r.prompt_ids)]
        ref = _reference_logprobs(model, r.prompt_ids + r.output_ids)
        T = len(r.prompt_ids)
        assert [e.token for e in r.logprobs] == r.output_ids
        for i, e in enumerate(r.logprobs):
            row = ref[T - 1 + i]
            assert abs(e.logprob - row[e.token].item()) < 1e-5
            assert [t for t, _ in e.top] == row.topk(w.logprobs).indices.tolist()
            assert torch.allclose(torch.tensor([lp for _, lp in e.top]), row.topk(w.logprobs).values, atol=1e-5)
        if w.prompt_logprobs is not None:
            assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == T
            for j, e in enumerate(r.prompt_logprobs[1:], 1):
                assert e.token == r.prompt_ids[j] and len(e.top) == w.prompt_logprobs
                assert abs(e.logprob - ref[j - 1, e.token].item()) < 1e-5


def test_logprobs_come_from_the_logits_the_native_step_sampled_from(monkeypatch):
    """On the CPU's native decode step (bfloat16) the log-probabilities are the log-softmax of
    the very logits that step returned and the greedy choice took, in prefill and decode."""
    monkeypatch.setenv("CHIPSHIFT_HALF", "native")
    monkeypatch.setenv("CHIPSHIFT_CPU_KERNELS", "on")
    if kernels.bf16_linear_status() is not None:
        pytest.skip("no C compiler: no native decode step")
    engine = Engine(tiny(torch.bfloat16), max_batch=2)
    assert engine.native_step is not None
    step, seen = engine.native_step, []

    class Recorder:
        max_rows, max_prefill = step.max_rows, step.max_prefill

        def __call__(self, tokens, positions):
            seen.append(step(tokens, positions))
            return seen[-1]

        def prefill(self, slot, ids, all_rows=False):
            seen.append(step.prefill(slot, ids, all_rows))
            return seen[-1]

    engine.native_step = Recorder()
    requests = [engine.submit(Request(PROMPTS[0], greedy(6, logprobs=2, prompt_logprobs=1))),
                engine.submit(Request(PROMPTS[1], greedy(6, logprobs=2)))]
    while not all(r.done.is_set() for r in requests):
        engine.step()
    first, second = (torch.log_softmax(seen[i], -1) for i in (0, 1))
    assert first.shape[0] == len(PROMPTS[0]) and second.shape[0] == 1  # all rows only when asked
    assert [e.logprob for e in requests[0].prompt_logprobs[1:]] == \
        [first[j - 1, t].item() for j, t in enumerate(PROMPTS[0][1:], 1)]
    for slot, r in enumerate(requests):
        rows = [(first if slot == 0 else second)[-1]] + [torch.log_softmax(s, -1)[slot] for s in seen[2:]]
        assert r.output_ids == [row.argmax().item() for row in rows]
        assert [e.logprob for e in r.logprobs] == [row[t].item() for row, t in zip(rows, r.output_ids)]
