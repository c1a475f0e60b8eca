"""Model configuration and named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from chipshift.errors import ConfigError


@dataclass
class ModelConfig:
    """Shape of a Llama-family decoder (Llama 2/3, Mistral, SmolLM2, Qwen2)."""

    vocab_size: int = 32000
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int = 4
    intermediate_size: int = 2048
    head_dim: int | None = None  # defaults to hidden_size // num_heads
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    # Llama-3 frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2 puts a bias on q, k and v
    init_std: float = 0.02
    architecture: str = "llama"  # the family name exported to Hugging Face: llama | qwen2 | mistral

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        self.validate()

    def validate(self) -> None:
        positive = ["vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "intermediate_size", "head_dim", "max_seq_len"]
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{key} = {value!r}: must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_kv_heads = {self.num_kv_heads}: must divide "
                              f"model.num_heads = {self.num_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim = {self.head_dim}: RoPE needs an even head dimension")
        if self.architecture not in ("llama", "qwen2", "mistral"):
            raise ConfigError(f"model.architecture = {self.architecture!r}: allowed: llama, qwen2, mistral")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        return cls(**d)

    def num_params(self, include_embedding: bool = True) -> int:
        h, hd, L = self.hidden_size, self.head_dim, self.num_layers
        attn = h * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h
        total = L * per_layer + h + (emb if include_embedding else 0)
        if not self.tie_embeddings:
            total += emb
        return total


PRESETS: dict[str, dict] = {
    # for unit tests: builds and runs in milliseconds
    "tiny": dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=128, max_seq_len=256),
    # the two shapes of bench/train_vs_hf.py
    "S": dict(vocab_size=8192, hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=6,
              intermediate_size=1024, max_seq_len=1024),
    "M": dict(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
              intermediate_size=2048, max_seq_len=2048),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                         num_kv_heads=3, intermediate_size=1536, max_seq_len=8192,
                         rope_theta=100000.0, tie_embeddings=True),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
                         num_kv_heads=8, intermediate_size=8192, max_seq_len=131072,
                         rope_theta=500000.0, tie_embeddings=True,
                         rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14,
                       num_kv_heads=2, intermediate_size=4864, max_seq_len=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_embeddings=True,
                       qkv_bias=True, architecture="qwen2"),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; allowed: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
