"""Device registry: selection, simulated vendor backends, errors, catalogue lookups."""

import importlib
import os
import platform
import subprocess
import sys
import types

import pytest
import torch

import chipshift.devices as devices
from chipshift.devices import get_device, known_types, match_chip, parse_dtype
from chipshift.devices.backends import BACKENDS, detect, is_available
from chipshift.devices.catalogue import get_chip, load_catalogue
from chipshift.errors import ChipshiftError, DeviceError

VENDOR_CASES = [
    # device type, plugin module (None: built into torch), name the device reports, catalogue key, collective
    ("npu", "torch_npu", "Ascend910B3", "ascend-910b", "hccl"),
    ("mlu", "torch_mlu", "MLU370-X8", "mlu370-x8", "cncl"),
    ("musa", "torch_musa", "MTT S4000", "mtt-s4000", "mccl"),
    ("xpu", None, "Intel(R) Data Center GPU Max 1550", None, "xccl"),
]


def fake_namespace(name: str, count: int = 2):
    """What a vendor plugin registers as torch.<type>: enough for the device layer."""
    calls = []
    ns = types.SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: count,
        get_device_name=lambda i=0: name,
        synchronize=lambda *a: calls.append("synchronize"),
        manual_seed_all=lambda s: calls.append(("seed", s)),
        memory_allocated=lambda i=0: 123,
        max_memory_allocated=lambda i=0: 456,
        get_device_properties=lambda i=0: types.SimpleNamespace(total_memory=64 * 2**30),
        _is_in_bad_fork=lambda: True,  # torch.manual_seed asks torch.xpu this; True skips its own seeding
    )
    ns.calls = calls
    return ns


@pytest.fixture
def simulate(monkeypatch):
    """Make a backend look present: its plugin imports and torch.<type> answers."""

    def _simulate(dev_type, plugin, name):
        real_import = importlib.import_module

        def fake_import(mod, *a, **k):
            if plugin is not None and mod == plugin:
                return types.ModuleType(plugin)
            return real_import(mod, *a, **k)

        monkeypatch.setattr(importlib, "import_module", fake_import)
        ns = fake_namespace(name)
        monkeypatch.setattr(torch, dev_type, ns, raising=False)
        return ns

    return _simulate


@pytest.mark.parametrize("dev_type,plugin,name,chip,collective", VENDOR_CASES)
def test_simulated_vendor_backend(simulate, dev_type, plugin, name, chip, collective):
    ns = simulate(dev_type, plugin, name)
    assert is_available(dev_type)
    dev = get_device(f"{dev_type}:1")
    # (torch.device("npu") itself exists only once the real plugin has renamed PrivateUse1)
    assert (dev.type, dev.index) == (dev_type, 1)
    assert dev.collective == collective
    assert dev.count == 2
    assert dev.name == name
    assert (dev.chip.key if dev.chip else None) == chip
    dev.synchronize()
    dev.manual_seed(7)
    assert ns.calls == ["synchronize", ("seed", 7)]
    assert dev.memory_allocated() == 123 and dev.max_memory_allocated() == 456
    assert dev.total_memory() == 64 * 2**30
    if chip:
        assert dev.peak_flops("bfloat16") == (get_chip(chip).tflops_bf16 * 1e12,
                                              f"catalogue: {chip} ({get_chip(chip).status})")


def test_simulated_backend_index_out_of_range(simulate):
    simulate("npu", "torch_npu", "Ascend910B3")
    with pytest.raises(DeviceError, match="2 npu device"):
        get_device("npu:5")


def test_accelerator_rng_state(simulate):
    ns = simulate("npu", "torch_npu", "Ascend910B3")
    assert get_device("npu:1").get_rng_state() is None  # a backend without the calls
    states = {1: torch.tensor([1, 2, 3], dtype=torch.uint8)}
    ns.get_rng_state = lambda index=0: states[index].clone()
    ns.set_rng_state = lambda state, index=0: states.__setitem__(index, state)
    dev = get_device("npu:1")
    assert dev.get_rng_state().tolist() == [1, 2, 3]
    dev.set_rng_state(torch.tensor([9], dtype=torch.uint8))
    assert states[1].tolist() == [9]
    cpu = get_device("cpu")  # the CPU generator is torch.get_rng_state's: nothing here
    before = torch.get_rng_state()
    cpu.set_rng_state(torch.tensor([7], dtype=torch.uint8))
    assert cpu.get_rng_state() is None and torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("dev_type,plugin,package", [(t, b.plugin_module, b.plugin_package)
                                                     for t, b in BACKENDS.items() if b.plugin_module])
def test_missing_plugin_names_the_package(monkeypatch, dev_type, plugin, package):
    real_import = importlib.import_module

    def fake_import(mod, *a, **k):
        if mod == plugin:
            raise ModuleNotFoundError(f"No module named {mod!r}")
        return real_import(mod, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(DeviceError) as err:
        get_device(dev_type)
    assert plugin in str(err.value) and package in str(err.value)
    assert not is_available(dev_type)


def test_unknown_device_lists_known_ones():
    with pytest.raises(DeviceError) as err:
        get_device("tpu")
    for name in ("cpu", "cuda", "npu", "mlu", "xpu", "musa", "mps"):
        assert name in str(err.value)
    assert set(known_types()) == {"cpu", "cuda", "npu", "mlu", "xpu", "musa", "mps"}


def test_bad_index_is_refused():
    with pytest.raises(DeviceError, match="index"):
        get_device("cpu:x")


def test_env_var_selects_the_device(monkeypatch, simulate):
    simulate("mlu", "torch_mlu", "MLU370-X8")
    monkeypatch.setenv("CHIPSHIFT_DEVICE", "mlu")
    assert get_device().type == "mlu"
    assert get_device("cpu").type == "cpu"  # an explicit --device wins over the variable
    monkeypatch.setenv("CHIPSHIFT_DEVICE", "cpu")
    assert get_device().type == "cpu"


def test_auto_detection_uses_torch_accelerator(monkeypatch, simulate):
    simulate("musa", "torch_musa", "MTT S4000")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: types.SimpleNamespace(type="musa"))
    assert detect() == "musa"
    monkeypatch.delenv("CHIPSHIFT_DEVICE", raising=False)
    assert get_device("auto").type == "musa"


def test_auto_detection_falls_back_to_cpu(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.delenv("CHIPSHIFT_DEVICE", raising=False)
    assert get_device().type == "cpu"


def test_cpu_device_basics():
    dev = get_device("cpu")
    assert dev.collective == "gloo" and dev.count == 1 and dev.chip is None
    assert dev.dtype_works(torch.float32)
    assert "float32" in dev.working_dtypes()
    assert dev.memory_allocated() > 0 and dev.total_memory() > dev.memory_allocated()
    dtype, why = dev.precision.compute_dtype("float32")
    assert dtype == torch.float32 and "user" in why
    flops, source = dev.peak_flops("float32")
    assert flops > 1e8 and source.startswith("measured")


def test_a_dtype_that_fails_its_probe_is_refused(monkeypatch):
    dev = get_device("cpu")
    monkeypatch.setattr(dev, "dtype_works", lambda d: d == torch.float32)
    with pytest.raises(DeviceError, match="float16 does not work"):
        dev.precision.compute_dtype("float16")


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16
    with pytest.raises(DeviceError, match="allowed"):
        parse_dtype("int3")


@pytest.mark.parametrize("reported,dev_type,key", [
    ("NVIDIA H100 80GB HBM3", "cuda", "h100-sxm"),
    ("NVIDIA H200", "cuda", "h200"),
    ("NVIDIA H20", "cuda", "h20"),
    ("NVIDIA H800", "cuda", "h800"),
    ("NVIDIA A100-SXM4-80GB", "cuda", "a100"),
    ("NVIDIA B200", "cuda", "b200"),
    ("AMD Instinct MI300X", "cuda", "mi300x"),
    ("Ascend910B2", "npu", "ascend-910b"),
    ("Ascend910_9392", "npu", "ascend-910c"),
    ("MLU370-X8", "mlu", "mlu370-x8"),
    ("MTT S4000", "musa", "mtt-s4000"),
])
def test_catalogue_matches_reported_names(reported, dev_type, key):
    assert match_chip(reported, dev_type).key == key


def test_catalogue_no_match_and_type_filter():
    assert match_chip("NVIDIA GeForce GTX 1080", "cuda") is None
    assert match_chip("Ascend910B2", "cuda") is None  # the device type must agree


def test_catalogue_entries_are_sourced():
    chips = load_catalogue()
    for key in ("h100-sxm", "h200", "h800", "h20", "a100", "b200", "mi300x", "ascend-910b", "ascend-910c",
                "mlu370-x8", "mtt-s4000"):
        chip = chips[key]
        assert chip.tflops_bf16 > 0 and chip.memory_gb > 0 and chip.bandwidth_tbs > 0
        assert chip.status in ("official", "estimate") and chip.source
    with pytest.raises(ChipshiftError, match="known chips"):
        get_chip("tpu-v9")


def test_device_report_is_complete():
    row = devices.device_report(get_device("cpu"))
    assert set(row) >= {"type", "name", "count", "memory_gb", "working_dtypes", "collective", "catalogue",
                        "peak_tflops", "peak_source"}


def test_a_bad_mmap_threshold_is_named(monkeypatch):
    monkeypatch.setenv("CHIPSHIFT_MMAP_THRESHOLD", "1MB")
    with pytest.raises(ChipshiftError, match="CHIPSHIFT_MMAP_THRESHOLD = '1MB': expected a whole number"):
        devices.return_freed_host_memory()
    monkeypatch.setenv("CHIPSHIFT_MMAP_THRESHOLD", "0")
    assert devices.return_freed_host_memory() is False  # 0: glibc left alone
    assert devices.keep_freed_host_memory() is False


_FAULTS_ON_REUSE = """
import resource, sys, torch
from chipshift import devices
setting = sys.argv[1]
if setting != "default":
    assert getattr(devices, setting)() is True
def step():  # a fixed-shape training step's large blocks: allocated, written, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.empty(n).fill_(1.0) for n in (16 << 20, 10 << 20, 4 << 20)]  # 64, 40, 16 MiB
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
def rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) >> 10
for _ in range(12):  # glibc settles (its small per-thread caches fill)
    step()
settled = rss()
faults = [step() for _ in range(8)]
print(max(faults), rss() - settled)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/stat") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc on Linux")
@pytest.mark.any_class
@pytest.mark.parametrize("setting, reused", [("default", False), ("keep_freed_host_memory", True),
                                             ("return_freed_host_memory", False)])
def test_host_memory_settings_decide_whether_freed_pages_are_reused(setting, reused):
    """A step's 120 MiB of blocks page-fault (30,720 pages) anew each step with glibc's defaults
    and with freed memory returned; from a kept heap they reuse the last step's pages, and the
    resident set stays where it settled."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHIPSHIFT_MMAP", "MALLOC_", "GLIBC_TUNABLES"))}
    done = subprocess.run([sys.executable, "-c", _FAULTS_ON_REUSE, setting], env=env, capture_output=True,
                          text=True, check=True)
    faults, growth_mib = map(int, done.stdout.split())
    if reused:
        assert faults < 500 and growth_mib <= 1, (faults, growth_mib)
    else:
        assert faults > 15000, faults
