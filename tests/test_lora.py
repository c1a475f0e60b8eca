"""LoRA: only adapters train, merged == unmerged logits, clean names, Hugging Face export."""

import pytest
import torch

from chipshift.errors import ConfigError
from chipshift.model.checkpoint import load_checkpoint, write_checkpoint
from chipshift.model.config import ModelConfig
from chipshift.model.lora import TARGETS, LoRAConfig, LoRALinear, apply_lora, merge_lora
from chipshift.model.transformer import build_model

pytestmark = pytest.mark.any_class  # nothing here asks the precision policy (conftest checks)

CFG = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=128, max_seq_len=64)


def lora_model(targets=TARGETS, seed=0):
    model = build_model(CFG, seed=1)
    lora = apply_lora(model, LoRAConfig(enabled=True, rank=4, alpha=8.0, targets=list(targets)), seed=seed)
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for m in lora.modules().values():
            m.lora_B.normal_(0, 0.05)
    return model, lora


def test_starts_as_the_base_model_and_trains_only_adapters():
    base = build_model(CFG, seed=1)
    model = build_model(CFG, seed=1)
    lora = apply_lora(model, LoRAConfig(enabled=True, rank=4, targets=["q_proj", "v_proj", "down_proj"]))
    ids = torch.randint(0, CFG.vocab_size, (2, 16))
    assert torch.equal(model(ids), base(ids))  # B = 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(lora.modules()) == 3 * CFG.num_layers
    assert not isinstance(model.layers[0].self_attn.k_proj, LoRALinear)


def test_merged_logits_match_unmerged():
    model, lora = lora_model()
    ids = torch.randint(0, CFG.vocab_size, (2, 24))
    with torch.no_grad():
        unmerged = model(ids)
        merged_sd = lora.merged_state_dict()
        plain = build_model(CFG, seed=None)
        plain.load_state_dict(merged_sd, strict=True)  # clean names, nothing missing or extra
        assert (plain(ids) - unmerged).abs().max().item() <= 1e-5
        merge_lora(model)  # in place, back to plain Linear layers
        assert (model(ids) - unmerged).abs().max().item() <= 1e-5
    assert not any("lora" in n for n in model.state_dict())


def test_merged_context_runs_one_gemm_per_layer_and_follows_the_adapter():
    """`LoRA.merged()` (GRPO's rollouts): the same logits up to rounding, one F.linear per
    adapted layer; the adapter's next values are merged on the next entry (its buffer
    reused); training forwards outside it are untouched; half-precision weights refused."""
    model, lora = lora_model()
    ids = torch.randint(0, CFG.vocab_size, (2, 24))
    calls = []
    with torch.no_grad():
        unmerged = model(ids)
        with lora.merged():
            linear = torch.nn.functional.linear
            torch.nn.functional.linear = lambda *a, **k: calls.append(1) or linear(*a, **k)
            try:
                merged = model(ids)
            finally:
                torch.nn.functional.linear = linear
        assert (merged - unmerged).abs().max().item() <= 1e-5
        assert len(calls) == len(lora.modules()) + 1  # one GEMM each, and the output head
        assert all(m.merged is None for m in lora.modules().values())
        buffers = [m._merge_buffer for m in lora.modules().values()]
        for m in lora.modules().values():
            m.lora_B.mul_(2)
        moved = model(ids)
        with lora.merged():
            assert (model(ids) - moved).abs().max().item() <= 1e-5
        assert all(m._merge_buffer is b for m, b in zip(lora.modules().values(), buffers))
    half, half_lora = lora_model()
    half.to(torch.bfloat16)
    assert not half_lora.can_merge()
    with pytest.raises(ValueError, match="float32 weights"):
        with half_lora.merged():
            pass


def test_adapter_state_round_trip():
    model, lora = lora_model()
    other, other_lora = lora_model(seed=5)
    other_lora.load_state_dict(lora.state_dict())
    ids = torch.randint(0, CFG.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(other(ids), model(ids))
    with pytest.raises(ConfigError):
        other_lora.load_state_dict({k: v for k, v in lora.state_dict().items() if "q_proj" not in k})


def test_bad_settings_are_refused():
    for bad in (dict(rank=0), dict(alpha=-1.0), dict(dropout=1.0), dict(targets=["attn"]), dict(targets=[])):
        with pytest.raises(ConfigError):
            LoRAConfig(enabled=True, **bad).check()


def test_merged_checkpoint_exports_to_transformers(tmp_path, tiny_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    from chipshift.model.hf import export_hf

    cfg = ModelConfig(**{**CFG.to_dict(), "vocab_size": 300})
    model = build_model(cfg, seed=1)
    lora = apply_lora(model, LoRAConfig(enabled=True, rank=4, alpha=8.0))
    with torch.no_grad():
        for m in lora.modules().values():
            m.lora_B.normal_(0, 0.05)
    ckpt = write_checkpoint(tmp_path / "ckpt", lora.merged_state_dict(), cfg, tokenizer_dir=tiny_tokenizer_dir)
    loaded, _ = load_checkpoint(ckpt)
    out = export_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        want = model(ids)
        assert (loaded(ids) - want).abs().max().item() <= 1e-5
        assert (hf(ids).logits - want).abs().max().item() <= 1e-4
