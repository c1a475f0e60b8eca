"""Emulated stages end to end through the CLI on this CPU: pre-training (float16 with loss
scaling), SFT and serving, each under another chip's numerics."""

import json
import subprocess
import sys

import pytest

from chipshift.cli import main as cli_main
from chipshift.train.metrics import read
from infer_helpers import REPO, make_checkpoint
from test_train_processes import ENV, data_dir, write_config  # noqa: F401  (data_dir: a fixture)


def test_pretrain_under_an_emulated_fp16_only_chip_scales_the_loss(tmp_path, data_dir):  # noqa: F811
    cfg = write_config(tmp_path / "pre.toml", data_dir, tmp_path / "pre", run__dtype="auto", train__steps=6,
                       train__ckpt_every=6)
    assert cli_main(["pretrain", str(cfg), "--emulate", "ascend-910a", "--no-progress"]) == 0
    resolved = json.loads((tmp_path / "pre" / "config.resolved.json").read_text())
    assert resolved["run"]["emulate"] == "ascend-910a" and resolved["resolved"]["compute_dtype"] == "float16"
    assert resolved["resolved"]["emulation"]["chip"] == "ascend-910a"
    last = [r for r in read(tmp_path / "pre" / "metrics.jsonl") if "loss" in r][-1]
    assert last["step"] == 6 and last["loss_scale"] >= 1 and "scaler_skipped_total" in last


def test_sft_under_an_emulated_fp8_chip(tmp_path, tiny_tokenizer_dir):
    ckpt = make_checkpoint(tiny_tokenizer_dir, tmp_path / "tiny-chat")
    assert cli_main(["sft", "recipes/sft_small.toml", "--set", f"sft.init='{ckpt}'", "--set", "sft.data='identity'",
                     "--set", "run.dtype='auto'", "--set", "train.steps=3", "--set", "train.ckpt_every=3",
                     "--set", "optim.warmup_steps=1", "--set", "data.seq_len=64", "--set", "data.batch_size=2",
                     "--set", "sft.evaluate=false", "--emulate", "h100-sxm:fp8-ue8m0",
                     "--out", str(tmp_path / "sft"), "--no-progress"]) == 0
    resolved = json.loads((tmp_path / "sft" / "config.resolved.json").read_text())["resolved"]
    assert resolved["compute_dtype"] == "bfloat16" and resolved["emulation"]["name"] == "fp8-ue8m0"


def test_chat_serves_under_an_emulated_chip_and_refuses_a_dtype_it_lacks(tmp_path, tiny_tokenizer_dir):
    ckpt = make_checkpoint(tiny_tokenizer_dir, tmp_path / "tiny-chat")
    args = [sys.executable, "-m", "chipshift", "chat", str(ckpt), "--device", "cpu", "--emulate", "ascend-910a",
            "--temperature", "0", "--max-tokens", "6"]
    proc = subprocess.run(args, input="hello there\n/quit\n", capture_output=True, text=True, cwd=REPO,
                          timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "in float16" in proc.stderr and "emulating fp16-only (ascend-910a)" in proc.stderr
    assert proc.stdout.count("assistant> ") == 1
    proc = subprocess.run([*args, "--dtype", "bfloat16"], input="/quit\n", capture_output=True, text=True,
                          cwd=REPO, timeout=300, env=ENV)
    assert proc.returncode == 2 and "dtype bfloat16 cannot run under the emulated profile fp16-only" in proc.stderr


@pytest.mark.parametrize("stage, words", [
    ({"emulate": "fp7"}, ["stages.sft.emulate = 'fp7'", "unknown numerics profile", "ascend-910a"]),
    ({"emulate": "ascend-910a", "dtype": "bfloat16"}, ["stages.sft.emulate = 'ascend-910a'", "dtype bfloat16"]),
    ({"emulate": "bf16", "run": {"emulate": "tf32"}}, ["stages.sft.run.emulate", "use stages.sft.emulate"]),
])
def test_recipe_emulate_mistakes_are_named_before_work(stage, words):
    from chipshift.errors import ConfigError
    from chipshift.pipeline.recipe import parse_recipe

    raw = {"recipe": {"name": "r"}, "stages": {"import": {"source": "smollm2"}, "sft": {"sft": {}, **stage}}}
    with pytest.raises(ConfigError) as err:
        parse_recipe(raw)
    assert all(w in str(err.value) for w in words)


@pytest.mark.slow
def test_rehearsal_recipe_end_to_end(tmp_path):
    """recipes/rehearse_npu.toml (about 2 minutes): the emulated stages run, each move is rehearsed
    and the report lists the rehearsals beside the handoffs, labelled as emulated."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "chipshift", "run", "rehearse_npu", "--no-progress", "--set",
                           f"recipe.out='{out}'"], capture_output=True, text=True, cwd=REPO, timeout=900, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (out / "report.md").read_text()
    assert "pretrain → sft (rehearsal, emulated)" in report and "(predicted)" in report
    assert "cpu emulating ascend-910a | float16" in report and "rehearsed already" in proc.stdout
