"""Hugging Face adapter: logits parity with transformers through import, export and
import -> export -> import, on random models built in-process."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from chipshift.errors import CheckpointError
from chipshift.model import build_model
from chipshift.model.checkpoint import load_checkpoint, save_checkpoint
from chipshift.model.config import ModelConfig
from chipshift.model.hf import config_from_hf, export_hf, import_hf

TOL = 1e-4
SHAPE = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=96, max_position_embeddings=64)

CASES = {
    "llama-gqa-untied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-mha-tied-llama3-rope": ("LlamaConfig", dict(
        num_key_value_heads=4, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8))),
    "qwen2-gqa-tied-bias": ("Qwen2Config", dict(num_key_value_heads=1, tie_word_embeddings=True,
                                                rope_theta=1e6, rms_norm_eps=1e-6)),
    "qwen2-gqa-untied-bias": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral-gqa-untied": ("MistralConfig", dict(num_key_value_heads=2, tie_word_embeddings=False,
                                                 sliding_window=None, head_dim=24)),
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere, biases and norms included, so a swapped or dropped
    tensor cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.08 * noise)


def _hf_model(case: str):
    cls_name, extra = CASES[case]
    cfg = getattr(transformers, cls_name)(**SHAPE, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    _randomise(model, seed=1)
    return model


def _ids():
    return torch.randint(0, SHAPE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(2))


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _our_logits(ckpt, ids):
    model, _ = load_checkpoint(ckpt, dtype=torch.float32)
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("case", list(CASES))
def test_import_export_roundtrip_logits_parity(case, tmp_path):
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # sharded, with an index
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ids = _ids()
    want = _hf_logits(hf, ids)

    ckpt = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    imported = (_our_logits(ckpt, ids) - want).abs().max().item()
    assert imported <= TOL, f"import: max abs diff {imported:.3g}"

    export_hf(ckpt, tmp_path / "exported")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").float().eval()
    assert type(back) is type(hf)
    exported = (_hf_logits(back, ids) - want).abs().max().item()
    assert exported <= TOL, f"export: max abs diff {exported:.3g}"

    ckpt2 = import_hf(tmp_path / "exported", tmp_path / "ckpt2")
    round_trip = (_our_logits(ckpt2, ids) - want).abs().max().item()
    assert round_trip <= TOL, f"import->export->import: max abs diff {round_trip:.3g}"
    print(f"{case}: import {imported:.2e} export {exported:.2e} round trip {round_trip:.2e}")


@pytest.mark.parametrize("cfg", [
    ModelConfig(vocab_size=80, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                intermediate_size=64, qkv_bias=True, tie_embeddings=False),  # llama + bias: zero o_proj bias
    ModelConfig(vocab_size=80, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2,
                intermediate_size=64, qkv_bias=True, architecture="qwen2",
                rope_scaling=dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8)),
])
def test_export_of_a_native_model_matches_transformers(cfg, tmp_path):
    model = build_model(cfg, seed=3)
    _randomise(model, seed=4)
    save_checkpoint(model, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    assert diff <= TOL


def test_tokenizer_and_chat_template_survive_import_and_export(tmp_path, tiny_tokenizer_dir):
    hf = _hf_model("llama-gqa-untied")
    hf.save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / "hf" / name).write_bytes((tiny_tokenizer_dir / name).read_bytes())
    ckpt = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    template = (tiny_tokenizer_dir / "chat_template.jinja").read_text()
    assert json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"] == template

    export_hf(ckpt, tmp_path / "out")
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (tmp_path / "out" / name).exists(), name
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ref = transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    messages = [{"role": "user", "content": "hello there"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok("hello there").input_ids == ref("hello there").input_ids
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ref.eos_token_id


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(CheckpointError, match="LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM"):
        config_from_hf({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


def test_unsupported_rope_scaling_is_refused():
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
          "num_attention_heads": 2, "intermediate_size": 8, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(CheckpointError, match="yarn"):
        config_from_hf(hf)


def test_pickled_weights_are_refused(tmp_path):
    hf = _hf_model("llama-gqa-untied")
    hf.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="pickle"):
        import_hf(tmp_path, tmp_path / "ckpt")


def test_corrupt_safetensors_is_refused_by_name(tmp_path):
    hf = _hf_model("llama-gqa-untied")
    hf.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")


def test_cli_import_export_generate(tmp_path, tiny_tokenizer_dir, capsys):
    from chipshift.cli import main
    from chipshift.data.tokenizer import Tokenizer
    from chipshift.model.generate import generate_naive

    hf = _hf_model("qwen2-gqa-tied-bias")
    hf.save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / "hf" / name).write_bytes((tiny_tokenizer_dir / name).read_bytes())
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--dtype", "float32"]) == 0
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--format", "hf"]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "ckpt"), "hello there", "--chat", "--max-new-tokens", "5",
                 "--device", "cpu", "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    tok = Tokenizer.load(tmp_path / "ckpt")
    model, _ = load_checkpoint(tmp_path / "ckpt")
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hello there"}]))
    want = tok.decode(generate_naive(model, prompt, 5, stop_ids=tok.stop_ids()))
    assert printed == want + "\n"


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, tiny_tokenizer_dir):
    cfg = transformers.LlamaConfig(**{**SHAPE, "vocab_size": 64})
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_bytes((tiny_tokenizer_dir / "tokenizer.json").read_bytes())
    with pytest.raises(CheckpointError, match="more than the model's vocab_size 64"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")


def test_weights_that_contradict_config_json_are_refused(tmp_path):
    _hf_model("llama-gqa-untied").save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match="mlp.gate_proj.weight has shape"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
