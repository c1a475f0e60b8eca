"""The run's state (runs/NAME/state.json) and what a running stage sees of the run."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from chipshift.pipeline.recipe import Recipe, Stage

STATE_FILE = "state.json"


def sha256_of(path: Path) -> str:
    from chipshift.model.checkpoint import sha256_file
    return sha256_file(path)


class RunState:
    """runs/NAME/state.json: per stage its status, fingerprint, outputs (with sha256) and
    results. Written atomically after every change."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / STATE_FILE
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, ensure_ascii=False, default=str))
        os.replace(tmp, self.path)

    def record(self, name: str) -> dict:
        return self.data["stages"].setdefault(name, {})

    def finished(self, name: str, fingerprint: str) -> bool:
        """Done with these settings, and every output still has the checksum recorded."""
        rec = self.data["stages"].get(name) or {}
        if rec.get("status") != "done" or rec.get("fingerprint") != fingerprint:
            return False
        outputs = (rec.get("result") or {}).get("outputs", {})
        return all(Path(p).is_file() and sha256_of(Path(p)) == digest for p, digest in outputs.items())


@dataclass
class Context:
    recipe: Recipe
    state: RunState
    force: bool = False
    progress: bool = True

    @property
    def run_dir(self) -> Path:
        return self.recipe.out

    def stage_dir(self, stage: Stage) -> Path:
        return self.run_dir / stage.name

    def result(self, name: str) -> dict:
        return self.state.data["stages"][name]["result"]

    def model_of(self, stage: Stage) -> Path:
        return Path(self.result(stage.source)["model"])


class Interrupted(Exception):
    """A training stage stopped on a signal after writing its checkpoint."""


def resolved_target(device: str, dtype: str) -> tuple[str, str]:
    """(device, dtype name) as the device layer resolves a stage's settings."""
    from chipshift.devices import dtype_name, get_device
    dev = get_device(device)
    return str(dev), dtype_name(dev.compute_dtype(dtype)[0])

