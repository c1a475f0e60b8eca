"""RMSNorm, RoPE and SwiGLU as autograd Functions (the training path) against the plain
autograd formulas they replace."""

import pytest
import torch
import torch.nn.functional as F

from chipshift.model import build_model, preset, transformer
from chipshift.model.transformer import apply_rope, rms_norm, rotate_half, swiglu

pytestmark = pytest.mark.any_class  # nothing here asks the precision policy (conftest checks)


def plain_rms_norm(x, weight, eps):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def plain_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


def plain_swiglu(gate, up):
    return F.silu(gate) * up


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def rope_inputs(B, H, T, D, dtype, gen):
    """q as the model lays it out ((B, T, H, D) memory seen as (B, H, T, D)), cos/sin (B, 1, T, D)."""
    x = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64).to(dtype).transpose(1, 2)
    positions = torch.arange(T) + torch.randint(0, 100, (B, 1), generator=gen)
    freqs = positions[..., None].double() / 10000 ** (torch.arange(0, D, 2).double() / D)
    emb = torch.cat((freqs, freqs), -1)
    return x.requires_grad_(), emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(8, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: transformer._RMSNorm.apply(x, w, 1e-5), (x, w))
    q, cos, sin = rope_inputs(2, 3, 4, 8, torch.float64, gen)
    assert torch.autograd.gradcheck(lambda q: transformer._Rope.apply(q, cos, sin), (q,))
    gate, up = (torch.randn(3, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(transformer._SwiGLU.apply, (gate, up))


@pytest.mark.parametrize("shape", [(7, 24), (2, 9, 64), (1, 3, 5, 576)])
def test_rms_norm_matches_the_plain_formula(shape):
    gen = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(shape, generator=gen)).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).requires_grad_()
    g = torch.randn(shape, generator=gen)
    out, ref = rms_norm(x, w, 1e-5), plain_rms_norm(x, w, 1e-5)
    assert type(out.grad_fn).__name__ == "_RMSNormBackward"
    assert torch.equal(out, ref)
    for a, b in zip(torch.autograd.grad(out, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        assert a.dtype == b.dtype and rel(a, b) <= 1e-5
    # only the gradient asked for (frozen norm weights under LoRA, frozen inputs)
    assert rel(torch.autograd.grad(rms_norm(x.detach(), w, 1e-5), w, g)[0],
               torch.autograd.grad(plain_rms_norm(x, w, 1e-5), w, g)[0]) <= 1e-5
    xb, wb = x.detach().bfloat16().requires_grad_(), w.detach().bfloat16()
    assert torch.equal(rms_norm(xb, wb, 1e-5), plain_rms_norm(xb, wb, 1e-5))


@pytest.mark.parametrize("dims", [(1, 9, 16, 64), (2, 3, 5, 8), (3, 1, 7, 32)])
def test_rope_matches_the_plain_formula(dims):
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        x, cos, sin = rope_inputs(*dims, dtype, gen)
        out, ref = apply_rope(x, cos, sin), plain_rope(x, cos, sin)
        assert type(out.grad_fn).__name__ == "_RopeBackward"
        assert torch.equal(out, ref) and out.stride() == ref.stride()  # same bits, same layout
        g = torch.randn(out.shape, generator=gen).to(dtype)
        a, b = torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0]
        assert a.dtype == b.dtype and rel(a, b) <= 1e-5


@pytest.mark.parametrize("shape", [(5, 12), (2, 9, 1536)])
def test_swiglu_matches_the_plain_formula(shape):
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        gate, up = (torch.randn(shape, generator=gen).to(dtype).requires_grad_() for _ in range(2))
        out, ref = swiglu(gate, up), plain_swiglu(gate, up)
        assert type(out.grad_fn).__name__ == "_SwiGLUBackward"
        assert torch.equal(out, ref)
        g = torch.randn(shape, generator=gen).to(dtype)
        for a, b in zip(torch.autograd.grad(out, (gate, up), g), torch.autograd.grad(ref, (gate, up), g)):
            assert torch.equal(a, b)  # the same ops as autograd's graph of the plain formula


def test_no_grad_keeps_the_plain_path():
    x, w = torch.randn(2, 8, requires_grad=True), torch.ones(8, requires_grad=True)
    with torch.inference_mode():
        assert rms_norm(x, w, 1e-5).grad_fn is None and swiglu(x, x).grad_fn is None


def loss_and_grads(model, ids, autocast=False):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def backward_nodes(loss):
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(n for n, _ in node.next_functions)
    return {type(n).__name__ for n in seen}


@pytest.mark.parametrize("checkpointing,attn_impl,autocast", [
    (False, "sdpa", False), (True, "sdpa", False), (False, "math", False), (True, "math", True)])
def test_model_matches_the_plain_path(monkeypatch, checkpointing, attn_impl, autocast):
    model = build_model(preset("tiny", num_kv_heads=2), seed=0).train()
    model.activation_checkpointing, model.attn_impl = checkpointing, attn_impl
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    loss, grads = loss_and_grads(model, ids, autocast)
    functions = {"_RMSNormBackward", "_RopeBackward", "_SwiGLUBackward"} | \
        ({"_CausalAttentionBackward"} if attn_impl == "math" else set())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert functions <= backward_nodes(model(ids).sum())
    monkeypatch.setattr(transformer, "_recording", lambda *tensors: False)
    plain_loss, plain_grads = loss_and_grads(model, ids, autocast)
    assert torch.equal(loss, plain_loss)  # the forwards are bitwise the same, under autocast too
    # the attention Function's softmax backward takes bfloat16 probabilities under autocast, the
    # plain graph's float32 ones: both stay as far from the float32 gradients (test below)
    tolerance = 2e-2 if attn_impl == "math" and autocast else 1e-5
    assert all(grads[n].dtype == g.dtype and rel(grads[n], g) <= tolerance for n, g in plain_grads.items())


def test_causal_attention_gradients(monkeypatch):
    """The attention Function's hand-written backward is autograd's (float64, with GQA), and in
    bfloat16 its gradients are no further from float32's than the plain graph's."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 6, 8, dtype=torch.float64, generator=gen, requires_grad=True) for h in (4, 2, 2))
    assert torch.autograd.gradcheck(transformer._CausalAttention.apply, (q, k, v))
    model = build_model(preset("tiny", num_kv_heads=2), seed=0).train()
    model.attn_impl = "math"
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    _, fp32 = loss_and_grads(model, ids)
    _, ours = loss_and_grads(model, ids, autocast=True)
    monkeypatch.setattr(transformer, "_recording", lambda *tensors: False)
    _, plain = loss_and_grads(model, ids, autocast=True)
    for name in (n for n in fp32 if "self_attn" in n):
        assert rel(ours[name], fp32[name]) <= 1.1 * rel(plain[name], fp32[name]) + 1e-4, name
