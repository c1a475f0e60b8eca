"""The device layer's native CPU kernel for bfloat16 weights (chipshift/devices/kernels)."""

import pytest
import torch
import torch.nn.functional as F

from chipshift.devices import cpu_flags, get_device, kernels
from chipshift.model.config import preset
from chipshift.model.transformer import build_model

missing = kernels.bf16_linear_status()
pytestmark = pytest.mark.skipif(missing is not None, reason=f"bf16 kernel unavailable: {missing}")


HAS_AVX512_BF16 = missing is None and "avx512_bf16" in cpu_flags()


@pytest.fixture(params=["avx2", "avx512_bf16"])
def isa(request):
    """Linears of 7+ rows take AVX512-BF16 dot products where the CPU has them, else AVX2
    column tiles: both paths, on a CPU that has both."""
    if request.param == "avx512_bf16" and not HAS_AVX512_BF16:
        pytest.skip("the CPU lacks AVX512-BF16")
    before = kernels.avx512_bf16()
    kernels.avx512_bf16(request.param == "avx512_bf16")
    yield request.param
    kernels.avx512_bf16(before)


def reference(x, w, b=None):
    """What a native bf16 GEMM computes: exact products, float32 sums, one rounding."""
    y = x.double() @ w.double().T + (0 if b is None else b.double())
    return y.float().to(torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("n,k", [(64, 32), (37, 29), (130, 203), (512, 768)])
def test_matches_bf16_arithmetic(rows, n, k, isa):
    g = torch.Generator().manual_seed(rows * 1000 + n)
    x, w, b = (torch.randn(*s, generator=g).to(torch.bfloat16) for s in ((rows, k), (n, k), (n,)))
    for bias in (None, b):
        got, want = kernels.bf16_linear(x, w, bias), reference(x, w, bias)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        # float32 summation in another order: at most one bfloat16 rounding step apart
        ulp = want.float().abs().clamp_min(1e-3) * 2 ** -7
        assert ((got.float() - want.float()).abs() <= ulp).all()
    # and what torch's own (emulated) bf16 linear gives, to the same tolerance
    assert torch.allclose(kernels.bf16_linear(x, w).float(), F.linear(x, w).float(), rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize("rows", [2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 15, 16, 17, 33])
@pytest.mark.parametrize("n,k", [(13, 8), (25, 29), (7, 300), (49, 136), (30, 1536)])
def test_every_row_count_and_ragged_shapes(rows, n, k, isa):
    """Every path: 2..4 rows (dot products), 5..8 and 9..16 rows (column tiles with 8 or
    16 lanes), several chunks of 16 rows; N not a multiple of the tile widths (6, 4), K not
    a multiple of 16 or of the 128-k blocking, or shorter than 16."""
    g = torch.Generator().manual_seed(rows * 7919 + n * 31 + k)
    x, w, b = (torch.randn(*s, generator=g).to(torch.bfloat16) for s in ((rows, k), (n, k), (n,)))
    for bias in (None, b):
        got, want = kernels.bf16_linear(x, w, bias), reference(x, w, bias)
        ulp = want.float().abs().clamp_min(1e-3) * 2 ** -7
        assert ((got.float() - want.float()).abs() <= ulp).all()


@pytest.mark.parametrize("rows", [2, 4, 8, 16])
def test_rounding_ties_and_special_values_with_several_rows(rows, isa):
    """The rounding of each path (the column tiles round 8 outputs at once): exact sums that
    fall halfway between two bfloat16 values go to the even one, infinities and NaN survive."""
    k, n = 16, 4
    w = torch.zeros(n, k, dtype=torch.bfloat16)
    w[:, 0] = 1.0
    w[:, 1] = 1.0  # y = x[:, 0] + x[:, 1] for every column
    pairs = [(1.0, 2 ** -8), (1.0078125, 2 ** -8), (-1.0, -(2 ** -8)), (3.0e38, 3.0e38),
             (float("inf"), 1.0), (float("nan"), 1.0), (-2.5e-38, 0.0), (0.0, -0.0),
             (1.5, 2 ** -9), (-1.0078125, -(2 ** -8)), (2.0, 2 ** -7), (7.0, 2 ** -6),
             (1.0, 2 ** -8 + 2 ** -14), (0.5, -(2 ** -10)), (float("-inf"), -1.0), (65504.0, 128.0)]
    x = torch.zeros(rows, k, dtype=torch.bfloat16)
    for r in range(rows):
        x[r, 0], x[r, 1] = pairs[r]
    got = kernels.bf16_linear(x, w)
    want = (x[:, 0].float() + x[:, 1].float()).to(torch.bfloat16)  # exact in float32, one rounding
    for j in range(n):
        assert torch.equal(got[:, j].isnan(), want.isnan())
        ok = ~want.isnan()
        assert torch.equal(got[:, j][ok], want[ok])
    b = torch.full((n,), 2 ** -8, dtype=torch.bfloat16)  # the bias joins the sum before rounding
    ones = torch.zeros(rows, k, dtype=torch.bfloat16)
    ones[:, 0] = 1.0
    assert (kernels.bf16_linear(ones, w, b).float() == 1.0).all()  # 1 + 2^-8: a tie, to even


def test_leading_dims_and_special_values():
    w = torch.eye(16, dtype=torch.bfloat16)
    x = torch.tensor([1.0, -0.0, 3.0e38, -2.5e-38] + [0.5] * 12).to(torch.bfloat16)
    y = kernels.bf16_linear(x.view(1, 1, 16), w)
    assert y.shape == (1, 1, 16) and torch.equal(y.view(-1), x)
    x[5] = float("nan")  # NaN spreads through every output, as in torch (0 * NaN)
    assert torch.isnan(kernels.bf16_linear(x.view(1, 16), w)).all()
    big = torch.full((1, 16), 3.0e38, dtype=torch.bfloat16)  # the sum overflows to inf
    assert torch.isinf(kernels.bf16_linear(big, torch.ones(2, 16, dtype=torch.bfloat16))).all()


def test_engine_twin_shares_weights_and_leaves_the_model_alone(monkeypatch):
    monkeypatch.setenv("CHIPSHIFT_HALF", "emulated")  # the twin is for CPUs without bfloat16 arithmetic
    model = build_model(preset("tiny", init_std=0.15, max_seq_len=96), dtype=torch.bfloat16, seed=0)
    twin, note = get_device("cpu").precision.for_inference(model, torch.bfloat16)
    assert twin is not model and "kernel" in note
    assert all(a is b for a, b in zip(twin.parameters(), model.parameters()))
    assert all(type(m).forward is m.forward.__func__ for m in model.modules()
               if isinstance(m, torch.nn.Linear) and hasattr(m.forward, "__func__"))
    assert (twin.attn_impl, twin.kv_cache_dtype) == ("sdpa_float32", torch.float32)
    assert (model.attn_impl, model.kv_cache_dtype) == ("sdpa", None)
    calls = {}

    def counted(name, kernel):
        def run(*args):
            calls[name] = calls.get(name, 0) + 1
            return kernel(*args)
        return run

    for name in ("bf16_linear", "bf16_linear_many", "bf16_rms_norm"):
        monkeypatch.setattr(kernels, name, counted(name, getattr(kernels, name)))
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.allclose(twin(ids).float(), model(ids).float(), rtol=0.05, atol=0.05)
    layers = model.cfg.num_layers
    # per layer: o_proj and down_proj alone, q/k/v and gate/up joint, two norms; then the
    # final norm and the output projection
    assert calls == {"bf16_linear": 2 * layers + 1, "bf16_linear_many": 2 * layers, "bf16_rms_norm": 2 * layers + 1}


def test_native_twin_takes_only_decode_sized_inputs(monkeypatch):
    """On a CPU with bfloat16 arithmetic the twin sends inputs of up to
    NATIVE_KERNEL_MAX_ROWS rows through the kernel and leaves longer ones, and attention and
    the KV cache, to torch's native bfloat16 path: a prefill gives torch's own numbers."""
    model = build_model(preset("tiny", init_std=0.15, max_seq_len=96), dtype=torch.bfloat16, seed=0)
    twin = kernels.for_inference(model, native_half=True)
    assert all(a is b for a, b in zip(twin.parameters(), model.parameters()))
    assert (twin.attn_impl, twin.kv_cache_dtype) == (model.attn_impl, model.kv_cache_dtype)
    calls = []
    for name in ("bf16_linear", "bf16_linear_many", "bf16_rms_norm"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _k=kernel, _n=name: calls.append(_n) or _k(*a))
    long_ids = torch.arange(kernels.NATIVE_KERNEL_MAX_ROWS + 1)[None]
    with torch.no_grad():
        assert torch.equal(twin(long_ids), model(long_ids)) and calls == []
        short_ids = torch.arange(kernels.NATIVE_KERNEL_MAX_ROWS)[None]
        assert torch.allclose(twin(short_ids).float(), model(short_ids).float(), rtol=0.05, atol=0.05)
    layers = model.cfg.num_layers
    assert calls.count("bf16_linear_many") == 2 * layers and calls.count("bf16_linear") == 2 * layers + 1


@pytest.mark.parametrize("rows", [1, 3, 5, 8, 16])
def test_many_matrices_in_one_call(rows):
    """q/k/v or gate/up in one pass: each output as if computed alone."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=g).bfloat16()
    ws = [torch.randn(n, 96, generator=g).bfloat16() for n in (64, 16, 16, 40)]
    bs = [torch.randn(w.shape[0], generator=g).bfloat16() if i % 2 else None for i, w in enumerate(ws)]
    for biases in (None, bs):
        outs = kernels.bf16_linear_many(x, ws, biases)
        for i, (w, y) in enumerate(zip(ws, outs)):
            assert torch.equal(y, kernels.bf16_linear(x, w, None if biases is None else biases[i]))
    with pytest.raises(ValueError):
        kernels.bf16_linear_many(x, ws * 3)


def test_rms_norm_matches_the_model():
    from chipshift.model.transformer import RMSNorm

    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(200, 1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(200, generator=g))
    x = (torch.randn(3, 1, 200, generator=g) * 4).bfloat16()
    got, want = kernels.bf16_rms_norm(x, norm.weight, norm.eps), norm(x)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    # float32 sums in another order: the two roundings may each move one bfloat16 step
    assert ((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -6 + 1e-6).all()
    assert (got == want).float().mean() > 0.95


@pytest.mark.parametrize("rows", [kernels.KERNEL_MAX_ROWS, kernels.KERNEL_MAX_ROWS + 1])
def test_linear_on_either_side_of_the_kernel_row_limit(rows):
    """`linear` sends up to KERNEL_MAX_ROWS rows (decode, short prefills) through the kernel
    and more through torch's float32 GEMM on widened operands: both give bf16 arithmetic."""
    g = torch.Generator().manual_seed(rows)
    x, w, b = (torch.randn(*s, generator=g).to(torch.bfloat16) for s in ((rows, 96), (70, 96), (70,)))
    got, want = kernels.linear(x, w, b), reference(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 70)
    ulp = want.float().abs().clamp_min(1e-3) * 2 ** -7
    assert ((got.float() - want.float()).abs() <= ulp).all()


# -- the native decode step (decode.c) ----------------------------------------------------------
def _engine_after_prefill(monkeypatch, half, qkv_bias, lengths, slots=8):
    """An engine under `half` whose slots 0.. hold prompts of `lengths`, prefilled through the
    model, and random tokens for the next step."""
    from chipshift.infer.engine import Engine, Request
    from chipshift.infer.sampling import SamplingParams

    monkeypatch.setenv("CHIPSHIFT_HALF", half)
    monkeypatch.setenv("CHIPSHIFT_CPU_KERNELS", "on")
    model = build_model(preset("tiny", init_std=0.15, max_seq_len=96, qkv_bias=qkv_bias), dtype=torch.bfloat16, seed=0)
    gen = torch.Generator().manual_seed(1)
    if qkv_bias:  # the init leaves biases at zero: make them count
        for b in model.layers:
            for m in (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj):
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
    engine = Engine(model, max_batch=slots)
    with torch.inference_mode():
        for slot, T in enumerate(lengths):
            prompt = torch.randint(0, model.cfg.vocab_size, (T,), generator=gen).tolist()
            engine._prefill(slot, Request(prompt, SamplingParams(max_tokens=4, seed=0)))
    tokens = torch.randint(0, model.cfg.vocab_size, (len(lengths),), generator=gen)
    return engine, tokens, torch.tensor(lengths)


def _both_ways(engine, tokens, positions):
    """The step's logits and cache through the model, then through the native step from the
    same cache."""
    rows = tokens.shape[0]
    cache = engine.cache
    k0, v0 = cache.k.clone(), cache.v.clone()
    with torch.inference_mode():
        want = engine._decode_forward(tokens[:, None], positions, rows, int(positions.max()) + 1)
        want_kv = cache.k.clone(), cache.v.clone()
        cache.k.copy_(k0), cache.v.copy_(v0)
        got = engine.native_step(tokens, positions)
    return got, want, (cache.k, cache.v), want_kv


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("lengths", [[5], [5, 9, 2], [3, 1, 4, 1, 5, 9, 2, 6]], ids=["1row", "3rows", "8rows"])
def test_native_step_is_the_emulating_twin_bitwise(monkeypatch, qkv_bias, lengths):
    """Where the CPU emulates bfloat16 the twin runs the same kernels and attends in float32:
    the native step gives the very same logits and cache, with biases, GQA, rows at
    different positions, and the 7+-row kernel path."""
    engine, tokens, positions = _engine_after_prefill(monkeypatch, "emulated", qkv_bias, lengths)
    assert engine.native_step is not None and engine.cache.k.dtype == torch.float32
    got, want, kv, want_kv = _both_ways(engine, tokens, positions)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(kv, want_kv))


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_native_prefill_is_the_emulating_twins_bitwise(monkeypatch, qkv_bias):
    """A prompt through the native step (its rows in one slot, causal) gives the last token's
    logits and the slot's cache exactly as the twin's prefill does; other slots untouched."""
    from chipshift.infer.engine import Request
    from chipshift.infer.sampling import SamplingParams

    engine, _, _ = _engine_after_prefill(monkeypatch, "emulated", qkv_bias, [4, 6])
    prompt = [3, 17, 5, 99, 42, 7, 1, 8, 23]
    step, cache = engine.native_step, engine.cache
    runs = []
    for native in (True, False):
        engine.native_step = step if native else None
        cache.k[:, 2].zero_(), cache.v[:, 2].zero_()
        with torch.inference_mode():
            engine._prefill(2, Request(prompt, SamplingParams(max_tokens=4, seed=0)))
        runs.append((engine.last_token[2].item(), cache.k.clone(), cache.v.clone()))
        engine.slots[2] = None
    (tok_a, k_a, v_a), (tok_b, k_b, v_b) = runs
    assert tok_a == tok_b and torch.equal(k_a, k_b) and torch.equal(v_a, v_b)
    engine.native_step = step
    with torch.inference_mode():
        logits = step.prefill(2, torch.tensor(prompt))
        ids = torch.tensor([prompt])
        want = engine.model.logits(engine.model.forward_hidden(
            ids, cache=engine.cache.prefill(2, len(prompt)))[:, -1]).float()
    assert torch.equal(logits, want)


def test_native_step_beside_native_bfloat16_agrees_up_to_rounding(monkeypatch):
    """On a CPU with bfloat16 arithmetic the model attends in torch's bfloat16 kernel over a
    bfloat16 cache and the native step in float32 over the same cache: logits agree to
    bfloat16 rounding noise."""
    engine, tokens, positions = _engine_after_prefill(monkeypatch, "native", False, [5, 9, 2])
    assert engine.native_step is not None and engine.cache.k.dtype == torch.bfloat16
    assert engine.native_step.max_rows == kernels.NATIVE_KERNEL_MAX_ROWS
    got, want, kv, want_kv = _both_ways(engine, tokens, positions)
    scale = want.abs().max()
    assert (got - want).abs().max() <= 0.03 * scale
    assert all(((a.float() - b.float()).abs().max() <= 0.03 * b.float().abs().max()) for a, b in zip(kv, want_kv))


@pytest.mark.parametrize("amx", [False, True], ids=["avx512_bf16", "amx"])
def test_native_half_prefills_longer_prompts_natively_without_amx(monkeypatch, amx):
    """Where bfloat16 is native through AVX512-BF16 alone, prompts of up to
    NATIVE_PREFILL_MAX_ROWS tokens are prefilled by the native step (torch's bfloat16 GEMM has
    no matrix unit behind it there); with AMX only decode-sized ones. The native prefill's
    logits agree with the model's to bfloat16 rounding noise."""
    import chipshift.devices as devices

    flags = (devices.cpu_flags() - {"amx_bf16"}) | ({"amx_bf16"} if amx else set())
    monkeypatch.setattr(devices, "cpu_flags", lambda: flags)
    engine, _, _ = _engine_after_prefill(monkeypatch, "native", False, [4])
    step = engine.native_step
    assert step.max_rows == kernels.NATIVE_KERNEL_MAX_ROWS
    assert step.max_prefill == (kernels.NATIVE_KERNEL_MAX_ROWS if amx else kernels.NATIVE_PREFILL_MAX_ROWS)
    assert kernels.prefill_max_rows(False, amx) == kernels.KERNEL_MAX_ROWS  # emulating CPUs: as before
    prompt = torch.randint(0, engine.cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = engine.model.logits(engine.model.forward_hidden(
            prompt[None], cache=engine.cache.prefill(1, 20))[:, -1]).float()
        if amx:
            with pytest.raises(ValueError, match="at most 8"):
                step.prefill(1, prompt)
            return
        got = step.prefill(1, prompt)
    assert (got - want).abs().max() <= 0.03 * want.abs().max()


def test_engine_decodes_through_the_model_beyond_the_native_steps_rows(monkeypatch):
    """Batches larger than the native step's max_rows take the model's path; tokens agree with
    an engine without the native step."""
    from chipshift.infer.engine import Engine
    from chipshift.infer.sampling import SamplingParams

    monkeypatch.setenv("CHIPSHIFT_HALF", "emulated")
    monkeypatch.setattr(kernels, "KERNEL_MAX_ROWS", 2)
    model = build_model(preset("tiny", init_std=0.15, max_seq_len=96), dtype=torch.bfloat16, seed=0)
    engine = Engine(model, max_batch=4)
    calls = []
    step = engine.native_step
    engine.native_step = type("Counted", (), {"max_rows": step.max_rows, "max_prefill": step.max_prefill,
                                              "prefill": lambda self, *a, **k: step.prefill(*a, **k),
                                              "__call__": lambda self, *a: calls.append(len(a[0])) or step(*a)})()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    two = engine.generate(prompts[:2], params)
    assert calls and set(calls) == {2}
    calls.clear()
    four = engine.generate(prompts, params)
    assert calls == []  # 4 rows > max_rows 2: every step through the model
    assert four[:2] == two


def test_native_step_refuses_what_it_does_not_compute(monkeypatch):
    """float32 weights and LoRA layers: no native step (with the reason), and the engine decodes
    through the model."""
    from chipshift.infer.cache import KVCache
    from chipshift.model.lora import LoRAConfig, apply_lora

    cfg = preset("tiny", max_seq_len=32)
    fp32 = build_model(cfg, dtype=torch.float32, seed=0)
    cache = KVCache(cfg, 2, 32, torch.device("cpu"), torch.bfloat16)
    with pytest.raises(kernels.Unavailable, match="bfloat16 weights"):
        kernels.DecodeStep(fp32, cache, 2)
    lora_model = build_model(cfg, dtype=torch.float32, seed=0)
    apply_lora(lora_model, LoRAConfig(enabled=True, rank=2))
    lora_model.to(torch.bfloat16)
    with pytest.raises(kernels.Unavailable, match="LoRALinear"):
        kernels.DecodeStep(lora_model, cache, 2)
    monkeypatch.setenv("CHIPSHIFT_HALF", "emulated")
    decision = get_device("cpu").precision.decode_step(lora_model, cache)
    assert decision.value is None and "LoRALinear" in decision.reason
