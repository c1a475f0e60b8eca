"""The run's state (runs/NAME/state.json), the typed result each stage runner returns, and
what a running stage sees of the run.

A result is stored as JSON: its fields as they are, except `outputs`, whose paths become
{path: sha256} so a re-run can tell the files are still the ones it made. `RunState.result`
reads a stored result back into its type, from this run or from an earlier one (resume)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from chipshift.pipeline.recipe import Recipe, Stage

STATE_FILE = "state.json"


def sha256_of(path: Path) -> str:
    from chipshift.model.checkpoint import sha256_file
    return sha256_file(path)


# -- what each stage returns -----------------------------------------------------------------
@dataclass(kw_only=True)
class StageResult:
    """What every stage leaves; each kind adds the paths later stages and the report use."""
    outputs: list[Path] = field(default_factory=list)  # files a later run checks before skipping the stage
    metrics: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**asdict(self), "outputs": {str(p): sha256_of(Path(p)) for p in self.outputs}}

    @classmethod
    def from_json(cls, data: dict) -> StageResult:
        known = {f.name for f in fields(cls)} - {"outputs"}
        return cls(**{k: v for k, v in data.items() if k in known}, outputs=[Path(p) for p in data.get("outputs", {})])


@dataclass(kw_only=True)
class TokenizerResult(StageResult):
    tokenizer: str  # the tokenizer's folder


@dataclass(kw_only=True)
class DataResult(StageResult):
    data_dir: str  # index.json, train.bin, val.bin


@dataclass(kw_only=True)
class ModelResult(StageResult):
    model: str  # a chipshift checkpoint folder


@dataclass(kw_only=True)
class TrainingResult(ModelResult):
    metrics_file: str  # the run's metrics.jsonl, for the report's loss curves


@dataclass(kw_only=True)
class EvalResult(StageResult):
    samples: list[dict]  # {"prompt", "answer"} per question asked
    harness: dict | None = None  # lm-eval scores per target and their delta (chipshift.parity.harness)


@dataclass(kw_only=True)
class ServeResult(EvalResult):
    command: str  # how to use the model, for the report
    check: dict | None = None  # the trainer-to-server check's report (chipshift.parity.serve_check)


@dataclass(kw_only=True)
class ExportResult(StageResult):
    export: str  # the exported folder
    samples: list[dict] = field(default_factory=list)  # transformers' answer, when it was checked


@dataclass
class HandoffResult:
    """A handoff's verdict; stored with the keys "from" and "to" for the two targets."""
    verdict: str
    from_target: str
    to_target: str
    rule: str
    first_failing: dict
    loss_max_rel_diff: float | None
    worst_error: dict
    report: str
    figure: str
    checkpoint: str

    def to_json(self) -> dict:
        data = asdict(self)
        data["from"], data["to"] = data.pop("from_target"), data.pop("to_target")
        return data

    @classmethod
    def from_json(cls, data: dict) -> HandoffResult:
        data = dict(data)
        return cls(from_target=data.pop("from"), to_target=data.pop("to"), **data)


RESULT_TYPES: dict[str, type] = {
    "tokenizer": TokenizerResult, "data": DataResult, "import": ModelResult, "pretrain": TrainingResult,
    "sft": TrainingResult, "dpo": TrainingResult, "grpo": TrainingResult, "eval": EvalResult, "serve": ServeResult,
    "export": ExportResult, "handoff": HandoffResult}


# -- the state file --------------------------------------------------------------------------
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

    def result(self, name: str) -> StageResult | HandoffResult:
        """The stored result of a finished stage (or handoff), as its type."""
        rec = self.data["stages"][name]
        return RESULT_TYPES[rec["kind"]].from_json(rec["result"])


# -- what a running stage sees ---------------------------------------------------------------
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

    def model_of(self, stage: Stage) -> Path:
        return Path(self.state.result(stage.source).model)


class Interrupted(Exception):
    """A training stage stopped on a signal after writing its checkpoint."""


def resolved_target(device: str, dtype: str, emulate: str = "") -> tuple[str, str]:
    """(device, dtype name) as the device layer resolves a stage's settings (under the
    emulated profile `emulate`, the profile's dtype)."""
    from chipshift.devices import dtype_name, get_device
    dev = get_device(device, emulate)
    return str(dev), dtype_name(dev.precision.compute_dtype(dtype).value)

