"""Emulated numerics: run any stage with another chip's arithmetic on the device in hand.

A profile (numerics.toml) names what a chip computes in: the dtype activations and
weights are stored in, the format matmul and attention inputs are rounded to (with
per-tensor or per-block scales where the format has them), the format of the gradient
operand in backward, float32 accumulation. `Emulation(profile)` is a TorchFunctionMode
that the device layer enters around a stage's forward and backward (`Device.numerics()`):
inside it every `F.linear`, matmul (`@`, `matmul`, `mm`, `bmm`) and
`F.scaled_dot_product_attention` rounds its inputs to the profile's formats, computes in
float32 and stores its output in the profile's dtype. The model and the loops run as
they are; everything else (norms, activations, residual adds) runs in the stored dtype,
as on the chip.

What is approximated, and why it is close enough to predict divergence: a GEMM
accumulates in float32 in the host's order (a chip's order differs at float32's
rounding, far below the formats emulated here); blocks of block-scaled formats run along
the reduction dimension of the forward GEMMs and along the last dimension of gradients;
attention's backward is float32 autograd through the rounded forward.
"""

from __future__ import annotations

import contextlib
import math
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from chipshift.devices.dtypes import dtype_name, parse_dtype
from chipshift.errors import DeviceError

NUMERICS_PATH = Path(__file__).with_name("numerics.toml")


@dataclass(frozen=True)
class Format:
    """A number format matmul inputs can be rounded to."""

    torch_dtype: torch.dtype | None  # None: float32 with its mantissa cut (tf32, hf32)
    max: float  # largest finite value
    tiny: float  # smallest normal value
    unit_roundoff: float  # half the distance from 1 to the next value
    emax: int  # exponent of the largest power of two (OCP MX scale rule)


def _format(dtype: torch.dtype, mantissa: int) -> Format:
    fi = torch.finfo(dtype)
    return Format(dtype, fi.max, fi.smallest_normal, 2.0 ** -(mantissa + 1), int(math.floor(math.log2(fi.max))))


FORMATS = {
    "fp32": _format(torch.float32, 23),
    "bf16": _format(torch.bfloat16, 7),
    "fp16": _format(torch.float16, 10),
    "e4m3": _format(torch.float8_e4m3fn, 3),
    "e5m2": _format(torch.float8_e5m2, 2),
    # mantissa-cut float32: the unit roundoff is the profile's (`Profile.format`)
    "tf32": Format(None, torch.finfo(torch.float32).max, 2.0**-126, 2.0**-11, 127),
    "hf32": Format(None, torch.finfo(torch.float32).max, 2.0**-126, 2.0**-11, 127),
}
SCALES = ("none", "tensor", "ue8m0", "e8m0")


# -- rounding ------------------------------------------------------------------------------
def round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 `x` rounded to `bits` mantissa bits, to nearest with ties to even, by integer
    arithmetic on the bit pattern (TF32 is bits=10); infinities and NaN pass through, and a
    value that rounds past float32's largest becomes infinite, as in IEEE rounding."""
    x = x.float()
    drop = 23 - bits
    if drop <= 0:
        return x
    i = x.view(torch.int32)
    lsb = (i >> drop) & 1
    rounded = ((i + (1 << (drop - 1)) - 1 + lsb) & ~((1 << drop) - 1)).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x)


def block_scales(amax: torch.Tensor, fmt: Format, rule: str) -> torch.Tensor:
    """Power-of-two scales for blocks whose largest |value| is `amax`: `ue8m0` the smallest
    power of two with amax / scale <= the format's max (no element overflows), `e8m0` the
    OCP MX rule 2^(floor(log2 amax) - emax) (elements above the max saturate). Both are
    values of torch.float8_e8m0fnu (2^-127 .. 2^127); an all-zero block gets scale 1."""
    amax = amax.float()
    if rule == "ue8m0":
        mant, exp = torch.frexp(amax / fmt.max)  # r = mant * 2^exp, mant in [0.5, 1)
        exp = torch.where(mant == 0.5, exp - 1, exp)  # r a power of two: itself
    else:
        exp = torch.frexp(amax)[1] - 1 - fmt.emax  # floor(log2 amax) - emax
    return torch.where(amax > 0, torch.exp2(exp.clamp(-127, 127).float()), torch.ones_like(amax))


def _cast(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Round float32 `x` to a format with a torch dtype and back; e4m3 has no infinity and
    saturates at its max (as torch's cast, TransformerEngine and the MX spec do)."""
    if fmt.torch_dtype == torch.float8_e4m3fn:
        x = x.clamp(-fmt.max, fmt.max)
    return x.to(fmt.torch_dtype).float()


def quantize(x: torch.Tensor, fmt: Format, *, mantissa: int = 10, scale: str = "none", block: int = 0,
             dim: int = -1, flush: bool = False) -> torch.Tensor:
    """`x` rounded to `fmt` (with its scales applied and undone), as float32. Blocks of
    `block` elements run along `dim`, the reduction dimension of the GEMM it feeds."""
    x = x.float()
    if fmt.torch_dtype is None:
        q = round_mantissa(x, mantissa)
    elif fmt.torch_dtype == torch.float32:
        q = x
    elif scale == "none":
        q = _cast(x, fmt)
    elif scale == "tensor":
        s = (x.abs().amax() / fmt.max).clamp_min(torch.finfo(torch.float32).tiny)
        q = _cast(x / s, fmt) * s
    else:
        xt = x.movedim(dim, -1)
        n = xt.shape[-1]
        pad = -n % block
        xb = F.pad(xt, (0, pad)).unflatten(-1, (-1, block))
        s = block_scales(xb.abs().amax(-1, keepdim=True), fmt, scale)
        q = (_cast(xb / s, fmt) * s).flatten(-2)[..., :n].movedim(-1, dim)
    if flush:
        q = torch.where(q.abs() < fmt.tiny, torch.zeros_like(q), q)
    return q


# -- the profiles --------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    dtype: torch.dtype
    input: str
    grad: str
    attention: str
    scale: str = "none"
    block: int = 0
    accumulate: str = "fp32"
    denormals: str = "keep"
    mantissa: int = 10
    chip: str | None = None  # the chip the profile was named through

    @property
    def label(self) -> str:
        return f"{self.name} ({self.chip})" if self.chip else self.name

    def format(self, which: str) -> Format:
        fmt = FORMATS[getattr(self, which)]
        if fmt.torch_dtype is None:  # mantissa-cut float32
            fmt = Format(None, fmt.max, fmt.tiny, 2.0 ** -(self.mantissa + 1), fmt.emax)
        return fmt

    def round(self, x: torch.Tensor, which: str = "input", dim: int = -1) -> torch.Tensor:
        """`x` rounded to the format of `which` (input, grad, attention), as float32."""
        fmt = self.format(which)
        scaled = which != "attention" and self.scale != "none"
        return quantize(x, fmt, mantissa=self.mantissa, scale=self.scale if scaled else "none",
                        block=self.block, dim=dim, flush=self.denormals == "flush")

    def describe(self) -> dict:
        return {"name": self.name, "chip": self.chip, "dtype": dtype_name(self.dtype), "input": self.input,
                "grad": self.grad, "attention": self.attention, "scale": self.scale, "block": self.block,
                "accumulate": self.accumulate, "denormals": self.denormals, "description": self.description}


@dataclass(frozen=True)
class ChipNumerics:
    key: str
    profiles: tuple[str, ...]
    fp32_matmul: str
    status: str
    source: str
    name: str | None = None


PROFILE_KEYS = {"description", "dtype", "input", "grad", "attention", "scale", "block", "accumulate",
                "denormals", "mantissa"}
CHIP_KEYS = {"profiles", "fp32_matmul", "status", "source", "name"}


@lru_cache(maxsize=None)
def load_numerics(path: str | None = None) -> tuple[dict[str, Profile], dict[str, ChipNumerics]]:
    """The profiles and chips of numerics.toml, validated."""
    raw = tomllib.loads(Path(path or NUMERICS_PATH).read_text())
    profiles, chips = {}, {}
    for name, entry in raw.get("profiles", {}).items():
        where = f"numerics.toml [profiles.{name}]"
        if unknown := set(entry) - PROFILE_KEYS:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        entry = {"grad": entry["input"], "attention": entry["input"], **entry}
        for key in ("input", "grad", "attention"):
            if entry[key] not in FORMATS:
                raise ValueError(f"{where}: {key} = {entry[key]!r}; allowed: {', '.join(FORMATS)}")
        if entry.get("scale", "none") not in SCALES:
            raise ValueError(f"{where}: scale = {entry['scale']!r}; allowed: {', '.join(SCALES)}")
        if entry.get("scale") in ("ue8m0", "e8m0") and entry.get("block", 0) < 1:
            raise ValueError(f"{where}: scale = {entry['scale']!r} needs block >= 1")
        if entry.get("accumulate", "fp32") != "fp32" or entry.get("denormals", "keep") not in ("keep", "flush"):
            raise ValueError(f"{where}: accumulate must be 'fp32', denormals 'keep' or 'flush'")
        profiles[name] = Profile(name=name, **{**entry, "dtype": parse_dtype(entry["dtype"])})
    for key, entry in raw.get("chips", {}).items():
        where = f"numerics.toml [chips.{key}]"
        if unknown := set(entry) - CHIP_KEYS:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        if missing := [p for p in entry["profiles"] if p not in profiles]:
            raise ValueError(f"{where}: unknown profiles {missing}")
        if entry["status"] not in ("official", "estimate"):
            raise ValueError(f"{where}: status must be official or estimate")
        chips[key] = ChipNumerics(key=key, **{**entry, "profiles": tuple(entry["profiles"])})
    return profiles, chips


def resolve(spec: str) -> Profile:
    """A profile by name (`fp16-only`), a chip's first profile (`ascend-910a`), or one of a
    chip's profiles (`h100-sxm:fp8-e4m3`); an unknown name lists the known ones."""
    profiles, chips = load_numerics()
    chip_key, _, name = spec.partition(":") if ":" in spec else (None, "", spec)
    if chip_key is None and spec in chips:
        chip_key, name = spec, chips[spec].profiles[0]
    if chip_key is not None:
        if chip_key not in chips:
            raise DeviceError(f"unknown chip {chip_key!r} in --emulate {spec!r}; chips: {', '.join(chips)}")
        if name not in chips[chip_key].profiles:
            raise DeviceError(f"--emulate {spec!r}: {chip_key} runs the profiles "
                              f"{', '.join(chips[chip_key].profiles)}")
    elif name not in profiles:
        raise DeviceError(f"unknown numerics profile or chip {spec!r}; profiles: {', '.join(profiles)}; "
                          f"chips: {', '.join(chips)} (or CHIP:PROFILE)")
    return Profile(**{**profiles[name].__dict__, "chip": chip_key})


def profile_for_dtype(dtype: torch.dtype) -> Profile:
    """The profile of a device that simply computes in `dtype` (the device in hand)."""
    return resolve({torch.bfloat16: "bf16", torch.float16: "fp16-only"}.get(dtype, "fp32"))


def refuse(profile: Profile, what: str, why: str) -> DeviceError:
    """The error for a stage setting that cannot run under `profile`, naming both."""
    return DeviceError(f"{what} cannot run under the emulated profile {profile.label}: {why}")


def check_dtype(profile: Profile, dtype: str | torch.dtype | None) -> None:
    if dtype is None or dtype == "auto" or parse_dtype(dtype) == profile.dtype:
        return
    profiles, chips = load_numerics()
    wanted = dtype_name(parse_dtype(dtype))
    other = [p for p in (chips[profile.chip].profiles if profile.chip else profiles)
             if profiles[p].dtype == parse_dtype(dtype)]
    prefix = f"{profile.chip}:" if profile.chip else ""
    hint = (f"; emulate {prefix}{other[0]} to rehearse {wanted}" if other
            else f"; {profile.chip or 'no profile'} has no {wanted} profile")
    raise refuse(profile, f"dtype {wanted}", f"it computes in {dtype_name(profile.dtype)}{hint}")


# -- the emulated operators ----------------------------------------------------------------
class _Round(torch.autograd.Function):
    """Forward: `x` rounded (float32). Backward: the gradient passes straight through, in x's dtype."""

    @staticmethod
    def forward(ctx, x, rounder):
        ctx.dtype = x.dtype
        return rounder(x)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype), None


class _Store(torch.autograd.Function):
    """Forward: a float32 GEMM result stored in `dtype`. Backward: the incoming gradient,
    the operand of the backward GEMMs, rounded to the gradient format (float32)."""

    @staticmethod
    def forward(ctx, y, dtype, grad_rounder):
        ctx.grad_rounder = grad_rounder
        return y.to(dtype, copy=True)

    @staticmethod
    def backward(ctx, g):
        return ctx.grad_rounder(g), None, None


class Emulation(TorchFunctionMode):
    """Within this mode, linear, matmul and attention compute with `profile`'s numerics."""

    MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.mm}

    def __init__(self, profile: Profile) -> None:
        super().__init__()
        self.profile = profile

    def _in(self, x, which: str = "input", dim: int = -1):
        if x.dtype == torch.float32 and getattr(self.profile, which) == "fp32":
            return x
        return _Round.apply(x, lambda t: self.profile.round(t, which, dim))

    def _out(self, y):
        return _Store.apply(y, self.profile.dtype, lambda g: self.profile.round(g, "grad"))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        floating = all(t.is_floating_point() for t in args[:2] if isinstance(t, torch.Tensor))
        if func is F.linear and floating:
            return self.linear(*args, **kwargs)
        if func in self.MATMUL and len(args) == 2 and not kwargs and floating \
                and all(isinstance(t, torch.Tensor) for t in args):
            return self.matmul(*args)
        if func is F.scaled_dot_product_attention and floating:
            return self.attention(*args, **kwargs)
        return func(*args, **kwargs)

    def linear(self, x, weight, bias=None):
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(self._in(x), self._in(weight))
            if bias is not None:
                y = y + bias.float()
            return self._out(y)

    def matmul(self, a, b):
        with torch.autocast(a.device.type, enabled=False):
            return self._out(torch.matmul(self._in(a), self._in(b, dim=-2 if b.dim() > 1 else -1)))

    def attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p:
            raise refuse(self.profile, "attention dropout", "the emulated attention computes no dropout")
        with torch.autocast(q.device.type, enabled=False):
            if enable_gqa and k.shape[-3] != q.shape[-3]:
                rep = q.shape[-3] // k.shape[-3]
                k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
            scores = self._in(q, "attention") @ self._in(k, "attention").transpose(-1, -2)
            scores = scores * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
            L, S = q.shape[-2], k.shape[-2]
            if is_causal:
                attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L)
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            elif attn_mask is not None:
                scores = scores + attn_mask.float()
            probs = torch.softmax(scores, dim=-1)
            return self._out(self._in(probs, "attention") @ self._in(v, "attention", dim=-2))


def numerics(profile: Profile | None):
    """The context a stage's forward and backward run in: the emulation, or nothing."""
    return Emulation(profile) if profile is not None else contextlib.nullcontext()
