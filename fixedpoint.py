"""gemmlowp's fixed-point functions, which TFLite's 8-bit SOFTMAX and LOG_SOFTMAX reference kernels
use, on int64 tensors that hold int32 values (gemmlowp/fixedpoint/fixedpoint.h and TFLite's
kernels/internal/common.h).

A raw int32 `x` with `bits` integer bits stands for x / 2^(31 - bits) (Q bits.(31 - bits)), so its
range is [-2^bits, 2^bits). The product of two such numbers is SaturatingRoundingDoublingHighMul
of the raws, with the integer bits added up. `Rescale` changes the integer bits: a rounding
shift when bits are added, a saturating one when they are taken away. The constants are
gemmlowp's raws (its GEMMLOWP_CHECKED_FIXEDPOINT_CONSTANT values), given with what they stand for.
"""
import torch

from function import INT32_MAX, INT32_MIN, rounding_divide_by_pot, saturating_rounding_doubling_high_mul

srdhm = saturating_rounding_doubling_high_mul
Q0_ONE = INT32_MAX                  # "1.0" with no integer bits: the largest raw, 1 - 2^-31

# exp(x) on [-1/4, 0): Taylor series around -1/8
EXP_MINUS_ONE_EIGHTH = 1895147668   # exp(-1/8) in Q0.31
ONE_THIRD = 715827883               # 1/3 in Q0.31
# exp(-2^k) in Q0.31 for k = -2 .. 4: the barrel shifter of exp_on_negative_values
EXP_OF_MINUS_POWERS_OF_TWO = {-2: 1672461947, -1: 1302514674, 0: 790015084, 1: 290630308, 2: 39332535,
                              3: 720401, 4: 242}
# 1 / (1 + x) by Newton-Raphson: the first guess 48/17 - 32/17 d, in Q2.29
FORTY_EIGHT_OVER_17, MINUS_32_OVER_17 = 1515870810, -1010580540
NEWTON_STEPS = 3
# log(x), log_x_for_x_greater_than_or_equal_to_1 (Q0.31)
LOG_2 = 1488522236                  # log(2)
SQRT_SQRT_HALF = 1805811301         # 0.5^(1/4)
SQRT_HALF = 1518500250              # sqrt(0.5)
ONE_QUARTER = 536870912             # 1/4
ALPHA_N = 117049297                 # 11/240 * 2^(1/4)
ALPHA_D = 127690142                 # 1/20 * 2^(1/4)
ALPHA_I = 1057819769                # 2 / 2^(1/4) - 2^(1/4)
ALPHA_F = 638450708                 # 1/4 * 2^(1/4)


def saturate(x):
    return x.clamp(INT32_MIN, INT32_MAX)


def saturating_shift_left(x, exponent):
    """SaturatingRoundingMultiplyByPOT with exponent >= 0 (a tensor or an int): x * 2^exponent,
    saturated where |x| exceeds (2^(31 - exponent) - 1)."""
    exponent = torch.as_tensor(exponent, dtype=torch.int64, device=x.device)
    threshold = torch.bitwise_left_shift(torch.ones_like(exponent), 31 - exponent) - 1
    out = torch.where(x > threshold, torch.full_like(x, INT32_MAX), torch.bitwise_left_shift(x, exponent))
    out = torch.where(x < -threshold, torch.full_like(x, INT32_MIN), out)
    return torch.where(exponent == 0, x, out)


def multiply_by_pot(x, exponent):
    """gemmlowp's SaturatingRoundingMultiplyByPOT<exponent>: saturating left shift for exponent > 0,
    RoundingDivideByPOT for exponent < 0."""
    if exponent >= 0:
        return saturating_shift_left(x, exponent)
    return rounding_divide_by_pot(x, -exponent)


def rescale(x, src_bits, dst_bits):
    """gemmlowp's Rescale<dst_bits> of a Q src_bits number."""
    return multiply_by_pot(x, src_bits - dst_bits)


def rounding_half_sum(a, b):
    """gemmlowp's RoundingHalfSum: (a + b + sign(a + b)) / 2, C's division (toward zero)."""
    s = a + b
    return torch.div(s + torch.where(s >= 0, 1, -1), 2, rounding_mode="trunc")


def count_leading_zeros(x):
    """CountLeadingZeros of uint32(x) for 0 <= x < 2^32: 32 - bit length."""
    _, exponent = torch.frexp(x.double())          # x = m 2^e, m in [0.5, 1): e is x's bit length (exact)
    return 32 - torch.where(x == 0, torch.zeros_like(exponent), exponent).long()


def exp_on_interval_between_negative_one_quarter_and_0_excl(a):
    """exp(a) for a in [-1/4, 0), a and the result in Q0.31: the Taylor series around -1/8,
    exp(-1/8) (1 + x + x^2/2 + x^3/6 + x^4/24) with x = a + 1/8."""
    x = a + (1 << 28)                                              # + 1/8
    x2 = srdhm(x, x)
    x3 = srdhm(x2, x)
    x4 = srdhm(x2, x2)
    x4_over_4 = rounding_divide_by_pot(x4, 2)
    poly = rounding_divide_by_pot(srdhm(x4_over_4 + x3, torch.full_like(x, ONE_THIRD)) + x2, 1)
    c = torch.full_like(x, EXP_MINUS_ONE_EIGHTH)
    return c + srdhm(c, x + poly)


def exp_on_negative_values(a, integer_bits):
    """exp(a) for a <= 0, a in Q integer_bits, the result in Q0.31: exp of a mod 1/4 (shifted into
    [-1/4, 0)), times exp(-2^k) for each bit k of the rest; 0 below -32, 1 at 0."""
    fractional_bits = 31 - integer_bits
    quarter = 1 << (fractional_bits - 2)
    a_mod_quarter_minus_quarter = (a & (quarter - 1)) - quarter
    result = exp_on_interval_between_negative_one_quarter_and_0_excl(
        rescale(a_mod_quarter_minus_quarter, integer_bits, 0))
    remainder = a_mod_quarter_minus_quarter - a
    for k, multiplier in EXP_OF_MINUS_POWERS_OF_TWO.items():
        if integer_bits > k:
            bit = (remainder & (1 << (fractional_bits + k))) != 0
            result = torch.where(bit, srdhm(result, torch.full_like(result, multiplier)), result)
    if integer_bits > 5:
        result = torch.where(a < -(1 << (36 - integer_bits)), torch.zeros_like(result), result)   # below -32
    return torch.where(a == 0, torch.full_like(result, Q0_ONE), result)


def one_over_one_plus_x_for_x_in_0_1(a):
    """1 / (1 + a) for a in [0, 1), both in Q0.31: Newton-Raphson on d = (1 + a) / 2 in Q2.29."""
    half_denominator = rounding_half_sum(a, torch.full_like(a, Q0_ONE))
    x = FORTY_EIGHT_OVER_17 + srdhm(half_denominator, torch.full_like(a, MINUS_32_OVER_17))
    one = 1 << 29                                                  # 1.0 in Q2.29
    for _ in range(NEWTON_STEPS):
        one_minus_dx = one - srdhm(half_denominator, x)
        x = x + rescale(srdhm(x, one_minus_dx), 4, 2)
    return rescale(x, 1, 0)                                        # x / 2 (exactly, as Q1.30), then to Q0.31


def get_reciprocal(x, integer_digits):
    """TFLite's GetReciprocal of x > 0 in Q integer_digits: x = (1 + a) 2^k with a in [0, 1)
    (k: the bits over unit), and (1 / (1 + a) in Q0.31, k), so that 1 / x = raw 2^-31 2^-k."""
    headroom_plus_one = count_leading_zeros(x)
    bits_over_unit = integer_digits - headroom_plus_one
    shifted_minus_one = torch.bitwise_left_shift(x, headroom_plus_one) - (1 << 31)   # x 2^h in [2^31, 2^32): a 2^31
    return one_over_one_plus_x_for_x_in_0_1(shifted_minus_one), bits_over_unit


def saturating_add(a, b):
    return saturate(a + b)


def log_x_for_x_greater_than_or_equal_to_1(x, input_bits, output_bits):
    """log(x) for x >= 1, x in Q input_bits, the result in Q output_bits (TFLite's
    log_x_for_x_greater_than_or_equal_to_1_impl): x = 2^p r with r near 1, log x = p log 2 +
    log r, log r from a rational approximation around 2^(-1/4). Accumulated with one integer
    bit more than the output."""
    accum_bits = output_bits + 1
    shifted_quarter = rescale(torch.full_like(x, ONE_QUARTER), 0, accum_bits)
    c = lambda v: torch.full_like(x, v)
    # z_a: x read as Q0.31, normalised so that its top bit is bit 30
    z_a_headroom_plus_1 = count_leading_zeros(x)
    r_a_tmp = saturating_shift_left(x, z_a_headroom_plus_1 - 1)
    r_a = saturating_shift_left(srdhm(r_a_tmp, c(SQRT_HALF)), 1)
    z_a_pow_2_adj = saturating_add(saturating_shift_left(input_bits - z_a_headroom_plus_1, 31 - accum_bits), shifted_quarter)
    # z_b: the same with x premultiplied by sqrt(1/2)
    z_b = srdhm(x, c(SQRT_HALF))
    z_b_headroom = count_leading_zeros(z_b) - 1
    r_b = saturating_shift_left(x, z_b_headroom)
    z_b_pow_2_adj = saturate(saturating_shift_left(input_bits - z_b_headroom, 31 - accum_bits) - shifted_quarter)
    r = torch.minimum(r_a, r_b)
    z_pow_2_adj = torch.maximum(z_a_pow_2_adj, z_b_pow_2_adj)
    # log r for r in [sqrt(1/2), sqrt(2)): num / denom around 2^(-1/4)
    p = rounding_half_sum(r, c(SQRT_SQRT_HALF))
    q = r - SQRT_SQRT_HALF
    q = q + q
    common_sq = srdhm(q, q)
    num = srdhm(q, r) + srdhm(srdhm(q, common_sq), c(ALPHA_N))
    denom_minus_one = srdhm(p, c(ALPHA_I) + q + srdhm(c(ALPHA_D), common_sq)) + srdhm(c(ALPHA_F), q)
    recip_denom = one_over_one_plus_x_for_x_in_0_1(denom_minus_one)
    num_scaled = rescale(num, 0, accum_bits)
    return rescale(srdhm(z_pow_2_adj, c(LOG_2)) + srdhm(num_scaled, recip_denom), accum_bits, output_bits)
