"""`chipshift plan`: FLOP counts against published runs and torch's own counter, memory
arithmetic, the acceptance commands, and clear errors for bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from chipshift.cli import main
from chipshift.errors import ChipshiftError
from chipshift.model import flops, memory
from chipshift.model.checkpoint import save_checkpoint
from chipshift.model.config import ModelConfig, preset
from chipshift.model.transformer import build_model
from chipshift.plan.estimate import (make_plan, poisson_quantile, require_fit, resolve_chip, resolve_chip_key,
                                     resolve_model)
from chipshift.plan.report import TAGS

pytestmark = pytest.mark.any_class  # nothing here asks the precision policy (conftest checks)

LLAMA3_8B = ModelConfig(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                        intermediate_size=14336, max_seq_len=8192, tie_embeddings=False)
# GPT-3 175B: 96 layers, d_model 12288, tied 50257-token embedding, 4x GELU MLP; a SwiGLU
# width of 8/3 * 4 h / 2 = 32768 gives the same 8 h^2 MLP parameters.
GPT3_175B = ModelConfig(vocab_size=50257, hidden_size=12288, num_layers=96, num_heads=96, num_kv_heads=96,
                        intermediate_size=32768, max_seq_len=2048, tie_embeddings=True)


# -- FLOPs -------------------------------------------------------------------------------

def test_flops_match_published_runs():
    # GPT-3 paper (Brown et al. 2020, table D.1): 175B on 300B tokens = 3.14e23 FLOPs
    n = flops.matmul_params(GPT3_175B)
    assert n == pytest.approx(174.6e9, rel=0.01)
    dense, attn = flops.training_flops(n, 96, 12288, 2048, 300e9)
    assert dense == pytest.approx(3.14e23, rel=0.01)
    assert attn / dense == pytest.approx(0.028, abs=0.005)  # the few per cent the paper leaves out
    # Chinchilla (Hoffmann et al. 2022): 70B on 1.4T tokens, Gopher's budget of 5.76e23
    spec = resolve_model(params=70e9, seq_len=2048)
    dense, _ = flops.training_flops(spec.n_matmul.value, spec.cfg.num_layers, flops.attention_dim(spec.cfg),
                                    2048, 1.4e12)
    assert dense == pytest.approx(5.76e23, rel=0.03)
    # Llama-3-8B on 15T tokens: 8.03B parameters; the 6ND convention gives 7.2e23
    assert LLAMA3_8B.num_params() == pytest.approx(8.03e9, rel=0.002)
    assert 6 * LLAMA3_8B.num_params() * 15e12 == pytest.approx(7.2e23, rel=0.01)
    # chipshift counts only matmul parameters (the input embedding lookup is free) and adds
    # attention at the 8192-token context: the two corrections nearly cancel here
    dense, attn = flops.training_flops(flops.matmul_params(LLAMA3_8B), 32, 4096, 8192, 15e12)
    assert dense == pytest.approx(6 * (8.03e9 - 128256 * 4096) * 15e12, rel=0.002)
    assert attn == pytest.approx(1.93e23, rel=0.01)


def test_flops_formula_matches_torch_flop_counter():
    """6N + 12 L A S is exactly the matmul FLOPs of a forward + backward pass of our model
    (math attention: torch counts the full S x S product, as the formula does)."""
    cfg = preset("tiny")
    model = build_model(cfg)
    model.attn_impl = "math"
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(ids).float().logsumexp(-1).mean().backward()
    assert counter.get_total_flops() == pytest.approx(flops.model_flops_per_token(cfg, 64) * 2 * 64, rel=0.01)


# -- memory ------------------------------------------------------------------------------

def test_memory_states_and_sharding():
    cfg, n = LLAMA3_8B, LLAMA3_8B.num_params()
    prec = memory.PRECISIONS["bf16-mixed"]
    assert prec.state_bytes_per_param == 16 == memory.PRECISIONS["fp32"].state_bytes_per_param
    ddp = memory.memory_per_chip(n, cfg, 64, "ddp", False, prec, 1, 8192)
    fsdp = memory.memory_per_chip(n, cfg, 64, "fsdp", False, prec, 1, 8192)
    assert ddp.params + ddp.grads + ddp.optimizer == pytest.approx(16 * n)
    assert fsdp.params + fsdp.grads + fsdp.optimizer == pytest.approx(16 * n / 64)
    assert fsdp.activations == ddp.activations
    ckpt = memory.memory_per_chip(n, cfg, 64, "fsdp", True, prec, 1, 8192)
    assert ckpt.activations < fsdp.activations / 3  # the fp32 loss head over 128k tokens stays
    # math attention keeps the S x S probabilities: far more than the fused kernel at 8k
    math_act = memory.activation_bytes(cfg, 1, 8192, prec, "math")
    assert math_act > 3 * fsdp.activations
    usable = 72e9
    k = memory.smallest_count(n, cfg, usable, "fsdp", True, prec, 1, 8192)
    assert memory.memory_per_chip(n, cfg, k, "fsdp", True, prec, 1, 8192).total <= usable
    assert memory.memory_per_chip(n, cfg, k - 1, "fsdp", True, prec, 1, 8192).total > usable
    assert memory.smallest_count(n, cfg, usable, "ddp", False, prec, 1, 8192) is None


def test_master_weight_step_counts_its_float32_gradients_where_activations_are_small():
    """After backward the bf16 recipe's step holds float32 gradients in place of the half ones:
    18 bytes per parameter with the activations freed, so a step needs the states plus the larger
    of the activations and 2 bytes per parameter. Sharded or float32 runs have no such step."""
    cfg, n = LLAMA3_8B, LLAMA3_8B.num_params()
    prec = memory.PRECISIONS["bf16-mixed"]
    small = memory.memory_per_chip(n, cfg, 1, "ddp", True, prec, 1, 128)
    assert small.activations < 2 * n and small.total == pytest.approx(18 * n)
    large = memory.memory_per_chip(n, cfg, 1, "ddp", False, prec, 8, 8192)
    assert large.activations > 2 * n and large.total == pytest.approx(16 * n + large.activations)
    sharded = memory.memory_per_chip(n, cfg, 8, "fsdp", True, prec, 1, 128)
    assert sharded.master_step == 0
    assert memory.memory_per_chip(n, cfg, 1, "ddp", True, memory.PRECISIONS["fp32"], 1, 128).master_step == 0
    tiny = preset("tiny")
    assert memory.training_memory(tiny, 1, 8, True, "sdpa").master_step == 2 * tiny.num_params()
    assert memory.training_memory(tiny, 1, 8, True, "sdpa", master=False).master_step == 0


@pytest.mark.parametrize("attention", ["flash", "math"])
def test_activation_count_matches_saved_tensors(attention):
    """The per-layer count equals the bytes autograd really saves for one decoder layer."""
    cfg = preset("S")
    model = build_model(cfg)
    layer, B, T = model.layers[0], 2, 128
    x = torch.randn(B, T, cfg.hidden_size, requires_grad=True)
    cos, sin = model.rope(torch.arange(T).expand(B, T), torch.float32)
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), cos, sin)}
    saved: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in skip:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, cos, sin, None, None, "sdpa" if attention == "flash" else "math")
    mask = T * T if attention == "math" else 0  # the bool causal mask, built per call
    expected = memory.layer_activation_bytes(cfg, T, 4, attention) * B * T + mask
    assert sum(saved.values()) == pytest.approx(expected, rel=0.01)


# -- models and chips --------------------------------------------------------------------

def test_resolve_model_sources(tmp_path):
    spec = resolve_model(params=7e9)
    assert (spec.cfg.num_layers, spec.cfg.hidden_size) == (32, 4096)  # Llama-2-7B's shape
    assert spec.n_params.source == "given" and spec.seq_len.source.startswith("assumed")
    assert any("vocab 32000 assumed" in note for note in spec.notes)
    small = resolve_model("S", seq_len=256)
    assert small.n_params.value == preset("S").num_params() and small.seq_len.source == "given"
    ckpt = save_checkpoint(build_model(preset("tiny")), tmp_path / "ck")
    from_ckpt = resolve_model(str(ckpt))
    assert from_ckpt.cfg == preset("tiny") and "checkpoint" in from_ckpt.n_params.source
    shaped = resolve_model(layers=16, hidden=2048, vocab=128256)
    assert shaped.n_params.source.startswith("derived") and shaped.cfg.num_heads == 16


def test_chip_aliases_and_sources():
    assert resolve_chip_key("h100") == "h100-sxm"
    assert resolve_chip_key("ascend-910b") == "ascend-910b"
    chip = resolve_chip("h20")
    assert chip.peak_flops.source.startswith("datasheet (estimate)")
    assert resolve_chip("h100").peak_flops.source.startswith("datasheet (official)")
    assert chip.mfu.source.startswith("assumed") and resolve_chip("h20", mfu=0.3).mfu.source == "given"


def test_plan_figures_all_name_a_source():
    plan = make_plan(resolve_model(params=7e9), 2e12, resolve_chip("ascend-910b"), count=1024,
                     price_per_hour=1.5)
    kinds = tuple(TAGS)
    for name, fig in plan.figures.items():
        assert fig.source.startswith(kinds), (name, fig.source)
    f = plan.figures
    assert f["flops_total"].value == pytest.approx(f["flops_dense"].value + f["flops_attention"].value)
    assert f["chip_hours"].value * 3600 * 376e12 * 0.40 == pytest.approx(f["flops_total"].value)
    assert f["wall_days"].value == pytest.approx(f["chip_hours"].value / 1024 / 24)
    assert f["energy_mwh"].value == pytest.approx(f["chip_hours"].value * 400 / 1e6)
    assert f["cost"].value == pytest.approx(f["chip_hours"].value * 1.5)
    assert plan.fits == "FSDP/ZeRO-3"


def test_nodes_failures_and_checkpoint_interval():
    plan = make_plan(resolve_model(params=7e9), 2e12, resolve_chip("ascend-910b"), count=1024)
    f = plan.figures
    assert f["nodes"].value == 128 and f["chips_per_node"].source.startswith("assumed")
    assert f["failure_rate"].value == pytest.approx(0.474, abs=1e-3) and "Llama 3" in f["failure_rate"].source
    mtbf_h = 24_000 / (f["failure_rate"].value * 1024)
    assert f["job_mtbf_hours"].value == pytest.approx(mtbf_h)
    assert f["expected_failures"].value == pytest.approx(f["wall_days"].value * 24 / mtbf_h)
    assert f["checkpoint_bytes"].value == 12 * 7e9 and f["checkpoint_write_s"].value == pytest.approx(42)
    young = math.sqrt(2 * 42 * mtbf_h * 3600) / 60
    assert f["checkpoint_interval_min"].value == pytest.approx(young)
    # Poisson(3.53): P(N <= 8) < 0.99 <= P(N <= 9)
    assert f["max_restarts"].value == 9 == poisson_quantile(f["expected_failures"].value)
    lost = f["expected_failures"].value * (5 * 60 + 42 + young * 30) + f["wall_days"].value * 86400 / (young * 60) * 42
    assert f["time_lost_hours"].value == pytest.approx(lost / 3600)
    # given figures replace the assumed ones; no failures, no restarts
    calm = make_plan(resolve_model(params=7e9), 2e12, resolve_chip("h100"), count=16, chips_per_node=4,
                     failure_rate=0, checkpoint_gbps=10).figures
    assert calm["nodes"].value == 4 and calm["failure_rate"].source == "given"
    assert calm["expected_failures"].value == 0 and calm["max_restarts"].value == 0
    assert calm["checkpoint_interval_min"].value == pytest.approx(calm["wall_days"].value * 24 * 60)


# -- the command -------------------------------------------------------------------------

def test_acceptance_single_chip(capsys):
    assert main(["plan", "--params", "7e9", "--tokens", "2e12", "--chip", "ascend-910b", "--count", "1024"]) == 0
    out = capsys.readouterr().out
    assert "1024 x ascend-910b" in out and "datasheet (estimate)" in out and "assumed" in out
    assert "FSDP/ZeRO-3 + act. ckpt" in out and "verdict: fits" in out
    assert "nodes, failures and checkpoints" in out and "Young's interval" in out
    assert "torchrun --nnodes 128 --nproc-per-node 8 --rdzv-backend c10d" in out and "--max-restarts 9" in out
    assert main(["plan", "--params", "7e9", "--tokens", "2e12", "--chip", "h100", "--count", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["chip"]["key"] == "h100-sxm" and data["figures"]["chips"]["value"] == 8


def test_acceptance_compare(tmp_path, capsys):
    png = tmp_path / "cmp.png"
    assert main(["plan", "--params", "7e9", "--tokens", "2e12", "--compare", "h100,h800,h20,ascend-910b,ascend-910c",
                 "--png", str(png)]) == 0
    out = capsys.readouterr().out
    for key in ("h100-sxm", "h800", "h20", "ascend-910b", "ascend-910c"):
        assert key in out
    assert "[D]" in out and "[E]" in out and "[A]" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


@pytest.mark.parametrize("argv, message", [
    (["--params", "7e9", "--chip", "h10"], "known chips: h100-sxm"),
    (["--params", "7e9", "--chip", "ascend-910"], "unknown chip 'ascend-910'; known chips:"),
    (["--params=-7e9", "--chip", "h100"], "--params = -7e+09: must be between"),
    (["--params", "1e20", "--chip", "h100"], "--params"),
    (["--params", "7e9", "--chip", "h100", "--mfu", "1.5"], "--mfu"),
    (["--params", "7e9", "--chip", "h100", "--count", "0"], "--count"),
    (["--params", "7e9", "--chip", "h100", "--failure-rate=-1"], "--failure-rate = -1: must be between"),
    (["--params", "7e9", "--chip", "h100", "--count", "1"], "GB more than the 72.0 GB usable; it fits on 2"),
    (["--params", "7e9", "--chip", "h100", "--seq-len", "2000000"], "no chip count fits"),
    (["--chip", "h100"], "describe the model"),
    (["--params", "7e9"], "exactly one of --chip"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys):
    assert main(["plan", "--tokens", "2e12", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_require_fit_says_by_how_much():
    plan = make_plan(resolve_model(params=7e9), 2e12, resolve_chip("h100"), count=1)
    lean = min(m.total for m, _ in plan.memory_rows)
    short = f"{(lean - 72e9) / 1e9:.1f} GB more than the 72.0 GB usable; it fits on 2 chips"
    with pytest.raises(ChipshiftError, match=short):
        require_fit(plan)
