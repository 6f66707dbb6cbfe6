"""Quantization math: integer grids, scales and zero points, rounding, fake-quant with a
straight-through gradient, and TFLite's fixed-point requantization.

Notation (Jacob et al. 2018, arXiv 1712.05877): a real value r is stored as an integer q
with r = S * (q - Z), S the scale (a positive real) and Z the zero point (an integer in
[QMIN, QMAX], so that r = 0 is represented exactly). A real multiplier M in (0, 1) is
represented as M = M0 * 2^-n with M0 an int32 in Q31 fixed point, M0 in [2^30, 2^31).
"""
from dataclasses import dataclass

import torch

from errors import IntsimError

MIN_BITS, MAX_BITS = 2, 16         # bit widths for weights and activations (fake-quant)
INT_MAX_BITS = 8                   # the integer path follows TFLite's 8-bit kernels: up to 8 bits
FLOAT_BITS = 32                    # "activation bits" 32: activations stay float (weight-only quantization)
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
Q31_ONE = 2 ** 31                  # 1.0 in Q31 fixed point
SHIFT_MIN, SHIFT_MAX = -31, 30     # TFLite's range of a multiplier's shift (TFLITE_DCHECK in MultiplyByQuantizedMultiplier)
POT_MAX = 31                       # RoundingDivideByPOT's exponent lies in [0, 31] (gemmlowp's assert)
FLOAT32_TINY = torch.finfo(torch.float32).tiny   # the smallest normal float32: a scale below it has lost its bits


def compiling():
    """True while torch.compile traces (ops/epilogue.py): the checks on values run before the
    compiled call, and a branch that only skips work is taken both ways (same integers)."""
    return torch.compiler.is_compiling()


def check_scale(scale):
    """TFLite's precondition on S: finite and > 0 (a zero or negative scale makes r / S meaningless)."""
    scale = torch.as_tensor(scale)
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise IntsimError(f"a scale must be finite and above 0, got {scale.flatten()[:4].tolist()}")


def check_finite(x):
    """Reals about to be quantized hold no NaN or inf (NaN would become an arbitrary integer,
    INT32_MIN on x86)."""
    if not torch.isfinite(x).all():
        raise IntsimError(f"cannot quantize NaN or inf: the input holds {int((~torch.isfinite(x)).sum())} NaN or "
                          f"inf values; check the data")


def check_int64(x, what):
    """The fixed-point helpers take int64 tensors holding int32 values: an int32 tensor would
    overflow silently in a * b."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int64:
        raise IntsimError(f"{what} takes int64 tensors (holding int32 values), got "
                          f"{getattr(x, 'dtype', type(x).__name__)}")


# ----------------------------------------------------------------------------- integer grids

def check_bits(bits, what="bits"):
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise IntsimError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def check_act_bits(bits, what="activation bits"):
    """Activation bits: MIN_BITS..MAX_BITS, or FLOAT_BITS for float activations."""
    if bits == FLOAT_BITS and not isinstance(bits, bool):
        return bits
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise IntsimError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, or {FLOAT_BITS} "
                          f"for float activations, got {bits!r}")
    return bits


@dataclass(frozen=True)
class Grid:
    """The integers a tensor may take, and how its range maps onto them. Three choices that
    TFLite keeps apart:
      signed        [-2^(b-1), 2^(b-1) - 1] (int8) or unsigned [0, 2^b - 1] (uint8)
      narrow_range  drop the lowest integer, so that -QMIN == QMAX when signed (TFLite's int8
                    weights: [-127, 127])
      symmetric     Z = 0 and S = max|r| / QMAX (needs a signed grid); else S and Z from the
                    range's two ends (asymmetric, with a zero point)
    intsim's defaults: weights signed, narrow, symmetric; activations unsigned, asymmetric (the
    2018 paper's uint8); TFLite's current int8 activations are signed and asymmetric."""
    bits: int
    signed: bool = False
    narrow_range: bool = False
    symmetric: bool = False

    def __post_init__(self):
        check_bits(self.bits)
        if self.symmetric and not self.signed:
            raise IntsimError("a symmetric grid (Z = 0) needs signed integers")

    @property
    def qmin(self):
        low = -(2 ** (self.bits - 1)) if self.signed else 0
        return low + 1 if self.narrow_range else low

    @property
    def qmax(self):
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1


def weight_grid(bits, symmetric=True):
    """intsim's weight grid: TFLite's int8 scheme (signed, narrow, Z = 0) or unsigned with a zero point."""
    return Grid(bits, signed=True, narrow_range=True, symmetric=True) if symmetric else Grid(bits)


def activation_grid(bits, signed=False):
    """intsim's activation grid: unsigned with a zero point (uint8), or signed with one (TFLite's int8)."""
    return Grid(bits, signed=signed)


def to_grid(v, zero_point, qmin, qmax):
    """Integers v (float tensor, already rounded) shifted by Z and clamped: clamp(v + Z, QMIN, QMAX)."""
    return torch.clamp(v + zero_point, qmin, qmax)


# ----------------------------------------------------------------------------- rounding

def round_half_away(x):
    """Round to nearest, ties away from zero, as C's std::round and TFLite do (torch.round
    rounds ties to even), exact at every float: floor(|x| + 0.5) is not, as |x| + 0.5 itself
    rounds (x = 0.5 - 2^-25 in float32 would give 1), while x - trunc(x) is always exact."""
    t = torch.trunc(x)
    return t + torch.sign(x) * (torch.abs(x - t) >= 0.5)


ROUNDINGS = ("nearest", "floor", "ceil", "stochastic")


def round_with(x, scheme, generator=None):
    """Round x (a float tensor of values in integer units, x = r / S) to integers by `scheme`:
      nearest     ties away from zero (TFLite)
      floor, ceil toward -inf, toward +inf
      stochastic  floor(x) + 1 with probability x - floor(x), so E[round(x)] = x (unbiased);
                  the uniform draws come from `generator` (a seeded torch.Generator) for
                  reproducible roundings. The AdaRound paper's Table 1 compares these four.
    """
    if scheme == "nearest":
        return round_half_away(x)
    if scheme == "floor":
        return torch.floor(x)
    if scheme == "ceil":
        return torch.ceil(x)
    if scheme == "stochastic":
        low = torch.floor(x)
        u = torch.rand(x.shape, generator=generator, dtype=torch.float64).to(x.device)
        return low + (u < (x - low).double()).to(x.dtype)
    raise IntsimError(f"unknown rounding {scheme!r}; use one of {', '.join(ROUNDINGS)}")


# ----------------------------------------------------------------------------- scale and zero point

def scale_zero_point(rmin, rmax, grid):
    """S and Z for the range [rmin, rmax] on `grid` (tensors of equal shape: one entry per channel).

    The range is first extended to contain 0 so that 0.0 is exactly representable. A zero
    range (all values 0) gets S = 1: any scale represents it, and no division by zero follows.
    Returns float32 S and int64 Z.
    """
    qmin, qmax = grid.qmin, grid.qmax
    rmin, rmax = torch.as_tensor(rmin, dtype=torch.float64), torch.as_tensor(rmax, dtype=torch.float64)
    if not (torch.isfinite(rmin).all() and torch.isfinite(rmax).all()):
        raise IntsimError("cannot quantize a range that is not finite (NaN or inf in the observed values)")
    if (rmin > rmax).any():
        raise IntsimError(f"an inverted range: rmin {rmin.max().item():g} > rmax {rmax.min().item():g}")
    rmin, rmax = torch.clamp(rmin, max=0.0), torch.clamp(rmax, min=0.0)
    if grid.symmetric:
        span = torch.maximum(-rmin, rmax)                    # [-span, span] onto [-qmax, qmax]
        scale = span / qmax
        zero_point = torch.zeros_like(scale, dtype=torch.int64)
    else:
        scale = (rmax - rmin) / (qmax - qmin)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        # Z = QMIN - rmin / S, rounded and kept in range ("nudged", so that r = 0 maps to Z exactly)
        zero_point = torch.clamp(round_half_away(qmin - rmin / safe), qmin, qmax).to(torch.int64)
    if ((scale > 0) & (scale < FLOAT32_TINY)).any():
        raise IntsimError(f"a range of {2 * scale.max().item() * qmax:.3g} is too small for a float32 scale "
                          f"(S below {FLOAT32_TINY:.3g}): the values are all but zero")
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.to(torch.float32), zero_point


# ----------------------------------------------------------------------------- quantize / dequantize

def quantize(x, scale, zero_point, qmin, qmax, rounding="nearest", generator=None):
    """q = clamp(round(r / S) + Z, QMIN, QMAX) as int32 (round: `round_with(., rounding)`)."""
    check_quantize(x, scale)
    return quantize_unchecked(x, scale, zero_point, qmin, qmax, rounding, generator)


def check_quantize(x, scale):
    """`quantize`'s checks on values: a usable scale, finite reals."""
    check_scale(scale)
    check_finite(x)


def quantize_unchecked(x, scale, zero_point, qmin, qmax, rounding="nearest", generator=None):
    """`quantize` without its checks on values (the input QUANTIZE runs it compiled, ops/quant.py)."""
    return to_grid(round_with(x / scale, rounding, generator), zero_point, qmin, qmax).to(torch.int32)


def dequantize(q, scale, zero_point):
    """r = S (q - Z)."""
    check_scale(scale)
    return scale * (q.to(torch.float32) - zero_point)


def integers_of(y, scale, zero_point):
    """The integers q behind a (fake-)quantized real y = S (q - Z): round(y / S) + Z, int64."""
    return torch.round(y / scale.to(y)).long() + zero_point.to(y.device)


def fake_quant_forward(x, scale, zero_point, qmin, qmax, needs_dyds):
    """The forward of fake_quantize, and what its backward needs: (y, the mask `inside`, and for a
    learned S, d y / d S = (q - Z) - x / S inside the range (round's gradient taken as 1) and
    q - Z where x is clipped (LSQ, Esser et al. 2019, eq. 3, with a zero point), or None)."""
    q = to_grid(round_half_away(x / scale), zero_point, qmin, qmax)
    inside = (x >= (qmin - zero_point) * scale) & (x <= (qmax - zero_point) * scale)
    dyds = ((q - zero_point) - torch.where(inside, x / scale, torch.zeros_like(x)) if needs_dyds else None)
    return (q - zero_point) * scale, inside, dyds


def fake_quant_backward(grad, inside, dyds, scale_shape):
    """(dL/dx, dL/dS) of fake_quantize: straight through inside the range, LSQ's for S."""
    return grad * inside, None if dyds is None else (grad * dyds).sum_to_size(scale_shape)


class _FakeQuantize(torch.autograd.Function):
    """dequantize(quantize(x)) with straight-through gradients (see fake_quantize). d y / d S
    depends on x alone, so it is computed in forward and x is not saved."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        y, inside, dyds = fake_quant_forward(x, scale, zero_point, qmin, qmax, ctx.needs_input_grad[1])
        ctx.scale_shape = scale.shape
        ctx.save_for_backward(inside, dyds)
        return y

    @staticmethod
    def backward(ctx, grad):
        inside, dyds = ctx.saved_tensors
        return *fake_quant_backward(grad, inside, dyds, ctx.scale_shape), None, None, None


def fake_quantize(x, scale, zero_point, qmin, qmax):
    """dequantize(quantize(x)) in float, S (clamp(round(x / S) + Z, QMIN, QMAX) - Z), with the
    straight-through estimator (Bengio et al. 2013; Jacob et al. 2018, section 3): the
    gradient is the identity where x lies inside the representable range
    [S (QMIN - Z), S (QMAX - Z)] and 0 where it is clipped (a value that rounds onto QMIN or
    QMAX from inside still gets it). When S requires a gradient (a learned step size), it gets
    LSQ's. scale and zero_point broadcast against x (one per channel, or one). (Training with
    compressed activations keeps what backward needs packed: compress.layers.fake_quantize_compressed.)"""
    check_scale(scale.detach() if isinstance(scale, torch.Tensor) else scale)
    return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax)


# ----------------------------------------------------------------------------- fixed-point requantization

def quantize_multiplier(m):
    """TFLite's QuantizeMultiplier, vectorised: real M >= 0 (tensor) -> (M0, shift), int64
    tensors, with M == M0 * 2^(shift - 31) and M0 in [2^30, 2^31) (or 0).

    shift > 0 is a left shift, shift < 0 a right shift (the paper's n = -shift).
    """
    m = torch.as_tensor(m, dtype=torch.float64)
    if (m < 0).any() or not torch.isfinite(m).all():
        raise IntsimError("a requantization multiplier must be finite and non-negative")
    mantissa, exponent = torch.frexp(m)                   # m = mantissa * 2^exponent, mantissa in [0.5, 1)
    m0 = round_half_away(mantissa * Q31_ONE).to(torch.int64)
    exponent = exponent.to(torch.int64)
    carry = m0 == Q31_ONE                                 # mantissa rounded up to 1.0
    m0 = torch.where(carry, m0 // 2, m0)
    exponent = torch.where(carry, exponent + 1, exponent)
    tiny = exponent < -31                                 # below what a Q31 number and a 31-bit shift hold
    m0 = torch.where(tiny | (m == 0), torch.zeros_like(m0), m0)
    exponent = torch.where(tiny | (m == 0), torch.zeros_like(exponent), exponent)
    return m0, exponent


def saturating_rounding_doubling_high_mul(a, b):
    """gemmlowp's SaturatingRoundingDoublingHighMul on int64 tensors holding int32 values:
    round(a * b / 2^31) with the nudge 2^30 (or 1 - 2^30 for a negative product) and C's
    truncating division; the one overflow, INT32_MIN * INT32_MIN, saturates to INT32_MAX.

    For x = ab + nudge, truncation toward zero equals floor((ab + 2^30) / 2^31) in both
    signs, so the division is one arithmetic shift (tests compare the literal formula).
    """
    check_int64(a, "SaturatingRoundingDoublingHighMul")
    ab = a * b
    ab += 2 ** 30
    ab >>= 31
    if compiling() or (b == INT32_MIN).any():        # (compiled: no data-dependent branch, the same values)
        ab = torch.where((a == INT32_MIN) & (b == INT32_MIN), torch.full_like(ab, INT32_MAX), ab)
    return ab


def rounding_divide_by_pot(x, exponent):
    """gemmlowp's RoundingDivideByPOT: x / 2^exponent rounded to nearest, ties away from zero,
    on int64 tensors (exponent >= 0, a tensor broadcastable to x, e.g. one per channel).

    gemmlowp adds 1 when the remainder x & (2^e - 1) exceeds (2^e - 1) >> 1, plus 1 if x < 0;
    that equals floor((x + 2^(e-1) - [x < 0]) / 2^e) for e >= 1 (and x for e = 0), which is
    adds and arithmetic shifts only: -[x < 0] is x's sign bit, x >> 63 (tests compare the
    literal formula).
    """
    check_int64(x, "RoundingDivideByPOT")
    exponent = torch.as_tensor(exponent, dtype=torch.int64, device=x.device)
    if not compiling() and ((exponent < 0) | (exponent > POT_MAX)).any():
        raise IntsimError(f"RoundingDivideByPOT's exponent lies in [0, {POT_MAX}], got "
                          f"{exponent.min().item()}..{exponent.max().item()}")
    out = x >> 63                                   # -1 where x < 0, else 0
    if compiling() or (exponent == 0).any():
        out *= exponent > 0                         # no division, no tie to correct
    out += x
    out += (1 << exponent) >> 1
    out >>= exponent
    return out


def check_multiplier(m0, shift):
    """TFLite's preconditions on a quantized multiplier: M0 in [0, 2^31), shift in [-31, 30]."""
    m0, shift = torch.as_tensor(m0), torch.as_tensor(shift)
    if ((m0 < 0) | (m0 >= Q31_ONE)).any():
        raise IntsimError(f"a quantized multiplier M0 lies in [0, 2^31), got {m0.min().item()}..{m0.max().item()}")
    if ((shift < SHIFT_MIN) | (shift > SHIFT_MAX)).any():
        raise IntsimError(f"a multiplier's shift lies in [{SHIFT_MIN}, {SHIFT_MAX}], got "
                          f"{shift.min().item()}..{shift.max().item()}")


def multiply_by_quantized_multiplier(x, m0, shift):
    """TFLite's MultiplyByQuantizedMultiplier: x * M0 * 2^(shift - 31), rounded as TFLite rounds,
    in exact integer arithmetic. x: int64 tensor of int32 values; m0, shift: int64 tensors
    broadcastable to x (per-channel multipliers)."""
    if not compiling():
        check_multiplier(m0, shift)
    shift = torch.as_tensor(shift, dtype=torch.int64, device=x.device)
    left = torch.clamp(shift, min=0)
    if compiling() or (left > 0).any():
        x = x << left
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, m0), torch.clamp(-shift, min=0))


def multiply_by_quantized_multiplier_single_rounding(x, m0, shift):
    """TFLite's MultiplyByQuantizedMultiplier when built with TFLITE_SINGLE_ROUNDING: one
    rounding (half up) of the exact product, (x M0 + 2^(30 - shift)) >> (31 - shift).

    The default above rounds twice: SRDHM rounds to 2^-n of an output step first, so a value
    just below a half lands on it and RoundingDivideByPOT rounds it up; about 2^-(n+1) of all
    outputs differ from exact rounding by 1 (0.15% for n = 7, measured in RESULTS.md)."""
    if not compiling():
        check_multiplier(m0, shift)
    check_int64(x, "MultiplyByQuantizedMultiplier")
    total = 31 - torch.as_tensor(shift, dtype=torch.int64, device=x.device)
    out = x * m0
    out += 1 << (total - 1)
    out >>= total
    return out


def rescale(x, m0, shift, single_rounding=False):
    """The one place the rescale kernel is chosen: TFLite's default (two roundings) or, with
    `single_rounding`, the TFLITE_SINGLE_ROUNDING build's."""
    if single_rounding:
        return multiply_by_quantized_multiplier_single_rounding(x, m0, shift)
    return multiply_by_quantized_multiplier(x, m0, shift)


def requantize(acc, m0, shift, zero_point, act_min, act_max, single_rounding=False, check=True):
    """int32 accumulator -> output integer: rescale, + Z_out, clamp to [act_min, act_max] (the
    output grid intersected with the fused activation's range). `check`: that acc fits int32
    (a caller that has bounded it already passes False)."""
    if check:
        int32_check(acc, "requantize")
    y = rescale(acc, m0, shift, single_rounding)
    y += zero_point
    return y.clamp_(act_min, act_max)


def requantize_in_double(acc, real_multiplier, zero_point, act_min, act_max):
    """The rescale of LiteRT's reference FULLY_CONNECTED (since 2025; the version pinned here):
    no fixed-point multiplier, one rounding of a double product,
        q_out = clamp(round(double(acc) * M) + Z_out, act_min, act_max),
    M = double(S_in) * double(S_w) / double(S_out), round = std::round (half away from zero)."""
    y = round_half_away(acc.to(torch.float64) * real_multiplier).to(torch.int64)
    y += zero_point
    return y.clamp_(act_min, act_max)


def multiplier_to_float(m0, shift):
    """The real multiplier an (M0, shift) pair stands for, for checks and printing."""
    return m0.to(torch.float64) * torch.pow(2.0, shift.to(torch.float64) - 31)


def int32_check(x, what):
    """Raise if an int64 tensor holds values outside int32 (an accumulator overflow)."""
    lo, hi = int(x.min()), int(x.max())
    if lo < INT32_MIN or hi > INT32_MAX:
        raise IntsimError(f"{what}: int32 accumulator overflow (values in [{lo}, {hi}]); "
                          f"use fewer bits or a smaller layer")
