"""The device layer: the only device-aware code in chipshift.

Ask it which device to use (`get_device`), what dtypes work there (probed with a tiny
matmul, not read from a table), which collective backend `torch.distributed` should
use, how to synchronize, seed and read memory, and what the chip's peak FLOP/s is.

    dev = get_device("auto")          # or "cpu", "cuda:1", "npu", ... or $CHIPSHIFT_DEVICE
    dev.precision.compute_dtype()     # bfloat16 where it is native, else float16, else float32
    dev.precision.report()            # every half-precision decision and why (devices/policy.py)
    dev.collective                    # "gloo", "nccl", "hccl", ...
    dev.peak_flops("bfloat16")        # from the chip catalogue, or a measured CPU probe

    dev = get_device("cpu", emulate="ascend-910a")   # another chip's arithmetic (emulate.py)
    with dev.numerics(): ...          # a stage's forward and backward under it
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass, field
from functools import cached_property

import torch

from chipshift.devices.backends import (
    BACKENDS,
    Backend,
    detect,
    get_backend,
    import_plugin,
    is_available,
    known_types,
    torch_namespace,
)
from chipshift.devices.catalogue import Chip, get_chip, load_catalogue, match_chip
from chipshift.devices.dtypes import DTYPES, HALF, dtype_name, parse_dtype
from chipshift.devices.emulate import Profile, numerics, resolve
from chipshift.devices.policy import EMULATED_BELOW, Decision, PrecisionPolicy
from chipshift.errors import ConfigError, DeviceError

__all__ = [
    "BACKENDS", "Backend", "Chip", "Decision", "Device", "DTYPES", "PrecisionPolicy", "get_device", "get_chip",
    "load_catalogue", "match_chip", "known_types", "parse_dtype", "device_report", "cpu_class", "cpu_flags",
    "machine_facts", "Profile",
]

ENV_VAR = "CHIPSHIFT_DEVICE"

def _cpu_rss_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_INT_MAX = (1 << 31) - 1


def return_freed_host_memory(threshold: int = 1 << 20) -> bool:
    """Have glibc give every host allocation of at least `threshold` bytes its own mapping,
    returned to the OS when freed. By default glibc raises that threshold to the size of
    the largest block freed so far (up to 32 MiB), after which a training step's
    activations come from the heap, whose freed pages it keeps: on a CPU, where host memory
    is the training memory, peak RSS then grows step after step when batch shapes vary
    (measured: SmolLM2-135M DPO, 3.27 GiB with glibc's default, 2.82 GiB with this). Every
    fresh mapping costs page faults, though, so the trainer asks for this only for
    variable-shape batches (fixed shapes: `keep_freed_host_memory`). The heap's top is
    trimmed past 64 MiB, glibc's own setting once its threshold has slid to the top. Memory
    the heap holds free at the call is returned too. $CHIPSHIFT_MMAP_THRESHOLD overrides the
    threshold (0: leave glibc alone). False where the C library is not glibc."""
    return _set_malloc_thresholds(threshold, 64 << 20)


def keep_freed_host_memory() -> bool:
    """Have glibc serve every host allocation from its heap and keep the heap's freed pages:
    for fixed-shape training on a CPU, where each step frees and allocates the same
    blocks. With glibc's defaults, blocks above its sliding threshold (32 MiB at most) get
    fresh mappings and the heap's top is trimmed, so every step page-faults its large
    activations in anew: 37,700 faults (150 MiB) per step of the S shape, 116,000 of M.
    Kept, the second step on faults nothing and the resident peak is the same (S bf16 on
    the AMD AVX512-BF16 class: 0.78 s -> 0.65 s a step, 989 -> 985 MiB). Memory the heap
    holds free at the call is returned first. $CHIPSHIFT_MMAP_THRESHOLD pins a threshold
    instead (0: leave glibc alone). False where the C library is not glibc."""
    return _set_malloc_thresholds(_INT_MAX, _INT_MAX)


def _set_malloc_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    value = os.environ.get("CHIPSHIFT_MMAP_THRESHOLD")
    if value is not None:
        try:
            mmap_threshold = int(value)
        except ValueError:
            raise ConfigError(f"CHIPSHIFT_MMAP_THRESHOLD = {value!r}: expected a whole number of bytes "
                              "(0 leaves glibc's malloc alone)") from None
        trim_threshold = min(2 * mmap_threshold, _INT_MAX)  # glibc's own pairing
    if mmap_threshold <= 0:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)  # what the heap holds free now (say, a loaded checkpoint's copy) goes back
        # fixing either ends glibc's sliding of both
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, _INT_MAX))) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_class() -> str:
    """The CPU class a speed figure holds for. Machines of one kind differ in it: AVX2-only
    CPUs emulate bfloat16 (slower than float32), AVX512-BF16 and AMX CPUs compute it natively
    (faster than float32), and chipshift's fast paths differ between them."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "AVX512-BF16+AMX" if "avx512_bf16" in flags else "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    if "avx2" in flags:
        return "AVX2"
    return os.uname().machine


def machine_facts() -> dict:
    """What a benchmark's JSON names the machine by: CPU model and class, cores, torch."""
    return {"cpu": Device("cpu").name, "cpu_class": cpu_class(), "cores": os.cpu_count(),
            "torch": torch.__version__}


_CPU_PEAK_CACHE: dict[str, float] = {}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024,
                         seconds: float = 0.3, sync=lambda: None, matmul=None) -> float:
    """Measured FLOP/s of an n x n matmul on `device` in `dtype` (best of a short run):
    torch.matmul, or `matmul(a, b)` (another library's product of two n x n matrices)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    product = (lambda: torch.matmul(a, b, out=out)) if matmul is None else (lambda: matmul(a, b))
    product()
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:  # one timed block at least
        t0 = time.perf_counter()
        for _ in range(4):
            product()
        sync()
        dt = time.perf_counter() - t0
        best = max(best, 4 * 2 * n**3 / dt)
        if time.perf_counter() >= deadline:
            return best


def cpu_fp32_onednn_flops(n: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of oneDNN's float32 n x n GEMM on the CPU (0 where this torch has none): part of
    the float32 ceiling wherever training may route its linears there (`kernels.onednn`)."""
    from chipshift.devices.kernels import onednn

    if onednn.available() is not None:
        return 0.0
    return measure_matmul_flops(torch.device("cpu"), torch.float32, n=n, seconds=seconds, matmul=onednn.mm_nt)


_HALF_PROBE_CACHE: dict[str, tuple[float, float]] = {}


def best_in_turns(bursts, rounds: int, sync=lambda: None) -> list[float]:
    """The shortest time of each burst (a callable) over `rounds`, timed in turns (one of each
    per round), so that every burst meets the same slow phases of a shared machine."""
    best = [float("inf")] * len(bursts)
    for _ in range(rounds):
        for i, burst in enumerate(bursts):
            t0 = time.perf_counter()
            burst()
            sync()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def compare_matmul_flops(device: torch.device, dtypes: tuple[torch.dtype, ...], n: int = 256, rounds: int = 6,
                         sync=lambda: None) -> list[float]:
    """Best FLOP/s of an n x n matmul in each of `dtypes`, measured in turns (`best_in_turns`,
    a burst of two products each)."""
    mats = [(torch.randn(n, n, device=device).to(d), torch.randn(n, n, device=device).to(d)) for d in dtypes]
    outs = [torch.matmul(a, b) for a, b in mats]
    sync()

    def burst(a, b, out):
        return lambda: [torch.matmul(a, b, out=out) for _ in range(2)]

    times = best_in_turns([burst(a, b, out) for (a, b), out in zip(mats, outs)], rounds, sync)
    return [2 * 2 * n**3 / t for t in times]


@dataclass
class Device:
    """One selected device and everything chipshift asks of it."""

    type: str
    index: int | None = None
    emulation: Profile | None = None  # another chip's arithmetic, emulated (`emulate`)
    backend: Backend = field(init=False)

    def __post_init__(self) -> None:
        self.backend = get_backend(self.type)

    # -- identity ----------------------------------------------------------------------
    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type if self.index is None else f"{self.type}:{self.index}")

    def __str__(self) -> str:
        return str(self.torch_device)

    def numerics(self):
        """The context a stage's forward and backward run in: the emulated profile's
        arithmetic (`emulate.Emulation`), or the device's own (a no-op)."""
        return numerics(self.emulation)

    @property
    def is_cpu(self) -> bool:
        return self.type == "cpu"

    @property
    def collective(self) -> str:
        return self.backend.collective

    @property
    def ns(self):
        return torch_namespace(self.type)

    @cached_property
    def name(self) -> str:
        if self.is_cpu:
            try:
                with open("/proc/cpuinfo") as f:
                    for line in f:
                        if line.startswith("model name"):
                            return line.split(":", 1)[1].strip()
            except OSError:
                pass
            return "CPU"
        return str(self.ns.get_device_name(self.index or 0))

    @property
    def count(self) -> int:
        if self.is_cpu:
            return 1
        return int(self.ns.device_count())

    @cached_property
    def chip(self) -> Chip | None:
        return None if self.is_cpu else match_chip(self.name, self.type)

    # -- control -----------------------------------------------------------------------
    def synchronize(self) -> None:
        if not self.is_cpu:
            self.ns.synchronize()

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)  # seeds the CPU and every registered accelerator
        if not self.is_cpu and hasattr(self.ns, "manual_seed_all"):
            self.ns.manual_seed_all(seed)

    def get_rng_state(self) -> torch.Tensor | None:
        """The accelerator generator's state (a CPU byte tensor), for exact resumes; None on
        the CPU (`torch.get_rng_state` holds it) or where the backend exposes none."""
        if self.is_cpu or not hasattr(self.ns, "get_rng_state"):
            return None
        return self.ns.get_rng_state(self.index or 0)

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore what `get_rng_state` returned (a no-op where that was None)."""
        if not self.is_cpu and hasattr(self.ns, "set_rng_state"):
            self.ns.set_rng_state(state.cpu(), self.index or 0)

    def set_current(self) -> None:
        if not self.is_cpu and self.index is not None:
            self.ns.set_device(self.index)

    # -- memory ------------------------------------------------------------------------
    def total_memory(self) -> int:
        if self.is_cpu:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return int(self.ns.get_device_properties(self.index or 0).total_memory)

    def memory_allocated(self) -> int:
        """Bytes in use: the process's resident set on the CPU, the allocator's count elsewhere."""
        if self.is_cpu:
            return _cpu_rss_bytes("VmRSS")
        return int(self.ns.memory_allocated(self.index or 0))

    def max_memory_allocated(self) -> int:
        if self.is_cpu:
            return _cpu_rss_bytes("VmHWM")
        return int(self.ns.max_memory_allocated(self.index or 0))

    def reset_peak_memory(self) -> None:
        if self.is_cpu:
            try:  # writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            return
        self.ns.reset_peak_memory_stats(self.index or 0)

    def empty_cache(self) -> None:
        if not self.is_cpu and hasattr(self.ns, "empty_cache"):
            self.ns.empty_cache()

    # -- numerics ----------------------------------------------------------------------
    def dtype_works(self, dtype: torch.dtype) -> bool:
        """Probe: a tiny matmul in `dtype` must run and agree with float32."""
        cache = self.__dict__.setdefault("_dtype_probe", {})
        if dtype not in cache:
            try:
                g = torch.Generator().manual_seed(0)
                a = torch.randn(16, 16, generator=g)
                b = torch.randn(16, 16, generator=g)
                want = a @ b
                got = (a.to(self.torch_device, dtype) @ b.to(self.torch_device, dtype)).float().cpu()
                tol = {torch.bfloat16: 0.15, torch.float16: 0.02}.get(dtype, 1e-3)
                cache[dtype] = bool(torch.isfinite(got).all()) and bool(
                    (got - want).abs().max() <= tol * want.abs().max()
                )
            except Exception:
                cache[dtype] = False
        return cache[dtype]

    def working_dtypes(self) -> list[str]:
        return [dtype_name(d) for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
                if self.dtype_works(d)]

    @cached_property
    def precision(self) -> PrecisionPolicy:
        """Every half-precision decision on this device, with its reason (`policy`)."""
        return PrecisionPolicy(self)

    @property
    def fused_adamw(self) -> bool:
        return self.backend.fused_adamw

    def half_probe(self, dtype: torch.dtype) -> tuple[float, float]:
        """(`dtype`'s, float32's) matmul FLOP/s on one thread, measured in turns: the ratio is
        what a core's arithmetic gives, and one thread keeps it steady on a busy machine
        (two threads measured bfloat16 at 0.45-1.14x float32 from one probe to the next on
        an AVX512-BF16 CPU without AMX, one thread 0.49-0.60x). Once per process."""
        key = f"{self}:{dtype}"
        if key not in _HALF_PROBE_CACHE:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                half, full = compare_matmul_flops(self.torch_device, (dtype, torch.float32), sync=self.synchronize)
            finally:
                torch.set_num_threads(threads)
            _HALF_PROBE_CACHE[key] = (half, full)
        return _HALF_PROBE_CACHE[key]

    def peak_flops(self, dtype: torch.dtype | str = torch.bfloat16) -> tuple[float, str]:
        """Peak FLOP/s and where the figure comes from (catalogue or a measured probe)."""
        dtype = parse_dtype(dtype)
        if self.chip is not None:
            return self.chip.peak_flops(dtype_name(dtype)), f"catalogue: {self.chip.key} ({self.chip.status})"
        key = f"{self}:{dtype}:{torch.get_num_threads()}"
        onednn_too = self.is_cpu and dtype == torch.float32  # oneDNN's GEMM, where faster (kernels.onednn)
        if key not in _CPU_PEAK_CACHE:
            half = dtype in HALF
            n = (256 if half else 1024) if self.is_cpu else 4096  # emulated half is slow: start small
            flops = measure_matmul_flops(self.torch_device, dtype, n=n, sync=self.synchronize)
            if self.is_cpu and half and flops >= EMULATED_BELOW * self.peak_flops(torch.float32)[0]:
                # native half (AVX512-BF16, AMX): 256 x 256 leaves it below its ceiling (AMX
                # bf16 measured 0.9 against 1.4 TFLOP/s at 1024), which would overstate MFU
                flops = max(flops, measure_matmul_flops(self.torch_device, dtype, n=1024, sync=self.synchronize))
            if onednn_too:
                flops = max(flops, cpu_fp32_onednn_flops(n, seconds=0.15))
            _CPU_PEAK_CACHE[key] = flops
        both = " (torch's and oneDNN's GEMMs, the faster)" if onednn_too else ""
        return _CPU_PEAK_CACHE[key], f"measured: {dtype_name(dtype)} matmul probe{both}"


def get_device(spec: str | None = None, emulate: str | None = None) -> Device:
    """Resolve `--device` / $CHIPSHIFT_DEVICE / auto-detection to a usable Device.

    `spec` is a device type with an optional index ("npu", "cuda:1") or "auto"; `emulate`
    a numerics profile or chip (`--emulate`, numerics.toml) whose arithmetic the device
    computes with; empty or None: its own.
    """
    profile = resolve(emulate) if emulate else None  # an unknown name fails before any probe
    spec = spec or os.environ.get(ENV_VAR) or "auto"
    if spec == "auto":
        spec = detect()
    dev_type, _, idx = spec.partition(":")
    backend = get_backend(dev_type)  # unknown name -> error listing the known ones
    if idx and not idx.isdigit():
        raise DeviceError(f"bad device {spec!r}: the index after ':' must be a number")
    import_plugin(backend)  # missing plugin -> error naming the package
    if not is_available(dev_type):
        raise DeviceError(f"device {dev_type!r} ({backend.vendors}) is not available on this machine "
                          f"(torch {torch.__version__})")
    index = int(idx) if idx else None
    if index is None and dev_type != "cpu" and "LOCAL_RANK" in os.environ:
        index = int(os.environ["LOCAL_RANK"]) % max(1, int(torch_namespace(dev_type).device_count()))
    dev = Device(dev_type, index, profile)
    if index is not None and dev_type != "cpu" and index >= dev.count:
        raise DeviceError(f"device {spec!r} does not exist: {dev.count} {dev_type} device(s) present")
    return dev


def device_report(dev: Device) -> dict:
    """What `chipshift devices` prints for one device type."""
    peak, peak_source = dev.peak_flops(dev.precision.compute_dtype().value)
    return {
        "type": dev.type,
        "name": dev.name,
        **({"cpu_class": cpu_class()} if dev.is_cpu else {}),
        "count": dev.count,
        "memory_gb": round(dev.total_memory() / 1e9, 1),
        "working_dtypes": dev.working_dtypes(),
        "collective": dev.collective,
        "catalogue": dev.chip.key if dev.chip else None,
        "peak_tflops": round(peak / 1e12, 3),
        "peak_source": peak_source,
        "precision": dev.precision.report(),
    }
