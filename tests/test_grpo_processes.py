"""`chipshift grpo` in a subprocess: SIGKILL mid-run + --resume draws the same completions
and lands on the uninterrupted run's weights (float32 CPU)."""

import subprocess
import sys

import pytest
import torch
from test_grpo_run import write_config
from test_posttrain import init_ckpt, model, tok, tok_dir  # noqa: F401 (fixtures)
from test_train_processes import ENV, final_state, kill_after_checkpoint, per_step

pytestmark = pytest.mark.slow


def grpo(cfg, *extra):
    proc = subprocess.run([sys.executable, "-m", "chipshift", "grpo", str(cfg), "--no-progress", *extra], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("lora", [True, False])
def test_kill_resume_is_exact(tmp_path, init_ckpt, lora):  # noqa: F811
    def config(name):
        return write_config(tmp_path / f"{name}.toml", init_ckpt, tmp_path / name, lora__enabled=lora,
                            grpo__evaluate=False, grpo__beta=0.05, train__steps=10, train__ckpt_every=2,
                            data__micro_batch=4)
    grpo(config("one"))
    cfg = config("killed")
    kill_after_checkpoint([sys.executable, "-m", "chipshift", "grpo", str(cfg), "--no-progress"],
                          tmp_path / "killed", 4)
    resumed = grpo(cfg, "--resume")
    assert "resumed from" in resumed.stdout + resumed.stderr
    (wa, _), (wb, _) = final_state(tmp_path / "one"), final_state(tmp_path / "killed")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for key in ("loss", "reward", "completion_len", "logp_diff_max"):  # the same completions, step by step
        assert per_step(tmp_path / "one", key) == per_step(tmp_path / "killed", key)
