"""GGUF adapter: import a llama.cpp `.gguf` file into a chipshift checkpoint.

Supported: `general.architecture` llama (Llama, Mistral, SmolLM2, ...) and qwen2, with
tensors in F32, F16, BF16, Q8_0, Q4_0 or Q4_1 (dequantised to float32 by the `gguf`
package, or with `keep_quantized` kept as the quantized blocks they are). Three things
differ from the Hugging Face layout:

  - names: `blk.3.attn_q.weight` is our `layers.3.self_attn.q_proj.weight` (map below);
  - RoPE layout: llama.cpp's converter permutes the rows of q_proj and k_proj of llama
    models, within each head, from rotate-half order (pairs i, i + d/2) to interleaved order
    (pairs 2i, 2i + 1); `unpermute_rope_rows` undoes it (qwen2 files are not permuted);
  - tokenizer: stored as metadata (`tokenizer.ggml.*`); transformers' GGUF converter turns
    it into tokenizer.json, and the chat template and bos/eos go to tokenizer_config.json.

Llama-3 files with a `rope_freqs` tensor (frequency scaling stored as factors) are refused.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from chipshift.errors import CheckpointError
from chipshift.model import quant
from chipshift.model.checkpoint import write_checkpoint
from chipshift.model.config import ModelConfig
from chipshift.model.hf import check_state_dict

SUPPORTED_ARCHS = ("llama", "qwen2")
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def our_name(gguf_name: str) -> str:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m is None or m.group(2) not in BLOCK_NAMES:
        raise CheckpointError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: interleaved rotary pairs back to rotate-half.

    llama.cpp stored row (h, 2i + j) of head h from our row (h, j * d/2 + i); works for
    weights (rows, cols) and biases (rows,) alike.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(rows, *w.shape[1:])


# -- metadata ----------------------------------------------------------------------------
def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def config_from_gguf(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise CheckpointError("this GGUF stores Llama-3 RoPE scaling as a rope_freqs tensor, which is not "
                              "supported; import the Hugging Face folder instead")

    def need(key):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"GGUF metadata {arch}.{key} is missing")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise CheckpointError(f"partial RoPE ({rope_dim} of {head_dim} dimensions) is not supported")
    name = str(_field(reader, "general.name", "")).lower()
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        intermediate_size=int(need("feed_forward_length")),
        head_dim=head_dim,
        max_seq_len=int(_field(reader, f"{arch}.context_length", 2048)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        architecture="mistral" if arch == "llama" and "mistral" in name else arch,
    )


# -- tensors -----------------------------------------------------------------------------
def read_gguf_tensors(reader, cfg: ModelConfig, arch: str, keep_quantized: bool = False
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Our state dict from the GGUF's tensors, and {name: format} of those kept quantized:
    with `keep_quantized`, tensors in a format chipshift serves (Q8_0, Q4_0, Q4_1) keep
    their blocks byte for byte; other quantized formats are refused; the rest (norms,
    float tensors) is dequantised to float32."""
    from gguf.quants import dequantize

    sd, kept = {}, {}
    for t in tqdm(reader.tensors, desc="reading GGUF", unit="tensor", leave=False):
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise CheckpointError(f"GGUF tensor {t.name} has type {kind}; supported: {', '.join(SUPPORTED_TYPES)}")
        name = our_name(t.name)
        if keep_quantized and kind in quant.FORMATS:
            w = torch.from_numpy(np.array(t.data, dtype=np.uint8)).reshape(t.data.shape[0], -1)  # (rows, bytes)
            kept[name] = kind
        else:  # `dequantize` returns float32 in PyTorch's (rows, cols) order
            w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        if arch == "llama" and ".q_proj." in name:  # whole rows move: blocks stay intact
            w = unpermute_rope_rows(w, cfg.num_heads)
        elif arch == "llama" and ".k_proj." in name:
            w = unpermute_rope_rows(w, cfg.num_kv_heads)
        sd[name] = w.contiguous()
    return sd, kept


def write_tokenizer(gguf_path: Path, reader, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json (chat template, special tokens) from metadata."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False))}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tok, key, None)
        if value is not None:
            config[key] = str(value)
    template = _field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def import_gguf(src: str | Path, out: str | Path, dtype: torch.dtype | None = None,
                keep_quantized: bool = False) -> Path:
    """Convert a `.gguf` file into a chipshift checkpoint at `out` (float32 unless `dtype`).
    With `keep_quantized` its Q8_0/Q4_0/Q4_1 tensors stay quantized blocks (served by
    `chipshift.model.quant`'s layers) and the rest is stored in `dtype` (default bfloat16)."""
    from gguf import GGUFReader

    src = Path(src)
    if not src.is_file():
        raise CheckpointError(f"not found: {src}")
    try:
        reader = GGUFReader(str(src))
    except (ValueError, OSError, IndexError) as exc:
        raise CheckpointError(f"{src} is not a readable GGUF file: {exc}") from None
    cfg = config_from_gguf(reader)
    sd, kept = read_gguf_tensors(reader, cfg, _field(reader, "general.architecture"), keep_quantized)
    if keep_quantized and not kept:
        raise CheckpointError(f"{src} holds no tensor in a format chipshift serves quantized "
                              f"({', '.join(quant.FORMATS)}); import it without --keep-quantized")
    check_state_dict(sd, cfg, src, quantized=kept)
    dtype = dtype or (torch.bfloat16 if keep_quantized else None)
    if dtype is not None:
        sd = {k: v if k in kept else v.to(dtype) for k, v in sd.items()}
    meta = {"imported_from": {"format": "gguf", "path": str(src.resolve()),
                              "file_type": _field(reader, "general.file_type")}}
    with tempfile.TemporaryDirectory() as tmp:
        has_tokenizer = "tokenizer.ggml.model" in reader.fields
        if has_tokenizer:
            write_tokenizer(src, reader, Path(tmp))
        return write_checkpoint(out, sd, cfg, dtype=dtype or torch.float32, quantized=kept,
                                tokenizer_dir=tmp if has_tokenizer else None, meta=meta)
