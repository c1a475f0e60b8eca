"""Small native kernels for devices whose PyTorch build lacks a fast path we need.

Today a bfloat16-weight linear (`bf16_linear`, `bf16_linear_many`) and RMSNorm for x86
CPUs with AVX2 and FMA: on CPUs without bfloat16 arithmetic for every input (see
bf16_linear.c for why), on CPUs with it for decode steps, where torch's one-row GEMV streams
the weights at about half the kernel's rate (`for_inference`; the precision policy decides). It is plain
C compiled on first use with the system's C compiler into a per-user cache, loaded through
ctypes after torch (so it shares torch's OpenMP runtime), and absent, with the reason kept,
when there is no compiler or the CPU lacks the instructions: callers then keep PyTorch's
own path. The same library holds weight-only linears on GGUF quantized blocks (quant.c; their
Python side is quant.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from chipshift.devices import cpu_flags

HERE = Path(__file__).parent
SOURCES = [HERE / "bf16_linear.c", HERE / "decode.c", HERE / "quant.c"]  # one library; each includes bf16.h
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]


def cache_dir() -> Path:
    root = os.environ.get("CHIPSHIFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "chipshift")
    return Path(root) / "kernels"


class Unavailable(RuntimeError):
    pass


@functools.cache
def _library() -> ctypes.CDLL:
    if not {"avx2", "fma", "f16c"} <= cpu_flags():  # f16c: the fp16 scales of quant.c's blocks
        raise Unavailable("the CPU lacks AVX2/FMA/F16C")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise Unavailable("no C compiler (cc/gcc) on PATH")
    source = b"".join(f.read_bytes() for f in (*SOURCES, HERE / "bf16.h"))
    tag = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    lib = cache_dir() / f"bf16_linear-{tag}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            run = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", str(out)], capture_output=True, text=True,
                                 check=False)
            if run.returncode != 0:
                raise Unavailable(f"{cc} failed: {run.stderr.strip()[:400]}")
            os.replace(out, lib)  # atomic: a concurrent process sees the whole file or none
    handle = ctypes.CDLL(str(lib))
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    handle.bf16_linear.argtypes = [P, P, P, P, I64, I64, I64, ctypes.c_int]
    handle.bf16_linear_many.argtypes = [P, ctypes.c_int, P, P, P, P, I64, I64, ctypes.c_int]
    handle.bf16_rms_norm.argtypes = [P, P, P, I64, I64, ctypes.c_float]
    handle.decode_step.argtypes = [ctypes.POINTER(_Decoder), I64, P, P, P, I64, P, ctypes.c_int]
    handle.decode_step.restype = ctypes.c_int
    handle.quant_linear_many.argtypes = [P, ctypes.c_int, P, P, P, P, I64, I64, ctypes.c_int]
    handle.quant_rows.argtypes = [P, ctypes.c_int, I64, P, I64, P]
    for fn in (handle.bf16_linear, handle.bf16_linear_many, handle.bf16_rms_norm, handle.quant_linear_many,
               handle.quant_rows):
        fn.restype = None
    handle.bf16_set_avx512.argtypes, handle.bf16_set_avx512.restype = [ctypes.c_int], None
    handle.bf16_set_avx512(1)  # where the CPU has AVX512-BF16, 7+ rows use it
    return handle


class _Matrix(ctypes.Structure):  # decode.c's `matrix`: bfloat16 (fmt 0) or GGUF blocks (ggml type id)
    _fields_ = [("w", ctypes.c_void_p), ("fmt", ctypes.c_int)]


class _LayerWeights(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("bias", ctypes.c_void_p * 3),
                ("m", _Matrix * 7)]  # q, k, v, o, gate, up, down


class _Decoder(ctypes.Structure):  # decode.c's `decoder`
    _fields_ = [*((name, ctypes.c_int64) for name in ("layers", "dim", "heads", "kv_heads", "head_dim", "ffn",
                                                       "vocab", "slots", "max_len")),
                ("eps", ctypes.c_float), ("kv_float32", ctypes.c_int), ("embed", _Matrix), ("out", _Matrix),
                *((name, ctypes.c_void_p) for name in ("norm", "inv_freq", "k_cache", "v_cache")),
                ("layer", ctypes.POINTER(_LayerWeights))]


def bf16_linear_status() -> str | None:
    """None when the kernel is usable here, else why not ($CHIPSHIFT_CPU_KERNELS=off: as on
    a machine without a C compiler; read at every call, so tests can pin it per test)."""
    from chipshift.devices.policy import KERNELS_ENV, kernels_pinned_off

    if kernels_pinned_off():
        return f"off ({KERNELS_ENV}=off)"
    try:
        _library()
        return None
    except (Unavailable, OSError) as exc:
        return str(exc)


def bf16_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for bfloat16 x (..., K), w (N, K) and b (N,) on the CPU: float32 arithmetic,
    the output rounded to bfloat16 like torch's. Meant for few rows (decode); raises
    Unavailable where the kernel cannot be built. (`bf16_linear_many` with one matrix,
    without building its pointer arrays: this runs several times per layer and token.)"""
    fn = _library().bf16_linear
    N, K = w.shape
    x2 = x.reshape(-1, K).contiguous()
    y = torch.empty(x2.shape[0], N, dtype=torch.bfloat16)
    fn(x2.data_ptr(), w.contiguous().data_ptr(), None if b is None else b.contiguous().data_ptr(),
       y.data_ptr(), x2.shape[0], N, K, torch.get_num_threads())
    return y.view(*x.shape[:-1], N)


def avx512_bf16(on: bool | None = None) -> bool:
    """Whether linears of 7 rows or more use the CPU's AVX512-BF16 dot products (where it has
    them) instead of the AVX2 path; `on` switches it (tests compare both on one machine)."""
    lib = _library()
    if on is not None:
        lib.bf16_set_avx512(int(on))
    return bool(ctypes.c_int.in_dll(lib, "use_avx512_bf16").value)


def bf16_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm (float32 statistics, output rounded to bfloat16, then scaled by
    the bfloat16 weight) of bfloat16 rows in one native call."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    y = torch.empty_like(x2)
    _library().bf16_rms_norm(x2.data_ptr(), weight.contiguous().data_ptr(), y.data_ptr(), x2.shape[0], D, eps)
    return y.view(x.shape)


MAX_MANY = 8


def bf16_linear_many(x: torch.Tensor, weights: list[torch.Tensor],
                     biases: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """[bf16_linear(x, w, b) for each w, b] in one pass over all their weights (q/k/v,
    gate/up: one call, one thread team, instead of several)."""
    if len(weights) > MAX_MANY:
        raise ValueError(f"at most {MAX_MANY} matrices per call")
    fn = _library().bf16_linear_many
    K = weights[0].shape[1]
    x2 = x.reshape(-1, K).contiguous()
    M, count = x2.shape[0], len(weights)
    ws = [w.contiguous() for w in weights]
    ys = [torch.empty(M, w.shape[0], dtype=torch.bfloat16) for w in ws]
    arr = ctypes.c_void_p * count
    b_ptrs = None
    if biases is not None and any(b is not None for b in biases):
        bs = [b.contiguous() if b is not None else torch.zeros(w.shape[0], dtype=torch.bfloat16)
              for b, w in zip(biases, ws)]
        b_ptrs = arr(*(b.data_ptr() for b in bs))
    fn(x2.data_ptr(), count, arr(*(w.data_ptr() for w in ws)), b_ptrs, arr(*(y.data_ptr() for y in ys)),
       (ctypes.c_int64 * count)(*(w.shape[0] for w in ws)), M, K, torch.get_num_threads())
    return [y.view(*x.shape[:-1], y.shape[1]) for y in ys]


# Rows up to which a bfloat16 linear goes through the kernel; beyond (long prefills), the
# weights are widened once per call and multiplied by torch's float32 GEMM, which at that
# many rows costs more than the widening. Measured on SmolLM2 prefills (2-core AVX2): 32
# tokens 80-120 ms through the kernel against 125-290 ms widened; 128 tokens 370 against
# 480; 256 tokens 700 against 570.
KERNEL_MAX_ROWS = 128


# On a CPU with bfloat16 arithmetic (AVX512-BF16, AMX) torch's bfloat16 GEMM serves many
# rows well, but its few-row GEMV streams the weights at about half the kernel's rate. There
# the twin takes decode-sized inputs only and leaves the rest to torch. Measured on SmolLM2
# decode (2-core Xeon with AMX, weights streamed from memory): batch 1 28 -> 36 tok/s, batch
# 8 194 -> 242 through the kernel; at batch 16 torch wins (361 against 330 tok/s). (Timed
# alone, with a weight hot in cache, the kernel loses from 8 rows: the decode step is what
# counts.)
NATIVE_KERNEL_MAX_ROWS = 8


def twin_max_rows(native_half: bool) -> int:
    """The most rows of an input the twin (and the native decode step) sends through the kernels."""
    return NATIVE_KERNEL_MAX_ROWS if native_half else KERNEL_MAX_ROWS


# Where bfloat16 is native through AVX512-BF16 alone (no AMX), torch's bfloat16 GEMM has no
# matrix unit behind it, and a prompt's prefill runs faster through the native step (which
# reads each weight from memory once for all its rows, 8 rows at a time in L1). Measured on
# SmolLM2 (2-core AMD EPYC, AVX512-BF16 without AMX), one prompt: 16 tokens 25 ms through the
# native step against 67 through torch, 32 tokens 47 against 82, 64 tokens 79 against 98.
NATIVE_PREFILL_MAX_ROWS = 64


def prefill_max_rows(native_half: bool, amx: bool) -> int:
    """The longest prompt the native decode step prefills (longer ones go through the model)."""
    if not native_half:
        return KERNEL_MAX_ROWS
    return NATIVE_KERNEL_MAX_ROWS if amx else NATIVE_PREFILL_MAX_ROWS


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """A bfloat16 linear computed as a native bfloat16 device would (bfloat16 operands,
    float32 accumulation, bfloat16 output) at float32 speed: few rows through
    `bf16_linear`, many as a float32 GEMM on the widened operands."""
    if _rows(x) <= KERNEL_MAX_ROWS:
        return bf16_linear(x, w, b)
    return F.linear(x.float(), w.float(), None if b is None else b.float()).to(torch.bfloat16)


# The twin's kernels (see `Transformer.with_kernels`): None where they do not apply, and the
# model's own code runs. `max_rows` None: the emulating CPU's twin, which takes every input
# (`linear` widens long ones); a number: the native CPU's, which takes up to that many rows.
def _twin_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *,
                 max_rows: int | None = None) -> torch.Tensor | None:
    if w.dtype != torch.bfloat16 or (b is not None and b.dtype != torch.bfloat16):
        return None
    if max_rows is None:
        return linear(x, w, b)
    return bf16_linear(x, w, b) if _rows(x) <= max_rows else None


def _twin_linear_many(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None], *,
                      max_rows: int = KERNEL_MAX_ROWS) -> list[torch.Tensor] | None:
    if _rows(x) <= max_rows and all(w.dtype == torch.bfloat16 for w in weights):
        return bf16_linear_many(x, weights, biases)
    return None


def _twin_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
                   max_rows: int = KERNEL_MAX_ROWS) -> torch.Tensor | None:
    if x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and _rows(x) <= max_rows:
        return bf16_rms_norm(x, weight, eps)
    return None


def _twin_quant_linear(x: torch.Tensor, blocks: torch.Tensor, fmt: str, bias: torch.Tensor | None, *,
                       widen: bool) -> torch.Tensor | None:
    """A quantized layer (chipshift.model.quant) for bfloat16 inputs: up to KERNEL_MAX_ROWS rows
    through the integer kernel (quant.c; a bias is added to the rounded product); beyond, on
    a CPU that emulates bfloat16 (`widen`), a float32 GEMM on the matrix dequantized for the
    call; elsewhere None (the layer's own path: dequantized to bfloat16 for the call)."""
    if x.dtype != torch.bfloat16:
        return None
    if _rows(x) <= KERNEL_MAX_ROWS:
        from chipshift.devices.kernels.quant import quant_linear

        y = quant_linear(x, blocks, fmt)
        return y if bias is None else (y.float() + bias.float()).to(torch.bfloat16)
    if not widen:
        return None
    from chipshift.devices.kernels.quant import dequantize

    w = dequantize(blocks, fmt, x.shape[-1])
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(torch.bfloat16)


def for_inference(model: nn.Module, native_half: bool = False) -> nn.Module:
    """A twin of a bfloat16 model for inference, made by the model's `with_kernels`: the same
    parameters and buffers (shared, not copied: weights stay bfloat16 in memory, once),
    whose bfloat16 linears and output projection run through the kernel, q/k/v and gate/up
    each in one `bf16_linear_many` call, and whose RMSNorms run natively; quantized layers
    (chipshift.model.quant) multiply their blocks through quant.c's integer kernel.

    On a CPU without bfloat16 arithmetic every input takes the kernels (`linear` widens long
    ones to a float32 GEMM) and attention computes in float32. With `native_half` (a CPU
    with bfloat16 arithmetic) only inputs of up to NATIVE_KERNEL_MAX_ROWS rows do (decode
    steps); longer ones, and attention, run on torch's native bfloat16 kernels.
    The caller's model is left as it was."""
    _library()  # fail here, not mid-forward, when the kernel cannot be built
    if native_half:
        rows = twin_max_rows(native_half)
        return model.with_kernels(linear=functools.partial(_twin_linear, max_rows=rows),
                                  linear_many=functools.partial(_twin_linear_many, max_rows=rows),
                                  rms_norm=functools.partial(_twin_rms_norm, max_rows=rows),
                                  quant_linear=functools.partial(_twin_quant_linear, widen=False))
    # attention on float32 copies of q, k, v: torch's bfloat16 attention is emulated too;
    # the KV cache is held in float32 (the same bfloat16 values, exactly) so that each row's
    # history is not widened again at every layer and step (~4 ms of a 60 ms SmolLM2 step
    # at batch 8), at twice the cache memory
    return model.with_kernels(linear=_twin_linear, linear_many=_twin_linear_many, rms_norm=_twin_rms_norm,
                              quant_linear=functools.partial(_twin_quant_linear, widen=True),
                              attn_impl="sdpa_float32", kv_cache_dtype=torch.float32)


class DecodeStep:
    """A whole decode step of a bfloat16 `Transformer` in one native call (decode.c): the
    rows' new tokens in, their float32 logits out, this step's keys and values written into
    the engine's `KVCache`; or a prompt's prefill (`prefill`). The same roundings as the
    model's bfloat16 operators (attention in float32, as the emulating CPU's twin computes
    it); only summation orders differ. Its linear and embedding layers may hold quantized
    blocks (chipshift.model.quant), multiplied by quant.c. Holds pointers to the model's
    weights and the cache: both must outlive it, unmoved.

    `max_rows`: the most rows a decode step takes (slots), `max_prefill` a prefill (prompt
    tokens; default max_rows); the engine runs larger batches and longer prompts through the model."""

    def __init__(self, model: nn.Module, cache, max_rows: int, max_prefill: int | None = None) -> None:
        reason = _decode_step_refusal(model, cache)
        if reason:
            raise Unavailable(reason)
        self._fn = _library().decode_step
        # a decode step takes one row per slot; a prefill its prompt's rows in one slot
        cfg, self.max_rows = model.cfg, min(max_rows, cache.max_batch)
        self.max_prefill = min(max_prefill or max_rows, cache.max_len)
        layers = (_LayerWeights * cfg.num_layers)()
        for L, block in zip(layers, model.layers):
            a, mlp = block.self_attn, block.mlp
            L.attn_norm, L.mlp_norm = _ptr(block.input_layernorm.weight), _ptr(block.post_attention_layernorm.weight)
            L.bias[:] = [_ptr(m.bias) for m in (a.q_proj, a.k_proj, a.v_proj)]
            L.m[:] = [_matrix(m) for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj,
                                           mlp.down_proj)]
        self._inv_freq = model._inv_freq.float().contiguous()
        self._layers = layers
        self._desc = _Decoder(cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                              cfg.intermediate_size, cfg.vocab_size, cache.max_batch, cache.max_len,
                              cfg.rms_norm_eps, cache.k.dtype == torch.float32, _matrix(model.embed_tokens),
                              _matrix(model.embed_tokens if model.lm_head is None else model.lm_head),
                              _ptr(model.norm.weight),
                              _ptr(self._inv_freq), _ptr(cache.k), _ptr(cache.v), layers)
        self.vocab = cfg.vocab_size

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """A decode step. tokens, positions: int64 (rows,), row r being cache slot r; logits
        (rows, vocab)."""
        rows = tokens.shape[0]
        if rows > self.max_rows:
            raise ValueError(f"{rows} rows: this decode step takes at most {self.max_rows}")
        return self._run(tokens, positions, None, rows)

    def prefill(self, slot: int, ids: torch.Tensor, all_rows: bool = False) -> torch.Tensor:
        """A prompt's tokens (int64 (T,), T <= max_rows) into cache slot `slot` at positions
        0..T-1, attending causally; the last token's logits (1, vocab), or with `all_rows`
        every token's (T, vocab) (prompt log-probabilities)."""
        T = ids.shape[0]
        if T > self.max_prefill:
            raise ValueError(f"{T} tokens: this prefill takes at most {self.max_prefill}")
        return self._run(ids, torch.arange(T), torch.full((T,), slot, dtype=torch.int64), T if all_rows else 1)

    def _run(self, tokens, positions, slots, out_rows: int) -> torch.Tensor:
        tokens, positions = tokens.contiguous(), positions.contiguous()
        logits = torch.empty(out_rows, self.vocab, dtype=torch.float32)
        if self._fn(ctypes.byref(self._desc), tokens.shape[0], tokens.data_ptr(), positions.data_ptr(),
                    None if slots is None else slots.data_ptr(), out_rows, logits.data_ptr(),
                    torch.get_num_threads()) != 0:
            raise ValueError("decode_step refused its inputs (a slot or position outside the cache)")
        return logits


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _matrix(module: nn.Module) -> _Matrix:
    """A linear or embedding layer's weight for decode.c: bfloat16, or quantized blocks."""
    from chipshift.devices.kernels.quant import FORMATS

    fmt = getattr(module, "fmt", None)
    return _Matrix(module.weight.data_ptr(), FORMATS[fmt][0] if fmt else 0)


def _decode_step_refusal(model: nn.Module, cache) -> str | None:
    """Why `DecodeStep` cannot run this model and cache (None: it can)."""
    # the device layer sits below the model's: it knows the model by its attributes
    if not all(hasattr(model, a) for a in ("cfg", "layers", "embed_tokens", "norm", "lm_head", "_inv_freq")):
        return f"not a chipshift Transformer ({type(model).__name__})"
    cfg = model.cfg
    if cfg.head_dim % 2 or cfg.head_dim > 1024:
        return f"head_dim {cfg.head_dim} (the native step takes even head dims up to 1024)"
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.dtype == torch.uint8)]
    if any(t.dtype not in (torch.bfloat16, torch.uint8) or t.device.type != "cpu" or not t.is_contiguous()
           for t in tensors):
        return "the native decode step takes contiguous bfloat16 weights (or quantized blocks) on the CPU"
    for m in model.modules():  # LoRA layers and other replacements compute otherwise
        if isinstance(m, nn.Linear) and type(m) is not nn.Linear:
            return f"a {type(m).__name__} layer, which the native decode step does not compute"
    if cache.k.dtype not in (torch.bfloat16, torch.float32) or cache.k.device.type != "cpu":
        return f"a {cache.k.dtype} KV cache on {cache.k.device}"
    return None
