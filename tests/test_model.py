"""The decoder and the naive reference generator."""

import pytest
import torch

from chipshift.errors import ConfigError
from chipshift.model import ModelConfig, build_model, preset
from chipshift.model.generate import generate_naive, sample_next

pytestmark = pytest.mark.any_class  # nothing here asks the precision policy (conftest checks)


def tiny(**overrides):
    return preset("tiny", **overrides)


def test_same_seed_gives_bit_identical_weights():
    a = build_model(tiny(), seed=5).state_dict()
    b = build_model(tiny(), seed=5).state_dict()
    c = build_model(tiny(), seed=6).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.self_attn.q_proj.weight"], c["layers.0.self_attn.q_proj.weight"])


def test_init_is_independent_of_the_build_dtype():
    """Weights are drawn in float32 on the CPU, then cast: a bf16 build is the fp32 one rounded."""
    fp32 = build_model(tiny(), seed=1).state_dict()
    bf16 = build_model(tiny(), dtype=torch.bfloat16, seed=1).state_dict()
    assert all(torch.equal(fp32[k].to(torch.bfloat16), bf16[k]) for k in fp32)


def test_tied_model_stores_no_lm_head_and_untied_does():
    assert "lm_head.weight" not in build_model(tiny(tie_embeddings=True)).state_dict()
    untied = build_model(tiny(tie_embeddings=False))
    assert "lm_head.weight" in untied.state_dict()
    assert untied.output_weight is untied.lm_head.weight


def test_param_count_matches_config():
    for cfg in (tiny(), tiny(tie_embeddings=False, qkv_bias=True), tiny(head_dim=32)):
        model = build_model(cfg)
        assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


@pytest.mark.parametrize("cfg", [tiny(), tiny(num_kv_heads=1, qkv_bias=True),
                                 tiny(rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                        original_max_position_embeddings=16))])
def test_sdpa_and_math_attention_agree(cfg):
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.attn_impl = "sdpa"
        a = model(ids)
        model.attn_impl = "math"
        b = model(ids)
    assert (a - b).abs().max().item() < 1e-5


def test_segment_ids_isolate_packed_documents():
    """Two documents packed in one row give the logits each gives alone."""
    model = build_model(tiny(), seed=0)
    g = torch.Generator().manual_seed(1)
    doc1, doc2 = torch.randint(0, 512, (1, 11), generator=g), torch.randint(0, 512, (1, 7), generator=g)
    packed = torch.cat([doc1, doc2], dim=1)
    segments = torch.tensor([[0] * 11 + [1] * 7])
    positions = torch.cat([torch.arange(11), torch.arange(7)])[None]
    with torch.no_grad():
        for impl in ("sdpa", "math"):
            model.attn_impl = impl
            out = model(packed, positions=positions, segment_ids=segments)
            assert (out[:, :11] - model(doc1)).abs().max() < 1e-5
            assert (out[:, 11:] - model(doc2)).abs().max() < 1e-5
        # without the segment mask the second document would see the first
        plain = model(packed, positions=positions)
        assert (plain[:, 11:] - model(doc2)).abs().max() > 1e-3


def test_causality():
    model = build_model(tiny(), seed=0)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, 8] = (changed[0, 8] + 1) % 512
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :8], b[:, :8]) and not torch.equal(a[:, 8:], b[:, 8:])


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        ModelConfig(num_heads=12, num_kv_heads=5)
    with pytest.raises(ConfigError, match="architecture"):
        ModelConfig(architecture="gpt2")
    with pytest.raises(ConfigError, match="allowed"):
        preset("huge")
    with pytest.raises(ConfigError, match="bogus"):
        ModelConfig.from_dict({"bogus": 1})


def test_presets_have_the_published_shapes():
    assert 134e6 < preset("smollm2-135m").num_params() < 136e6
    assert 1.2e9 < preset("llama-3.2-1b").num_params() < 1.25e9
    assert 0.49e9 < preset("qwen2-0.5b").num_params() < 0.5e9


# -- naive generator ---------------------------------------------------------------------
def test_greedy_generation_is_argmax_of_a_full_recompute():
    model = build_model(tiny(), seed=3)
    prompt = [1, 5, 9, 2]
    out = generate_naive(model, prompt, 6)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]


def test_generation_stops_after_a_stop_id_and_at_max_seq_len():
    model = build_model(tiny(max_seq_len=12), seed=3)
    free = generate_naive(model, [1, 2, 3], 5)
    stopped = generate_naive(model, [1, 2, 3], 5, stop_ids={free[2]})
    assert stopped == free[:free.index(free[2]) + 1]
    assert len(generate_naive(model, [1, 2, 3], 50)) == 12 - 3


def test_sampling_is_reproducible_with_a_seed():
    model = build_model(tiny(), seed=3)
    kw = dict(temperature=1.0, top_p=0.9, top_k=50)
    a = generate_naive(model, [1, 2], 12, seed=4, **kw)
    assert a == generate_naive(model, [1, 2], 12, seed=4, **kw)
    assert a != generate_naive(model, [1, 2], 12, seed=5, **kw)


def test_sample_next_filters():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 2.0])
    assert sample_next(logits) == 1  # greedy
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, top_k=2, generator=g) for _ in range(200)} == {1, 2}
    # probabilities ~ [.02, .44, .40, .01, .16]: top_p=0.5 keeps the two most likely
    assert {sample_next(logits, 1.0, top_p=0.5, generator=g) for _ in range(200)} == {1, 2}
    assert {sample_next(logits, 1.0, top_p=0.1, generator=g) for _ in range(50)} == {1}
    assert sample_next(logits, 1e-4, generator=g) == 1  # near-zero temperature is near-greedy
