"""Quantization math: integer ranges, scales and zero points, rounding, fake-quant with a
straight-through gradient, and TFLite's fixed-point requantization.

Notation (Jacob et al. 2018, arXiv 1712.05877): a real value r is stored as an integer q
with r = S * (q - Z), S the scale (a positive real) and Z the zero point (an integer in
[QMIN, QMAX], so that r = 0 is represented exactly). A real multiplier M in (0, 1) is
represented as M = M0 * 2^-n with M0 an int32 in Q31 fixed point, M0 in [2^30, 2^31).
"""
import torch

MIN_BITS, MAX_BITS = 2, 16         # bit widths for weights and activations (fake-quant)
INT_MAX_BITS = 8                   # the integer path follows TFLite's 8-bit kernels: up to 8 bits
FLOAT_BITS = 32                    # "activation bits" 32: activations stay float (weight-only quantization)
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
Q31_ONE = 2 ** 31                  # 1.0 in Q31 fixed point


class IntsimError(ValueError):
    """A problem with the user's input (bits, checkpoint, data): the scripts print it as one line."""


# ----------------------------------------------------------------------------- integer ranges

def check_bits(bits, what="bits"):
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise IntsimError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def check_act_bits(bits, what="activation bits"):
    """Activation bits: MIN_BITS..MAX_BITS, or FLOAT_BITS for float activations."""
    if bits == FLOAT_BITS:
        return bits
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise IntsimError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, or {FLOAT_BITS} "
                          f"for float activations, got {bits!r}")
    return bits


def qrange(bits, symmetric):
    """(QMIN, QMAX) of a b-bit integer.

    symmetric: signed narrow range [-(2^(b-1) - 1), 2^(b-1) - 1] (TFLite's int8 weights: the
    narrow range keeps -QMIN == QMAX so that the zero point is exactly 0).
    asymmetric: unsigned [0, 2^b - 1] (the 2018 paper's uint8).
    """
    check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


# ----------------------------------------------------------------------------- rounding

def round_half_away(x):
    """Round to nearest, ties away from zero, as C's std::round and TFLite do (torch.round
    rounds ties to even)."""
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)


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

def scale_zero_point(rmin, rmax, bits, symmetric):
    """S and Z for the range [rmin, rmax] (tensors of equal shape: one entry per channel).

    The range is first extended to contain 0 so that 0.0 is exactly representable. A zero
    range (all values 0) gets S = 1: any scale represents it, and no division by zero follows.
    Returns float32 S and int64 Z.
    """
    qmin, qmax = qrange(bits, symmetric)
    rmin = torch.clamp(torch.as_tensor(rmin, dtype=torch.float64), max=0.0)
    rmax = torch.clamp(torch.as_tensor(rmax, dtype=torch.float64), min=0.0)
    if not (torch.isfinite(rmin).all() and torch.isfinite(rmax).all()):
        raise IntsimError("cannot quantize a range that is not finite (NaN or inf in the observed values)")
    if symmetric:
        span = torch.maximum(-rmin, rmax)                    # [-span, span] onto [-qmax, qmax]
        scale = span / qmax
        zero_point = torch.zeros_like(scale, dtype=torch.int64)
    else:
        scale = (rmax - rmin) / (qmax - qmin)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        # Z = QMIN - rmin / S, rounded and kept in range ("nudged", so that r = 0 maps to Z exactly)
        zero_point = torch.clamp(round_half_away(qmin - rmin / safe), qmin, qmax).to(torch.int64)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.to(torch.float32), zero_point


# ----------------------------------------------------------------------------- quantize / dequantize

def quantize(x, scale, zero_point, qmin, qmax, rounding="nearest", generator=None):
    """q = clamp(round(r / S) + Z, QMIN, QMAX) as int32 (round: `round_with(., rounding)`)."""
    q = round_with(x / scale, rounding, generator) + zero_point
    return torch.clamp(q, qmin, qmax).to(torch.int32)


def dequantize(q, scale, zero_point):
    """r = S (q - Z)."""
    return scale * (q.to(torch.float32) - zero_point)


def integers_of(y, scale, zero_point):
    """The integers q behind a (fake-)quantized real y = S (q - Z): round(y / S) + Z, int64."""
    return torch.round(y / scale.to(y)).long() + zero_point.to(y.device)


def fake_quantize(x, scale, zero_point, qmin, qmax):
    """dequantize(quantize(x)) in float, differentiable with the straight-through estimator
    (Bengio et al. 2013; Jacob et al. 2018, section 3): the gradient is the identity where x
    lies inside the representable range [S (QMIN - Z), S (QMAX - Z)] and 0 where it is clipped.
    (Written out rather than through round-then-clamp, whose gradient is also 0 for values
    that round exactly onto QMIN or QMAX.)"""
    with torch.no_grad():
        q = torch.clamp(round_half_away(x / scale) + zero_point, qmin, qmax)
        y = (q - zero_point) * scale
        inside = (x >= (qmin - zero_point) * scale) & (x <= (qmax - zero_point) * scale)
    return y + (x - x.detach()) * inside


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
    ab = a * b
    ab += 2 ** 30
    ab >>= 31
    if (b == INT32_MIN).any():
        ab = torch.where((a == INT32_MIN) & (b == INT32_MIN), torch.full_like(ab, INT32_MAX), ab)
    return ab


def rounding_divide_by_pot(x, exponent):
    """gemmlowp's RoundingDivideByPOT: x / 2^exponent rounded to nearest, ties away from zero,
    on int64 tensors (exponent >= 0, a tensor broadcastable to x, e.g. one per channel).

    gemmlowp adds 1 when the remainder x & (2^e - 1) exceeds (2^e - 1) >> 1, plus 1 if x < 0;
    that equals floor((x + 2^(e-1) - [x < 0]) / 2^e) for e >= 1 (and x for e = 0), which is
    one add, one subtract and one arithmetic shift (tests compare the literal formula).
    """
    exponent = torch.as_tensor(exponent, dtype=torch.int64, device=x.device)
    out = x + ((1 << exponent) >> 1)
    out -= ((x < 0) & (exponent > 0)).to(torch.int64)
    out >>= exponent
    return out


def multiply_by_quantized_multiplier(x, m0, shift):
    """TFLite's MultiplyByQuantizedMultiplier: x * M0 * 2^(shift - 31), rounded as TFLite rounds,
    in exact integer arithmetic. x: int64 tensor of int32 values; m0, shift: int64 tensors
    broadcastable to x (per-channel multipliers)."""
    shift = torch.as_tensor(shift, dtype=torch.int64, device=x.device)
    left = torch.clamp(shift, min=0)
    if (left > 0).any():
        x = x << left
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, m0), torch.clamp(-shift, min=0))


def multiply_by_quantized_multiplier_single_rounding(x, m0, shift):
    """TFLite's MultiplyByQuantizedMultiplier when built with TFLITE_SINGLE_ROUNDING: one
    rounding (half up) of the exact product, (x M0 + 2^(30 - shift)) >> (31 - shift).

    The default above rounds twice: SRDHM rounds to 2^-n of an output step first, so a value
    just below a half lands on it and RoundingDivideByPOT rounds it up; about 2^-(n+1) of all
    outputs differ from exact rounding by 1 (0.15% for n = 7, measured in the README)."""
    total = 31 - torch.as_tensor(shift, dtype=torch.int64, device=x.device)
    out = x * m0
    out += 1 << (total - 1)
    out >>= total
    return out


def requantize(acc, m0, shift, zero_point, qmin, qmax, single_rounding=False):
    """int32 accumulator -> output integer: MultiplyByQuantizedMultiplier, + Z_out, clamp."""
    multiply = (multiply_by_quantized_multiplier_single_rounding if single_rounding
                else multiply_by_quantized_multiplier)
    y = multiply(acc, m0, shift)
    y += zero_point
    return y.clamp_(qmin, qmax)


def multiplier_to_float(m0, shift):
    """The real multiplier an (M0, shift) pair stands for, for checks and printing."""
    return m0.to(torch.float64) * torch.pow(2.0, shift.to(torch.float64) - 31)


def int32_check(x, what):
    """Raise if an int64 tensor holds values outside int32 (an accumulator overflow)."""
    lo, hi = int(x.min()), int(x.max())
    if lo < INT32_MIN or hi > INT32_MAX:
        raise IntsimError(f"{what}: int32 accumulator overflow (values in [{lo}, {hi}]); "
                          f"use fewer bits or a smaller layer")


