"""Training memory per chip: model states plus activations, by parallel strategy.

Model states (bytes per parameter, AdamW):

    recipe            params  grads  fp32 master  2 moments  total
    bf16 mixed           2      2         4           8        16   (ZeRO paper's "16 N")
    fp32                 4      4         -           8        16

With float32 master copies (chipshift's bf16 recipe, unsharded) the optimizer step moves each
half gradient into a float32 one, dropping the half one as it goes: after backward, with the
activations freed, the states reach 18 bytes per parameter. A step's peak is therefore the
states plus the larger of the activations and those 2 bytes per parameter.

DDP keeps a whole copy on every chip; FSDP / ZeRO-3 shards all of it over the chips and
gathers one layer's parameters (and reduce-scatters its gradients) at a time, two layers
in flight so the next gather overlaps the current compute.

Activations are counted as the tensors autograd keeps for the backward pass of
`chipshift.model.transformer`, per token and layer, in bytes (b bytes per activation value,
h hidden, A = heads * head_dim, K = kv_heads * head_dim, I = intermediate, H heads, S
sequence length); tensors that share storage are counted once:

    each of two RMSNorms: input, output, fp32 1/rms per row          2 b h + 4
    q and k after RoPE, v                                             b (A + 2 K)
    attention output = o_proj input                                   b A
    SwiGLU: gate, up, and silu(gate) * up                             3 b I
    fused attention kernel (sdpa / flash): log-sum-exp                4 H
    "math" attention instead: fp32 softmax probabilities              4 H S (+ b H S cast
                                                                      when b < 4)

With activation checkpointing each layer keeps only its input (h per token) and one layer
is recomputed at a time during the backward pass. On top of the layers: the final norm and
the loss head of chipshift's training loop (`chipshift.train.objectives`), a chunked
cross-entropy that never holds the full logits: per token the gradient of the hidden state
(b h), plus a float32 gradient of the output weight (4 V h) and one chunk of float32
logits (4 V per row, plus their cast when b < 4). `loss_chunk_rows` sizes that chunk, for
the objective and for this estimate alike.

`training_memory` is the same arithmetic in the training loop's terms; the loop checks a
batch with it before building the model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from chipshift.model.config import ModelConfig


@dataclass(frozen=True)
class Precision:
    name: str
    param: int
    grad: int
    master: int
    moments: int
    activation: int

    @property
    def state_bytes_per_param(self) -> int:
        return self.param + self.grad + self.master + self.moments


PRECISIONS = {
    "bf16-mixed": Precision("bf16 params and grads, fp32 master weights and AdamW moments", 2, 2, 4, 8, 2),
    "fp32": Precision("fp32 params, grads and AdamW moments", 4, 4, 0, 8, 4),
}

# FSDP gathers this many layers at once: the one computing and the one being prefetched.
FSDP_LAYERS_IN_FLIGHT = 2
# the chunked cross-entropy's float32 logits per chunk aim at this many bytes
LOSS_CHUNK_LOGIT_BYTES = 256 * 2**20


def loss_chunk_rows(vocab_size: int) -> int:
    """Rows of logits the chunked cross-entropy computes at once: as many as keep one chunk's
    float32 logits near 256 MiB (8192 rows at a 8k vocabulary, 2048 at 32k, 512 at 128k):
    fewer, larger GEMMs where the vocabulary is small, bounded memory where it is large."""
    return max(256, min(8192, LOSS_CHUNK_LOGIT_BYTES // (4 * vocab_size)))


def layer_activation_bytes(cfg: ModelConfig, seq_len: int, act_bytes: int, attention: str = "flash") -> int:
    """Bytes autograd saves per token in one decoder layer (see the module docstring)."""
    h, I = cfg.hidden_size, cfg.intermediate_size
    A, K = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    norms = 2 * (2 * act_bytes * h + 4)
    matmul_inputs = (A + 2 * K + A + 3 * I) * act_bytes
    if attention == "flash":
        kernel = cfg.num_heads * 4
    elif attention == "math":
        kernel = cfg.num_heads * seq_len * (4 + (act_bytes if act_bytes < 4 else 0))
    else:
        raise ValueError(f"attention must be flash or math, not {attention!r}")
    return norms + matmul_inputs + kernel


def activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, precision: Precision,
                     attention: str = "flash", checkpointing: bool = False) -> float:
    """Peak bytes of saved activations for one micro-batch (see the module docstring)."""
    tokens = micro_batch * seq_len
    b = precision.activation
    full_layer = layer_activation_bytes(cfg, seq_len, b, attention)
    if checkpointing:
        layers = cfg.num_layers * cfg.hidden_size * b + full_layer
    else:
        layers = cfg.num_layers * full_layer
    h, V = cfg.hidden_size, cfg.vocab_size
    head_per_token = (2 * b * h + 4) + b * h  # final norm, gradient of the hidden state
    head_fixed = 4 * V * h + min(tokens, loss_chunk_rows(V)) * V * (4 + (b if b < 4 else 0))
    return tokens * (layers + head_per_token) + head_fixed


@dataclass
class MemoryPerChip:
    strategy: str
    checkpointing: bool
    params: float
    grads: float
    optimizer: float
    gathered: float
    activations: float
    # what the master-weight optimizer step adds once the activations are gone (float32
    # gradients for the half ones): it counts only where it is larger than the activations
    master_step: float = 0.0

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.gathered + max(self.activations, self.master_step)

    @property
    def label(self) -> str:
        return self.strategy + (" + act. ckpt" if self.checkpointing else "")


STRATEGIES = ("ddp", "fsdp")
STRATEGY_NAMES = {"ddp": "DDP", "fsdp": "FSDP/ZeRO-3"}


def memory_per_chip(n_params: float, cfg: ModelConfig, count: int, strategy: str, checkpointing: bool,
                    precision: Precision, micro_batch: int, seq_len: int,
                    attention: str = "flash") -> MemoryPerChip:
    shards = count if strategy == "fsdp" else 1
    p = precision
    # unsharded, half params keep float32 masters (sharded, the float32 shards are the params)
    master_step = n_params * (p.master - p.grad) if strategy == "ddp" and p.master else 0.0
    gathered = 0.0
    if strategy == "fsdp" and count > 1:
        layer_params = n_params / cfg.num_layers
        gathered = FSDP_LAYERS_IN_FLIGHT * layer_params * (p.param + p.grad)
    return MemoryPerChip(
        strategy=STRATEGY_NAMES[strategy], checkpointing=checkpointing,
        params=n_params * p.param / shards, grads=n_params * p.grad / shards,
        optimizer=n_params * (p.master + p.moments) / shards, gathered=gathered,
        activations=activation_bytes(cfg, micro_batch, seq_len, p, attention, checkpointing),
        master_step=master_step,
    )


def all_strategies(n_params: float, cfg: ModelConfig, count: int, precision: Precision,
                   micro_batch: int, seq_len: int, attention: str = "flash") -> list[MemoryPerChip]:
    return [memory_per_chip(n_params, cfg, count, s, ckpt, precision, micro_batch, seq_len, attention)
            for s in STRATEGIES for ckpt in (False, True)]


def smallest_count(n_params: float, cfg: ModelConfig, usable_bytes: float, strategy: str,
                   checkpointing: bool, precision: Precision, micro_batch: int, seq_len: int,
                   attention: str = "flash", max_count: int = 1 << 20) -> int | None:
    """The fewest chips on which the run fits under one strategy; None when none does."""
    def fits(n: int) -> bool:
        m = memory_per_chip(n_params, cfg, n, strategy, checkpointing, precision, micro_batch, seq_len, attention)
        return m.total <= usable_bytes

    if fits(1):
        return 1
    if strategy == "ddp" or not fits(max_count):
        return None
    lo, hi = 1, max_count  # fits(hi) and not fits(lo): memory falls monotonically with count
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def training_memory(cfg: ModelConfig, micro_batch: int, seq_len: int, half: bool, attn_impl: str,
                    checkpointing: bool = False, shards: int = 1, master: bool = True) -> MemoryPerChip:
    """Bytes one process of chipshift's training loop needs for a step.

    `half`: activations in bfloat16 or float16. Half-precision parameters with float32 master
    weights and float32 parameters under autocast both keep 16 bytes of state per parameter,
    as the bf16-mixed recipe does; `master` says which, for the master-weight step's float32
    gradients. `attn_impl`: the model's attention; "math" keeps the softmax
    probabilities, the fused kernels only their log-sum-exp. `shards` > 1: FSDP over that many
    processes.
    """
    precision = PRECISIONS["bf16-mixed" if half else "fp32"]
    strategy = "fsdp" if shards > 1 else "ddp"
    m = memory_per_chip(cfg.num_params(), cfg, shards, strategy, checkpointing, precision, micro_batch,
                        seq_len, "math" if attn_impl == "math" else "flash")
    return m if master else replace(m, master_step=0.0)
