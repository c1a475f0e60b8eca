"""`chipshift parity dump | compare | handoff` end to end on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from chipshift.cli import main
from chipshift.errors import ChipshiftError
from chipshift.model.checkpoint import check_handoff_allowed, read_sidecar, save_checkpoint
from chipshift.model.config import preset
from chipshift.model.transformer import build_model
from chipshift.parity.handoff import handoff
from parity_helpers import one_thread  # noqa: F401  (autouse)


@pytest.fixture()
def ckpt(tmp_path):
    return save_checkpoint(build_model(preset("tiny"), seed=0), tmp_path / "ckpt")


def test_dump_compare_writes_reports_and_exit_codes(ckpt, tmp_path, capsys):
    a, b, r = tmp_path / "a", tmp_path / "b", tmp_path / "r"
    assert main(["parity", "dump", str(ckpt), "--dtype", "float32", "--out", str(a), "--steps", "2"]) == 0
    assert main(["parity", "dump", str(ckpt), "--dtype", "float64", "--out", str(r), "--steps", "2",
                 "--batch", str(a / "batch.json")]) == 0
    assert main(["parity", "dump", str(ckpt), "--dtype", "float32", "--out", str(b), "--steps", "2",
                 "--max-tensor-mb", "0"]) == 0
    doc = json.loads((a / "dump.json").read_text())
    assert doc["env"]["device_type"] == "cpu" and doc["env"]["torch"] == torch.__version__
    assert len(doc["losses"]) == 3 and doc["model"]["weights_sha256"]

    out = tmp_path / "report"
    assert main(["parity", "compare", str(r), str(a), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "pass" and report["rule_dtype"] == "float32"
    assert 1e-9 < report["summary"]["forward"]["median_error"] < 1e-5  # float32 vs float64
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.json", "depth.png", "loss.png"}
    assert "PASS" in (out / "report.md").read_text()

    # statistics-only B against a tensor dump: compared by statistics, and it says so
    assert main(["parity", "compare", str(a), str(b), "--out", str(out)]) == 0
    assert "statistics only" in capsys.readouterr().out

    # a bar nothing can meet fails, exit status 1 for CI
    assert main(["parity", "compare", str(r), str(a), "--out", str(out), "--rel-l2-fail", "1e-12"]) == 1


def test_bad_input_is_one_line_and_exit_2(ckpt, tmp_path, capsys):
    assert main(["parity", "compare", str(tmp_path / "x"), str(tmp_path / "y")]) == 2
    assert "parity dump not found" in capsys.readouterr().err
    assert main(["parity", "dump", str(tmp_path / "nope"), "--out", str(tmp_path / "d")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["parity", "dump", str(ckpt), "--device", "warp9", "--out", str(tmp_path / "d")]) == 2
    assert "unknown device" in capsys.readouterr().err


def test_handoff_records_verdicts_and_gates_later_stages(ckpt, tmp_path):
    assert check_handoff_allowed(ckpt) is None
    assert main(["parity", "handoff", str(ckpt), "--from", "cpu:float32", "--to", "cpu:float64",
                 "--out", str(tmp_path / "h1")]) == 0
    record = read_sidecar(ckpt)["handoffs"][-1]
    assert record["verdict"] == "pass" and record["to"] == "cpu:float64"
    assert check_handoff_allowed(ckpt)["verdict"] == "pass"

    # a failed handoff (a bar nothing can meet) blocks later stages unless forced
    assert main(["parity", "handoff", str(ckpt), "--from", "cpu:float32", "--to", "cpu:float64",
                 "--out", str(tmp_path / "h2"), "--cos-hard-fail", "1.5"]) == 1
    assert [h["verdict"] for h in read_sidecar(ckpt)["handoffs"]] == ["pass", "fail"]
    with pytest.raises(ChipshiftError, match=r"last handoff \(cpu:float32 -> cpu:float64.*failed.*--force"):
        check_handoff_allowed(ckpt)
    assert check_handoff_allowed(ckpt, force=True)["verdict"] == "fail"


def test_handoff_refuses_a_corrupt_checkpoint(ckpt, tmp_path):
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ChipshiftError, match="model.safetensors is corrupt"):
        handoff(ckpt, "cpu:float32", "cpu:float64", out=tmp_path / "h")


def test_handoff_hashes_each_file_once_and_a_dump_alone_verifies(ckpt, tmp_path, monkeypatch):
    from chipshift.model import checkpoint

    hashed = []
    sha256_file = checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", lambda path: hashed.append(path.name) or sha256_file(path))
    files = sorted(read_sidecar(ckpt)["files"])
    handoff(ckpt, "cpu:float32", "cpu:bfloat16", reference="cpu:float64", out=tmp_path / "h")
    assert sorted(hashed) == files  # three dumps, one verification
    hashed.clear()
    assert main(["parity", "dump", str(ckpt), "--out", str(tmp_path / "d")]) == 0
    assert sorted(hashed) == files


def test_train_pair_compares_loss_curves_step_by_step(tmp_path):
    import numpy as np

    from chipshift.parity.train import train_pair
    from chipshift.train.config import from_dict
    from chipshift.train.data import TokenWindows

    base = np.random.default_rng(0).integers(0, 512, 48)
    toks = np.concatenate([np.roll(base, k) for k in range(60)]).astype(np.uint16)
    cfg = from_dict({"model": {"preset": "tiny"}, "data": {"seq_len": 32, "batch_size": 4},
                     "optim": {"warmup_steps": 1}, "train": {"eval_every": 0, "ckpt_every": 0}})
    kw = dict(train_stream=TokenWindows(toks, 32, 0), progress=False)
    same = train_pair(cfg, "cpu:float32", "cpu:float32", 4, tmp_path / "same", **kw)
    assert same["verdict"] == "pass" and same["loss"]["max_rel_diff"] == 0
    assert len(same["loss"]["a"]) == 4 and same["loss"]["a"][-1] < same["loss"]["a"][0]
    assert (tmp_path / "same" / "loss.png").exists() and "PASS" in (tmp_path / "same" / "report.md").read_text()
    # a tolerance nothing can meet: bfloat16 differs from float32 at the first step
    bf16 = train_pair(cfg, "cpu:float32", "cpu:bfloat16", 2, tmp_path / "bf16", thresholds={"loss_fail": 1e-9}, **kw)
    assert bf16["rule_dtype"] == "bfloat16" and bf16["verdict"] == "fail"
    assert 0 < bf16["loss"]["max_rel_diff"] < 0.05
    with pytest.raises(ChipshiftError, match="exists"):
        train_pair(cfg, "cpu:float32", "cpu:float32", 1, tmp_path / "same", **kw)
