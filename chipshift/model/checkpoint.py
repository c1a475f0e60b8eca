"""The chipshift checkpoint: a directory that describes itself.

    CKPT/
      model.safetensors      weights (never a pickle)
      tokenizer.json         the tokenizer, when the model has one
      tokenizer_config.json  its config, with the chat template
      chipshift.json         the sidecar: model config, dtype, producing device, versions,
                             a sha256 per file, free-form `meta` (step, data cursor, ...)
                             and the record of verified handoffs (`chipshift.parity.handoff`),
                             which `check_handoff_allowed` reads before a stage starts from it

Writing is atomic: files go into a temporary sibling directory, are fsynced, and the
directory is renamed into place, so a reader sees a whole checkpoint or none. Loading
verifies every checksum first and refuses a corrupt or truncated file by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from chipshift.errors import CheckpointError, ChipshiftError
from chipshift.model.config import ModelConfig
from chipshift.model.quant import quantized_modules, swap_in
from chipshift.model.transformer import Transformer, build_model

SIDECAR = "chipshift.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict:
    import chipshift
    out = {"chipshift": chipshift.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for mod in ("transformers", "tokenizers", "safetensors"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def state_dict_for_save(model: Transformer) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; tied weights stored once (as embed_tokens.weight)."""
    sd = {}
    for k, v in model.state_dict().items():
        k = k.removeprefix("_orig_mod.")  # never bake torch.compile's wrapper into a checkpoint
        sd[k] = v.detach().to("cpu").contiguous()
    return sd


def write_checkpoint(out: str | Path, tensors: dict[str, torch.Tensor], cfg: ModelConfig, *,
                     dtype: torch.dtype | str | None = None, device: str = "cpu",
                     tokenizer_dir: str | Path | None = None, meta: dict | None = None,
                     extra_files: dict[str, Path] | None = None, handoffs: list | None = None,
                     quantized: dict[str, str] | None = None) -> Path:
    """Write a checkpoint directory atomically. `extra_files` maps names to files to copy in;
    `quantized` names the tensors that are quantized blocks and their formats."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        files = [WEIGHTS]
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.exists():
                    shutil.copyfile(src, tmp / name)
                    files.append(name)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
            files.append(name)
        for name in files:
            _fsync_file(tmp / name)
        if dtype is None:
            dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
        sidecar = {
            "format": "chipshift-checkpoint",
            "format_version": FORMAT_VERSION,
            "model_config": cfg.to_dict(),
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": versions(),
            "files": {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                      for name in files},
            "meta": meta or {},
            "handoffs": handoffs or [],
        }
        if quantized:
            sidecar["quantized"] = dict(quantized)
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2))
        _fsync_file(tmp / SIDECAR)
        _fsync_dir(tmp)
        if out.exists():  # replace: move the old one aside first so a crash leaves one whole copy
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_checkpoint(model: Transformer, out: str | Path, **kwargs) -> Path:
    """Save a model (see `write_checkpoint` for the keyword arguments)."""
    sd = state_dict_for_save(model)
    kwargs.setdefault("dtype", model.dtype)
    kwargs.setdefault("quantized", quantized_modules(model))
    return write_checkpoint(out, sd, model.cfg, **kwargs)


def read_sidecar(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a chipshift checkpoint directory "
                              f"(use `chipshift import` for Hugging Face folders and .gguf files)")
    side = path / SIDECAR
    if not side.exists():
        raise CheckpointError(f"{path} has no {SIDECAR}: not a chipshift checkpoint "
                              f"(use `chipshift import` for Hugging Face folders and .gguf files)")
    try:
        data = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{side} is corrupt: {exc}") from None
    if data.get("format") != "chipshift-checkpoint":
        raise CheckpointError(f"{side} is not a chipshift checkpoint sidecar")
    return data


def verify_checkpoint(path: str | Path) -> dict:
    """Check every file's size and sha256 against the sidecar; return the sidecar."""
    path = Path(path)
    data = read_sidecar(path)
    for name, info in data["files"].items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"checkpoint {path}: file {name} is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint {path}: file {name} is truncated or altered "
                                  f"({size} bytes, expected {info['bytes']})")
        if sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path}: file {name} is corrupt (sha256 mismatch)")
    return data


def load_tensors(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    data = verify_checkpoint(path) if verify else read_sidecar(path)
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read {WEIGHTS}: {exc}") from None
    return tensors, data


def float_dtype(tensors: dict[str, torch.Tensor], quantized: dict[str, str]) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in: its first tensor that is not quantized blocks."""
    return next(v.dtype for k, v in tensors.items() if k not in quantized)


def load_checkpoint(path: str | Path, device="cpu", dtype: torch.dtype | None = None,
                    verify: bool = True) -> tuple[Transformer, dict]:
    """Load a checkpoint as a model on `device` (in `dtype`, default: as stored)."""
    tensors, data = load_tensors(path, verify)
    cfg = ModelConfig.from_dict(data["model_config"])
    quantized = data.get("quantized") or {}
    dtype = dtype or float_dtype(tensors, quantized)
    model = build_model(cfg, device=device, dtype=dtype, seed=None)
    swap_in(model, quantized)  # quantized blocks load into quantized layers, as they are
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path}: weights do not match its config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model, data


def update_sidecar(path: str | Path, **changes) -> dict:
    """Atomically rewrite fields of the sidecar (e.g. to append a handoff record)."""
    path = Path(path)
    data = read_sidecar(path)
    data.update(changes)
    tmp = path / f".{SIDECAR}.tmp"
    tmp.write_text(json.dumps(data, indent=2))
    _fsync_file(tmp)
    os.replace(tmp, path / SIDECAR)
    return data


def check_handoff_allowed(ckpt: str | Path, force: bool = False) -> dict | None:
    """The checkpoint's last handoff record (None if it has none); raises a ChipshiftError
    saying why when that handoff failed, unless `force`."""
    handoffs = read_sidecar(ckpt).get("handoffs") or []
    if not handoffs:
        return None
    last = handoffs[-1]
    if last.get("verdict") == "fail" and not force:
        first = last.get("first_failing") or {}
        where = ", ".join(f"{d} {n}" for d, n in first.items() if n) or "the loss"
        raise ChipshiftError(
            f"checkpoint {ckpt}: its last handoff ({last['from']} -> {last['to']}, {last['time']}) "
            f"failed, first diverging at {where} (report: {last.get('report')}); fix the target or "
            f"pass --force to start from it anyway")
    return last
