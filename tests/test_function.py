"""The quantization math against independent references: a plain-Python transcription of
TFLite's reference functions (Python ints, no torch), brute-force checks, autograd."""
import math
import random
from fractions import Fraction

import pytest
import torch

from errors import IntsimError
from function import (INT32_MAX, INT32_MIN, Grid, activation_grid, check_bits, dequantize, fake_quantize,
                      multiply_by_quantized_multiplier, multiply_by_quantized_multiplier_single_rounding,
                      multiplier_to_float, quantize, quantize_multiplier, requantize, round_half_away,
                      rounding_divide_by_pot, saturating_rounding_doubling_high_mul, scale_zero_point, weight_grid)
from reference import (np_lsq_scale_gradient, ref_mbqm, ref_mbqm_single_rounding, ref_quantize_multiplier,
                       ref_rdbpot, ref_round_half_away, ref_srdhm)


def t(values):
    return torch.tensor(values, dtype=torch.int64)


# ---- requantization

EDGE_X = [0, 1, -1, 2, -2, 3, -3, INT32_MAX, INT32_MIN, INT32_MIN + 1, 12345, -12345, 1 << 30, -(1 << 30)]
EDGE_M0 = [1 << 30, (1 << 30) + 1, INT32_MAX, INT32_MAX - 1, 1518500250, 1 << 30 | 12345]


def test_srdhm_matches_reference_on_edges_and_random():
    rng = random.Random(0)
    pairs = [(x, m) for x in EDGE_X for m in EDGE_M0 + [INT32_MIN, -(1 << 30), 0, 1, -1]]
    pairs += [(rng.randint(INT32_MIN, INT32_MAX), rng.randint(INT32_MIN, INT32_MAX)) for _ in range(20000)]
    a, b = t([p[0] for p in pairs]), t([p[1] for p in pairs])
    got = saturating_rounding_doubling_high_mul(a, b).tolist()
    assert got == [ref_srdhm(x, m) for x, m in pairs]
    assert ref_srdhm(INT32_MIN, INT32_MIN) == INT32_MAX == got[pairs.index((INT32_MIN, INT32_MIN))]


def test_srdhm_exact_ties():
    # b = 2^29 is 0.25 in Q31: a * 0.25 is a tie for a = 2 mod 4; the nudge rounds ties up.
    a = t([2, -2, 6, -6, 1, -1, 3, -3])
    assert saturating_rounding_doubling_high_mul(a, t([1 << 29] * 8)).tolist() == \
        [ref_srdhm(x, 1 << 29) for x in a.tolist()] == [1, 0, 2, -1, 0, 0, 1, -1]


def test_rounding_divide_by_pot_matches_reference_with_ties_and_negatives():
    rng = random.Random(1)
    cases = [(x, e) for x in EDGE_X for e in (0, 1, 2, 5, 31)]
    cases += [(s * (2 * k + 1) << (e - 1), e) for s in (1, -1) for k in range(5) for e in (1, 3, 8)]  # ties
    cases += [(rng.randint(INT32_MIN, INT32_MAX), rng.randint(0, 31)) for _ in range(20000)]
    x, e = t([c[0] for c in cases]), t([c[1] for c in cases])
    assert rounding_divide_by_pot(x, e).tolist() == [ref_rdbpot(a, b) for a, b in cases]
    assert rounding_divide_by_pot(t([5, -5, 6, -6, 7, -7]), 1).tolist() == [3, -3, 3, -3, 4, -4]


def test_multiply_by_quantized_multiplier_matches_reference():
    rng = random.Random(2)
    cases = [(x, m, s) for x in EDGE_X for m in EDGE_M0 for s in (0, -1, -31, -5)]
    for _ in range(30000):
        shift = rng.randint(-31, 8)
        bound = 1 << (31 - max(shift, 0))            # x * 2^left must stay an int32, as in TFLite
        cases.append((rng.randint(-bound, bound - 1), rng.randint(1 << 30, INT32_MAX), shift))
    x, m0, shift = t([c[0] for c in cases]), t([c[1] for c in cases]), t([c[2] for c in cases])
    assert multiply_by_quantized_multiplier(x, m0, shift).tolist() == [ref_mbqm(*c) for c in cases]


def test_single_rounding_matches_reference_and_exact_rounding():
    rng = random.Random(4)
    cases = [(x, m, s) for x in EDGE_X for m in EDGE_M0 for s in (0, -1, -31, -5)]
    cases += [(rng.randint(INT32_MIN, INT32_MAX), rng.randint(1 << 30, INT32_MAX), rng.randint(-31, 0))
              for _ in range(30000)]
    x, m0, shift = t([c[0] for c in cases]), t([c[1] for c in cases]), t([c[2] for c in cases])
    got = multiply_by_quantized_multiplier_single_rounding(x, m0, shift).tolist()
    assert got == [ref_mbqm_single_rounding(*c) for c in cases]
    # one rounding: floor(v + 1/2) of the exact rational v = x M0 2^(shift - 31)
    assert got == [math.floor(Fraction(a * m, 2 ** (31 - s)) + Fraction(1, 2)) for a, m, s in cases]


def test_double_rounding_differs_from_exact_rounding_just_below_a_half():
    # x M0 2^-31 = 170 * 0.75 = 127.5: SRDHM rounds it up onto 128, which is exactly one half
    # after the right shift by 8, and RoundingDivideByPOT rounds that half up too. The exact
    # value 127.5 / 256 = 0.498 rounds to 0.
    x, m0, shift = 170, 3 << 29, -8
    double = multiply_by_quantized_multiplier(t([x]), t([m0]), t([shift])).item()
    single = multiply_by_quantized_multiplier_single_rounding(t([x]), t([m0]), t([shift])).item()
    assert (double, single) == (ref_mbqm(x, m0, shift), ref_mbqm_single_rounding(x, m0, shift)) == (1, 0)


def test_requantize_adds_zero_point_and_clamps():
    acc = t([-1000, -10, 0, 10, 1000])
    m0, shift = quantize_multiplier(torch.tensor(0.1))
    got = requantize(acc, m0, shift, 3, 0, 50).tolist()
    assert got == [min(max(ref_mbqm(a, int(m0), int(shift)) + 3, 0), 50) for a in acc.tolist()]
    assert got == [0, 2, 3, 4, 50]


@pytest.mark.parametrize("m", [0.0, 1e-12, 2.0 ** -32, 2.0 ** -31, 3e-10, 1e-5, 0.0123, 0.5, 0.75,
                               1 - 2.0 ** -33, 1 - 2.0 ** -40, 1.0, 1.5, 3.999999999, 100.0])
def test_quantize_multiplier_matches_reference(m):
    m0, shift = quantize_multiplier(torch.tensor([m], dtype=torch.float64))
    assert (int(m0), int(shift)) == ref_quantize_multiplier(m)


def test_quantize_multiplier_random_and_precise():
    rng = random.Random(3)
    ms = [10 ** rng.uniform(-9, 2) for _ in range(5000)]
    m0, shift = quantize_multiplier(torch.tensor(ms, dtype=torch.float64))
    assert list(zip(m0.tolist(), shift.tolist())) == [ref_quantize_multiplier(m) for m in ms]
    assert ((m0 >= 1 << 30) & (m0 <= INT32_MAX)).all()
    rel = (multiplier_to_float(m0, shift) - torch.tensor(ms, dtype=torch.float64)).abs() / torch.tensor(ms)
    assert rel.max() <= 2.0 ** -31


def test_quantize_multiplier_rejects_negative():
    with pytest.raises(IntsimError):
        quantize_multiplier(torch.tensor([-0.5]))


# ---- ranges, scales, zero points

def test_round_half_away_from_zero():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, -0.51])
    assert round_half_away(x).tolist() == [-3, -2, -1, 1, 2, 3, 0, -1]


@pytest.mark.parametrize("bits", [0, 1, 17, 32, 2.5, "8"])
def test_bad_bits_rejected(bits):
    with pytest.raises(IntsimError, match="2 to 16"):
        check_bits(bits)


def test_grids_keep_signed_narrow_and_symmetric_apart():
    assert (weight_grid(8).qmin, weight_grid(8).qmax) == (-127, 127)             # TFLite's int8 weights
    assert (Grid(8).qmin, Grid(8).qmax) == (0, 255)                              # uint8
    assert (Grid(8, signed=True).qmin, Grid(8, signed=True).qmax) == (-128, 127)  # TFLite's int8 activations
    assert (Grid(2, signed=True, narrow_range=True).qmin, Grid(4).qmax) == (-1, 15)
    assert (Grid(8, narrow_range=True).qmin, Grid(8, narrow_range=True).qmax) == (1, 255)
    with pytest.raises(IntsimError, match="symmetric grid"):
        Grid(8, symmetric=True)
    # int8 activations keep a zero point: the range [-1, 3] maps -1 -> -128 and 3 -> 127
    s, z = scale_zero_point(torch.tensor([-1.0]), torch.tensor([3.0]), activation_grid(8, signed=True))
    assert torch.isclose(s, torch.tensor([4 / 255])).all() and z.tolist() == [-128 + 64]


GRIDS = [weight_grid(b) for b in range(2, 9)] + [Grid(b) for b in range(2, 9)] + [Grid(8, signed=True),
                                                                                    Grid(5, signed=True)]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_zero_is_exact_and_range_is_covered(grid):
    g = torch.Generator().manual_seed(grid.bits)
    lo = -torch.rand(200, generator=g) * 5 + 1      # some ranges lie entirely above 0 ...
    hi = lo + torch.rand(200, generator=g) * 5      # ... and the range must be extended to hold 0
    s, z = scale_zero_point(lo, hi, grid)
    qmin, qmax = grid.qmin, grid.qmax
    assert (s > 0).all() and ((z >= qmin) & (z <= qmax)).all()
    assert (quantize(torch.zeros(200), s, z, qmin, qmax) == z).all()          # 0.0 -> Z ...
    assert (dequantize(z, s, z) == 0).all()                                  # ... and back exactly
    # every value of the (extended) range is within half a step of the grid
    for frac in torch.linspace(0, 1, 11):
        x = torch.minimum(lo, torch.zeros(200)) * (1 - frac) + torch.maximum(hi, torch.zeros(200)) * frac
        err = (dequantize(quantize(x, s, z, qmin, qmax), s, z) - x).abs()
        assert (err <= s * 0.5 * (1 + 1e-5) + 1e-7).all()


def test_scale_zero_point_reference_values():
    s, z = scale_zero_point(torch.tensor([-1.0]), torch.tensor([3.0]), Grid(8))
    assert torch.isclose(s, torch.tensor([4 / 255])).all() and z.tolist() == [64]   # 255/4 = 63.75 -> 64
    s, z = scale_zero_point(torch.tensor([-2.0]), torch.tensor([1.0]), weight_grid(8))
    assert torch.isclose(s, torch.tensor([2 / 127])).all() and z.tolist() == [0]


@pytest.mark.parametrize("grid", [weight_grid(8), Grid(8)], ids=str)
def test_zero_and_constant_ranges_give_valid_scales(grid):
    s, z = scale_zero_point(torch.tensor([0.0, 2.0, -3.0]), torch.tensor([0.0, 2.0, -3.0]), grid)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert s[0] == 1.0                                   # an all-zero range: any scale works; 1 is used
    qmin, qmax = grid.qmin, grid.qmax
    x = torch.tensor([0.0, 2.0, -3.0])
    back = dequantize(quantize(x, s, z, qmin, qmax), s, z)
    assert torch.allclose(back, x, atol=1e-6)            # a constant is represented (range [0, c])


def test_nan_range_rejected():
    with pytest.raises(IntsimError, match="not finite"):
        scale_zero_point(torch.tensor([float("nan")]), torch.tensor([1.0]), Grid(8))


# ---- fake quantization

def test_fake_quant_forward_equals_quantize_dequantize():
    x = torch.linspace(-3, 3, 1001)
    s, z = scale_zero_point(torch.tensor([-1.0]), torch.tensor([2.0]), Grid(4))
    assert torch.equal(fake_quantize(x, s, z, 0, 15), dequantize(quantize(x, s, z, 0, 15), s, z))


def test_fake_quant_gradient_is_identity_inside_zero_outside():
    s, z = scale_zero_point(torch.tensor([-1.0]), torch.tensor([2.0]), Grid(4))
    lo, hi = float(s * (0 - z)), float(s * (15 - z))      # the representable range
    x = torch.tensor([-3.0, -1.5, lo - 0.2, lo + 0.01, -0.3, 0.0, 0.77, 1.9, hi - 0.01, hi + 0.2, 5.0],
                     requires_grad=True)
    fake_quantize(x, s, z, 0, 15).backward(torch.arange(1.0, 12.0))
    inside = (x.detach() >= lo) & (x.detach() <= hi)
    assert torch.equal(x.grad, torch.where(inside, torch.arange(1.0, 12.0), torch.zeros(11)))
    assert inside.sum() == 6 and (~inside).sum() == 5
    assert x.grad[8] == 9  # 1.99 rounds onto QMAX and is still inside the range


@pytest.mark.parametrize("per_channel", [False, True])
def test_learned_scale_gets_lsq_gradient(per_channel):
    """With S a parameter, fake_quantize gives S LSQ's gradient (round's derivative taken as 1,
    clipped values contribute QMIN/QMAX - Z); checked element by element in NumPy."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 50, generator=g, dtype=torch.float64) * 2
    grad = torch.randn(3, 50, generator=g, dtype=torch.float64)
    s0 = torch.tensor([0.11, 0.07, 0.2], dtype=torch.float64)[:, None] if per_channel else \
        torch.tensor([0.1], dtype=torch.float64)
    z = torch.tensor([3, 0, -2])[:, None] if per_channel else torch.tensor([1])
    s = s0.clone().requires_grad_(True)
    fake_quantize(x, s, z, -8, 7).backward(grad)
    rows = range(3) if per_channel else [slice(None)]
    want = [np_lsq_scale_gradient(x[r].numpy(), float(s0.flatten()[i]), int(z.flatten()[i]), -8, 7, grad[r].numpy())
            for i, r in enumerate(rows)]
    assert torch.allclose(s.grad.flatten(), torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    assert (s.grad.abs() > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_half_away_is_exact_at_every_float(dtype):
    # k + 0.5 and its neighbours one and two ulps away, where floor(|x| + 0.5) rounds wrongly
    halves = torch.tensor([k + 0.5 for k in range(-40, 40)] + [2.0 ** 22 + 0.5, 2.0 ** 23 - 0.5], dtype=dtype)
    x = torch.cat([halves, torch.nextafter(halves, halves + 1), torch.nextafter(halves, halves - 1),
                   torch.nextafter(torch.nextafter(halves, halves - 1), halves - 1),
                   torch.rand(5000, generator=torch.Generator().manual_seed(0), dtype=dtype) * 200 - 100])
    assert round_half_away(x).tolist() == [ref_round_half_away(v) for v in x.tolist()]
    assert round_half_away(torch.tensor([0.5 - 2 ** -25], dtype=torch.float32)).item() == 0.0   # the case
