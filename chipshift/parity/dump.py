"""`chipshift parity dump`: record what every module computes on one fixed batch.

A dump is a directory of plain files, so that dumps made on two machines can be compared
on a third:

    DUMP/
      dump.json            format, model (config + weights sha256), batch sha256, run
                           settings, environment, losses per step, and one record per
                           module and direction in execution order: shape, dtype, min,
                           max, mean, L2 norm, count of non-finite values, and the key of
                           the tensor when it was kept
      tensors.safetensors  the kept tensors ("forward/<module>", "backward/<module>"),
                           all of them while they fit the budget, none once they do not
      batch.json           the token ids, reusable as `--batch` on another machine

Forward records are module outputs in the order modules finish (children before their
parent); backward records are the gradient with respect to each module's input, in the
order autograd produces them (`register_full_backward_hook`). The logits are recorded
as the last forward and the first backward record. Only the first forward/backward pass
is recorded; with `--steps K`, K AdamW steps follow and their losses are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from chipshift.devices import Device, dtype_name, get_device
from chipshift.devices.emulate import refuse
from chipshift.errors import ChipshiftError
from chipshift.model.checkpoint import WEIGHTS, load_checkpoint, verify_checkpoint, versions
from chipshift.model.config import ModelConfig
from chipshift.model.transformer import Transformer

FORMAT = "chipshift-parity-dump"
FORMAT_VERSION = 1
DUMP_JSON = "dump.json"
TENSORS = "tensors.safetensors"
BATCH_JSON = "batch.json"
DEFAULT_MAX_TENSOR_MB = 32.0

# The default batch when the checkpoint has a tokenizer: plain English, so that an
# imported model sees the kind of activations it was trained on.
DEFAULT_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins "
    "with a single step. In the beginning the universe was created; this has made a lot "
    "of people very angry and been widely regarded as a bad move. It was the best of "
    "times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness. Call me Ishmael. Some years ago, never mind how long precisely, having "
    "little or no money in my purse, I thought I would sail about a little and see the "
    "watery part of the world. "
)


def tensor_stats(t: torch.Tensor) -> dict:
    """shape, dtype, min, max, mean, L2 norm (over the finite values) and the non-finite count."""
    x = t.detach()
    x = x if x.dtype == torch.float64 else x.float()
    finite = torch.isfinite(x)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    big = torch.finfo(x.dtype).max
    xf = torch.where(finite, x, zero)
    n_finite = finite.sum()
    lo = torch.where(finite, x, big).min() if x.numel() else zero
    hi = torch.where(finite, x, -big).max() if x.numel() else zero
    mean = xf.sum() / n_finite.clamp_min(1)
    lo, hi, mean, norm, n_finite = torch.stack(
        [lo, hi, mean, xf.norm(), n_finite.to(x.dtype)]).tolist()
    return {"shape": list(t.shape), "dtype": dtype_name(t.dtype), "numel": t.numel(),
            "min": lo, "max": hi, "mean": mean, "l2": norm, "nonfinite": t.numel() - int(n_finite)}


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


class Recorder:
    """Hooks on every named module; statistics always, tensors while they fit the budget."""

    def __init__(self, max_tensor_bytes: int) -> None:
        self.max_tensor_bytes = max_tensor_bytes
        self.records: list[dict] = []
        self.tensors: dict[str, torch.Tensor] | None = {} if max_tensor_bytes > 0 else None
        self.tensor_bytes = 0
        self.stats_only_reason = None if max_tensor_bytes > 0 else "--max-tensor-mb is 0"
        self._handles: list = []

    def add(self, direction: str, name: str, tensor: torch.Tensor) -> None:
        record = {"direction": direction, "name": name, **tensor_stats(tensor), "tensor": None}
        if self.tensors is not None:
            nbytes = tensor.numel() * tensor.element_size()
            if self.tensor_bytes + nbytes > self.max_tensor_bytes:
                # all or nothing: a dump whose tensors stop half-way would compare some
                # modules by value and their neighbours by statistics only
                self.stats_only_reason = (f"the tensors exceed the budget of "
                                          f"{self.max_tensor_bytes / 2**20:g} MiB")
                self.tensors = None
                for r in self.records:
                    r["tensor"] = None
            else:
                key = f"{direction}/{name}"
                self.tensors[key] = tensor.detach().to("cpu", copy=True).contiguous()
                self.tensor_bytes += nbytes
                record["tensor"] = key
        self.records.append(record)

    def attach(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if not name:
                continue  # the model itself: its output is recorded as the logits

            @torch.compiler.disable  # a graph break, not a trace of .tolist() and copies
            def on_forward(mod, args, output, name=name):
                out = _first_tensor(output)
                if out is not None:
                    self.add("forward", name, out)

            self._handles.append(module.register_forward_hook(on_forward))
            if isinstance(module, nn.Embedding):
                continue  # its input is token ids: there is no input gradient

            @torch.compiler.disable
            def on_backward(mod, grad_input, grad_output, name=name):
                grad = _first_tensor(grad_input)
                if grad is not None:
                    self.add("backward", name, grad)

            self._handles.append(module.register_full_backward_hook(on_backward))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@dataclass
class RunResult:
    records: list[dict]
    tensors: dict[str, torch.Tensor]
    losses: list[float]
    stats_only_reason: str | None
    seconds: float
    settings: dict = field(default_factory=dict)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, in float32 at least (float64 stays float64)."""
    wide = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.to(wide).flatten(0, 1), targets.flatten())


def record_run(model: Transformer, batch: torch.Tensor, *, steps: int = 0, lr: float = 1e-3,
               max_tensor_bytes: int = int(DEFAULT_MAX_TENSOR_MB * 2**20), compile: bool = False,
               progress: bool = True, numerics=contextlib.nullcontext) -> RunResult:
    """Forward and backward on `batch` (B, T+1) with every module recorded, then `steps`
    AdamW steps on the same batch; the losses are the K+1 values before each update.
    `numerics`: the device's context for forward and backward (`Device.numerics`)."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    model.train()
    recorder = Recorder(max_tensor_bytes)
    recorder.attach(model)
    forward = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0) if steps else None
    losses = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps + 1), desc="parity dump", unit="step", disable=not progress)
    try:
        for step in bar:
            with numerics():
                logits = forward(inputs)
                if step == 0:
                    recorder.add("forward", "logits", logits)
                    logits.register_hook(lambda g: recorder.add("backward", "logits", g))
                loss = loss_fn(logits, targets)
                loss.backward()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.5f}")
            if step == 0:
                recorder.detach()
            if opt is not None and step < steps:
                opt.step()
                opt.zero_grad(set_to_none=True)
    finally:
        recorder.detach()
    return RunResult(records=recorder.records, tensors=recorder.tensors or {}, losses=losses,
                     stats_only_reason=recorder.stats_only_reason,
                     seconds=time.perf_counter() - t0,
                     settings={"steps": steps, "lr": lr, "compile": compile,
                               "max_tensor_mb": max_tensor_bytes / 2**20})


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ChipshiftError(f"{path} is corrupt (not JSON): {exc}") from None


# -- the batch -------------------------------------------------------------------------
def load_batch(path: str | Path, vocab_size: int) -> torch.Tensor:
    """Token ids from a JSON file: [[ids...], ...] or {"input_ids": [[ids...], ...]}."""
    path = Path(path)
    if not path.exists():
        raise ChipshiftError(f"batch file not found: {path}")
    data = read_json(path)
    if isinstance(data, dict):
        data = data.get("input_ids")
    if (not isinstance(data, list) or not data or not all(isinstance(r, list) for r in data)
            or not all(isinstance(i, int) for r in data for i in r)):
        raise ChipshiftError(f"batch file {path}: expected a list of rows of token ids "
                             f'(or {{"input_ids": [[...], ...]}})')
    if len({len(r) for r in data}) != 1 or len(data[0]) < 2:
        raise ChipshiftError(f"batch file {path}: rows must all have the same length, at least 2")
    ids = torch.tensor(data, dtype=torch.long)
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ChipshiftError(f"batch file {path}: token ids must lie in [0, {vocab_size}) "
                             f"(found {int(ids.min())}..{int(ids.max())})")
    return ids


def default_batch(cfg: ModelConfig, tokenizer_dir: str | Path | None, batch_size: int = 2,
                  seq_len: int = 32, seed: int = 0) -> tuple[torch.Tensor, str]:
    """A fixed batch (B, seq_len + 1): a built-in text through the tokenizer when there is
    one, else ids drawn from a seeded generator. Returns the ids and where they came from."""
    need = batch_size * (seq_len + 1)
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").exists():
        from chipshift.data.tokenizer import Tokenizer
        tok = Tokenizer.load(tokenizer_dir)
        ids = tok.encode(DEFAULT_TEXT)
        ids = (ids * (need // max(len(ids), 1) + 1))[:need]
        if max(ids) < cfg.vocab_size:
            return torch.tensor(ids, dtype=torch.long).view(batch_size, seq_len + 1), "tokenizer"
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), generator=gen), f"random (seed {seed})"


def batch_sha256(batch: torch.Tensor) -> str:
    return hashlib.sha256(json.dumps(batch.tolist()).encode()).hexdigest()


# -- the environment and the files -----------------------------------------------------
def environment(dev: Device) -> dict:
    plugin = dev.backend.plugin_module
    return {
        "device": str(dev),
        "device_type": dev.type,
        "device_name": dev.name,
        "chip": dataclasses.asdict(dev.chip) if dev.chip else None,
        "emulation": dev.emulation.describe() if dev.emulation else None,
        "plugin": {"module": plugin,
                   "version": getattr(sys.modules.get(plugin), "__version__", None)} if plugin else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "host": platform.node(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_dump(out: str | Path, run: RunResult, *, model_info: dict, batch: torch.Tensor,
               batch_source: str, dtype: torch.dtype, env: dict) -> Path:
    """Write the dump directory (replacing an older dump there)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_info,
        "batch": {"shape": list(batch.shape), "sha256": batch_sha256(batch), "source": batch_source},
        "dtype": dtype_name(dtype),
        "run": {**run.settings, "seconds": round(run.seconds, 3)},
        "env": env,
        "losses": run.losses,
        "stats_only": run.stats_only_reason,
        "tensors_file": TENSORS if run.tensors else None,
        "records": run.records,
    }
    try:
        (tmp / BATCH_JSON).write_text(json.dumps({"input_ids": batch.tolist()}))
        if run.tensors:
            save_file(run.tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        (tmp / DUMP_JSON).write_text(json.dumps(doc, indent=1))
        if out.exists():
            if not (out / DUMP_JSON).exists():
                raise ChipshiftError(f"{out} exists and is not a parity dump; refusing to overwrite it")
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class Dump:
    """A dump directory read back: the JSON document, with tensors opened on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        doc_path = self.path / DUMP_JSON
        if not self.path.is_dir():
            raise ChipshiftError(f"parity dump not found: {self.path}")
        if not doc_path.exists():
            raise ChipshiftError(f"{self.path} is not a parity dump: it has no {DUMP_JSON}")
        self.doc = read_json(doc_path)
        if self.doc.get("format") != FORMAT:
            raise ChipshiftError(f"{doc_path} is not a chipshift parity dump")
        if self.doc.get("format_version") != FORMAT_VERSION:
            raise ChipshiftError(f"{doc_path}: dump format version {self.doc.get('format_version')}, "
                                 f"this chipshift reads version {FORMAT_VERSION}")
        self._file = None
        if self.doc.get("tensors_file"):
            tpath = self.path / self.doc["tensors_file"]
            if not tpath.exists():
                raise ChipshiftError(f"parity dump {self.path}: {self.doc['tensors_file']} is missing")
            try:
                self._file = safe_open(str(tpath), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise ChipshiftError(f"parity dump {self.path}: cannot read {tpath.name}: {exc}") from None

    @property
    def dtype(self) -> str:
        return self.doc["dtype"]

    @property
    def label(self) -> str:
        run = self.doc["run"]
        extra = " compiled" if run.get("compile") else ""
        emulation = self.emulation
        emulated = f" emulating {emulation['name']}" + (f" ({emulation['chip']})" if emulation["chip"] else "") \
            if emulation else ""
        return f"{self.doc['env']['device']} {self.dtype}{emulated}{extra} ({self.doc['env']['threads']} threads)"

    @property
    def emulation(self) -> dict | None:
        """The emulated profile (`Profile.describe`) the dump ran under, or None."""
        return self.doc["env"].get("emulation")

    def records(self, direction: str) -> list[dict]:
        return [r for r in self.doc["records"] if r["direction"] == direction]

    def tensor(self, record: dict) -> torch.Tensor | None:
        if self._file is None or not record.get("tensor"):
            return None
        return self._file.get_tensor(record["tensor"])


# -- the command -----------------------------------------------------------------------
def parse_target(spec: str) -> tuple[str, str]:
    """'cpu:float64' -> ('cpu', 'float64'); 'DEV:1:bfloat16' -> ('DEV:1', 'bfloat16'); 'DEV' -> ('DEV', 'auto')."""
    from chipshift.devices import DTYPES
    head, _, tail = spec.rpartition(":")
    if head and tail in DTYPES:
        return head, tail
    return spec, "auto"


def dump_checkpoint(ckpt: str | Path, out: str | Path, *, device: str = "cpu", dtype: str = "auto",
                    batch_file: str | Path | None = None, batch_size: int = 2, seq_len: int = 32,
                    seed: int = 0, steps: int = 0, lr: float = 1e-3,
                    max_tensor_mb: float = DEFAULT_MAX_TENSOR_MB, compile: bool = False,
                    threads: int | None = None, deterministic: bool = True,
                    progress: bool = True, verify: bool = True, emulate: str | None = None) -> Path:
    """Load `ckpt` on `device` in `dtype`, record a run, write the dump to `out`.
    `verify=False` skips the checksums, for a caller that has just verified them itself;
    `emulate`: a numerics profile or chip whose arithmetic the run computes with."""
    if steps < 0 or batch_size < 1 or seq_len < 1 or max_tensor_mb < 0:
        raise ChipshiftError("--steps and --max-tensor-mb must be >= 0, --batch-size and --seq-len >= 1")
    if verify:
        verify_checkpoint(ckpt)
    dev = get_device(device, emulate)
    torch_dtype = dev.precision.compute_dtype(dtype).value
    if compile and dev.emulation is not None:
        raise refuse(dev.emulation, "--compile", "emulation runs eager (its function mode is not traced)")
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    try:
        if threads:
            torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        dev.manual_seed(seed)
        model, sidecar = load_checkpoint(ckpt, device=dev.torch_device, dtype=torch_dtype, verify=False)
        if batch_file is not None:
            batch, source = load_batch(batch_file, model.cfg.vocab_size), str(batch_file)
        else:
            batch, source = default_batch(model.cfg, ckpt, batch_size, seq_len, seed)
        run = record_run(model, batch, steps=steps, lr=lr, max_tensor_bytes=int(max_tensor_mb * 2**20),
                         compile=compile, progress=progress, numerics=dev.numerics)
        env = environment(dev)
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)
    model_info = {"config": sidecar["model_config"], "checkpoint": str(Path(ckpt).resolve()),
                  "weights_sha256": sidecar["files"][WEIGHTS]["sha256"]}
    return write_dump(out, run, model_info=model_info, batch=batch, batch_source=source,
                      dtype=torch_dtype, env=env)
