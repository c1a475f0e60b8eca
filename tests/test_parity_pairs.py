"""Pairs that really differ on one CPU get sensible figures and the right default verdict.

float32 vs float64 ~1e-7 relative, float32 vs bfloat16 ~1e-2, one vs two threads and eager
vs torch.compile at float32 rounding or exact: all of them pass under the default
thresholds, and the error-ratio rule passes a bfloat16 run against another bfloat16 run.
"""

from __future__ import annotations

import pytest

from chipshift.model.checkpoint import save_checkpoint
from chipshift.model.config import preset
from chipshift.model.transformer import build_model
from chipshift.parity.compare import compare_dumps
from chipshift.parity.dump import Dump, dump_checkpoint
from parity_helpers import one_thread  # noqa: F401  (autouse)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(build_model(preset("tiny", num_layers=4), seed=0),
                           tmp_path_factory.mktemp("pairs") / "ckpt")


@pytest.fixture(scope="module")
def dumps(ckpt):
    def get(name, **kw):
        if name not in cache:
            cache[name] = Dump(dump_checkpoint(ckpt, ckpt.parent / name, steps=2, progress=False, **kw))
        return cache[name]
    cache: dict[str, Dump] = {}
    return get


def medians(result):
    return [result["summary"][d]["median_error"] for d in ("forward", "backward")]


def test_float32_vs_float64(dumps):
    result = compare_dumps(dumps("f64", dtype="float64"), dumps("f32", dtype="float32"))
    assert result["verdict"] == "pass" and result["rule_dtype"] == "float32"
    for m in medians(result):
        assert 1e-9 < m < 1e-5
    assert 0 < result["loss"]["max_rel_diff"] < 1e-5


def test_float32_vs_bfloat16(dumps):
    result = compare_dumps(dumps("f32", dtype="float32"), dumps("bf16", dtype="bfloat16"))
    assert result["verdict"] in ("pass", "warn") and result["rule_dtype"] == "bfloat16"
    assert result["first_failing"] == {"forward": None, "backward": None}
    for m in medians(result):
        assert 1e-3 < m < 5e-2
    assert result["summary"]["forward"]["min_cosine"] > 0.999


def test_one_vs_two_threads(dumps):
    result = compare_dumps(dumps("f32", dtype="float32"), dumps("f32-t2", dtype="float32", threads=2))
    assert result["dumps"]["a"]["threads"] == 1 and result["dumps"]["b"]["threads"] == 2
    assert result["verdict"] == "pass"
    assert max(medians(result)) < 1e-6  # MKL here is even bit-identical across thread counts


def test_bfloat16_against_bfloat16_by_error_ratio(dumps):
    result = compare_dumps(dumps("bf16", dtype="bfloat16"), dumps("bf16", dtype="bfloat16"),
                           dumps("f64", dtype="float64"))
    assert result["verdict"] == "pass"
    assert all(r["ratio"] <= 1.0 for d in ("forward", "backward") for r in result["modules"][d])


@pytest.mark.slow
def test_eager_vs_compile(dumps):
    result = compare_dumps(dumps("f32", dtype="float32"), dumps("f32-compiled", dtype="float32", compile=True))
    assert result["dumps"]["b"]["compile"] is True
    assert result["verdict"] == "pass"
    assert 0 < max(medians(result)) < 1e-5  # inductor's fused kernels round differently


@pytest.mark.slow
def test_smollm2_dump_fits_the_budget_and_compares_in_under_a_minute(tmp_path):
    import time
    ckpt = save_checkpoint(build_model(preset("smollm2-135m"), seed=0), tmp_path / "smol")
    # float32 on both sides: the subject is the dump's size and the comparison's time, not
    # the dtype the precision policy would pick on this CPU
    a = Dump(dump_checkpoint(ckpt, tmp_path / "a", dtype="float32", progress=False))
    assert "exceed the budget of 32 MiB" in a.doc["stats_only"]  # statistics only by default
    assert sum(f.stat().st_size for f in a.path.iterdir()) < 1 << 20
    assert len(a.records("forward")) == 30 * 12 + 3
    b = Dump(dump_checkpoint(ckpt, tmp_path / "b", dtype="float32", threads=2, progress=False))
    t0 = time.perf_counter()
    result = compare_dumps(a, b)
    assert time.perf_counter() - t0 < 60
    assert result["verdict"] == "pass" and result["mode"] == "statistics"
