"""The registry of device backends: the only place that knows vendor device strings,
plugin modules and collective backends.

Every backend is driven through the same small set of operations (`torch.accelerator`
where it answers, the backend's own `torch.<type>` namespace otherwise), so the rest of
chipshift never branches on a vendor.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from chipshift.errors import DeviceError


@dataclass(frozen=True)
class Backend:
    """What chipshift must know about one kind of device."""

    type: str  # the torch device type string
    vendors: str  # who makes chips that appear under this type
    plugin_module: str | None  # module to import before the device type exists
    plugin_package: str | None  # what to install when that import fails
    collective: str  # torch.distributed backend for this device
    fused_adamw: bool  # whether torch's fused AdamW kernel exists for it
    # whether torch.compile's default backend (inductor) generates kernels for it; vendor
    # plugins that bring their own graph compiler are left to `run.compile = "on"`
    inductor: bool = False
    notes: str = ""


BACKENDS: dict[str, Backend] = {
    b.type: b
    for b in (
        Backend("cpu", "any x86-64 / Arm CPU", None, None, "gloo", True, inductor=True),
        Backend(
            "cuda",
            "NVIDIA; AMD and Hygon DCU through ROCm/HIP builds of PyTorch",
            None,
            "a CUDA or ROCm build of torch (https://pytorch.org/get-started/locally/)",
            "nccl",  # ROCm builds map nccl onto RCCL
            True,
            inductor=True,
        ),
        Backend("npu", "Huawei Ascend", "torch_npu", "torch-npu (Ascend Extension for PyTorch)", "hccl", False),
        Backend("mlu", "Cambricon", "torch_mlu", "torch_mlu (Cambricon PyTorch extension)", "cncl", False),
        Backend("xpu", "Intel GPUs", None, "an XPU build of torch (https://pytorch.org/get-started/locally/)",
                "xccl", True, inductor=True),
        Backend("musa", "Moore Threads", "torch_musa", "torch_musa (Moore Threads PyTorch extension)", "mccl", False),
        Backend("mps", "Apple silicon", None, "torch for macOS on Apple silicon", "gloo", True),
    )
}


def known_types() -> list[str]:
    return list(BACKENDS)


def get_backend(device_type: str) -> Backend:
    try:
        return BACKENDS[device_type]
    except KeyError:
        raise DeviceError(
            f"unknown device {device_type!r}; known devices: {', '.join(BACKENDS)}"
        ) from None


def import_plugin(backend: Backend) -> None:
    """Import the vendor plugin that registers the device type with torch, if any."""
    if backend.plugin_module is None:
        return
    try:
        importlib.import_module(backend.plugin_module)
    except ImportError as exc:
        raise DeviceError(
            f"device {backend.type!r} ({backend.vendors}) needs the PyTorch plugin "
            f"{backend.plugin_module!r}; install {backend.plugin_package} ({exc})"
        ) from None


def torch_namespace(device_type: str):
    """The `torch.<type>` namespace (torch.cuda, torch.npu, ...) or None for the CPU."""
    if device_type == "cpu":
        return None
    return getattr(torch, device_type, None)


def is_available(device_type: str) -> bool:
    if device_type == "cpu":
        return True
    backend = get_backend(device_type)
    if backend.plugin_module is not None:
        try:
            importlib.import_module(backend.plugin_module)
        except ImportError:
            return False
    ns = torch_namespace(device_type)
    try:
        return bool(ns is not None and ns.is_available())
    except Exception:  # a broken driver reports itself as absent, not as a crash
        return False


def detect() -> str:
    """The accelerator torch reports, importing known plugins first; 'cpu' when none."""
    for backend in BACKENDS.values():
        if backend.plugin_module is not None:
            try:
                importlib.import_module(backend.plugin_module)
            except ImportError:
                pass
    acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if acc is not None and acc.type in BACKENDS:
        return acc.type
    return "cpu"
