"""Parity: planted faults are found exactly where they were planted; bad input is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from chipshift.errors import ChipshiftError
from chipshift.model.config import preset
from chipshift.model.transformer import build_model
from chipshift.parity.compare import compare_dumps
from chipshift.parity.dump import Dump, default_batch, load_batch, record_run, write_dump
from parity_helpers import one_thread  # noqa: F401  (autouse)

CFG = preset("tiny", num_layers=4)
BATCH, BATCH_SOURCE = default_batch(CFG, None, batch_size=2, seq_len=32)
ENV = {"device": "cpu", "device_name": "test CPU", "chip": None, "threads": 1, "torch": torch.__version__,
       "plugin": None}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _noise(shape, dtype, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def plant(model, kind: str, module: str) -> None:
    """Plant one numerical fault in `module` of `model`."""
    sub = model.get_submodule(module)
    if kind == "scale_noise":  # a wrong kernel: its output (and so its gradient) off by ~30%
        sub.register_forward_hook(lambda m, a, out: out * (1 + 0.3 * _noise(out.shape, out.dtype)))
    elif kind == "add_noise":  # forward-only: noise added to the output, the Jacobian untouched
        sub.register_forward_hook(lambda m, a, out: out + 0.3 * out.std() * _noise(out.shape, out.dtype))
    elif kind == "eps":  # a different RMSNorm epsilon in this one layer
        sub.eps = 1e-2
    elif kind == "grad_noise":  # backward-only: a wrong gradient kernel, forward exact
        sub.register_full_backward_hook(
            lambda m, gin, gout: (gin[0] * (1 + 0.3 * _noise(gin[0].shape, gin[0].dtype)),) + tuple(gin[1:]))
    else:
        raise AssertionError(kind)


def make_dump(path, dtype="float32", fault=None, *, steps=1, max_tensor_mb=32.0, cfg=CFG, batch=BATCH):
    model = build_model(cfg, dtype=DTYPES[dtype], seed=0)
    if fault is not None:
        plant(model, *fault)
    run = record_run(model, batch, steps=steps, max_tensor_bytes=int(max_tensor_mb * 2**20), progress=False)
    info = {"config": cfg.to_dict(), "weights_sha256": "seed-0"}
    return Dump(write_dump(path, run, model_info=info, batch=batch, batch_source=BATCH_SOURCE,
                           dtype=DTYPES[dtype], env=ENV))


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    return {dt: make_dump(root / dt, dt) for dt in ("float32", "bfloat16", "float64")}


def test_same_run_passes_with_zero_error(baselines, tmp_path):
    result = compare_dumps(baselines["float32"], make_dump(tmp_path / "again"))
    assert result["verdict"] == "pass"
    assert result["first_failing"] == {"forward": None, "backward": None}
    assert result["mode"] == "tensors"
    rows = result["modules"]["forward"] + result["modules"]["backward"]
    assert all(r["max_abs_err"] == 0.0 and r["cosine"] == pytest.approx(1.0) for r in rows)
    assert len(result["modules"]["forward"]) == 4 * 12 + 3  # 12 per layer + embedding, norm, logits


@pytest.mark.parametrize("dtype,kind,module", [
    ("float32", "scale_noise", "layers.1.mlp"),
    ("float32", "scale_noise", "layers.0.self_attn"),
    ("float32", "scale_noise", "layers.3.mlp.down_proj"),
    ("float32", "eps", "layers.0.post_attention_layernorm"),
    ("float32", "eps", "layers.3.input_layernorm"),
    ("bfloat16", "scale_noise", "layers.2.mlp"),
    ("bfloat16", "eps", "layers.1.input_layernorm"),
    ("float64", "scale_noise", "layers.2.self_attn.v_proj"),
])
def test_planted_fault_is_named_forward_and_backward(baselines, tmp_path, dtype, kind, module):
    result = compare_dumps(baselines[dtype], make_dump(tmp_path / "b", dtype, (kind, module)))
    assert result["verdict"] == "fail"
    assert result["first_failing"] == {"forward": module, "backward": module}
    # the first failure in backward time lies downstream (or is the module itself)
    raw = result["first_failing_in_time"]["backward"]
    row = next(r for r in result["modules"]["backward"] if r["name"] == raw)
    assert raw == module or raw.startswith(module + ".") or row["downstream_of"] == module


@pytest.mark.parametrize("module", ["layers.2.self_attn.o_proj", "layers.0.mlp.up_proj"])
def test_backward_only_fault_is_named_in_backward_only(baselines, tmp_path, module):
    result = compare_dumps(baselines["float32"], make_dump(tmp_path / "b", "float32", ("grad_noise", module)))
    assert result["first_failing"] == {"forward": None, "backward": module}
    assert result["verdict"] == "fail"


def test_forward_only_fault_never_blames_an_upstream_module(baselines, tmp_path):
    result = compare_dumps(baselines["float32"], make_dump(tmp_path / "b", "float32", ("add_noise", "layers.2.mlp")))
    assert result["first_failing"]["forward"] == "layers.2.mlp"
    assert result["first_failing"]["backward"] in ("layers.2.mlp", None)


def test_statistics_only_dumps_are_compared_by_statistics_and_say_so(tmp_path):
    a = make_dump(tmp_path / "a", max_tensor_mb=0)
    assert a.doc["tensors_file"] is None and not (a.path / "tensors.safetensors").exists()
    same = compare_dumps(a, make_dump(tmp_path / "a2", max_tensor_mb=0))
    assert same["verdict"] == "pass" and same["mode"] == "statistics"
    assert any("statistics only" in n for n in same["notes"])
    bad = compare_dumps(a, make_dump(tmp_path / "b", fault=("eps", "layers.1.post_attention_layernorm"),
                                     max_tensor_mb=0))
    assert bad["first_failing"]["forward"] == "layers.1.post_attention_layernorm"
    assert bad["verdict"] == "fail"


def test_budget_is_all_or_nothing(tmp_path):
    d = make_dump(tmp_path / "small", max_tensor_mb=0.2)  # the tiny model's tensors are ~1.5 MiB
    assert "exceed the budget" in d.doc["stats_only"]
    assert all(r["tensor"] is None for r in d.doc["records"])
    assert d.doc["tensors_file"] is None


def test_error_ratio_rule_against_a_float64_reference(baselines):
    ref, fp32, bf16 = baselines["float64"], baselines["float32"], baselines["bfloat16"]
    same = compare_dumps(fp32, fp32, ref)
    assert same["verdict"] == "pass" and same["rule"].startswith("error ratio")
    assert all(r["ratio"] <= 1.0 for r in same["modules"]["forward"])
    worse = compare_dumps(fp32, bf16, ref)  # bfloat16 is far worse than float32 against float64
    assert worse["verdict"] == "fail"
    assert min(r["ratio"] for r in worse["modules"]["forward"][1:]) > 100  # [0] is the exact embedding
    better = compare_dumps(bf16, fp32, ref)
    assert better["verdict"] == "pass"


def test_statistics_only_reference_turns_the_ratio_rule_to_statistics(baselines, tmp_path):
    ref = make_dump(tmp_path / "r", "float64", max_tensor_mb=0)
    result = compare_dumps(baselines["float32"], baselines["bfloat16"], ref)
    assert result["mode"] == "statistics"
    assert all("norm_rel_diff" in r and "ratio" in r for r in result["modules"]["backward"])


def test_loss_curve_compared_step_by_step(baselines, tmp_path):
    a = make_dump(tmp_path / "a", steps=3)
    b = make_dump(tmp_path / "b", steps=3, fault=("scale_noise", "layers.3.mlp"))
    result = compare_dumps(a, b)
    loss = result["loss"]
    assert len(loss["a"]) == 4 and loss["a"][3] < loss["a"][0]  # AdamW on one batch: it learns
    assert loss["max_rel_diff"] > 0
    assert compare_dumps(a, make_dump(tmp_path / "a2", steps=3))["loss"]["max_rel_diff"] == 0


# -- bad input: a clear error naming the mismatch, never a silent pass --------------------
def test_different_batches_are_refused(baselines, tmp_path):
    other, _ = default_batch(CFG, None, seq_len=32, seed=1)
    with pytest.raises(ChipshiftError, match="different batches"):
        compare_dumps(baselines["float32"], make_dump(tmp_path / "b", batch=other))


def test_different_models_are_refused(baselines, tmp_path):
    with pytest.raises(ChipshiftError, match="different models: num_layers 4 vs 3"):
        compare_dumps(baselines["float32"], make_dump(tmp_path / "b", cfg=preset("tiny", num_layers=3)))


def test_different_steps_are_refused(baselines, tmp_path):
    with pytest.raises(ChipshiftError, match="different --steps: 1 vs 2"):
        compare_dumps(baselines["float32"], make_dump(tmp_path / "b", steps=2))


def test_mismatched_module_lists_are_refused(baselines, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(baselines["float32"].path, b)
    doc = json.loads((b / "dump.json").read_text())
    doc["records"] = [r for r in doc["records"] if r["name"] != "layers.2.mlp.up_proj"]
    (b / "dump.json").write_text(json.dumps(doc))
    with pytest.raises(ChipshiftError, match="different forward module lists: only in the first: layers.2.mlp.up_proj"):
        compare_dumps(baselines["float32"], Dump(b))


def test_missing_and_corrupt_files_are_named(baselines, tmp_path):
    with pytest.raises(ChipshiftError, match="parity dump not found"):
        Dump(tmp_path / "nowhere")
    b = tmp_path / "b"
    shutil.copytree(baselines["float32"].path, b)
    (b / "tensors.safetensors").unlink()
    with pytest.raises(ChipshiftError, match="tensors.safetensors is missing"):
        Dump(b)
    (b / "dump.json").write_text("{not json")
    with pytest.raises(ChipshiftError, match="corrupt"):
        Dump(b)


def test_batch_file_is_validated(tmp_path):
    f = tmp_path / "batch.json"
    f.write_text(json.dumps({"input_ids": [[1, 2, 3], [4, 5, 6]]}))
    assert load_batch(f, 512).tolist() == [[1, 2, 3], [4, 5, 6]]
    f.write_text(json.dumps([[1, 2, 3], [4, 5]]))
    with pytest.raises(ChipshiftError, match="same length"):
        load_batch(f, 512)
    f.write_text(json.dumps([[1, 2, 999]]))
    with pytest.raises(ChipshiftError, match=r"\[0, 512\)"):
        load_batch(f, 512)
