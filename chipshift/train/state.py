"""Training checkpoints: a model checkpoint plus everything needed to continue exactly.

    RUN/checkpoints/step_00000100/
      model.safetensors        the weights (float32 master weights when the run keeps them)
      train_state.safetensors  optimizer moments and step counts, RNG state
      chipshift.json           the sidecar; `meta` holds step, data cursor, schedule,
                               counters and the grad-scaler state; sha256 of every file

Nothing depends on the number of processes (data-parallel ranks hold the same state;
sharded ones are gathered into whole tensors when saving and re-sharded when loading),
so a checkpoint written by N processes resumes with M, in either `run.parallel` layout.
Written through `chipshift.model.checkpoint.write_checkpoint`, atomically; never a pickle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from chipshift.errors import CheckpointError
from chipshift.model.checkpoint import verify_checkpoint, write_checkpoint
from chipshift.model.config import ModelConfig
from chipshift.train.distributed import full_tensor, shard_like

STATE_FILE = "train_state.safetensors"
PREFIX = "step_"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    """Optimizer state keyed by parameter name ("adam.<name>.exp_avg"), so it outlives
    the parameter order of any one process layout. Sharded moments are gathered whole:
    every process must call this."""
    out = {}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for name, p in zip(names, params):
        for key, value in optimizer.state.get(p, {}).items():
            out[f"adam.{name}.{key}"] = full_tensor(value.detach()).to("cpu").contiguous().clone()
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str], tensors: dict) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for name, p in zip(names, params):
        keys = [k for k in tensors if k.startswith(f"adam.{name}.")]
        if not keys:
            raise CheckpointError(f"training state has no optimizer entry for {name}")
        # moments shaped like the parameter are laid out like it (sharded or not); `step` is a scalar
        optimizer.state[p] = {k.removeprefix(f"adam.{name}."): shard_like(tensors[k], p)
                              if tensors[k].shape == p.shape else tensors[k].to(p.device) for k in keys}
    for p in params:  # the fused kernel keeps `step` on the parameter's device
        st = optimizer.state[p]
        if "step" in st:
            st["step"] = st["step"].to(p.device if optimizer.defaults.get("fused") else "cpu")


def save(run_dir: Path, step: int, weights: dict[str, torch.Tensor], model_cfg: ModelConfig,
         state_tensors: dict[str, torch.Tensor], meta: dict, *, tokenizer_dir=None,
         device: str = "cpu", keep_last: int = 3) -> Path:
    """Write step_<step> atomically, then drop all but the newest `keep_last`."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".state-") as tmp:
        state_path = Path(tmp) / STATE_FILE
        save_file(state_tensors, str(state_path))
        out = write_checkpoint(root / f"{PREFIX}{step:08d}", weights, model_cfg, device=device,
                               tokenizer_dir=tokenizer_dir, meta={"step": step, **meta},
                               extra_files={STATE_FILE: state_path})
    for old in list_checkpoints(run_dir)[:-keep_last]:
        doomed = old.parent / f".deleting-{old.name}"  # out of the listing before it is half gone
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return out


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and p.name[len(PREFIX):].isdigit())


def latest_valid(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint whose checksums verify; damaged ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            sidecar = verify_checkpoint(path)
            if STATE_FILE not in sidecar["files"]:
                raise CheckpointError(f"checkpoint {path} holds no training state")
            return path, sidecar
        except CheckpointError as exc:
            warnings.warn(f"skipping damaged checkpoint: {exc}", stacklevel=2)
    return None


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, training-state tensors) of a verified checkpoint."""
    try:
        return load_file(str(path / "model.safetensors")), load_file(str(path / STATE_FILE))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read: {exc}") from None


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop metric records past the checkpoint a run resumes from (they will be redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)
