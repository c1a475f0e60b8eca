"""Emulated numerics (chipshift/devices/emulate.py): the profiles, the rounding checked
against real arithmetic and a float64 reference, and a training run under a profile."""

import math

import pytest
import torch
import torch.nn.functional as F

from chipshift.devices import get_device, load_catalogue
from chipshift.devices.emulate import (FORMATS, Emulation, block_scales, load_numerics, quantize, resolve,
                                       round_mantissa)
from chipshift.errors import ChipshiftError, DeviceError


from test_train import one_thread  # noqa: F401  (autouse: tiny matmuls on one thread)


def float32_patterns(n: int = 8000, seed: int = 0) -> torch.Tensor:
    """Random bit patterns (every exponent: subnormals, huge values, infinities; no NaN),
    plus exact ties for 10 and 7 kept mantissa bits."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-2**31, 2**31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    ties = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-8), 1 + 3 * 2**-8, 2.0**-130 * (1 + 2**-11),
                         3.4028235e38, -3.4028235e38, 0.0, -0.0, float("inf")])
    return torch.cat([x[~torch.isnan(x)], ties])


def reference_round(v: float, bits: int) -> float:
    """Round-to-nearest-even to `bits` mantissa bits, in float64 (exact for float32 inputs)."""
    if not math.isfinite(v) or v == 0:
        return v
    exponent = max(math.frexp(v)[1] - 1, -126)  # float32's subnormals share the exponent -126
    ulp = 2.0 ** (exponent - bits)
    q = math.copysign(round(v / ulp) * ulp, v)  # Python's round: half to even; v / ulp is exact
    return math.copysign(math.inf, q) if abs(q) >= 2.0**128 else q


def as_bits(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(torch.int32)


# -- the profiles --------------------------------------------------------------------------
def test_every_catalogue_chip_has_numerics_with_a_source():
    profiles, chips = load_numerics()
    assert set(load_catalogue()) <= set(chips)
    for chip in chips.values():
        assert chip.status in ("official", "estimate") and len(chip.source) > 20 and chip.profiles
    assert "bf16" not in chips["ascend-910a"].profiles and "fp16-only" in chips["ascend-910a"].profiles
    assert {"fp8-e4m3", "fp8-e5m2"} <= set(chips["h100-sxm"].profiles) and "hf32" in chips["ascend-910b"].profiles
    assert {"fp16-only", "bf16", "tf32", "hf32", "fp8-e4m3", "fp8-ue8m0", "mxfp8"} <= set(profiles)


def test_profiles_resolve_by_name_chip_and_chip_profile():
    assert resolve("ascend-910a").name == "fp16-only" and resolve("ascend-910a").chip == "ascend-910a"
    p = resolve("h100-sxm:fp8-ue8m0")
    assert (p.input, p.scale, p.block, p.attention, p.dtype) == ("e4m3", "ue8m0", 128, "bf16", torch.bfloat16)
    assert resolve("tf32").chip is None and resolve("tf32").dtype == torch.float32


@pytest.mark.parametrize("spec, words", [
    ("fp7", ["unknown numerics profile or chip 'fp7'", "fp16-only", "mxfp8", "ascend-910b"]),
    ("a100:fp8-e4m3", ["a100 runs the profiles", "tf32"]),
    ("nochip:bf16", ["unknown chip 'nochip'", "h100-sxm"]),
])
def test_unknown_profile_lists_the_known_ones(spec, words):
    with pytest.raises(DeviceError) as err:
        get_device("cpu", emulate=spec)
    assert all(w in str(err.value) for w in words) and "\n" not in str(err.value)


def test_a_dtype_the_profile_does_not_compute_in_is_refused_naming_both():
    dev = get_device("cpu", emulate="ascend-910a")
    with pytest.raises(DeviceError, match="dtype bfloat16 cannot run under the emulated profile fp16-only "
                                          r"\(ascend-910a\): it computes in float16; ascend-910a has no bfloat16"):
        dev.precision.compute_dtype("bfloat16")
    assert dev.precision.compute_dtype().value == torch.float16
    assert dev.precision.serving_dtype().value == torch.float16
    assert not dev.precision.inference_twin(torch.float16).value  # no native kernel under emulation


# -- rounding, exact where it can be checked --------------------------------------------------
@pytest.mark.parametrize("bits", [10, 7, 11])
def test_mantissa_rounding_is_bit_exact_against_a_float64_reference(bits):
    x = float32_patterns()
    want = as_bits([reference_round(v, bits) for v in x.tolist()])
    assert torch.equal(round_mantissa(x, bits).view(torch.int32), want)


def test_the_float64_reference_agrees_with_torchs_bfloat16_cast():
    """The reference that checks TF32/HF32 is itself right where torch can check it: 7 bits is bfloat16."""
    x = float32_patterns(seed=1)
    assert torch.equal(as_bits([reference_round(v, 7) for v in x.tolist()]), x.to(torch.bfloat16).float().view(torch.int32))


@pytest.mark.parametrize("fmt, dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2),
                                        ("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_unscaled_rounding_equals_torchs_casts(fmt, dtype):
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * torch.logspace(-8, 4, 4096)
    assert torch.equal(quantize(x, FORMATS[fmt]), x.to(dtype).float())


@pytest.mark.parametrize("rule, block", [("ue8m0", 128), ("e8m0", 32)])
def test_block_scales_are_e8m0_values_and_elements_are_fp8_values(rule, block):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 256, generator=g) * torch.logspace(-3, 3, 256)
    amax = x.abs().unflatten(-1, (-1, block)).amax(-1)
    s = block_scales(amax, FORMATS["e4m3"], rule)
    assert torch.equal(s.to(torch.float8_e8m0fnu).float(), s)  # every scale is a UE8M0/E8M0 value
    if rule == "ue8m0":  # the smallest power of two that keeps the block within E4M3's 448
        assert (amax / s <= 448).all() and (amax / (s / 2) > 448).all()
        # torch's own e8m0 cast rounds to nearest; the UE8M0 rule rounds up: they meet on powers of two
        r = amax / 448
        assert torch.equal(s, torch.where(r.to(torch.float8_e8m0fnu).float() >= r, r.to(torch.float8_e8m0fnu).float(),
                                          2 * r.to(torch.float8_e8m0fnu).float()))
    else:  # OCP MX: 2^(floor(log2 amax) - 8)
        assert torch.equal(s, torch.exp2(torch.floor(torch.log2(amax)) - 8))
    q = quantize(x, FORMATS["e4m3"], scale=rule, block=block)
    elems = q.unflatten(-1, (-1, block)) / s[..., None]
    assert torch.equal(elems.to(torch.float8_e4m3fn).float(), elems)


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("fp16-only", torch.float16)])
def test_half_profiles_compute_what_the_cpus_own_half_matmul_computes(name, dtype):
    """bfloat16: identical to torch's CPU kernel. float16: torch's CPU kernel accumulates in
    another order, so up to one float16 ulp of the output apart in under 1% of the elements."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 256, generator=g).to(dtype), torch.randn(96, 256, generator=g).to(dtype)
    want = F.linear(x, w)
    with Emulation(resolve(name)):
        got, got_mm = F.linear(x, w), x @ w.T
    assert got.dtype == dtype and torch.equal(got, got_mm)
    ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(1)
    assert ((got.float() - want.float()).abs() <= ulp).all()
    assert (got == want).float().mean() >= (1.0 if dtype == torch.bfloat16 else 0.99)


def test_emulated_attention_matches_torchs_sdpa_and_rounds_for_fp8_profiles():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], is_causal=True, enable_gqa=True)
    with Emulation(resolve("fp32")):
        got = F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], is_causal=True, enable_gqa=True)
    assert torch.allclose(got, want, atol=1e-6)
    with Emulation(resolve("bf16")):
        half = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True)
    ref = F.scaled_dot_product_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(),
                                         is_causal=True)
    assert half.dtype == torch.bfloat16 and ((half.float() - ref).abs() <= 2 ** -7 * ref.abs() + 1e-2).all()


def test_gradients_flow_in_the_stored_dtype_with_the_gradient_format():
    x = torch.randn(8, 64, requires_grad=True)
    w = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    with Emulation(resolve("fp8-e4m3")):
        y = F.linear(x.bfloat16(), w)
    y.float().pow(2).sum().backward()
    assert y.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    exact = 2 * (x.bfloat16().float() @ w.float().T) @ w.float()
    assert 0 < ((x.grad - exact).norm() / exact.norm()) < 0.2  # FP8's error, not a broken gradient


# -- a stage under a profile ------------------------------------------------------------------
def test_fp16_only_training_uses_loss_scaling_and_logs_skipped_steps(tmp_path):
    from test_train import streams, tiny_cfg

    from chipshift.train.loop import train
    from chipshift.train.metrics import read

    cfg = tiny_cfg(tmp_path, run={"dtype": "auto", "emulate": "ascend-910a"}, train={"steps": 4, "log_every": 2})
    logs = []
    result = train(cfg, train_stream=streams()[0], progress=False, log=logs.append)
    rec = [r for r in read(result.run_dir / "metrics.jsonl") if "loss" in r][-1]
    assert rec["loss_scale"] > 1 and rec["scaler_skipped_total"] == 0 and math.isfinite(rec["loss"])
    assert any("emulating fp16-only (ascend-910a)" in line for line in logs)
    assert any("the scaler skipped 0 of 4 steps" in line for line in logs)


@pytest.mark.parametrize("run, words", [
    ({"emulate": "fp16-only", "dtype": "bfloat16"}, ["dtype bfloat16", "fp16-only", "emulate bf16"]),
    ({"emulate": "bf16", "compile": "on"}, ["run.compile = 'on'", "profile bf16"]),
    ({"emulate": "tf32", "activation_checkpointing": True}, ["run.activation_checkpointing", "profile tf32"]),
    ({"emulate": "fp9"}, ["run.emulate = 'fp9'", "fp16-only"]),
])
def test_settings_a_profile_cannot_run_are_refused_before_work(tmp_path, run, words):
    from test_train import streams, tiny_cfg

    from chipshift.train.loop import Trainer
    from chipshift.train.objectives import LanguageModeling

    with pytest.raises(ChipshiftError) as err:
        cfg = tiny_cfg(tmp_path, run={"dtype": "auto", **run})
        Trainer(cfg, LanguageModeling(), streams()[0], model_cfg=cfg.model_config(), log=lambda *a: None)
    assert all(w in str(err.value) for w in words)
