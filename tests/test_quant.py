"""Weight-only quantized layers (chipshift/model/quant.py): GGUF blocks kept as they are."""

import numpy as np
import pytest
import torch

from chipshift.errors import ChipshiftError, CheckpointError
from chipshift.model import quant
from chipshift.model.checkpoint import load_checkpoint, save_checkpoint
from chipshift.model.config import preset
from chipshift.model.transformer import build_model
from infer_helpers import assert_greedy_agrees_up_to_near_ties



@pytest.mark.parametrize("fmt", list(quant.FORMATS))
def test_quantize_and_dequantize_are_llama_cpps(fmt):
    """Byte for byte the gguf package's quantizer (llama.cpp's reference), and its dequantizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    w = torch.randn(12, 96, generator=torch.Generator().manual_seed(0)) * 0.1
    w[3, :32] = 0  # an all-zero block: scale 0
    blocks = quant.quantize(w, fmt)
    want = quantize(w.numpy(), GGMLQuantizationType[fmt])
    assert np.array_equal(blocks.numpy(), want)
    assert torch.equal(quant.dequantize(blocks, fmt, 96),
                       torch.from_numpy(dequantize(want, GGMLQuantizationType[fmt]).astype(np.float32)))


def test_an_unservable_format_is_refused_naming_the_served_ones(tmp_path):
    with pytest.raises(CheckpointError, match="'Q5_K' cannot be served; chipshift serves Q8_0, Q4_0, Q4_1"):
        quant.check_format("Q5_K")
    model = build_model(preset("tiny"), dtype=torch.float32, seed=0)
    quant.quantize_model(model, "Q8_0")
    ckpt = save_checkpoint(model, tmp_path / "q")
    from chipshift.model.checkpoint import update_sidecar, read_sidecar

    formats = read_sidecar(ckpt)["quantized"]
    update_sidecar(ckpt, quantized={**formats, "layers.0.mlp.up_proj.weight": "Q5_K"})
    with pytest.raises(CheckpointError, match="'Q5_K' cannot be served; chipshift serves Q8_0, Q4_0, Q4_1"):
        load_checkpoint(ckpt, verify=False)


@pytest.mark.parametrize("fmt", list(quant.FORMATS))
def test_a_quantized_model_saves_loads_and_computes_its_dequantized_weights(tmp_path, fmt):
    """Blocks survive a checkpoint byte for byte; the plain path equals a float model holding
    the dequantized weights; the memory held is that of the blocks."""
    model = build_model(preset("tiny"), dtype=torch.float32, seed=0)
    formats = quant.quantize_model(model, fmt)
    assert formats["embed_tokens.weight"] == "Q8_0" and formats["layers.0.mlp.up_proj.weight"] == fmt
    loaded, side = load_checkpoint(save_checkpoint(model, tmp_path / "q"))
    assert side["quantized"] == formats and side["dtype"] == "float32"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    float_model = build_model(preset("tiny"), dtype=torch.float32, seed=0)
    sd = {k: quant.dequantize(v, formats[k], float_model.get_parameter(k).shape[1]) if k in formats else v
          for k, v in loaded.state_dict().items()}
    float_model.load_state_dict(sd, strict=False)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), float_model(ids))
    held = sum(b.numel() for b in loaded.buffers() if b.dtype == torch.uint8)
    assert held < 0.3 * sum(p.numel() * 4 for p in float_model.parameters())


@pytest.mark.any_class
def test_keep_quantized_gguf_import_serves_the_same_weights(tmp_path):
    """SmolLM2's Q4_1 GGUF read with keep_quantized: its blocks as they are (Q4_1 layers, a
    Q8_0 embedding; q/k rows unpermuted whole), logits bitwise those of the dequantizing
    import in float32. (In memory: the command's checkpoint writing is the same as above.)"""
    from gguf import GGUFReader

    from chipshift.data.packages import smollm2_gguf
    from chipshift.model.cli import import_model
    from chipshift.model.gguf import config_from_gguf, read_gguf_tensors

    reader = GGUFReader(str(smollm2_gguf()))
    cfg = config_from_gguf(reader)
    blocks, kept = read_gguf_tensors(reader, cfg, "llama", keep_quantized=True)
    floats, none = read_gguf_tensors(reader, cfg, "llama")
    assert none == {} and kept["embed_tokens.weight"] == "Q8_0"
    assert set(kept.values()) == {"Q8_0", "Q4_1"} and len(kept) == 1 + 7 * cfg.num_layers
    models = []
    for sd, formats in ((blocks, kept), (floats, {})):
        model = build_model(cfg, dtype=torch.float32, seed=None)
        quant.swap_in(model, formats)
        model.load_state_dict(sd, strict=False)
        models.append(model)
    assert sum(t.numel() for t in blocks.values()) < 0.2 * 4 * sum(t.numel() for t in floats.values())
    ids = torch.tensor([[1, 504, 3458, 314, 260]])
    with torch.no_grad():
        assert torch.equal(models[0](ids), models[1](ids))
    with pytest.raises(ChipshiftError, match="--keep-quantized applies to .gguf files"):
        import_model(tmp_path, tmp_path / "x", keep_quantized=True)


PROMPTS = [[1, 5, 9, 2, 7], [3, 3, 8], [10, 4, 6, 2, 2, 9, 1], [7]]


@pytest.mark.parametrize("half, pin", [("emulated", "auto"), ("native", "auto"), ("emulated", "off")],
                         ids=["emulated-kernels", "native-kernels", "no-compiler"])
@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_1"])
def test_engine_serves_a_quantized_model_as_the_reference_generates(monkeypatch, half, pin, fmt):
    """The engine (the native decode step and integer kernels where they build, the layers'
    own dequantizing path elsewhere) against the naive generator on the same quantized model:
    the kernels quantize activations to 8 bits, so a near-tie of the reference's logits may
    flip; every disagreement must be one, and the first tokens must agree."""
    from chipshift.devices import kernels
    from chipshift.infer.engine import Engine
    from chipshift.infer.sampling import SamplingParams

    monkeypatch.setenv("CHIPSHIFT_HALF", half)
    monkeypatch.setenv("CHIPSHIFT_CPU_KERNELS", pin)
    model = build_model(preset("tiny", init_std=0.15, max_seq_len=96), dtype=torch.float32, seed=0)
    quant.quantize_model(model, fmt)
    model.to(torch.bfloat16)
    engine = Engine(model, max_batch=4)
    native = pin != "off" and kernels.bf16_linear_status() is None
    assert (engine.native_step is not None) is native
    outputs = engine.generate(PROMPTS, SamplingParams(max_tokens=16, stop_ids=()))
    assert_greedy_agrees_up_to_near_ties(model, PROMPTS, outputs, 16, tolerance=0.03)


def test_quantize_command_and_serve_with_the_openai_client(tmp_path, tiny_tokenizer_dir, capsys):
    """`chipshift quantize` writes a checkpoint (blocks, tokenizer, sidecar formats) that
    `chipshift serve` serves to the official client; a bad format is one line naming them."""
    import openai

    from chipshift.cli import main
    from chipshift.model.checkpoint import read_sidecar
    from infer_helpers import live_server, make_checkpoint

    ckpt = make_checkpoint(tiny_tokenizer_dir, tmp_path / "f")
    assert main(["quantize", str(ckpt), str(tmp_path / "q"), "--format", "Q4_0"]) == 0
    side = read_sidecar(tmp_path / "q")
    assert set(side["quantized"].values()) == {"Q4_0", "Q8_0"} and (tmp_path / "q" / "tokenizer.json").exists()
    with live_server(tmp_path / "q") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        name = client.models.list().data[0].id
        comp = client.completions.create(model=name, prompt="the capital of", max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
        assert comp.usage.completion_tokens == 8 and comp.choices[0].finish_reason == "length"
    capsys.readouterr()
    assert main(["quantize", str(ckpt), str(tmp_path / "x"), "--format", "Q5_K"]) == 2
    assert "'Q5_K' cannot be served; chipshift serves Q8_0, Q4_0, Q4_1" in capsys.readouterr().err
