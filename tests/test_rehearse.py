"""`chipshift parity rehearse`: planted problems are predicted exactly where they were planted."""

import json

import pytest
import torch

from chipshift.cli import main as cli_main
from chipshift.model.checkpoint import save_checkpoint
from chipshift.model.config import preset
from chipshift.model.transformer import build_model
from chipshift.parity.rehearse import rehearse
from parity_helpers import one_thread  # noqa: F401  (autouse)

CFG = preset("tiny", num_layers=4)


@pytest.fixture(scope="module")
def overflow_ckpt(tmp_path_factory):
    """layers.1.mlp.up_proj's outputs exceed float16's 65504 (its weights x 2^20, down_proj's / 2^20:
    the same function, the same float64 loss)."""
    model = build_model(CFG, dtype=torch.float32, seed=0)
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight.mul_(2.0**20)
        model.layers[1].mlp.down_proj.weight.div_(2.0**20)
    return save_checkpoint(model, tmp_path_factory.mktemp("overflow") / "ckpt")


@pytest.fixture(scope="module")
def outlier_ckpt(tmp_path_factory):
    """A massive activation: channel 3 of layer 1's normed residual is 1e6, and q_proj ignores it,
    so q_proj's output rests on the small channels, which share an FP8 scaling block with it."""
    model = build_model(CFG, dtype=torch.float32, seed=0)
    with torch.no_grad():
        model.layers[1].input_layernorm.weight[3] = 1e6
        model.layers[1].self_attn.q_proj.weight[:, 3] = 0
    return save_checkpoint(model, tmp_path_factory.mktemp("outlier") / "ckpt")


def verdict_of(result, name):
    return next(r["verdict"] for r in result["modules"]["forward"] if r["name"] == name)


def test_activations_over_65504_are_flagged_exactly_there_under_fp16_only(overflow_ckpt, tmp_path):
    result = rehearse(overflow_ckpt, "ascend-910a", trusted="bf16", out=tmp_path / "fp16", progress=False)
    r = result["rehearsal"]
    assert result["verdict"] == "fail" and r["first_diverging"]["forward"] == "layers.1.mlp.up_proj"
    assert [(s["name"], s["direction"]) for s in r["overflow"]] == [("layers.1.mlp.up_proj", "forward")]
    assert 1 < r["overflow"][0]["margin"] < 100 and r["target"]["chip"] == "ascend-910a"
    assert any(m.startswith("layers.1.mlp.up_proj: activations reach") for m in r["mitigations"])
    # every module before it passes: the rest of the model is fine in float16
    forward = [x["name"] for x in result["modules"]["forward"]]
    before = forward[:forward.index("layers.1.mlp.up_proj")]
    assert all(verdict_of(result, n) == "pass" for n in before)

    result = rehearse(overflow_ckpt, "bf16", trusted="fp32", out=tmp_path / "bf16", progress=False)
    assert result["rehearsal"]["overflow"] == [] and verdict_of(result, "layers.1.mlp.up_proj") == "pass"
    assert result["rehearsal"]["format_gap"] == 2.0**16


def test_a_fragile_module_is_named_first_under_fp8_and_not_under_bf16(outlier_ckpt, tmp_path):
    result = rehearse(outlier_ckpt, "fp8-ue8m0", trusted="bf16", out=tmp_path / "fp8", progress=False)
    r = result["rehearsal"]
    assert r["first_diverging"]["forward"] == "layers.1.self_attn.q_proj" and r["format_gap"] == 16
    assert r["overflow"] == [] and any("layers.1.self_attn.q_proj: first to diverge" in m for m in r["mitigations"])
    result = rehearse(outlier_ckpt, "bf16", trusted="fp32", out=tmp_path / "bf16", progress=False)
    assert verdict_of(result, "layers.1.self_attn.q_proj") == "pass"
    assert result["rehearsal"]["first_diverging"]["forward"] is None


def test_cli_writes_the_reports_labelled_emulated_and_exits_1_on_a_predicted_fail(overflow_ckpt, tmp_path, capsys):
    out = tmp_path / "r"
    code = cli_main(["parity", "rehearse", str(overflow_ckpt), "--chip", "fp16-only", "--trusted", "bf16",
                     "--steps", "2", "--out", str(out), "--seq-len", "16"])
    text = capsys.readouterr().out
    assert code == 1 and "overflow at layers.1.mlp.up_proj" in text and "mitigation:" in text
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.json", "depth.png", "loss.png"}
    md = (out / "report.md").read_text()
    assert md.startswith("# Rehearsal (emulated): fp16-only predicted **FAIL**") and "emulating fp16-only" in md
    doc = json.loads((out / "report.json").read_text())
    assert doc["rehearsal"]["emulated"] and doc["rehearsal"]["loss_drift"]["steps"] == 2
    assert cli_main(["parity", "rehearse", str(overflow_ckpt), "--chip", "fp17", "--out", str(tmp_path / "x")]) == 2
    assert "unknown numerics profile or chip 'fp17'" in capsys.readouterr().err
