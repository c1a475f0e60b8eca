"""The chip catalogue (chips.toml): peak figures of accelerators, each with its source."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from chipshift.errors import ChipshiftError

CATALOGUE_PATH = Path(__file__).with_name("chips.toml")


@dataclass(frozen=True)
class Chip:
    key: str
    name: str
    device_type: str
    match: tuple[str, ...]
    tflops_bf16: float
    tflops_fp16: float
    memory_gb: float
    bandwidth_tbs: float
    power_w: float
    status: str  # "official" or "estimate"
    source: str

    def peak_flops(self, dtype_name: str) -> float:
        """Peak dense FLOP/s for a compute dtype name ('bfloat16', 'float16', 'float32')."""
        if dtype_name == "float16":
            return self.tflops_fp16 * 1e12
        # fp32 training on these parts runs its matmuls on the bf16/tf32 tensor cores at
        # best; MFU is conventionally quoted against the bf16 peak.
        return self.tflops_bf16 * 1e12


@lru_cache(maxsize=None)
def load_catalogue(path: str | None = None) -> dict[str, Chip]:
    raw = tomllib.loads(Path(path or CATALOGUE_PATH).read_text())
    chips = {}
    for key, entry in raw.items():
        if entry["status"] not in ("official", "estimate"):
            raise ValueError(f"chips.toml [{key}]: status must be official or estimate")
        chips[key] = Chip(key=key, match=tuple(entry.pop("match")), **entry)
    return chips


def get_chip(key: str) -> Chip:
    chips = load_catalogue()
    if key not in chips:
        raise ChipshiftError(f"unknown chip {key!r}; known chips: {', '.join(chips)}")
    return chips[key]


def match_chip(reported_name: str, device_type: str | None = None) -> Chip | None:
    """Map a device's reported name to a catalogue entry; longest matching pattern wins."""
    best: tuple[int, Chip] | None = None
    name = reported_name.lower()
    for chip in load_catalogue().values():
        if device_type is not None and chip.device_type != device_type:
            continue
        for pattern in chip.match:
            if pattern.lower() in name and (best is None or len(pattern) > best[0]):
                best = (len(pattern), chip)
    return best[1] if best else None
