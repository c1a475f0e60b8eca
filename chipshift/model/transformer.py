"""The chipshift decoder: one readable file for the Llama family.

Architecture (pre-norm decoder-only transformer):
  - token embedding, optionally tied to the output projection (`tie_embeddings`)
  - per layer: RMSNorm -> grouped-query self-attention -> residual,
               RMSNorm -> SwiGLU MLP (down(silu(gate(x)) * up(x))) -> residual
  - attention: rotary position embeddings (RoPE, rotate-half layout as in Hugging Face,
    with optional Llama-3 frequency scaling), `num_kv_heads` <= `num_heads` shared K/V
    heads (GQA), optional bias on q/k/v (Qwen2); no bias elsewhere
  - final RMSNorm, then the output projection to the vocabulary

Parameter names follow Hugging Face's `LlamaForCausalLM` without the `model.` prefix
(`layers.3.self_attn.q_proj.weight`), so the adapters in `chipshift.model.hf` stay thin.

Two attention paths share one API and are tested against each other: `sdpa`
(torch's `scaled_dot_product_attention`) and `math` (explicit matmul + softmax, which is
faster on CPUs at short sequence lengths). Build on the meta device, then materialise
and call `init_weights(seed)`: weights are drawn on the CPU from a seeded generator, so
the same seed gives bit-identical weights on every device.

While autograd records, RMSNorm, RoPE and SwiGLU run as autograd Functions with
hand-written backward passes (same forward results; see the comment above them).
"""

from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from chipshift.model.config import ModelConfig
from chipshift.model.quant import QuantEmbedding, QuantLinear

# -- RMSNorm, RoPE and SwiGLU ----------------------------------------------------------
# While autograd records, these three run as autograd Functions with hand-written backward
# passes, for training on CPUs, where every small op is a kernel launch and a pass over
# memory: fewer ops than their plain autograd graphs, and fewer saved tensors (each norm's
# float32 copy and normalised value, silu(gate): recomputed instead; a float32 SmolLM2-135M
# layer at 1024 tokens saves 33 instead of 44 MiB). Their forwards do the plain code's
# operations in the same order, so the results are bitwise those of the plain path, which
# inference (no grad) keeps. Inside are only elementwise ops and reductions, which autocast
# leaves in their inputs' dtype (or widens to float32, where they already are): they need
# no custom_fwd/custom_bwd and compute as the plain code does under autocast too.


def _recording(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _normalise(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x / rms(x) in float32 like the reference implementations (float64 stays float64),
    and 1 / rms(x) of shape (..., 1)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf * rstd, rstd


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)): normalised in float32, rounded to x's dtype, then scaled."""
    if _recording(x, weight):
        return _RMSNorm.apply(x, weight, eps)
    return weight * _normalise(x, eps)[0].to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    """Saves x and the float32 1/rms (one value per row); recomputes x / rms in backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xn, rstd = _normalise(x, eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * xn.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        dtype = rstd.dtype  # float32 (float64 for float64 x)
        g, w = grad.to(dtype), weight.to(dtype)
        xn = x.to(dtype) * rstd
        g_xn = g * xn
        gw = g_xn.reshape(-1, g_xn.shape[-1]).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        gx = None
        if ctx.needs_input_grad[0]:
            # with dn = g * w the gradient of xn: dx = rstd * (dn - xn * mean(dn * xn))
            mean = g_xn.mul_(w).mean(-1, keepdim=True)
            gx = (g * w).sub_(xn.mul_(mean)).mul_(rstd).to(x.dtype)
        return gx, gw, None


class _Rope(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin, saving only cos and sin (which get no gradient)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        # per half: out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2, the plain formula's roundings
        # ((-x2) s1 is -(x2 s1) exactly) without its -x2 and concatenated copies
        out = x * cos
        (out1, out2), (x1, x2), (s1, s2) = out.chunk(2, -1), x.chunk(2, -1), sin.chunk(2, -1)
        out1.sub_(x2 * s1)
        out2.add_(x1 * s2)
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        # the transpose of the rotation: g * cos + (g2 s2, -g1 s1)
        gx = grad * cos
        (gx1, gx2), (g1, g2), (s1, s2) = gx.chunk(2, -1), grad.chunk(2, -1), sin.chunk(2, -1)
        gx1.add_(g2 * s2)
        gx2.sub_(g1 * s1)
        return gx, None, None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    if _recording(gate, up):
        return _SwiGLU.apply(gate, up)
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    """Saves gate and up only; silu(gate) and its derivative are recomputed in backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        # silu_backward(g, x) = g * sigmoid(x) * (1 + x * (1 - sigmoid(x))), one pass; the
        # same ops as autograd's own graph, so the gradients are bitwise the plain path's
        g_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        g_up = F.silu(gate).mul_(grad) if ctx.needs_input_grad[1] else None
        return g_gate, g_up


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies (float32, CPU), with Llama-3 scaling when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if s:
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if _recording(x) and not (cos.requires_grad or sin.requires_grad):
        return _Rope.apply(x, cos, sin)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, h, bias=False)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three projections (an inference kernel may compute them in one pass)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, attn_mask, cache, attn_impl: str) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # the cache stores this step's k/v and returns the full history
            k, v = cache.update(self.layer_idx, k, v)
        if attn_impl == "math":
            y = _math_attention(q, k, v, attn_mask)
        else:  # "sdpa_float32": half inputs where the device emulates half arithmetic
            up = attn_impl == "sdpa_float32"
            y = F.scaled_dot_product_attention(
                *((t.float() for t in (q, k, v)) if up else (q, k, v)), attn_mask=attn_mask,
                is_causal=attn_mask is None, enable_gqa=self.num_kv_heads != self.num_heads)
            y = y.to(q.dtype) if up else y
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def _math_attention(q, k, v, attn_mask):
    """softmax(q k^T / sqrt(d) + mask) v with GQA by reshaping q, never copying k/v."""
    if attn_mask is None and q.shape[2] == k.shape[2] and _recording(q, k, v) \
            and not torch.compiler.is_compiling():  # inductor fuses the plain ops itself (measured: no gain)
        return _CausalAttention.apply(q, k, v)
    B, H, T, D = q.shape
    KVH, S = k.shape[1], k.shape[2]
    qg = q.reshape(B, KVH, H // KVH * T, D)
    scores = (qg @ k.transpose(-1, -2)).view(B, KVH, H // KVH, T, S) * (1.0 / math.sqrt(D))
    if attn_mask is None:
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if attn_mask.dim() == 4:  # (B or 1, 1, T, S) -> broadcast over kv-head groups
        attn_mask = attn_mask.unsqueeze(1)
    scores = scores.masked_fill(~attn_mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return (probs.view(B, KVH, H // KVH * T, S) @ v).view(B, H, T, D)


class _CausalAttention(torch.autograd.Function):
    """Causal math attention for eager training: the scale and the mask ride in the scores'
    GEMM (baddbmm of an additive -inf bias), the softmax runs in the inputs' dtype (torch's
    CPU kernel reduces half rows in float32 and rounds once, so its forward is bitwise the
    plain path's), and backward is four GEMMs around one softmax-backward pass. The plain
    graph's scaled, masked and float32 copies of the (T x T) scores, and their gradients,
    never exist; the probabilities are saved in the inputs' dtype."""

    @staticmethod
    def forward(ctx, q, k, v):
        B, H, T, D = q.shape
        KVH = k.shape[1]
        qg, kf, vf = q.reshape(B * KVH, H // KVH * T, D), k.reshape(B * KVH, T, D), v.reshape(B * KVH, T, D)
        # -inf above the diagonal, 0 elsewhere, for each query row of every head in a kv group
        bias = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1).repeat(H // KVH, 1)
        scale = 1.0 / math.sqrt(D)
        probs = torch.softmax(torch.baddbmm(bias, qg, kf.transpose(1, 2), alpha=scale), dim=-1)
        ctx.save_for_backward(qg, kf, vf, probs)
        ctx.scale, ctx.shape = scale, (q.shape, k.shape)
        return torch.bmm(probs, vf).view(B, H, T, D)

    @staticmethod
    def backward(ctx, grad):
        qg, kf, vf, probs = ctx.saved_tensors
        q_shape, kv_shape = ctx.shape
        g = grad.reshape(qg.shape)
        grad_v = torch.bmm(probs.transpose(1, 2), g).view(kv_shape)
        grad_scores = torch._softmax_backward_data(torch.bmm(g, vf.transpose(1, 2)), probs, -1, probs.dtype)
        grad_scores.mul_(ctx.scale)
        grad_q = torch.bmm(grad_scores, kf).view(q_shape)
        grad_k = torch.bmm(grad_scores.transpose(1, 2), qg).view(kv_shape)
        return grad_q, grad_k, grad_v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two input projections (an inference kernel may compute them in one pass)."""
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(swiglu(gate, up))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask=None, cache=None, attn_impl="sdpa"):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, attn_impl)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # `_weight` skips nn.Embedding's own normal_() init: on the meta device that call
        # imports much of torch._dynamo (seconds per process); init_weights() draws it anyway
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # float32 on purpose and not a buffer, so that `model.to(bfloat16)` cannot round it
        with torch.device("cpu"):  # real values even when the model is built on meta
            self._inv_freq = rope_inv_freq(cfg)
        self.attn_impl = "sdpa"  # or "math", "sdpa_float32"; a runtime choice, not part of the checkpoint
        self.kv_cache_dtype = None  # for the inference engine: None = the weights' dtype
        self.activation_checkpointing = False
        self.head_gemms = None  # the training loss's output-projection GEMMs (use_linear_kernel)

    # -- weights -----------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Draw every weight on the CPU from one seeded generator, then copy it in place.

        Linear and embedding weights ~ N(0, init_std); residual output projections
        (o_proj, down_proj) scaled by 1/sqrt(2 * num_layers); norms 1, biases 0.
        """
        gen = torch.Generator(device="cpu").manual_seed(seed)
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                value = torch.ones(p.shape)
            elif name.endswith(".bias"):
                value = torch.zeros(p.shape)
            else:
                s = std / math.sqrt(2 * self.cfg.num_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                value = torch.empty(p.shape).normal_(0.0, s, generator=gen)
            p.copy_(value.to(p.dtype))

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    # -- forward -----------------------------------------------------------------------
    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape (B, 1, T, head_dim), computed in float32 then cast to `dtype`."""
        with torch.autocast(positions.device.type, enabled=False):
            if self._inv_freq.device != positions.device:
                self._inv_freq = self._inv_freq.to(positions.device)
            freqs = positions[..., None].float() * self._inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def forward_hidden(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                       attn_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                       cache=None) -> torch.Tensor:
        """Final normalised hidden states (B, T, hidden).

        positions:   (B, T) token positions for RoPE; default 0..T-1.
        attn_mask:   bool (B or 1, 1, T, S), True = may attend; default causal.
        segment_ids: (B, T) ids of packed documents; tokens attend causally within their
                     own segment only (positions should restart per segment).
        cache:       an object with `update(layer_idx, k, v) -> (k_all, v_all)`, used by the
                     inference engine; pass the matching `attn_mask` with it.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if segment_ids is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            same = segment_ids[:, :, None] == segment_ids[:, None, :]
            attn_mask = (causal & same)[:, None]
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype if not torch.is_autocast_enabled(x.device.type)
                             else torch.get_autocast_dtype(x.device.type))
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, attn_mask, cache, self.attn_impl, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, cache, self.attn_impl)
        return self.norm(x)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (its weights', unless they are quantized blocks)."""
        return self.norm.weight.dtype

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.embed_tokens if self.lm_head is None else self.lm_head
        if isinstance(out, (QuantLinear, QuantEmbedding)):
            return out.linear(hidden)
        return F.linear(hidden, self.output_weight)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits (B, T, vocab); keyword arguments as for `forward_hidden`."""
        return self.logits(self.forward_hidden(input_ids, **kwargs))

    # -- other kernels -----------------------------------------------------------------
    def use_linear_kernel(self, kernel=None, head_gemms=None) -> None:
        """In place, for training: every nn.Linear computes `kernel(x, weight, bias)` (None from
        the kernel: that call runs the plain path); `kernel=None` restores the plain path.
        Gradients flow through the kernel's own autograd. Subclasses (a LoRA layer) keep their
        own forward. `head_gemms`, (x @ w.T, g @ w) for the training loss's output projection,
        is kept as `head_gemms` for the objectives (`chunked_cross_entropy`)."""
        self.head_gemms = head_gemms
        for module in self.modules():
            if type(module) is nn.Linear:
                if kernel is None:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = functools.partial(_swapped_linear, kernel, module)

    def with_kernels(self, *, linear=None, linear_many=None, rms_norm=None, quant_linear=None,
                     attn_impl: str | None = None, kv_cache_dtype: torch.dtype | None = None) -> Transformer:
        """A twin of this model for inference that computes with kernels the caller passes in
        (the device layer's, `chipshift.devices.kernels`): the same parameters and buffers,
        shared, not copied, and its own module objects. This model is left as it was.

          linear(x, weight, bias) -> y                 each nn.Linear and the output projection
          linear_many(x, weights, biases) -> [y, ...]  projections that read the same input
                                                       (q/k/v, gate/up) in one call
          rms_norm(x, weight, eps) -> y                each RMSNorm
          quant_linear(x, blocks, fmt, bias) -> y      each quantized layer (chipshift.model.quant)

        A kernel returns None where it does not apply (a dtype or a shape it does not take),
        and that call runs the plain path. `attn_impl` and `kv_cache_dtype`, when given, are
        set on the twin.
        """
        shared = {id(t): t for t in (*self.parameters(), *self.buffers())}
        twin = copy.deepcopy(self, memo=shared)
        for module in twin.modules():
            if linear is not None and isinstance(module, nn.Linear):
                module.forward = functools.partial(_swapped_linear, linear, module)
            if linear_many is not None and isinstance(module, Attention):
                module.qkv = functools.partial(_swapped_many, linear_many,
                                               (module.q_proj, module.k_proj, module.v_proj))
            if linear_many is not None and isinstance(module, MLP):
                module.gate_up = functools.partial(_swapped_many, linear_many, (module.gate_proj, module.up_proj))
            if rms_norm is not None and isinstance(module, RMSNorm):
                module.forward = functools.partial(_swapped_norm, rms_norm, module)
            if quant_linear is not None and isinstance(module, (QuantLinear, QuantEmbedding)):
                module.kernel = quant_linear
        if attn_impl is not None:
            twin.attn_impl = attn_impl
        if kv_cache_dtype is not None:
            twin.kv_cache_dtype = kv_cache_dtype
        if linear is not None:
            twin.logits = functools.partial(_swapped_logits, linear, twin)
        return twin


def _swapped_linear(kernel, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    y = kernel(x, module.weight, module.bias)
    return type(module).forward(module, x) if y is None else y


def _swapped_many(kernel, linears: tuple[nn.Linear, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    ys = kernel(x, [m.weight for m in linears], [m.bias for m in linears])
    return tuple(m(x) for m in linears) if ys is None else tuple(ys)


def _swapped_norm(kernel, module: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    y = kernel(x, module.weight, module.eps)
    return type(module).forward(module, x) if y is None else y


def _swapped_logits(kernel, model: Transformer, hidden: torch.Tensor) -> torch.Tensor:
    y = kernel(hidden, model.output_weight, None)
    return type(model).logits(model, hidden) if y is None else y


def build_model(cfg: ModelConfig, device="cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = 0) -> Transformer:
    """Build on the meta device, materialise on `device`, and init (unless seed is None,
    for a model whose weights are about to be loaded)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    if seed is not None:
        model.init_weights(seed)
    return model.to(dtype)
