"""Checkpoint format: round trip, checksums, refusal of corrupt or truncated files by name."""

import json

import pytest
import torch

from chipshift.errors import CheckpointError
from chipshift.model import build_model, preset
from chipshift.model.checkpoint import (
    SIDECAR,
    load_checkpoint,
    read_sidecar,
    save_checkpoint,
    update_sidecar,
    verify_checkpoint,
)

pytestmark = pytest.mark.any_class  # nothing here asks the precision policy (conftest checks)


@pytest.fixture
def ckpt(tmp_path, tiny_tokenizer_dir):
    model = build_model(preset("tiny", tie_embeddings=False, qkv_bias=True), seed=1)
    return save_checkpoint(model, tmp_path / "ckpt", tokenizer_dir=tiny_tokenizer_dir, meta={"step": 7}), model


def test_round_trip_is_exact(ckpt):
    path, model = ckpt
    loaded, side = load_checkpoint(path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert side["meta"] == {"step": 7}
    assert side["model_config"] == model.cfg.to_dict()
    assert side["dtype"] == "float32" and side["device"] == "cpu"
    assert {"torch", "chipshift", "python"} <= set(side["versions"])
    assert set(side["files"]) == {"model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def test_load_in_another_dtype(ckpt):
    path, model = ckpt
    loaded, _ = load_checkpoint(path, dtype=torch.bfloat16)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight.to(torch.bfloat16))


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_corrupt_file_is_refused_by_name(ckpt, name):
    path, _ = ckpt
    f = path / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{name} is corrupt"):
        load_checkpoint(path)


def test_truncated_file_is_refused_by_name(ckpt):
    path, _ = ckpt
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        verify_checkpoint(path)


def test_missing_file_and_foreign_directories(ckpt, tmp_path):
    path, _ = ckpt
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        read_sidecar(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a chipshift checkpoint"):
        read_sidecar(tmp_path / "empty")
    (tmp_path / "empty" / SIDECAR).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_sidecar(tmp_path / "empty")


def test_overwrite_is_whole_and_sidecar_updates(ckpt, tmp_path):
    path, _ = ckpt
    other = build_model(preset("tiny"), seed=2)
    save_checkpoint(other, path)
    loaded, side = load_checkpoint(path)
    assert torch.equal(loaded.embed_tokens.weight, other.embed_tokens.weight)
    assert "tokenizer.json" not in side["files"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    update_sidecar(path, handoffs=[{"from": "cpu", "to": "cpu"}])
    assert json.loads((path / SIDECAR).read_text())["handoffs"] == [{"from": "cpu", "to": "cpu"}]
    verify_checkpoint(path)  # the sidecar is not among the checksummed files


def test_weights_that_do_not_match_the_config_are_refused(ckpt):
    path, _ = ckpt
    side = json.loads((path / SIDECAR).read_text())
    side["model_config"]["tie_embeddings"] = True  # now lm_head.weight is unexpected
    (path / SIDECAR).write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(path)
