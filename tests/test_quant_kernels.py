"""Weight-only quantized linears (chipshift/devices/kernels/quant.py, quant.c): GGUF Q8_0,
Q4_0 and Q4_1 blocks, held to the gguf package and to the dequantized weights."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, quants

from chipshift.devices import kernels
from chipshift.devices.kernels import quant
from chipshift.devices.policy import KERNELS_ENV
from chipshift.errors import CheckpointError
from chipshift.model import quant as mq

missing = kernels.bf16_linear_status()
needs_kernel = pytest.mark.skipif(missing is not None, reason=f"CPU kernels unavailable: {missing}")

FORMATS = list(mq.FORMATS)


def weights(n, k, seed):
    """Rows of different scales, with blocks that test the quantizers' edges: all zeros,
    constant, one value, a tie for the largest magnitude between +a and -a."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 0.1
    w[0, :32] = 0.0
    if n > 2:
        w[1, :32] = 0.25
        w[2, :32] = 0.0
        w[2, 5] = -1.5
    if n > 3:
        w[3, :32] = torch.linspace(-1, 1, 32)
        w[3, 7], w[3, 9] = 2.0, -2.0
    return w


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_and_dequantize_match_gguf(fmt):
    w = weights(40, 576, seed=1)
    qtype = GGMLQuantizationType[fmt]
    expected = quants.quantize(w.numpy(), qtype)
    got = mq.quantize(w, fmt)
    assert got.dtype == torch.uint8 and got.shape == (40, 576 // 32 * mq.block_bytes(fmt))
    assert np.array_equal(got.numpy(), expected)  # byte for byte
    assert np.array_equal(mq.dequantize(got, fmt, 576).numpy(), quants.dequantize(expected, qtype))


def reference_8bit(x, w, fmt):
    """What the kernel computes, in float64: x quantized per block of 32 (d = amax / 127,
    q = round(x / d), to nearest even, in float32 as quant.c does) times the weights; and
    the size of the terms it sums in float32 (Q4_1 sums d q x and m x apart)."""
    M, K = x.shape
    xb = x.float().reshape(M, K // 32, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    q = (xb * torch.where(d == 0, torch.zeros_like(d), 1 / d)).round()
    xq = (d.double() * q.double()).reshape(M, K)
    wd = mq.dequantize(w, fmt, K).double()
    terms = wd.abs()
    if fmt == "Q4_1":
        blocks = w.view(w.shape[0], K // 32, 20)
        m = blocks[..., 2:4].contiguous().view(torch.float16).double().expand(-1, -1, 32).reshape(w.shape[0], K)
        terms = (wd - m).abs() + m.abs()
    return xq @ wd.T, xq.abs() @ terms.T


@needs_kernel
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16])
@pytest.mark.parametrize("k", [32, 96, 224, 576, 1536])  # 1, 3, 7, 18, 48 blocks: every grouping of quant.c
def test_kernel_against_dequantized_weights(fmt, rows, k):
    n = 13 if k > 576 else 37
    g = torch.Generator().manual_seed(rows * 100 + k)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    x[0, :32] = 0  # an all-zero block of x (d = 0)
    wq = mq.quantize(weights(n, k, seed=k), fmt)
    got = quant.quant_linear(x, wq, fmt)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    got = got.double()

    # 1. The kernel is x's 8-bit approximation times the exact weights, with float32 sums:
    # within one bfloat16 rounding (2^-8 relative, with margin) and float32 summation
    # error (1e-5 of the sum of |terms|) of that, computed in float64.
    model, scale = reference_8bit(x, wq, fmt)
    assert ((got - model).abs() <= model.abs() * 2 ** -8 + 1e-5 * scale + 1e-30).all()

    # 2. Against the bfloat16 x itself (the plain path): rounding each x to 8 bits moves it by
    # at most half a step, d / 2 = (its block's largest |x|) / 254, about 0.4% of that
    # largest |x|; so the output moves by at most sum_k |w_k| * d_k / 2. Plus the bfloat16
    # rounding of the output and float32 sums (1e-5 of sum |w x|).
    exact = F.linear(x.double(), mq.dequantize(wq, fmt, k).double())
    xb = x.double().reshape(rows, k // 32, 32)
    half_step = (xb.abs().amax(-1, keepdim=True) / 254).expand_as(xb).reshape(rows, k)
    wd = mq.dequantize(wq, fmt, k).double().abs()
    bound = 1.001 * half_step @ wd.T + exact.abs() * 2 ** -8 + 1e-5 * (x.double().abs() @ wd.T)
    assert ((got - exact).abs() <= bound).all()
    # Coarser, the same in words: within 1% of the output's scale, the row's largest |x|
    # times sum_k |w_k| (the bound above is 1/254 of it, plus the output's rounding).
    scale = x.double().abs().amax(-1, keepdim=True) * wd.sum(-1)
    assert ((got - exact).abs() <= 0.01 * scale + exact.abs() * 2 ** -8).all()


@needs_kernel
def test_many_matrices_of_mixed_formats_equal_separate_calls():
    k = 576
    g = torch.Generator().manual_seed(7)
    mats = [("Q4_1", 64), ("Q8_0", 13), ("Q4_0", 200), ("Q4_1", 1), ("Q8_0", 96), ("Q4_0", 8), ("Q4_1", 33),
            ("Q8_0", 40)]
    ws = [mq.quantize(weights(n, k, seed=i), fmt) for i, (fmt, n) in enumerate(mats)]
    fmts = [fmt for fmt, _ in mats]
    for rows in (1, 3, 6):
        x = torch.randn(2, rows, k, generator=g).to(torch.bfloat16)  # leading dims kept
        ys = quant.quant_linear_many(x, ws, fmts)
        assert [y.shape for y in ys] == [(2, rows, n) for _, n in mats]
        for y, w, fmt in zip(ys, ws, fmts):
            assert torch.equal(y, quant.quant_linear(x, w, fmt))


@needs_kernel
@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_dequantized(fmt):
    wq = mq.quantize(weights(50, 96, seed=3), fmt)
    ids = torch.tensor([[3, 0, 49], [3, 17, 2]])
    got = quant.quant_rows(wq, fmt, ids)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 96)
    assert torch.equal(got, mq.dequantize(wq, fmt, 96)[ids].to(torch.bfloat16))
    with pytest.raises(IndexError):
        quant.quant_rows(wq, fmt, torch.tensor([50]))


@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0"])
def test_plain_path_where_the_kernels_are_off(fmt, monkeypatch):
    """Without the kernel library: a float32 linear on the dequantized weights, and rows by
    `dequantize`."""
    monkeypatch.setenv(KERNELS_ENV, "off")
    wq = mq.quantize(weights(20, 64, seed=5), fmt)
    x = torch.randn(3, 64).to(torch.bfloat16)
    want = F.linear(x.float(), mq.dequantize(wq, fmt, 64)).to(torch.bfloat16)
    assert torch.equal(quant.quant_linear(x, wq, fmt), want)
    ids = torch.tensor([4, 19, 4])
    assert torch.equal(quant.quant_rows(wq, fmt, ids), mq.dequantize(wq, fmt, 64)[ids].to(torch.bfloat16))


def test_unknown_format_names_the_served_ones():
    w = torch.zeros(4, 64)
    wq = mq.quantize(w, "Q8_0")
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    calls = [lambda: mq.quantize(w, "Q5_K"), lambda: mq.dequantize(wq, "Q5_K", 64),
             lambda: quant.quant_linear(x, wq, "Q5_K"), lambda: quant.quant_rows(wq, "Q5_K", torch.tensor([0]))]
    for call in calls:
        with pytest.raises(CheckpointError, match="'Q5_K'.*Q8_0, Q4_0, Q4_1"):
            call()


@needs_kernel
def test_empty_inputs():
    """No rows: empty outputs; K = 0: zeros."""
    wq = mq.quantize(torch.zeros(5, 64), "Q4_1")
    assert quant.quant_linear(torch.zeros(0, 64, dtype=torch.bfloat16), wq, "Q4_1").shape == (0, 5)
    empty = torch.zeros(5, 0, dtype=torch.uint8)
    assert torch.equal(quant.quant_linear(torch.zeros(2, 0, dtype=torch.bfloat16), empty, "Q8_0"),
                       torch.zeros(2, 5, dtype=torch.bfloat16))


def test_shapes_are_checked():
    wq = mq.quantize(torch.zeros(4, 64), "Q4_1")
    with pytest.raises(ValueError, match="uint8"):
        quant.quant_linear(torch.zeros(1, 96, dtype=torch.bfloat16), wq, "Q4_1")  # K does not match
    with pytest.raises(ValueError, match="multiple"):
        mq.quantize(torch.zeros(4, 40), "Q4_1")
