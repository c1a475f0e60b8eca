"""Hugging Face adapter: import a model folder into a chipshift checkpoint, export one back.

Supported architectures: LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM. Our
parameter names are Hugging Face's without the `model.` prefix, and both sides use the
same rotate-half RoPE layout, so no weight is permuted here: the map is a rename.

Import reads `config.json` (old `rope_theta`/`rope_scaling` keys and the newer
`rope_parameters` alike), `model.safetensors` or sharded `model-0000x-of-0000y.safetensors`
with their index, and the tokenizer (`tokenizer.json`, `tokenizer_config.json`, with a
separate `chat_template.jinja` merged into the config). Pickled `.bin` weights are refused:
loading them would run arbitrary code.

Export writes what `transformers.AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load as they are: config.json, model.safetensors,
generation_config.json, tokenizer.json and tokenizer_config.json with the chat template.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from chipshift.errors import CheckpointError
from chipshift.model import quant
from chipshift.model.checkpoint import float_dtype, load_tensors, write_checkpoint
from chipshift.model.config import ModelConfig

# Hugging Face class -> our `ModelConfig.architecture` (and its `model_type`)
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
HF_CLASS = {arch: cls for cls, arch in ARCHITECTURES.items()}
SUPPORTED = ", ".join(ARCHITECTURES)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


# -- config ------------------------------------------------------------------------------
def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, our rope_scaling) from either the old or the new config layout."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise CheckpointError(f"RoPE scaling type {rope_type!r} is not supported; "
                              f"supported: default, llama3")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {k: params[k] for k in keys}


def config_from_hf(hf: dict) -> ModelConfig:
    """Our config from a Hugging Face config.json dict; refuses what the model can't run."""
    archs = hf.get("architectures") or []
    cls = next((a for a in archs if a in ARCHITECTURES), None)
    if not archs:  # a bare config saved without a model class: go by model_type
        cls = HF_CLASS.get(hf.get("model_type"))
    if cls is None:
        raise CheckpointError(f"unsupported architecture {', '.join(archs) or hf.get('model_type')!r}; "
                              f"supported: {SUPPORTED}")
    arch = ARCHITECTURES[cls]
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act {hf['hidden_act']!r} is not supported; the MLP is SwiGLU (silu)")
    if hf.get("mlp_bias"):
        raise CheckpointError("mlp_bias=true is not supported (the MLP has no bias)")
    if arch == "qwen2" and hf.get("use_sliding_window"):
        raise CheckpointError("use_sliding_window=true is not supported (attention is full causal)")
    theta, scaling = _rope_from_hf(hf)
    max_seq_len = int(hf.get("max_position_embeddings", 2048))
    if arch == "mistral" and hf.get("sliding_window"):
        # full attention equals sliding-window attention up to the window: cap the context there
        max_seq_len = min(max_seq_len, int(hf["sliding_window"]))
    num_heads = int(hf["num_attention_heads"])
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        intermediate_size=int(hf["intermediate_size"]),
        head_dim=hf.get("head_dim"),
        max_seq_len=max_seq_len,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
        architecture=arch,
    )


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype, token_ids: dict) -> dict:
    hf = {
        "architectures": [HF_CLASS[cfg.architecture]],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": {"rope_type": "llama3", **cfg.rope_scaling} if cfg.rope_scaling else None,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **token_ids,
    }
    if cfg.architecture == "llama":
        # Llama's attention_bias covers o_proj too; export_hf writes a zero o_proj bias
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    if cfg.architecture == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None)
    if cfg.architecture == "mistral":
        hf.update(sliding_window=None)
    return hf


# -- weights -----------------------------------------------------------------------------
def _weight_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is corrupt: {exc}") from None
        return [src / s for s in shards]
    files = sorted(src.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt*"))
    if pickles:
        raise CheckpointError(f"{src} holds only pickled weights ({', '.join(pickles[:3])}); chipshift never "
                              f"unpickles (it can run arbitrary code): convert them to safetensors first")
    raise CheckpointError(f"{src} has no model.safetensors")


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"weight shard {f} is missing")
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    tensors[name] = st.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{f} is not a readable safetensors file (corrupt or truncated?): {exc}") from None
    return tensors


def _state_dict_from_hf(hf_tensors: dict[str, torch.Tensor], cfg: ModelConfig, src: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for name, t in hf_tensors.items():
        if name.endswith("rotary_emb.inv_freq"):  # a recomputed buffer some old exports saved
            continue
        if name.endswith("self_attn.o_proj.bias"):  # Llama attention_bias: only a zero bias maps
            if t.abs().max() != 0:
                raise CheckpointError(f"{src}: {name} is non-zero; an o_proj bias is not supported")
            continue
        sd[name.removeprefix("model.")] = t
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # some exports store the tied copy too
    return sd


def check_state_dict(sd: dict, cfg: ModelConfig, src: Path, quantized: dict[str, str] | None = None) -> None:
    """Refuse imported weights whose names or shapes disagree with the config (`quantized`:
    {name: format} of the tensors that are quantized blocks)."""
    from chipshift.model.quant import swap_in
    from chipshift.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
        swap_in(model, quantized or {})
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        raise CheckpointError(f"{src}: weights do not match the config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, shape in want.items():
        if tuple(sd[name].shape) != shape:
            raise CheckpointError(f"{src}: {name} has shape {tuple(sd[name].shape)}, the config implies {shape}")


# -- tokenizer ---------------------------------------------------------------------------
def tokenizer_config(src: Path) -> dict | None:
    """tokenizer_config.json with the chat template and special tokens folded in, or None."""
    if not (src / "tokenizer.json").exists():
        return None
    cfg_file = src / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    template = src / "chat_template.jinja"
    if "chat_template" not in cfg and template.exists():
        cfg["chat_template"] = template.read_text()
    special = src / "special_tokens_map.json"
    if special.exists():
        for key, value in json.loads(special.read_text()).items():
            cfg.setdefault(key, value)
    return cfg


def _stage_tokenizer(src: Path, cfg: dict, tmp: Path) -> Path:
    shutil.copyfile(src / "tokenizer.json", tmp / "tokenizer.json")
    (tmp / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return tmp


# -- import / export ---------------------------------------------------------------------
def import_hf(src: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Convert a Hugging Face model folder into a chipshift checkpoint at `out`."""
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"not found: {src}")
    cfg_file = src / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{src} has no config.json: not a Hugging Face model folder")
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_file} is corrupt: {exc}") from None
    cfg = config_from_hf(hf_cfg)
    sd = _state_dict_from_hf(_read_safetensors(_weight_files(src)), cfg, src)
    check_state_dict(sd, cfg, src)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    sd = {k: v.contiguous() for k, v in sd.items()}
    tok_cfg = tokenizer_config(src)
    if tok_cfg is not None:
        from tokenizers import Tokenizer as HFTokenizer

        n_tokens = HFTokenizer.from_file(str(src / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
        if n_tokens > cfg.vocab_size:
            raise CheckpointError(f"{src}: the tokenizer has {n_tokens} tokens, more than the model's "
                                  f"vocab_size {cfg.vocab_size}")
    meta = {"imported_from": {"format": "hf", "path": str(src.resolve())}}
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = _stage_tokenizer(src, tok_cfg, Path(tmp)) if tok_cfg is not None else None
        return write_checkpoint(out, sd, cfg, tokenizer_dir=tok_dir, meta=meta)


def _token_ids(ckpt: Path) -> dict:
    """bos/eos/pad ids for config.json and generation_config.json, from the tokenizer."""
    if not (ckpt / "tokenizer.json").exists():
        return {}
    from chipshift.data.tokenizer import Tokenizer

    tok = Tokenizer.load(ckpt)
    return {k: v for k, v in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id),
                              ("pad_token_id", tok.pad_id)) if v is not None}


def export_hf(ckpt: str | Path, out: str | Path) -> Path:
    """Write a chipshift checkpoint as a Hugging Face model folder at `out`."""
    ckpt, out = Path(ckpt), Path(out)
    tensors, side = load_tensors(ckpt)
    cfg = ModelConfig.from_dict(side["model_config"])
    quantized = side.get("quantized") or {}
    dtype = float_dtype(tensors, quantized)
    for name, fmt in quantized.items():  # Hugging Face folders hold float weights: dequantize
        tensors[name] = quant.dequantize(tensors[name], fmt, quant.columns(tensors[name], fmt)).to(dtype)
    hf_tensors = {(k if k == "lm_head.weight" else f"model.{k}"): v.contiguous() for k, v in tensors.items()}
    if cfg.architecture == "llama" and cfg.qkv_bias:
        for i in range(cfg.num_layers):
            hf_tensors[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(cfg.hidden_size, dtype=dtype)
    ids = _token_ids(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype, ids), indent=2))
    (out / "generation_config.json").write_text(json.dumps({**ids, "do_sample": False}, indent=2))
    export_hf_tokenizer(ckpt, out)
    return out


def export_hf_tokenizer(ckpt: str | Path, out: str | Path) -> bool:
    """The checkpoint's tokenizer as files transformers' AutoTokenizer loads from `out`
    (offline); False when the checkpoint has none."""
    tok_cfg = tokenizer_config(Path(ckpt))
    if tok_cfg is None:
        return False
    # "TokenizersBackend" exists only in transformers >= 5; this class loads everywhere
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    Path(out).mkdir(parents=True, exist_ok=True)
    _stage_tokenizer(Path(ckpt), tok_cfg, Path(out))
    return True


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


__all__ = ["ARCHITECTURES", "config_from_hf", "config_to_hf", "import_hf", "export_hf", "export_hf_tokenizer",
           "is_hf_folder", "tokenizer_config"]
