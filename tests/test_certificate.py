"""The certificate a handoff writes into the checkpoint, and `parity verify` judging a device
against it in a fresh directory, without the source chip: pass, the ratio rule's verdict for
bfloat16, a planted fault named, bad certificates refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest

from chipshift.cli import main
from chipshift.model.checkpoint import save_checkpoint
from chipshift.model.config import preset
from chipshift.model.transformer import build_model
from chipshift.parity import dump as dump_module
from chipshift.parity.certificate import add_to_certificate, read_certificate, verify
from chipshift.parity.handoff import handoff
from parity_helpers import one_thread  # noqa: F401  (autouse)
from test_parity import plant


def _handed_off(tmp_path, source: str, target: str, **kw):
    """A checkpoint handed off in one run directory, then copied to a fresh one (as if to
    another machine) and the original run directory removed."""
    run = tmp_path / "run"
    ckpt = save_checkpoint(build_model(preset("tiny", num_layers=4), seed=0), run / "ckpt")
    record, _ = handoff(ckpt, source, target, out=run / "handoff", steps=1, progress=False, **kw)
    moved = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(ckpt, moved)
    shutil.rmtree(run)
    return moved, record


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    return _handed_off(tmp_path_factory.mktemp("cert"), "cpu:float32", "cpu:bfloat16")[0]


def test_the_handoff_writes_the_certificate_into_the_checkpoint(moved):
    cert = read_certificate(moved)
    assert cert["handoff"]["verdict"] == "pass" and cert["handoff"]["first_failing"] == {"forward": None,
                                                                                        "backward": None}
    assert set(cert["checkpoint"]["files"]) == {"model.safetensors"}
    assert {k: e["dtype"] for k, e in cert["environments"].items()} == {
        "from": "float32", "to": "bfloat16", "reference": "float64"}
    ref = cert["reference"]
    assert ref["mode"] == "tensors" and ref["bytes"] < ref["budget_mb"] * 2**20
    assert {k: d["dtype"] for k, d in ref["dumps"].items()} == {"reference": "float64", "from": "float32",
                                                                "to": "bfloat16"}
    md = (moved / "certificate" / "certificate.md").read_text()
    assert "cpu:float32 → cpu:bfloat16: **PASS**" in md and "model.safetensors" in md
    assert cert["serve_check"] is None and cert["eval"] is None

    # a later stage's figures land in it
    assert add_to_certificate(moved, serve_check={"verdict": "pass", "device": "cpu", "dtype": "float32",
                                                  "max_abs": 1e-6, "mean_abs": 1e-7, "greedy_agreement": 1.0})
    assert read_certificate(moved)["serve_check"]["max_abs"] == 1e-6
    assert "PASS on cpu in float32" in (moved / "certificate" / "certificate.md").read_text()


def test_verify_in_a_fresh_directory_float32_and_bfloat16_pass(moved, tmp_path):
    r32 = verify(moved, "cpu", "float32", out=tmp_path / "v32", progress=False)
    assert r32["verdict"] == "pass" and r32["rule"] == "error ratio against the reference"
    assert r32["baseline"] == {"stored": "from", "target": "cpu:float32", "dtype": "float32"}
    assert r32["summary"]["forward"]["max_error"] == 0.0  # the same CPU computes the same bits
    # bfloat16 is judged against the stored bfloat16 side (the handoff passed it): ratio 1, pass
    r16 = verify(moved, "cpu", "bfloat16", out=tmp_path / "v16", progress=False)
    assert r16["baseline"]["stored"] == "to" and r16["verdict"] == "pass"
    assert (tmp_path / "v16" / "report" / "report.md").exists()


def test_bfloat16_against_a_float32_only_certificate_fails_the_ratio_rule(tmp_path):
    """When only float32 was trusted (a float32 -> float32 move), bfloat16 is judged against
    float32's error: its error against float64 is thousands of times larger, so the rule
    fails it, first at the embedding (whose bfloat16 weights are already rounded)."""
    moved, _ = _handed_off(tmp_path, "cpu:float32", "cpu:float32")
    result = verify(moved, "cpu", "bfloat16", out=tmp_path / "v", progress=False)
    assert result["baseline"]["dtype"] == "float32"
    assert result["verdict"] == "fail" and result["first_failing"]["forward"] == "embed_tokens"


def test_a_planted_fault_is_named(moved, tmp_path, monkeypatch):
    load = dump_module.load_checkpoint

    def faulty(*args, **kwargs):
        model, sidecar = load(*args, **kwargs)
        plant(model, "scale_noise", "layers.2.mlp")
        return model, sidecar

    monkeypatch.setattr(dump_module, "load_checkpoint", faulty)
    result = verify(moved, "cpu", "float32", out=tmp_path / "v", progress=False)
    assert result["verdict"] == "fail"
    assert result["first_failing"] == {"forward": "layers.2.mlp", "backward": "layers.2.mlp"}


def test_statistics_only_within_a_zero_budget_still_verifies(tmp_path):
    moved, _ = _handed_off(tmp_path, "cpu:float32", "cpu:bfloat16", certificate_mb=0)
    cert = read_certificate(moved)
    assert cert["reference"]["mode"] == "statistics" and "budget of 0 MiB" in cert["reference"]["stats_only"]
    assert not list((moved / "certificate").rglob("tensors.safetensors"))
    result = verify(moved, "cpu", "float32", out=tmp_path / "v", progress=False)
    assert result["verdict"] == "pass" and result["mode"] == "statistics"


def test_bad_certificates_are_one_line_and_exit_2(moved, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(moved, bad)
    cert_file = bad / "certificate" / "certificate.json"
    doc = json.loads(cert_file.read_text())
    doc["checkpoint"]["files"]["model.safetensors"] = "0" * 64
    cert_file.write_text(json.dumps(doc))
    assert main(["parity", "verify", str(bad), "--dtype", "float32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "model.safetensors has sha256" in err and "not of these weights" in err

    shutil.rmtree(bad)
    shutil.copytree(moved, bad)
    shutil.rmtree(bad / "certificate" / "reference" / "reference")
    assert main(["parity", "verify", str(bad), "--dtype", "float32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stored reference dump (certificate/reference/reference) is missing" in err

    shutil.rmtree(bad / "certificate")
    assert main(["parity", "verify", str(bad)]) == 2
    assert "has no certificate" in capsys.readouterr().err
