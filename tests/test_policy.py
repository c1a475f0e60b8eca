"""The precision policy (chipshift/devices/policy.py): each decision under each outcome of
its probes, whatever CPU runs the test. Every test pins the probes (CHIPSHIFT_HALF,
CHIPSHIFT_CPU_KERNELS) or fakes the matmul probe's figures, so none follows the machine."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from chipshift.devices import get_device, kernels
from chipshift.devices import policy as policy_module
from chipshift.devices.policy import EMULATED_BELOW, HALF_ENV, KERNELS_ENV, Decision
from chipshift.errors import ConfigError
from chipshift.infer.engine import Engine
from chipshift.model.config import preset
from chipshift.model.transformer import build_model
from chipshift.train.config import from_dict
from chipshift.train.data import TokenWindows
from chipshift.train.loop import Trainer
from chipshift.train.objectives import LanguageModeling

KERNEL_BUILDS = kernels.bf16_linear_status() is None


def policy(monkeypatch, half: str | None = None, kernels_off: bool = False, kernels_pin: str | None = None):
    """A fresh CPU device whose policy sees the given pins."""
    for var, value in ((HALF_ENV, half), (KERNELS_ENV, "off" if kernels_off else kernels_pin)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    return get_device("cpu")


def test_native_half_pinned(monkeypatch):
    p = policy(monkeypatch, "native", kernels_off=True).precision
    assert p.half_native().value and "pinned by CHIPSHIFT_HALF=native" in p.half_native().reason
    assert p.compute_dtype().value == torch.bfloat16
    assert not p.matmul_upcast(torch.bfloat16).value
    assert p.serving_dtype().value == torch.bfloat16
    assert not p.inference_twin(torch.bfloat16).value  # no kernel: torch's native kernels
    assert p.mfu_ceiling(torch.bfloat16, upcast=False).reason.startswith("measured: bfloat16")


@pytest.mark.skipif(not KERNEL_BUILDS, reason=f"the bf16 kernel does not build here: {kernels.bf16_linear_status()}")
@pytest.mark.parametrize("pin, probe, twin", [("on", None, True), (None, True, True), (None, False, False)])
def test_native_half_takes_the_kernel_for_decode_where_it_is_faster(monkeypatch, pin, probe, twin):
    """With bfloat16 arithmetic, decode steps go through the kernel only where it beats
    torch's GEMV: pinned (CHIPSHIFT_CPU_KERNELS=on) or measured (the probe, faked here)."""
    p = policy(monkeypatch, "native", kernels_pin=pin).precision
    if probe is not None:
        monkeypatch.setattr(policy_module, "_KERNEL_PROBE", Decision(probe, "fake probe"))
    decision = p.inference_twin(torch.bfloat16)
    assert decision.value is twin
    assert ("decode steps" in decision.reason) is twin and ("pinned" in decision.reason or "fake" in decision.reason)
    assert p.serving_dtype().value == torch.bfloat16  # native: bfloat16 either way


@pytest.mark.skipif(not KERNEL_BUILDS, reason=f"the bf16 kernel does not build here: {kernels.bf16_linear_status()}")
def test_the_kernel_probe_times_both_once_per_process(monkeypatch):
    monkeypatch.setattr(policy_module, "_KERNEL_PROBE", None)
    p = policy(monkeypatch, "native").precision
    first = p.kernel_beats_torch()
    assert first.reason.startswith("probe: one row through a 2048x2048") and p.kernel_beats_torch() is first
    assert policy(monkeypatch, "native").precision.kernel_beats_torch() is first  # another Device, same answer


def test_emulated_half_pinned(monkeypatch):
    p = policy(monkeypatch, "emulated").precision
    assert not p.half_native().value
    dtype, why = p.compute_dtype()
    assert dtype == torch.float32 and "emulates" in why and "CHIPSHIFT_HALF=emulated" in why
    assert p.matmul_upcast(torch.bfloat16).value and not p.matmul_upcast(torch.float32).value
    ceiling = p.mfu_ceiling(torch.bfloat16, upcast=True)
    assert ceiling.reason.startswith("measured: float32") and "run as float32 GEMMs" in ceiling.reason
    # the user's dtype always wins, and the compiled decode step never takes the kernel
    assert p.serving_dtype("float32").value == torch.float32
    assert p.serving_dtype(compiled=True).value == torch.float32


@pytest.mark.skipif(not KERNEL_BUILDS, reason=f"the bf16 kernel does not build here: {kernels.bf16_linear_status()}")
def test_emulated_half_with_the_kernel_serves_bfloat16_through_a_twin(monkeypatch):
    p = policy(monkeypatch, "emulated").precision
    assert p.cpu_kernel().value
    dtype, why = p.serving_dtype()
    assert dtype == torch.bfloat16 and "AVX2 kernel" in why
    assert p.inference_twin(torch.bfloat16).value


def test_emulated_half_without_a_compiler_serves_float32(monkeypatch):
    p = policy(monkeypatch, "emulated", kernels_off=True).precision
    assert not p.cpu_kernel().value and "CHIPSHIFT_CPU_KERNELS=off" in p.cpu_kernel().reason
    assert kernels.bf16_linear_status() == "off (CHIPSHIFT_CPU_KERNELS=off)"
    dtype, why = p.serving_dtype()
    assert dtype == torch.float32 and "no native kernel" in why
    twin = p.inference_twin(torch.bfloat16)
    assert not twin.value and "emulated bfloat16 kernels" in twin.reason
    model = build_model(preset("tiny"), dtype=torch.bfloat16, seed=0)
    same, note = p.for_inference(model, torch.bfloat16)
    assert same is model and "CHIPSHIFT_CPU_KERNELS=off" in note


@pytest.mark.parametrize("half, full, native", [(800e9, 200e9, True), (30e9, 200e9, False),
                                                 (EMULATED_BELOW * 200e9, 200e9, True),
                                                 (0.99 * EMULATED_BELOW * 200e9, 200e9, False)])
def test_the_probe_decides_at_one_line(monkeypatch, half, full, native):
    """Unpinned, the decision follows the measured matmul figures at EMULATED_BELOW: both
    outcomes, on any CPU, by faking the probe."""
    dev = policy(monkeypatch)
    monkeypatch.setattr(dev, "half_probe", lambda dtype: (half, full))
    decision = dev.precision.half_native(torch.bfloat16)
    assert decision.value is native and decision.reason.startswith("probe:")
    assert dev.precision.compute_dtype().value == (torch.bfloat16 if native else torch.float32)
    assert dev.precision.matmul_upcast(torch.bfloat16).value is (not native)


@pytest.mark.parametrize("kernels_off", [False, True])
def test_float16_native_bfloat16_emulated(monkeypatch, kernels_off):
    """A CPU with AVX512-FP16 and AVX512-BF16 but no AMX (measured: float16 matmul 303 GFLOP/s,
    bfloat16 155, float32 243): training computes in float32 (on a CPU auto never picks
    float16); serving holds bfloat16 weights where chipshift's kernels decode them."""
    if not kernels_off and not KERNEL_BUILDS:
        pytest.skip(f"the bf16 kernel does not build here: {kernels.bf16_linear_status()}")
    dev = policy(monkeypatch, kernels_off=kernels_off)
    figures = {torch.float32: 243e9, torch.bfloat16: 155e9, torch.float16: 303e9}
    monkeypatch.setattr(dev, "half_probe", lambda dtype: (figures[dtype], figures[torch.float32]))
    p = dev.precision
    assert not p.half_native(torch.bfloat16).value and p.half_native(torch.float16).value
    assert p.compute_dtype().value == torch.float32
    assert p.compute_dtype("float16").value == torch.float16  # the user's choice stands
    serving = p.serving_dtype()
    assert serving.value == (torch.float32 if kernels_off else torch.bfloat16)
    assert ("native kernels" in serving.reason) is not kernels_off
    assert p.serving_dtype("float16").value == torch.float16  # the user's choice stands
    assert p.serving_dtype(compiled=True).value == torch.float32  # compiled: torch's kernels


def test_a_bad_pin_names_the_variable_and_the_allowed_values(monkeypatch):
    monkeypatch.setenv(HALF_ENV, "fast")
    with pytest.raises(ConfigError, match="CHIPSHIFT_HALF = 'fast': allowed values are auto, native, emulated"):
        get_device("cpu").precision
    monkeypatch.setenv(HALF_ENV, "native")
    monkeypatch.setenv(KERNELS_ENV, "maybe")
    with pytest.raises(ConfigError, match="CHIPSHIFT_CPU_KERNELS = 'maybe': allowed values are auto, on, off"):
        get_device("cpu").precision.cpu_kernel()


def test_report_lists_every_decision_with_a_reason(monkeypatch):
    report = policy(monkeypatch, "emulated", kernels_off=True).precision.report()
    assert set(report) == {"half_native", "compute_dtype", "matmul_upcast", "fp32_gemm", "cpu_kernel",
                           "serving_dtype", "inference_twin"}
    assert report["compute_dtype"]["value"] == "float32" and report["half_native"]["value"] is False
    assert all(row["reason"] for row in report.values())


# -- the decisions where they are used ----------------------------------------------------
def trainer(tmp_path, **run) -> Trainer:
    cfg = from_dict({"run": {"out": str(tmp_path), "device": "cpu", **run}, "model": {"preset": "tiny"},
                     "data": {"seq_len": 16, "batch_size": 2}, "optim": {"warmup_steps": 0},
                     "train": {"steps": 2, "eval_every": 0}})
    rows = TokenWindows(torch.arange(400).remainder(50).numpy().astype("uint16"), 16, 0)
    lines = []
    t = Trainer(cfg, LanguageModeling(), rows, model_cfg=cfg.model_config(), log=lines.append)
    t.logged = lines
    return t


@pytest.mark.parametrize("variable", [False, True])
def test_cpu_trainer_keeps_freed_host_memory_for_fixed_shapes_only(tmp_path, monkeypatch, variable):
    """Fixed-shape batches reuse the heap's pages step after step; varying ones would grow it."""
    import chipshift.train.loop as loop
    calls = []
    monkeypatch.setattr(loop, "keep_freed_host_memory", lambda: calls.append("keep"))
    monkeypatch.setattr(loop, "return_freed_host_memory", lambda: calls.append("return"))
    monkeypatch.setattr(TokenWindows, "variable_shapes", variable, raising=False)
    t = trainer(tmp_path)
    assert t.fixed_shapes is not variable and calls == (["return"] if variable else ["keep"])


@pytest.mark.parametrize("half, dtype, precision, upcast, ceiling, attention", [
    ("native", torch.bfloat16, "master", False, "bfloat16", "math"),
    ("emulated", torch.float32, "float32", False, "float32", "sdpa"),
])
def test_trainer_follows_the_policy_in_auto(tmp_path, monkeypatch, half, dtype, precision, upcast, ceiling,
                                            attention):
    policy(monkeypatch, half)
    t = trainer(tmp_path)
    assert (t.dtype, t.precision, t.upcast) == (dtype, precision, upcast)
    assert t.model.attn_impl == attention and any(line.startswith(f"attention: {attention}") for line in t.logged)
    assert trainer(tmp_path, attn_impl="sdpa").model.attn_impl == "sdpa"  # run.attn_impl pins it
    assert t.peak_source.startswith(f"measured: {ceiling}")
    assert f"CHIPSHIFT_HALF={half}" in t.logged[0]  # the decision is logged with its reason


@pytest.mark.parametrize("half, upcast", [("native", False), ("emulated", True)])
def test_trainer_in_bfloat16_upcasts_only_where_half_is_emulated(tmp_path, monkeypatch, half, upcast):
    policy(monkeypatch, half)
    t = trainer(tmp_path, dtype="bfloat16")
    assert t.precision == "master" and t.upcast is upcast
    assert t.peak_source.startswith("measured: float32" if upcast else "measured: bfloat16")
    assert ("half matmuls as float32 GEMMs" in t.logged[0]) is upcast
    assert torch.isfinite(torch.tensor(t.train_step().loss))


@pytest.mark.parametrize("half, pin, twin", [("native", "off", False), ("native", "on", True),
                                             ("emulated", None, True), ("emulated", "off", False)])
def test_engine_takes_the_policys_inference_path(monkeypatch, half, pin, twin):
    if twin and not KERNEL_BUILDS:
        pytest.skip(f"the bf16 kernel does not build here: {kernels.bf16_linear_status()}")
    policy(monkeypatch, half, kernels_pin=pin)
    model = build_model(preset("tiny", max_seq_len=64), dtype=torch.bfloat16, seed=0)
    engine = Engine(model, max_batch=2)
    assert (engine.model is not model) is twin
    # the emulating CPU's twin attends in float32 from a float32 cache; the native one in bfloat16
    assert engine.cache.k.dtype == (torch.float32 if twin and half == "emulated" else torch.bfloat16)
    assert ("AVX2 kernel" in (engine.kernel_note or "")) is twin
    assert (engine.native_step is not None) is twin  # and with the twin, the native decode step
    assert ("CHIPSHIFT_CPU_KERNELS=off" in (engine.kernel_note or "")) is (half == "emulated" and pin == "off")


def test_training_attention_decision(monkeypatch):
    """math attention for half pre-training where the CPU's half GEMM is native; torch's fused
    SDPA for float32, for half emulated (its matmuls upcast), for post-training's varying
    batches and off the CPU."""
    native = policy(monkeypatch, "native").precision
    assert native.training_attention(torch.bfloat16, False).value == "math"
    assert native.training_attention(torch.float32, False).value == "sdpa"
    assert native.training_attention(torch.bfloat16, False, fixed_shapes=False).value == "sdpa"  # post-training
    emulated = policy(monkeypatch, "emulated").precision
    assert emulated.training_attention(torch.bfloat16, True).value == "sdpa"
    assert emulated.training_attention(torch.bfloat16, False).value == "sdpa"  # emulated, not upcast: still slow
    monkeypatch.setattr(type(native.device), "is_cpu", property(lambda self: False))
    assert native.training_attention(torch.bfloat16, False).value == "sdpa"


# -- compile for training --------------------------------------------------------------------
def test_compile_training_decision(monkeypatch):
    """Fixed-shape runs whose eager steps would take COMPILE_MIN_SECONDS compile where inductor
    generates kernels; shorter runs, varying shapes, a CPU without a C++ compiler and
    backends without inductor stay eager."""
    from chipshift.devices import policy as policy_module
    from chipshift.devices.policy import COMPILE_MIN_SECONDS, EAGER_MFU

    p = policy(monkeypatch).precision
    monkeypatch.setattr(policy_module, "cxx_compiler", lambda: "/usr/bin/g++")
    p.device.peak_flops = lambda dtype: (1e11, "fake probe")
    step = 1e11 * EAGER_MFU  # one second per eager step
    assert p.compile_training(COMPILE_MIN_SECONDS, step, torch.float32, False, fixed_shapes=True).value is True
    short = p.compile_training(COMPILE_MIN_SECONDS - 60, step, torch.float32, False, fixed_shapes=True)
    assert short.value is False and f"shorter than the {COMPILE_MIN_SECONDS // 60} min" in short.reason
    varying = p.compile_training(10 * COMPILE_MIN_SECONDS, step, torch.float32, False, fixed_shapes=False)
    assert varying.value is False and "recompile" in varying.reason
    monkeypatch.setattr(policy_module, "cxx_compiler", lambda: None)
    assert "C++ compiler" in p.compile_training(10 * COMPILE_MIN_SECONDS, step, torch.float32, False, True).reason
    monkeypatch.setattr(policy_module, "cxx_compiler", lambda: "/usr/bin/g++")
    p.device.backend = dataclasses.replace(p.device.backend, inductor=False)  # as for npu, mlu, musa, mps
    assert "does not generate kernels for cpu" in p.compile_training(10 * COMPILE_MIN_SECONDS, step, torch.float32,
                                                                     False, True).reason


@pytest.mark.parametrize("sections, compiled, words", [
    ({"train": {"steps": 10**7}}, True, "compiled with inductor"),
    ({"train": {"steps": 50}}, False, "shorter than"),
    ({"train": {"steps": 10**7}, "run": {"compile": "off"}}, False, None),
    ({"train": {"steps": 50}, "run": {"compile": True}}, True, None),
    ({"train": {"steps": 10**7}, "run": {"activation_checkpointing": True}}, False,
     "not with activation checkpointing"),
])
def test_trainer_compiles_long_runs_by_default(monkeypatch, sections, compiled, words):
    """run.compile = "auto" (the default) asks the device layer and logs its reason; on/off
    pin it. Building the trainer compiles nothing yet (torch.compile is lazy). The tiny
    model's step is about 0.05 GFLOP: 10**7 steps are a long run on any CPU, 50 a short one."""
    from chipshift.devices import policy as policy_module

    monkeypatch.setattr(policy_module, "cxx_compiler", lambda: "/usr/bin/g++")
    raw = {"run": {"device": "cpu", "dtype": "float32"}, "model": {"preset": "tiny"},
           "data": {"seq_len": 16, "batch_size": 2}, "optim": {"warmup_steps": 0}, "train": {}}
    for name, values in sections.items():
        raw[name].update(values)
    lines = []
    toks = torch.arange(2000) % 500
    cfg = from_dict(raw)
    trainer = Trainer(cfg, LanguageModeling(), TokenWindows(toks.numpy(), 16), model_cfg=cfg.model_config(),
                      device=get_device("cpu"), log=lines.append)
    assert trainer.compiled is compiled
    assert hasattr(trainer.model.forward_hidden, "_torchdynamo_orig_callable") is compiled
    if words:
        assert any(words in line for line in lines if line.startswith("compile:")), lines


@pytest.mark.parametrize("ratio, chosen", [(1.3, "onednn"), (0.9, "torch")])
def test_fp32_gemm_follows_the_probe_each_way(monkeypatch, ratio, chosen):
    """Auto: oneDNN only on an AVX-512 CPU where the probe finds it FP32_GEMM_LINE x as fast
    (faked here both ways), torch's on AVX2; the env pins it; a bad pin names the allowed values."""
    monkeypatch.delenv(policy_module.FP32_GEMM_ENV, raising=False)
    monkeypatch.setattr(policy_module, "_FP32_GEMM_PROBE", None)
    fake = Decision("onednn" if ratio >= policy_module.FP32_GEMM_LINE else "torch", f"probe: {ratio}x")
    monkeypatch.setattr(policy_module, "_probe_fp32_gemm", lambda onednn: fake)
    p = get_device("cpu").precision
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert p.fp32_gemm() == Decision(chosen, f"probe: {ratio}x")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # no probe: torch's
    assert p.fp32_gemm().value == "torch" and "AVX2" in p.fp32_gemm().reason
    for pin in ("torch", "onednn"):
        monkeypatch.setenv(policy_module.FP32_GEMM_ENV, pin)
        assert p.fp32_gemm().value == pin and "pinned" in p.fp32_gemm().reason
    monkeypatch.setenv(policy_module.FP32_GEMM_ENV, "mkl")
    with pytest.raises(ConfigError, match="CHIPSHIFT_FP32_GEMM = 'mkl': allowed values are auto, onednn, torch"):
        p.fp32_gemm()


def test_fp32_gemm_probe_times_both_paths_and_draws_no_global_randomness():
    from chipshift.devices.kernels import onednn

    if onednn.available() is not None:
        pytest.skip(onednn.available())
    before = torch.random.get_rng_state()
    decision = policy_module._probe_fp32_gemm(onednn)
    assert torch.equal(before, torch.random.get_rng_state())
    assert decision.value in ("onednn", "torch") and "as fast through oneDNN" in decision.reason
