"""Training FLOPs of a Llama-family decoder.

Per trained token (forward + backward = 3 x forward):

    flops_per_token = 6 * N  +  12 * L * A * S

  - N: parameters that take part in a matmul for every token: every weight except an
    untied input-embedding table, whose lookup costs no FLOPs (a tied table counts once,
    as the output projection). For a bare `--params` count, N is that count, which is the
    convention behind published "6ND" figures.
  - 12 * L * A * S: attention scores and weighted values (q k^T and p v, 2 * 2 * A * S
    forward FLOPs per token and layer, times 3), with A = num_heads * head_dim and S the
    sequence length, counted over the full S x S square as in PaLM (Chowdhery et al. 2022,
    appendix B) and nanoGPT's `estimate_mfu`, so MFU figures stay comparable with theirs.

Norms, RoPE, softmax and the optimizer step are left out, as in those references.
"""

from __future__ import annotations

from chipshift.model.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters used in a matmul per token (see the module docstring)."""
    total = cfg.num_params()
    return total - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size)


def attention_dim(cfg: ModelConfig) -> int:
    return cfg.num_heads * cfg.head_dim


def flops_per_token(n_matmul: float, num_layers: int, attn_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12 L A S."""
    return 6.0 * n_matmul + 12.0 * num_layers * attn_dim * seq_len


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return flops_per_token(matmul_params(cfg), cfg.num_layers, attention_dim(cfg), seq_len)


def training_flops(n_matmul: float, num_layers: int, attn_dim: int, seq_len: int,
                   tokens: float) -> tuple[float, float]:
    """(dense 6ND term, attention term) of a whole run, in FLOPs."""
    return 6.0 * n_matmul * tokens, 12.0 * num_layers * attn_dim * seq_len * tokens
