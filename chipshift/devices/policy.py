"""The precision policy: every half-precision decision chipshift makes on a device, each
with its reason, in one object (`Device.precision`).

On an accelerator half precision is native. A CPU either has half-precision arithmetic
(AVX512-BF16, AMX: a bfloat16 matmul runs at least as fast as a float32 one) or emulates
it (AVX2 only: torch widens every element, several times slower than float32). That one
fact, probed with a timed matmul, drives the decisions below:

    decision                native half        emulated half (CPU)            pinned by
    ----------------------  -----------------  -----------------------------  -------------------
    auto compute dtype      bfloat16           float32                        run.dtype, --dtype
    training half matmuls   the device's GEMM  float32 GEMMs on the half       run.half_matmul_upcast
                                               operands (same numbers)
    MFU ceiling             half peak          float32 peak under the upcast  (follows the upcast)
    auto serving dtype      bfloat16           bfloat16 through chipshift's   --dtype
                                               AVX2 kernel, else float32
    inference twin          on a CPU, decode   the kernel twin for every      CHIPSHIFT_CPU_KERNELS
                            steps through the  input, where the kernel builds
                            kernel where it
                            beats torch (probe)
    native decode step      where the twin     where the twin runs: the whole (follows the twin)
                            runs, up to 8 rows step in one native call
    KV-cache dtype          the weights'       float32 under the twin         (follows the twin)
    training attention      math (matmul +     torch's fused SDPA             run.attn_impl
                            softmax) on a CPU,
                            SDPA elsewhere
    compile training        fixed-shape runs estimated at COMPILE_MIN_SECONDS  run.compile
                            or more of eager steps, where inductor generates
                            kernels (a CPU with a C++ compiler, cuda, xpu)
    float32 training GEMMs  on an AVX-512 CPU, oneDNN's where it is no slower  run.fp32_gemm
                            than torch's default BLAS (probe), else torch's

On a CPU the auto compute dtype is bfloat16 or float32, never float16: a CPU with float16
arithmetic but emulated bfloat16 (AVX512-FP16 without AMX) trains in float32 and serves
bfloat16 weights through the twin and decode step, which stream half float32's bytes
without torch's per-operator overhead.

The probes behind the table (is half native; does the kernel build; does it beat torch's
one-row GEMV) can be pinned from outside, for tests and for users:

    CHIPSHIFT_HALF=native|emulated   what the matmul probe would say (CPUs only)
    CHIPSHIFT_CPU_KERNELS=off        chipshift's native CPU kernels are unavailable, as on a
                                     machine without a C compiler; =on: used wherever they
                                     build, without the speed probe
    CHIPSHIFT_FP32_GEMM=onednn|torch what the float32 GEMM probe would say (CPUs only)

`chipshift devices` prints every decision with its reason; training and serving log theirs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from chipshift.devices.dtypes import HALF, dtype_name, parse_dtype
from chipshift.devices.emulate import check_dtype, refuse
from chipshift.errors import ConfigError, DeviceError

if TYPE_CHECKING:
    from chipshift.devices import Device

HALF_ENV = "CHIPSHIFT_HALF"
KERNELS_ENV = "CHIPSHIFT_CPU_KERNELS"
FP32_GEMM_ENV = "CHIPSHIFT_FP32_GEMM"
# Where torch's CPU kernels are AVX-512, oneDNN's float32 GEMM must be at least this fast against
# torch's to be used: on the AMD AVX512-BF16 CPU it measured 1.06-1.49x on training shapes (the
# probe 1.10-1.72x, it is noisy on a 2-core machine); with the AVX2 instruction set forced,
# 0.8-1.3x (the probe 0.97-1.26x, and a float32 S step 8% slower through it), so AVX2 keeps torch's
FP32_GEMM_LINE = 1.0
FP32_GEMM_PROBE_ROUNDS = 5
# torch.compile of a training step costs 10-20 s once with inductor's cache warm and up to
# 90 s on a fresh machine (2-core CPU; S: 47 s cold, 12 s warm), then saves up to a fifth of
# every step (float32 M about 20% on the Intel CPU without AMX; S, and bfloat16 S and M on the
# AMD AVX512-BF16 CPU with eager attention as one Function, 0-5%: docs/train.md).
# A run whose eager steps would take this long saves more than even a cold compile costs.
COMPILE_MIN_SECONDS = 900
# the eager MFU the run-length estimate assumes (measured on CPUs: S 53-62%, M 41-55%)
EAGER_MFU = 0.5
# A CPU whose half-precision matmul runs below this fraction of its float32 matmul emulates
# half precision: AVX2 CPUs measure 0.05-0.3, AVX512-BF16 and AMX CPUs 2-4.
EMULATED_BELOW = 0.8
_KERNEL_PROBE: Decision | None = None  # kernel_beats_torch, once per process
_FP32_GEMM_PROBE: Decision | None = None  # fp32_gemm, once per process


def pinned(var: str, allowed: tuple[str, ...]) -> str:
    """The value of an environment pin ('auto' when unset); a bad value names the allowed ones."""
    value = os.environ.get(var, "auto").strip().lower() or "auto"
    if value not in allowed:
        raise ConfigError(f"{var} = {os.environ[var]!r}: allowed values are {', '.join(allowed)}")
    return value


def kernels_pin() -> str:
    """$CHIPSHIFT_CPU_KERNELS: auto (probe), on (wherever the kernel builds), off (never)."""
    return pinned(KERNELS_ENV, ("auto", "on", "off"))


def kernels_pinned_off() -> bool:
    return kernels_pin() == "off"


@dataclass(frozen=True)
class Decision:
    """One decision of the policy: its value and why."""

    value: Any
    reason: str

    def __iter__(self):  # `dtype, why = policy.compute_dtype()`
        return iter((self.value, self.reason))


class PrecisionPolicy:
    """Every half-precision decision for one device. $CHIPSHIFT_HALF is read once, when the
    policy is made (`Device.precision`, once per Device); $CHIPSHIFT_CPU_KERNELS by
    `kernels.bf16_linear_status` at each ask."""

    def __init__(self, device: "Device") -> None:
        self.device = device
        self.half_pin = pinned(HALF_ENV, ("auto", "native", "emulated"))

    # -- the probes ------------------------------------------------------------------------
    def half_native(self, dtype: torch.dtype = torch.bfloat16) -> Decision:
        """Whether `dtype` matmuls run natively (at least EMULATED_BELOW x float32 speed)."""
        if not self.device.is_cpu:
            return Decision(True, f"{self.device.type} computes half precision in its own kernels")
        if self.half_pin != "auto":
            return Decision(self.half_pin == "native", f"pinned by {HALF_ENV}={self.half_pin}")
        half, full = self.device.half_probe(dtype)
        native = half >= EMULATED_BELOW * full
        return Decision(native, f"probe: {dtype_name(dtype)} matmul {half / 1e9:.3g} GFLOP/s against float32 "
                                f"{full / 1e9:.3g} on one thread: {'native' if native else 'emulated'}, the line "
                                f"being {EMULATED_BELOW}x float32")

    def cpu_kernel(self) -> Decision:
        """Whether chipshift's native CPU bfloat16 kernel (`devices.kernels`) can be used here."""
        if not self.device.is_cpu:
            return Decision(False, f"{self.device.type} is not a CPU")
        from chipshift.devices import kernels

        missing = kernels.bf16_linear_status()
        return Decision(missing is None, missing or "chipshift's AVX2 bfloat16 kernel builds here")

    def kernel_beats_torch(self) -> Decision:
        """On a CPU with bfloat16 arithmetic: whether chipshift's kernel multiplies one row
        by bfloat16 weights (a decode step) faster than torch's GEMV; timed once per process
        (as the half probe: every engine in a process decides alike) on a 2048 x 2048 weight,
        larger than the caches. $CHIPSHIFT_CPU_KERNELS=on skips the probe."""
        if kernels_pin() == "on":
            return Decision(True, f"pinned by {KERNELS_ENV}=on")
        global _KERNEL_PROBE
        if _KERNEL_PROBE is None:
            import time

            import torch.nn.functional as F

            from chipshift.devices import kernels

            g = torch.Generator().manual_seed(0)  # leaves the global generator alone
            w = torch.randn(2048, 2048, generator=g).to(torch.bfloat16)
            x = torch.randn(1, 2048, generator=g).to(torch.bfloat16)

            def best(fn) -> float:
                fn()
                times = []
                for _ in range(15):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                return min(times)

            ratio = best(lambda: F.linear(x, w)) / best(lambda: kernels.bf16_linear(x, w))
            _KERNEL_PROBE = Decision(ratio >= 1.1, f"probe: one row through a 2048x2048 bfloat16 weight "
                                                        f"{ratio:.2f}x as fast through the kernel as torch's GEMV")
        return _KERNEL_PROBE

    def fp32_gemm(self, override: str | None = None) -> Decision:
        """Which GEMM a CPU float32 training run's linears use: "onednn"
        (`devices.kernels.onednn`) where torch's CPU kernels are AVX-512 and a timed probe finds
        it at least FP32_GEMM_LINE x as fast as torch's `mm` (MKL/OpenBLAS), else "torch". The
        probe, a guard against a CPU where oneDNN is slower, times a forward and an
        input-gradient product of a 2048 x 384 x 1024 linear (a pre-training projection), three
        of each per timed block, best of FP32_GEMM_PROBE_ROUNDS blocks per path, in turns, on the
        run's threads, once per process (about 0.4 s); `override` (run.fp32_gemm) or
        $CHIPSHIFT_FP32_GEMM pins it."""
        dev = self.device
        if not dev.is_cpu:
            return Decision("torch", f"{dev.type}: the device's own GEMM")
        if dev.emulation is not None:
            return Decision("torch", f"emulating {dev.emulation.label} on torch's own kernels")
        from chipshift.devices.kernels import onednn

        missing = onednn.available()
        if override not in (None, "auto"):
            pin, by = override, f"run.fp32_gemm = '{override}'"
        else:
            pin = pinned(FP32_GEMM_ENV, ("auto", "onednn", "torch"))
            by = f"pinned by {FP32_GEMM_ENV}={pin}"
        if pin == "torch" or (pin == "onednn" and missing is None):
            return Decision(pin, by)
        if missing is not None:
            return Decision("torch", missing)
        if "AVX512" not in (capability := torch.backends.cpu.get_cpu_capability()):
            return Decision("torch", f"torch's CPU kernels are {capability} here: oneDNN's float32 GEMM gains with "
                                     "its AVX-512 kernels (with AVX2 only it measured even with torch's)")
        global _FP32_GEMM_PROBE
        if _FP32_GEMM_PROBE is None:
            _FP32_GEMM_PROBE = _probe_fp32_gemm(onednn)
        return _FP32_GEMM_PROBE

    # -- training ----------------------------------------------------------------------------
    def compute_dtype(self, override: str | torch.dtype | None = None) -> Decision:
        """The dtype a run computes in: the user's, else the first of bfloat16, float16 that
        works and is native here (on a CPU bfloat16 only), else float32."""
        dev = self.device
        if (profile := dev.emulation) is not None:
            check_dtype(profile, override)
            return Decision(profile.dtype, f"{dtype_name(profile.dtype)} (emulating {profile.label}: "
                                           f"{profile.description})")
        if override is not None and override != "auto":
            dtype = parse_dtype(override)
            if not dev.dtype_works(dtype):
                raise DeviceError(f"dtype {dtype_name(dtype)} does not work on {dev} "
                                  f"(working: {', '.join(dev.working_dtypes())})")
            return Decision(dtype, f"{dtype_name(dtype)} (set by the user)")
        # On a CPU only bfloat16: float16 training needs loss scaling, and where a CPU has
        # float16 arithmetic but not bfloat16's (AVX512-FP16 without AMX) its float16 GEMM
        # measured anywhere from 0.66x to 1.25x float32 from one probe to the next.
        for dtype in (torch.bfloat16,) if dev.is_cpu else HALF:
            if dev.dtype_works(dtype) and (native := self.half_native(dtype)).value:
                first = "" if dev.is_cpu else f"the first of {', '.join(map(dtype_name, HALF))} that is "
                return Decision(dtype, f"{dtype_name(dtype)} ({first}native here; {native.reason})")
        if dev.is_cpu:
            return Decision(torch.float32, f"float32 (this CPU emulates half precision: "
                                           f"{self.half_native(torch.bfloat16).reason})")
        return Decision(torch.float32, "float32 (neither bfloat16 nor float16 works here)")

    def matmul_upcast(self, dtype: torch.dtype) -> Decision:
        """Whether training's `dtype` matmuls should run as float32 GEMMs on the half operands
        (`chipshift.train.precision.HalfMatmulUpcast`): where the native half GEMM is emulated."""
        if dtype not in HALF:
            return Decision(False, f"{dtype_name(dtype)} is not half precision")
        if self.device.emulation is not None:
            return Decision(False, f"emulating {self.device.emulation.label}: its GEMMs run in float32 already")
        native = self.half_native(dtype)
        if native.value:
            return Decision(False, native.reason)
        return Decision(True, f"half matmuls as float32 GEMMs on half operands ({native.reason})")

    def mfu_ceiling(self, dtype: torch.dtype, upcast: bool) -> Decision:
        """The peak FLOP/s a stage's MFU is measured against: `dtype`'s, or float32's where its
        half matmuls run as float32 GEMMs."""
        peak, source = self.device.peak_flops(torch.float32 if upcast else dtype)
        if upcast:
            source += f" ({dtype_name(dtype)} matmuls run as float32 GEMMs here)"
        return Decision(peak, source)

    def training_attention(self, dtype: torch.dtype, upcast: bool, fixed_shapes: bool = True) -> Decision:
        """The attention a training run uses where run.attn_impl = "auto": "math" (q k^T,
        softmax, times v, as batched GEMMs) for half-precision training on a CPU whose half GEMM
        is native, else "sdpa" (the device's fused kernel). On the AMD AVX512-BF16 CPU without
        AMX, torch's CPU flash-attention kernel ran at about 85 GFLOP/s in bf16, a fifth of the
        S step, and the math path's bf16 GEMMs made the S shape 1.39x transformers against
        1.16-1.18x (docs/train.md). In float32 the math path's 256 x 64 batched GEMMs ran at
        about 40 GFLOP/s on the Intel class (no gain), and accelerators' fused kernels win.
        Post-training batches (padded, masked, of varying shape) keep SDPA: the path their
        speed and memory against TRL were measured on."""
        dev = self.device
        if not fixed_shapes:
            return Decision("sdpa", "batches of varying shape (post-training): torch's fused attention")
        if not dev.is_cpu:
            return Decision("sdpa", "the device's fused attention kernel")
        if dev.emulation is not None:
            return Decision("sdpa", f"emulating {dev.emulation.label} (its function mode covers SDPA)")
        if dtype not in HALF or upcast or not (native := self.half_native(dtype)).value:
            return Decision("sdpa", f"{dtype_name(dtype)} compute{' (half emulated)' if dtype in HALF else ''}: "
                                    "torch's fused CPU attention")
        return Decision("math", f"attention as {dtype_name(dtype)} GEMMs and a softmax, faster than torch's CPU "
                                f"flash kernel ({native.reason}; run.attn_impl pins it)")

    def compile_training(self, steps: int, flops_per_step: float, dtype: torch.dtype, upcast: bool,
                         fixed_shapes: bool) -> Decision:
        """Whether a training run compiles its model's forward (`torch.compile`, inductor):
        where inductor generates kernels for the device, the batches all have one shape
        (varying shapes, as in SFT, would recompile) and the run's eager steps would take at
        least COMPILE_MIN_SECONDS (`steps` x `flops_per_step` at EAGER_MFU of the peak)."""
        dev = self.device
        if dev.emulation is not None:
            return Decision(False, f"eager: emulating {dev.emulation.label} (its function mode is not traced)")
        if not dev.backend.inductor:
            return Decision(False, f"eager: torch.compile's inductor does not generate kernels for {dev.type} "
                                   f"(run.compile = 'on' tries the backend the device's plugin sets)")
        if dev.is_cpu and not cxx_compiler():
            return Decision(False, "eager: inductor needs a C++ compiler on a CPU and none is on PATH "
                                   "($CXX, g++ or clang++)")
        if not fixed_shapes:
            return Decision(False, "eager: batches of varying shape would recompile the model")
        seconds = steps * flops_per_step / (EAGER_MFU * self.mfu_ceiling(dtype, upcast).value)
        if seconds < COMPILE_MIN_SECONDS:
            return Decision(False, f"eager: {steps} steps, about {seconds / 60:.0f} min eager, shorter than the "
                                   f"{COMPILE_MIN_SECONDS // 60} min that pay back compiling (up to 90 s)")
        return Decision(True, f"compiled with inductor: {steps} steps, about {seconds / 60:.0f} min eager, pay "
                              f"back compiling (10-90 s once, then up to 20% faster steps)")

    # -- inference ---------------------------------------------------------------------------
    def serving_dtype(self, override: str | None = None, compiled: bool = False) -> Decision:
        """The dtype to hold weights in for inference: bfloat16 on a CPU where chipshift's
        native kernels run bfloat16 decode steps (`inference_twin`; not under compile, which
        runs torch's own kernels): decoding streams every weight once per token, and there
        bfloat16 halves float32's bytes and skips torch's per-operator overhead, whatever
        the CPU's half arithmetic (float16 may be the native compute dtype, as on AVX512-FP16
        CPUs without AMX). Elsewhere as `compute_dtype`."""
        choice = self.compute_dtype(override)
        if self.device.emulation is not None and compiled:
            raise refuse(self.device.emulation, "a compiled decode step", "emulation runs eager")
        if (override is not None and override != "auto") or compiled or not self.device.is_cpu \
                or self.device.emulation is not None \
                or not self.device.dtype_works(torch.bfloat16):
            return choice
        twin = self.inference_twin(torch.bfloat16)
        if twin.value:
            return Decision(torch.bfloat16, f"bfloat16 (decoding streams every weight once per token: half the bytes "
                                            f"of float32, through chipshift's native kernels: {twin.reason})")
        if choice.value == torch.float32 and not (kernel := self.cpu_kernel()).value:
            return Decision(torch.float32, f"{choice.reason}; no native kernel for bfloat16 weights: {kernel.reason}")
        return choice

    def inference_twin(self, dtype: torch.dtype, quantized: bool = False) -> Decision:
        """Whether inference in `dtype` runs a twin of the model through chipshift's CPU kernel:
        bfloat16 weights on a CPU that emulates bfloat16, where the kernel can be used; on a
        CPU with bfloat16 arithmetic, for decode-sized inputs only, where the kernel measures
        faster than torch (`kernel_beats_torch`), or where the model holds `quantized` blocks
        (which torch would dequantize at every call)."""
        if (profile := self.device.emulation) is not None:
            if quantized:
                raise refuse(profile, "a model of quantized blocks", "they run on chipshift's own integer kernels, "
                                      "which have no emulated arithmetic")
            return Decision(False, f"emulating {profile.label} on torch's own kernels")
        if dtype != torch.bfloat16 or not self.device.is_cpu:
            return Decision(False, f"{dtype_name(dtype)} on {self.device.type} runs on torch's own kernels")
        native = self.half_native(dtype)
        kernel = self.cpu_kernel()
        if not kernel.value:
            return Decision(False, f"torch's {'native' if native.value else 'emulated'} bfloat16 kernels "
                                   f"(no native kernel: {kernel.reason})")
        if quantized and native.value:
            return Decision(True, "quantized blocks through chipshift's integer kernels; decode steps (up to 8 "
                                  "rows) through its AVX2 kernel, longer inputs on torch's native bfloat16 kernels")
        if not native.value:
            return Decision(True, "bfloat16 weights through chipshift's AVX2 kernel (this CPU has no bfloat16 "
                                  "arithmetic; float32 accumulation; KV cache in float32)")
        faster = self.kernel_beats_torch()
        if not faster.value:
            return Decision(False, f"native bfloat16: torch's own kernels ({faster.reason})")
        return Decision(True, "decode steps (up to 8 rows) through chipshift's AVX2 kernel, longer inputs and "
                              f"attention on torch's native bfloat16 kernels ({faster.reason})")

    def for_inference(self, model: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.nn.Module, str | None]:
        """The model to run inference with in `dtype`, and what changed (None: nothing): the
        kernel twin of `inference_twin` (sharing the model's weights), or the model itself."""
        twin = self.inference_twin(dtype, quantized=_is_quantized(model))
        if not twin.value:
            return model, (twin.reason if dtype == torch.bfloat16 and self.device.is_cpu
                           and not self.half_native(dtype).value else None)
        from chipshift.devices import kernels

        return kernels.for_inference(model, native_half=self.half_native(dtype).value), twin.reason

    def decode_step(self, model: torch.nn.Module, cache: Any) -> Decision:
        """Where the inference twin runs: chipshift's native decode step for the engine
        (`kernels.DecodeStep`, the model's whole step in one call, none of PyTorch's
        per-operator overhead), for up to as many rows as the twin sends through the kernel,
        and prompts of up to `kernels.prefill_max_rows` tokens (more than that where bfloat16
        is native without AMX). Its value is None elsewhere, and the engine decodes through the model."""
        dtype = model.dtype
        twin = self.inference_twin(dtype, quantized=_is_quantized(model))
        if not twin.value:
            return Decision(None, twin.reason)
        from chipshift.devices import cpu_flags, kernels

        native = self.half_native(dtype).value
        try:
            step = kernels.DecodeStep(model, cache, kernels.twin_max_rows(native),
                                      kernels.prefill_max_rows(native, amx="amx_bf16" in cpu_flags()))
        except kernels.Unavailable as exc:
            return Decision(None, f"decode through the model (no native decode step: {exc})")
        return Decision(step, f"decode steps of up to {step.max_rows} rows (prompts of up to "
                              f"{step.max_prefill} tokens) in one native call")

    # -- the whole table ---------------------------------------------------------------------
    def report(self) -> dict[str, dict]:
        """Every decision with its value and reason, for `chipshift devices` and run logs."""
        compute = self.compute_dtype()
        serving = self.serving_dtype()
        rows = {
            **({"emulation": Decision(self.device.emulation.label, self.device.emulation.description)}
               if self.device.emulation is not None else {}),
            "half_native": self.half_native(),
            "compute_dtype": compute,
            "matmul_upcast": self.matmul_upcast(torch.bfloat16),
            "fp32_gemm": self.fp32_gemm(),
            "cpu_kernel": self.cpu_kernel(),
            "serving_dtype": serving,
            "inference_twin": self.inference_twin(serving.value),
        }
        return {k: {"value": dtype_name(d.value) if isinstance(d.value, torch.dtype) else d.value, "reason": d.reason}
                for k, d in rows.items()}


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on a CPU ($CXX, else g++ or clang++), or None."""
    import shutil

    for name in (os.environ.get("CXX"), "g++", "clang++"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _is_quantized(model: torch.nn.Module) -> bool:
    """Whether a model holds quantized blocks (chipshift.model.quant's layers: a format name
    and a uint8 weight; the device layer sits below the model's and knows them so)."""
    from chipshift.devices.kernels.quant import FORMATS

    return any(getattr(m, "fmt", None) in FORMATS and getattr(m, "weight", None) is not None
               and m.weight.dtype == torch.uint8 for m in model.modules())


def _probe_fp32_gemm(onednn) -> Decision:
    from chipshift.devices import best_in_turns

    g = torch.Generator().manual_seed(0)  # leaves the global generator alone
    x, w, dy = (torch.randn(shape, generator=g) for shape in ((2048, 384), (1024, 384), (2048, 1024)))
    # bursts of 3 forward + input-gradient pairs per path, in turns: single calls timed one by
    # one, interleaved, favoured oneDNN even where its training step measured slower (AVX2)
    paths = {"torch": (lambda: x @ w.T, lambda: dy @ w),
             "onednn": (lambda: onednn.mm_nt(x, w), lambda: onednn.mm_nn(dy, w))}
    bursts = [lambda fns=fns: [f() for _ in range(3) for f in fns] for fns in paths.values()]
    best = dict(zip(paths, best_in_turns(bursts, FP32_GEMM_PROBE_ROUNDS)))
    ratio = best["torch"] / best["onednn"]
    value = "onednn" if ratio >= FP32_GEMM_LINE else "torch"
    return Decision(value, f"probe: a float32 linear's forward and input gradient {ratio:.2f}x as fast through "
                           f"oneDNN as through torch's mm, the line being {FP32_GEMM_LINE}x")
