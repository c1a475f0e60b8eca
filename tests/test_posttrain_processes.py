"""Whole `chipshift sft` / `chipshift dpo` runs in subprocesses: SIGKILL + --resume lands
on the uninterrupted run's weights, and two torchrun processes follow one process."""

import subprocess
import sys

import pytest
import torch
from test_posttrain import init_ckpt, model, tok, tok_dir, write_config  # noqa: F401 (fixtures)
from test_train_processes import ENV, final_state, kill_after_checkpoint, per_step, torchrun

pytestmark = pytest.mark.slow


def post(kind, cfg, *extra, launcher=(sys.executable, "-m", "chipshift")):
    proc = subprocess.run([*launcher, kind, str(cfg), "--no-progress", *extra], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("kind,lora", [("sft", False), ("dpo", True)])
def test_kill_resume_and_two_processes(tmp_path, init_ckpt, kind, lora):  # noqa: F811
    def config(name, **extra):
        return write_config(tmp_path / f"{name}.toml", kind, init_ckpt, tmp_path / name, lora__enabled=lora,
                            lora__rank=4, train__steps=12, train__ckpt_every=2, train__eval_batches=2,
                            data__micro_batch=2, **extra)  # 2 micro-batches per step, as 2 processes have
    post(kind, config("one"))
    cfg = config("killed")
    kill_after_checkpoint([sys.executable, "-m", "chipshift", kind, str(cfg), "--no-progress"], tmp_path / "killed", 4)
    resumed = post(kind, cfg, "--resume")
    assert "resumed from" in resumed.stdout + resumed.stderr
    (wa, _), (wb, _) = final_state(tmp_path / "one"), final_state(tmp_path / "killed")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert per_step(tmp_path / "one") == per_step(tmp_path / "killed")

    post(kind, config("two"), launcher=torchrun(2))
    ref, got = per_step(tmp_path / "one"), per_step(tmp_path / "two")
    assert ref.keys() == got.keys() and len(ref) == 12
    worst = max(abs(got[s] - ref[s]) / max(abs(ref[s]), 1e-3) for s in ref)
    assert worst <= 1e-5, f"2 processes vs 1: relative loss difference {worst:.2e}"
