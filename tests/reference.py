"""Independent references the tests compare intsim with: a plain-Python transcription of
TFLite's and gemmlowp's reference functions (Python ints, C semantics written out by hand, no
torch), NumPy int64 versions of the integer conv, add and mean, and NumPy range searches.
Nothing here imports the project's code."""
import math
from fractions import Fraction

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


# ----------------------------------------------------------------------------- TFLite / gemmlowp, one integer at a time

def c_div(a, b):
    """C's integer division: truncates toward zero."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def ref_srdhm(a, b):
    """SaturatingRoundingDoublingHighMul."""
    if a == INT32_MIN and b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    return c_div(ab + nudge, 1 << 31)


def ref_rdbpot(x, exponent):
    """RoundingDivideByPOT."""
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def ref_mbqm(x, m0, shift):
    """MultiplyByQuantizedMultiplier (TFLite's default, double rounding)."""
    left, right = max(shift, 0), max(-shift, 0)
    return ref_rdbpot(ref_srdhm(x * (1 << left), m0), right)


def ref_mbqm_single_rounding(x, m0, shift):
    """MultiplyByQuantizedMultiplier built with TFLITE_SINGLE_ROUNDING."""
    total_shift = 31 - shift
    return (x * m0 + (1 << (total_shift - 1))) >> total_shift


def ref_quantize_multiplier(m):
    """QuantizeMultiplier: real M -> (M0, shift)."""
    if m == 0:
        return 0, 0
    q, shift = math.frexp(m)
    q_fixed = int(math.floor(q * (1 << 31) + 0.5))       # std::round of a positive number
    if q_fixed == 1 << 31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        shift, q_fixed = 0, 0
    return q_fixed, shift


def ref_tflite_add(q1, z1, s1, q2, z2, s2, z_out, s_out, qmin, qmax, relu):
    """reference_ops::Add for uint8 as TFLite prepares it (QuantizeMultiplierSmallerThanOneExp
    for every multiplier, left_shift 20), one element at a time."""
    left_shift = 20
    twice_max = 2 * max(s1, s2)
    m1, sh1 = ref_quantize_multiplier(s1 / twice_max)
    m2, sh2 = ref_quantize_multiplier(s2 / twice_max)
    mo, sho = ref_quantize_multiplier(twice_max / ((1 << left_shift) * s_out))
    a1 = ref_mbqm((q1 - z1) * (1 << left_shift), m1, sh1)
    a2 = ref_mbqm((q2 - z2) * (1 << left_shift), m2, sh2)
    out = ref_mbqm(a1 + a2, mo, sho) + z_out
    lo = z_out if relu else qmin
    return min(max(out, lo), qmax)


def ref_mean(q, z_in, s_in, s_out, z_out, qmin, qmax):
    """Global average pooling of a list of integers: int32 sum, then the fixed-point rescale."""
    m0, shift = ref_quantize_multiplier(s_in / (len(q) * s_out))
    return min(max(ref_mbqm(sum(v - z_in for v in q), m0, shift) + z_out, qmin), qmax)


def ref_tflite_mean(q, z_in, s_in, s_out, z_out, qmin, qmax):
    """LiteRT's reference_ops::QuantizedMeanOrSum (mean) of a list of integers: the multiplier of
    S_in / S_out with 1/N folded in as (M0 << k) / N, k = floor(log2 N) capped at 32 and 31 + shift."""
    n = len(q)
    m0, shift = ref_quantize_multiplier(s_in / s_out)
    k = min(n.bit_length() - 1, 32, 31 + shift)
    m0, shift = c_div(m0 << k, n), shift - k
    return min(max(ref_mbqm(sum(q) - z_in * n, m0, shift) + z_out, qmin), qmax)


# ----------------------------------------------------------------------------- NumPy int64 layers

def ref_int_conv(q_in, z_in, w_q, z_w, b_q, m0, shift, z_out, lo, hi, pad, stride, single_rounding=False):
    """The paper's integer conv in NumPy int64 and Python ints: (B, C, H, W) integers in ->
    integers out. pad = (left, right, top, bottom), padded with Z_in (real 0); per-channel
    z_w, b_q, m0, shift; output clamped to [lo, hi]."""
    x = np.asarray(q_in, dtype=np.int64) - z_in
    left, right, top, bottom = pad
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    w = np.asarray(w_q, dtype=np.int64) - np.asarray(z_w, dtype=np.int64)[:, None, None, None]
    windows = sliding_window_view(x, w.shape[2:], axis=(2, 3))[:, :, ::stride, ::stride]  # (B,C,Ho,Wo,kh,kw)
    acc = np.einsum("bchwij,ocij->bohw", windows, w) + np.asarray(b_q, dtype=np.int64)[None, :, None, None]
    rescale = ref_mbqm_single_rounding if single_rounding else ref_mbqm
    out = np.empty_like(acc)
    for idx in np.ndindex(*acc.shape):
        c = idx[1]
        out[idx] = min(max(rescale(int(acc[idx]), int(m0[c]), int(shift[c])) + z_out, lo), hi)
    return out


def ref_conv_multiplier_per_tensor(s_in, s_w, s_out):
    """kernel_util.cc's GetQuantizedConvolutionMultipler for per-tensor (uint8) models: the
    product of two float32 scales is a float32, only then widened to double and divided."""
    product = np.float32(s_in) * np.float32(s_w)              # float32 * float32 = float32
    return ref_quantize_multiplier(float(product) / float(np.float32(s_out)))


def ref_adjust_weights_for_bias_scale(bias, input_scale, weight_scales, qmax=127):
    """TFLite's AdjustWeightsForBiasScale (lite/tools/optimize/quantization_utils.cc) on plain
    Python floats: per channel (several scales), where |b| >= 0.5 S_in S_w INT32_MAX the range
    max becomes 2 |b| / INT32_MAX * (QMAX / S_in) (stored as float32) and S_w = max / QMAX
    (float32); one scale: the same from the largest |b|. Returns the new scales."""
    f32 = lambda v: float(np.float32(v))
    s_in = f32(input_scale)
    scales = [f32(v) for v in weight_scales]
    if len(scales) > 1:
        out = []
        for b, s in zip(bias, scales):
            b = abs(f32(b))
            out.append(f32(f32(2.0 * b / INT32_MAX * (qmax / s_in)) / np.float32(qmax))
                       if b >= 0.5 * s_in * s * INT32_MAX else s)
        return out
    half = max(abs(f32(b)) for b in bias)
    if half >= 0.5 * s_in * scales[0] * INT32_MAX:
        return [f32(f32(2.0 * half / INT32_MAX * (qmax / s_in)) / np.float32(qmax))]
    return scales


def ref_concat_with_scaling(inputs, scales, zero_points, s_out, z_out):
    """reference_ops::ConcatenationWithScaling (uint8) along the last axis, value by value: an
    input on another grid is rescaled in float32, round(q * scale + bias) + Z_out, with
    scale = S_i * (1 / S_out) and bias = -Z_i * scale, then clamped to [0, 255]."""
    f = np.float32
    inverse = f(1.0) / f(s_out)
    out = []
    for q, s, z in zip(inputs, scales, zero_points):
        if z == z_out and f(s) == f(s_out):
            out.append(np.asarray(q, dtype=np.int64))
            continue
        scale = f(f(s) * inverse)
        bias = f(-f(z) * scale)
        v = [f(f(float(x)) * scale) + bias for x in np.asarray(q).reshape(-1)]
        r = [int(math.floor(abs(float(t)) + 0.5)) * (1 if t >= 0 else -1) + z_out for t in v]
        out.append(np.clip(np.array(r, dtype=np.int64), 0, 255).reshape(np.asarray(q).shape))
    return np.concatenate(out, axis=-1)


def _srdhm16(a, b):
    if a == b == -32768:
        return 32767
    ab = a * b
    return c_div(ab + ((1 << 14) if ab >= 0 else 1 - (1 << 14)), 1 << 15)


def _sdhm16(a, b):
    return 32767 if a == b == -32768 else c_div(a * b, 1 << 15)


def _sat_left16(v, amount):
    return max(-32768, min(32767, v * (1 << amount)))


def _down16(m):
    return 32767 if m >= INT32_MAX - (1 << 15) else (m + (1 << 15)) >> 16


def ref_hard_swish(q, s_in, z_in, s_out, z_out, qmin, qmax):
    """reference_ops::HardSwish on 8-bit values with HardSwishPrepare's parameters (float32
    quotients, QuantizeMultiplier, DownScaleInt32ToInt16Multiplier), one integer at a time."""
    f = np.float32
    hires = f(f(1.0 / 128.0) * f(s_in))
    m_out, e_out = ref_quantize_multiplier(float(f(hires / f(s_out))))
    m_relu, e_relu = ref_quantize_multiplier(float(f(hires / f(3.0 / 32768.0))))
    m_out, m_relu = _down16(m_out), _down16(m_relu)
    out = []
    for v in q:
        x = (v - z_in) * 128
        pre = _srdhm16(x, m_out)
        r = _sat_left16(x, e_relu - 1) if e_relu > 0 else x
        r = _srdhm16(r, m_relu)
        if e_relu > 0:
            r = _sat_left16(r, 1)
        if e_relu < 0:
            r = ref_rdbpot(r, -e_relu)
        r = (r + (1 << 15)) >> 1
        out.append(max(qmin, min(qmax, ref_rdbpot(_sdhm16(r, pre), -e_out) + z_out)))
    return out


def ref_logistic_table(s_in, z_in, s_out, z_out, qmin, qmax):
    """LUTPopulate for LOGISTIC (kernels/activations.cc), every step in NumPy float32, the
    exponential as float32 of a float64 exp."""
    f = np.float32
    inverse = f(1.0) / f(s_out)
    table = []
    for v in range(qmin, qmax + 1):
        d = f(f(s_in) * f(v - z_in))
        t = f(f(1.0) / f(f(1.0) + f(np.exp(-np.float64(d)))))
        r = f(t * inverse)
        rounded = math.floor(abs(float(r)) + 0.5) * (1 if r >= 0 else -1)
        table.append(max(qmin, min(qmax, int(rounded + z_out))))
    return table


def ref_mul(q1, z1, s1, q2, z2, s2, z_out, s_out, qmin, qmax):
    """reference_integer_ops::Mul: MultiplyByQuantizedMultiplier((q1 - Z1)(q2 - Z2), M) + Z_out,
    M = S1 S2 / S_out in float32 (mul.cc's Prepare)."""
    f = np.float32
    m0, shift = ref_quantize_multiplier(float(f(f(f(s1) * f(s2)) / f(s_out))))
    return [max(qmin, min(qmax, ref_mbqm((a - z1) * (b - z2), m0, shift) + z_out)) for a, b in zip(q1, q2)]


def ref_same_padding(in_size, filter_size, stride, dilation=1):
    """TFLite's SAME padding (ComputePaddingWithOffset): (before, after)."""
    out_size = (in_size + stride - 1) // stride
    effective = (filter_size - 1) * dilation + 1
    total = max((out_size - 1) * stride + effective - in_size, 0)
    return total // 2, total // 2 + total % 2


def ref_avg_pool(q, kernel, stride, pad, signed, act_min, act_max):
    """reference_ops::AveragePool (uint8) / reference_integer_ops::AveragePool (int8), one
    output at a time, on (B, C, H, W) integers; pad = (left, right, top, bottom)."""
    b, c, h, w = q.shape
    (kh, kw), (sh, sw), (left, _, top, _) = kernel, stride, pad
    out_h, out_w = (h + pad[2] + pad[3] - kh) // sh + 1, (w + pad[0] + pad[1] - kw) // sw + 1
    out = np.zeros((b, c, out_h, out_w), dtype=np.int64)
    for idx in np.ndindex(b, c, out_h, out_w):
        y0, x0 = idx[2] * sh - top, idx[3] * sw - left
        acc, count = 0, 0
        for y in range(max(0, y0), min(h, y0 + kh)):
            for x in range(max(0, x0), min(w, x0 + kw)):
                acc += int(q[idx[0], idx[1], y, x])
                count += 1
        if signed:
            acc = c_div(acc + count // 2, count) if acc > 0 else c_div(acc - count // 2, count)
        else:
            acc = c_div(acc + count // 2, count)
        out[idx] = min(max(acc, act_min), act_max)
    return out


def ref_max_pool2(x):
    """2x2 max-pool, stride 2, of (B, C, H, W) integers."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


# ----------------------------------------------------------------------------- NumPy quantization and range search

def ref_round_half_away(v):
    """std::round of a float, on its exact value (a Fraction): no floating-point step at all."""
    f = Fraction(v)
    n = math.floor(abs(f) + Fraction(1, 2))
    return float(n if f >= 0 else -n)


def np_round_half_away(x):
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def np_quantize_range(x, lo, hi, bits, symmetric):
    """x quantized with the range [lo, hi] (0 included), written out in NumPy: (x_q, clipped)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
        s, z = max(-lo, hi) / qmax, 0
    else:
        qmin, qmax = 0, 2 ** bits - 1
        s = (hi - lo) / (qmax - qmin)
        z = int(np.clip(np_round_half_away(qmin - lo / s), qmin, qmax))
    s = np.float64(np.float32(s))                 # intsim keeps S in float32
    q = np.clip(np_round_half_away(x / s) + z, qmin, qmax)
    return (q - z) * s, (x < (qmin - z) * s) | (x > (qmax - z) * s)


def np_lp(x, lo, hi, bits, symmetric, p):
    xq, _ = np_quantize_range(x, lo, hi, bits, symmetric)
    return np.mean(np.abs(x - xq) ** p)


def np_sqnr(x, lo, hi, bits, symmetric, gamma):
    """Signal power over noise power, clipped values' noise weighted by AIMET's gamma."""
    xq, clipped = np_quantize_range(x, lo, hi, bits, symmetric)
    noise = np.mean((x - xq) ** 2 * np.where(clipped, gamma, 1.0))
    return np.mean(x ** 2) / noise


def np_lsq_scale_gradient(x, s, z, qmin, qmax, grad):
    """d/dS of sum(grad * S (clamp(round(x/S) + Z, QMIN, QMAX) - Z)) with round's derivative
    taken as 1 (LSQ, Esser et al. 2019, eq. 3), written per element."""
    total = 0.0
    for v, g in zip(np.ravel(x), np.ravel(grad)):
        q = min(max(np_round_half_away(v / s) + z, qmin), qmax)
        inside = s * (qmin - z) <= v <= s * (qmax - z)
        total += g * ((q - z) - v / s if inside else (q - z))
    return total


# ----------------------------------------------------------------------------- gemmlowp fixed point, SOFTMAX, LOG_SOFTMAX

def _wrap32(v):
    """An int32 result as C computes it (two's complement wrap-around)."""
    return ((v + (1 << 31)) % (1 << 32)) - (1 << 31)


def _sat_shl(x, e):
    """SaturatingRoundingMultiplyByPOT(Param) with exponent e >= 0."""
    if e == 0:
        return x
    threshold = (1 << (31 - e)) - 1
    if x > threshold:
        return INT32_MAX
    if x < -threshold:
        return INT32_MIN
    return _wrap32(x << e)


def _rescale(x, src_bits, dst_bits):
    e = src_bits - dst_bits
    return _sat_shl(x, e) if e >= 0 else ref_rdbpot(x, -e)


def _half_sum(a, b):
    s = a + b
    return c_div(s + (1 if s >= 0 else -1), 2)


def _clz32(x):
    return 32 - x.bit_length() if x > 0 else 32


def ref_exp_on_interval(a):
    x = _wrap32(a + (1 << 28))
    x2 = ref_srdhm(x, x)
    x3 = ref_srdhm(x2, x)
    x4 = ref_srdhm(x2, x2)
    x4_over_4 = ref_rdbpot(x4, 2)
    t = ref_rdbpot(_wrap32(ref_srdhm(_wrap32(x4_over_4 + x3), 715827883) + x2), 1)
    return _wrap32(1895147668 + ref_srdhm(1895147668, _wrap32(x + t)))


def ref_exp_on_negative_values(a, integer_bits):
    frac = 31 - integer_bits
    quarter = 1 << (frac - 2)
    a_mod = _wrap32((a & (quarter - 1)) - quarter)
    result = ref_exp_on_interval(_rescale(a_mod, integer_bits, 0))
    remainder = _wrap32(a_mod - a)
    for k, m in ((-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308), (2, 39332535),
                 (3, 720401), (4, 242)):
        if integer_bits > k and remainder & (1 << (frac + k)):
            result = ref_srdhm(result, m)
    if integer_bits > 5 and a < -(1 << (36 - integer_bits)):
        result = 0
    return INT32_MAX if a == 0 else result


def ref_one_over_one_plus_x(a):
    half_denominator = _half_sum(a, INT32_MAX)
    x = _wrap32(1515870810 + ref_srdhm(half_denominator, -1010580540))
    for _ in range(3):
        one_minus = _wrap32((1 << 29) - ref_srdhm(half_denominator, x))
        x = _wrap32(x + _rescale(ref_srdhm(x, one_minus), 4, 2))
    return _rescale(x, 1, 0)


def ref_log_x_ge_1(x, input_bits, output_bits):
    accum = output_bits + 1
    quarter = _rescale(536870912, 0, accum)
    sat = lambda v: max(INT32_MIN, min(INT32_MAX, v))
    h1 = _clz32(x)
    r_a = _sat_shl(ref_srdhm(_sat_shl(x, h1 - 1), 1518500250), 1)
    z_a = sat(_sat_shl(input_bits - h1, 31 - accum) + quarter)
    z_b_raw = ref_srdhm(x, 1518500250)
    hb = _clz32(z_b_raw) - 1
    r_b = _sat_shl(x, hb)
    z_b = sat(_sat_shl(input_bits - hb, 31 - accum) - quarter)
    r, z = min(r_a, r_b), max(z_a, z_b)
    p = _half_sum(r, 1805811301)
    q = _wrap32(r - 1805811301)
    q = _wrap32(q + q)
    sq = ref_srdhm(q, q)
    num = _wrap32(ref_srdhm(q, r) + ref_srdhm(ref_srdhm(q, sq), 117049297))
    den = _wrap32(ref_srdhm(p, _wrap32(1057819769 + q + ref_srdhm(127690142, sq))) + ref_srdhm(638450708, q))
    recip = ref_one_over_one_plus_x(den)
    return _rescale(_wrap32(ref_srdhm(z, 1488522236) + ref_srdhm(_rescale(num, 0, accum), recip)), accum, output_bits)


def ref_softmax_params(s_in, beta=1.0, log=False):
    """PreprocessSoftmaxScaling (and PreprocessLogSoftmaxScalingExp), CalculateInputRadius."""
    real = min(beta * s_in * (1 << 26), (1 << 31) - 1.0)
    m, shift = ref_quantize_multiplier(real)
    radius = math.floor(31 * (1 << 26) / (1 << shift))
    if not log:
        return m, shift, -radius
    rev_m, rev_shift = ref_quantize_multiplier((1 << (31 - shift)) / m)
    return m, shift, -radius, rev_m, rev_shift


def ref_softmax_row(q, s_in, qmin, qmax, beta=1.0):
    """reference_ops::Softmax on one row of 8-bit integers (output S = 1/256, Z = QMIN)."""
    m, shift, diff_min = ref_softmax_params(s_in, beta)
    top = max(q)
    total = 0
    for v in q:
        d = v - top
        if d >= diff_min:
            total += _rescale(ref_exp_on_negative_values(ref_srdhm(d * (1 << shift), m), 5), 0, 12)
    h = _clz32(total)
    bits_over_unit = 12 - h
    recip = ref_one_over_one_plus_x(((total << h) - (1 << 31)))
    exponent = bits_over_unit + 31 - 8
    out = []
    for v in q:
        d = v - top
        if d >= diff_min:
            e = ref_exp_on_negative_values(ref_srdhm(d * (1 << shift), m), 5)
            out.append(max(qmin, min(qmax, ref_rdbpot(ref_srdhm(recip, e), exponent) + qmin)))
        else:
            out.append(qmin)
    return out


def ref_log_softmax_row(q, s_in, qmin, qmax):
    """reference_integer_ops::LogSoftmax / reference_ops::LogSoftmax (uint8) on one row (output
    S = 16/256, Z = QMAX)."""
    m, shift, diff_min, rev_m, rev_shift = ref_softmax_params(s_in, log=True)
    top = max(q)
    total = 0
    for v in q:
        d = v - top
        if d >= diff_min:
            total += _rescale(ref_exp_on_negative_values(ref_mbqm(d, m, shift), 5), 0, 12)
    log_sum = ref_log_x_ge_1(total, 12, 5)
    adjusted = max(diff_min - 1, ref_mbqm(log_sum + INT32_MIN, rev_m, rev_shift))
    out = []
    for v in q:
        d = v - top
        if d > adjusted:
            out.append(max(qmin, min(qmax, ref_rdbpot(_wrap32(ref_mbqm(d, m, shift) - log_sum), 22) + qmax)))
        else:
            out.append(qmin)
    return out


def ref_requantize(q, z_in, s_in, z_out, s_out, qmin, qmax):
    """reference_ops::Requantize (QUANTIZE between 8-bit tensors)."""
    m0, shift = ref_quantize_multiplier(float(s_in) / float(s_out))
    return [max(qmin, min(qmax, ref_mbqm(v - z_in, m0, shift) + z_out)) for v in q]
