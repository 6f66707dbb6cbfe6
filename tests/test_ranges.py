"""Range observers (Lp search, SQNR), weight rounding schemes, weights-only quantization, and
the Hessian-vector product of the Table 1 analysis, each against an independent reference:
NumPy brute force over dense grids, exact rounding by hand, finite differences."""
import math

import numpy as np
import pytest
import torch

from config import QConfig
from errors import IntsimError
from frozen import runs_in_integers, set_mode
from function import FLOAT_BITS, Grid, quantize, round_with, weight_grid
from model import convert, qlayers
from freezing import freeze
from observer import (SEARCH_FACTORS, SQNR_GAMMA, SQNR_GRID, SearchObserver, make_observer,
                      search_range, weight_range)
from reference import np_lp, np_sqnr
from taylor import LayerLoss


def grid(bits, symmetric):
    return weight_grid(bits) if symmetric else Grid(bits)


def heavy_tailed(n, seed, positive=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, size=n)
    return np.abs(x) if positive else x


# ----------------------------------------------------------------------------- observers

@pytest.mark.parametrize("p", [2.0, 2.4])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_lp_search_finds_what_a_dense_grid_search_finds(p, bits, symmetric):
    x = heavy_tailed(4000, seed=bits)
    lo, hi = search_range(torch.tensor(x).reshape(1, -1), grid(bits, symmetric), "lp", p)
    ours = np_lp(x, float(lo), float(hi), bits, symmetric, p)
    # 1) at least as good as the best of its coarse candidates, recomputed here
    coarse = min(np_lp(x, f * x.min(), f * x.max(), bits, symmetric, p) for f in SEARCH_FACTORS)
    assert ours <= coarse * (1 + 1e-9)
    # 2) a dense grid (step 0.00025, every range from 0.5% to 100% of min/max) does no better
    #    than 0.1%
    dense = min(np_lp(x, f * x.min(), f * x.max(), bits, symmetric, p) for f in np.linspace(0.005, 1.0, 3981))
    assert ours <= dense * 1.001
    # 3) with heavy tails clipping pays: the range is narrower than min/max at low bits
    if bits <= 4:
        assert float(hi) < x.max()


@pytest.mark.parametrize("symmetric,positive", [(True, False), (False, False), (False, True)])
def test_sqnr_pick_is_the_best_candidate(symmetric, positive):
    x = heavy_tailed(3000, seed=7, positive=positive)
    bits = 4
    lo, hi = search_range(torch.tensor(x).reshape(1, -1), grid(bits, symmetric), "sqnr")
    two_sided = not symmetric and not positive
    pairs = ([(a, b) for a in SQNR_GRID for b in SQNR_GRID] if two_sided
             else [(f, f) for f in np.linspace(0.005, 1.0, 3981)])          # a dense grid
    best = max(np_sqnr(x, a * x.min(), b * x.max(), bits, symmetric, SQNR_GAMMA) for a, b in pairs)
    ours = np_sqnr(x, float(lo), float(hi), bits, symmetric, SQNR_GAMMA)
    if two_sided:
        assert ours == pytest.approx(best, rel=1e-6)       # the grid's best, exactly
    else:
        assert ours >= best / 1.001
    # the clipping weight matters: the plain-MSE (lp, p=2) range clips at least as much
    lo2, hi2 = search_range(torch.tensor(x).reshape(1, -1), grid(bits, symmetric), "lp", 2.0)
    assert float(hi2) <= float(hi) + 1e-6 or not symmetric


def test_per_channel_search_treats_rows_independently():
    rows = [heavy_tailed(500, seed=s) * (s + 1) for s in range(4)]
    lo, hi = search_range(torch.tensor(np.stack(rows)), weight_grid(3), "lp", 2.4)
    for i, r in enumerate(rows):
        lo1, hi1 = search_range(torch.tensor(r).reshape(1, -1), weight_grid(3), "lp", 2.4)
        assert float(lo[i]) == float(lo1) and float(hi[i]) == float(hi1)


def test_weight_range_minmax_per_tensor_and_per_channel():
    w = torch.randn(6, 3, 3, 3)
    lo, hi = weight_range(w, per_channel=True)
    assert torch.equal(lo, w.reshape(6, -1).min(1).values) and torch.equal(hi, w.reshape(6, -1).max(1).values)
    lo, hi = weight_range(w, per_channel=False)
    assert lo.shape == (6,) and torch.all(lo == w.min()) and torch.all(hi == w.max())
    lo, hi = weight_range(w, per_channel=False, method="lp", grid=weight_grid(4))
    assert lo.shape == (6,) and float(hi[0]) < float(w.abs().max())


def test_activation_search_observer_is_seeded_and_clips_an_outlier():
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(64, 8, 10, 10, generator=g) for _ in range(3)]
    batches[1][0, 0, 0, 0] = 50.0                                     # one outlier
    ranges = []
    for _ in range(2):
        obs = make_observer("lp", Grid(4), p=2.0)
        for b in batches:
            obs(b)
        assert obs.max_val.item() == 50.0                            # min/max kept until finish()
        obs.finish()
        ranges.append((obs.min_val.item(), obs.max_val.item()))
    assert ranges[0] == ranges[1]                                    # reproducible
    assert 0.5 < ranges[0][1] < 5.0                                   # the outlier is clipped
    mm = make_observer("minmax", Grid(4))
    for b in batches:
        mm(b)
    mm.finish()
    assert mm.max_val.item() == 50.0
    assert isinstance(make_observer("sqnr", Grid(8)), SearchObserver)


def test_bad_observer_options_stop_with_clear_errors():
    with pytest.raises(IntsimError, match="unknown weight observer 'ema'"):
        QConfig(w_observer="ema")
    with pytest.raises(IntsimError, match="unknown activation observer"):
        QConfig(a_observer="mse")
    for p in (0, -1.0, math.inf, math.nan):
        with pytest.raises(IntsimError, match="p > 0"):
            QConfig(w_observer="lp", lp_p=p)
    with pytest.raises(IntsimError, match="unknown rounding"):
        QConfig(w_rounding="up")
    with pytest.raises(IntsimError, match="float activations"):
        QConfig(fold_bn=False, a_bits=8)
    with pytest.raises(IntsimError, match="needs float activations"):
        QConfig(quantize_layers="first", a_bits=8)
    with pytest.raises(IntsimError, match="activation bits"):
        QConfig(a_bits=24)


# ----------------------------------------------------------------------------- rounding

def test_nearest_floor_ceil_exact_on_ties_and_negatives():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, -3.0, 3.0, -0.2, 0.7, -1.7])
    expected = {"nearest": [-3, -2, -1, 1, 2, 3, -3, 3, 0, 1, -2],       # ties away from zero (TFLite)
                "floor": [math.floor(v) for v in x.tolist()],
                "ceil": [math.ceil(v) for v in x.tolist()]}
    for scheme, want in expected.items():
        assert round_with(x, scheme).tolist() == [float(v) for v in want], scheme


def test_stochastic_rounding_is_unbiased_and_seeded():
    x = torch.tensor([-2.75, -1.5, -0.1, 0.0, 0.3, 1.5, 2.9, 4.0]).repeat(20000, 1)   # (20000, 8)
    r = round_with(x, "stochastic", torch.Generator().manual_seed(1))
    assert torch.all((r == torch.floor(x)) | (r == torch.floor(x) + 1))
    assert torch.equal(r[:, [3, 7]], x[:, [3, 7]])                  # integers stay put
    frac = (x[0] - torch.floor(x[0])).double()
    sigma = torch.sqrt(frac * (1 - frac) / x.shape[0])
    assert torch.all((r.double().mean(0) - x[0].double()).abs() <= 5 * sigma + 1e-12)
    again = round_with(x, "stochastic", torch.Generator().manual_seed(1))
    other = round_with(x, "stochastic", torch.Generator().manual_seed(2))
    assert torch.equal(r, again) and not torch.equal(r, other)


def test_quantize_with_floor_and_ceil_clamps_to_the_grid():
    x = torch.tensor([-1.0, -0.26, 0.26, 0.9])
    assert quantize(x, 0.25, 0, -3, 3, "floor").tolist() == [-3, -2, 1, 3]
    assert quantize(x, 0.25, 0, -3, 3, "ceil").tolist() == [-3, -1, 2, 3]


# ----------------------------------------------------------------------------- weights-only models

def test_float_activations_quantize_weights_only_and_have_no_integer_path(trained_like):
    model = trained_like("cnn_bn")
    x = torch.randn(8, 1, 28, 28)
    frozen = freeze(convert(model, QConfig(w_bits=8, a_bits=FLOAT_BITS)))    # nothing to calibrate
    assert not runs_in_integers(frozen)
    y = set_mode(frozen, "reals")(x)
    assert torch.allclose(y, model(x), atol=0.05) and not torch.equal(y, model(x))
    with pytest.raises(IntsimError, match="integer activations"):
        set_mode(frozen, "int")
    # the fake-quant output is the frozen integer weights as reals, in a plain float model
    ref = trained_like("cnn_bn")
    with torch.no_grad():
        for name, conv in zip(["features.0", "features.4", "classifier"], [ref.features[0], ref.features[4],
                                                                           ref.classifier]):
            op = frozen.get_submodule(name)
            conv.weight.copy_(op.real_weight(torch.float32))
            if conv.bias is None:
                conv.bias = torch.nn.Parameter(op.bias.clone())
            else:
                conv.bias.copy_(op.bias)
        ref.features[1], ref.features[5] = torch.nn.Identity(), torch.nn.Identity()   # folded into w, b
    assert torch.allclose(y, ref(x), atol=1e-5)


def test_first_layer_only_leaves_the_rest_float_and_unfolded_bn_keeps_bn(trained_like):
    from ops.conv import FloatLayer
    model = trained_like("cnn_bn")
    x = torch.randn(8, 1, 28, 28)
    qmodel = convert(model, QConfig(w_bits=2, a_bits=FLOAT_BITS, quantize_layers="first"))
    assert [n for n, l in qlayers(qmodel) if l.w_quantizer is not None] == ["features.0"]
    frozen = set_mode(freeze(qmodel), "reals")
    assert isinstance(frozen.classifier, FloatLayer) and not runs_in_integers(frozen)
    assert len(torch.unique(frozen.get_submodule("features.0").w_q)) <= 3
    assert not torch.allclose(frozen(x), model(x), atol=1e-3)
    with pytest.raises(IntsimError, match="integer activations"):
        set_mode(frozen, "int")
    # unfolded BN at 8 bits: the conv's own weights on the grid, BN after it in float
    unfolded = set_mode(freeze(convert(model, QConfig(w_bits=8, a_bits=FLOAT_BITS, fold_bn=False))), "reals")
    op = unfolded.get_submodule("features.0")
    s = op.w_scale.reshape(-1, 1, 1, 1)
    assert torch.allclose(op.w_q * s, model.features[0].weight, atol=float(s.max()) / 2 + 1e-7)
    assert isinstance(unfolded.get_submodule("features.0_bn"), torch.nn.BatchNorm2d)
    assert torch.allclose(unfolded(x), model(x), atol=0.05)


def test_integer_model_with_lp_activation_ranges_and_8_bit_bias(trained_like, quantize):
    model = trained_like("cnn_bn")
    x = torch.randn(16, 1, 28, 28)
    qmodel, frozen = quantize(model, QConfig(w_bits=4, a_bits=4, a_observer="lp", w_observer="sqnr", bias_bits=8), x)
    from module import round_bias
    op = frozen.get_submodule("features.0")
    b = qlayers(qmodel)[0][1].folded_weight_bias()[1].detach()
    b8 = round_bias(b, 8)                                 # the bias on its own 8-bit grid ...
    step = b.abs().max() / 127
    assert torch.allclose(b8 / step, torch.round(b8 / step), atol=1e-3) and not torch.equal(b8, b)
    bias_scale = op.in_scale.double() * op.w_scale.double()  # ... then int32 at S_in S_w, as TFLite's
    assert torch.equal(op.b_q, torch.round(b8.double() / bias_scale).long())
    assert qmodel.get_submodule("features.0.out").observer.max_val.item() < qmodel.quant_in.observer.max_val.item() * 100
    assert torch.isfinite(set_mode(frozen, "int")(x)).all()


# ----------------------------------------------------------------------------- Hessian

def test_hessian_vector_product_matches_finite_differences(random_bn):
    # A smooth network (no ReLU or max-pool kinks for the finite differences to straddle):
    # conv -> BN -> linear -> softmax cross-entropy, which is not quadratic in the conv weights.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), random_bn(3, torch.Generator().manual_seed(1)),
                                torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, 4)).double().eval()
    x = torch.randn(12, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (12,))
    qmodel = convert(model, QConfig(w_bits=4, a_bits=FLOAT_BITS, quantize_layers="first")).double()
    loss = LayerLoss(qmodel, "0", [(x[:6], y[:6]), (x[6:], y[6:])], "cpu")
    v = torch.randn_like(loss.w0)

    def grad_at(w):
        w = w.detach().requires_grad_(True)
        total = sum(loss._loss(w, xb, yb) for xb, yb in loss.batches) / loss.n
        return torch.autograd.grad(total, w)[0]

    eps = 1e-4
    fd = (grad_at(loss.w0 + eps * v) - grad_at(loss.w0 - eps * v)) / (2 * eps)
    hv = loss.hvp(v)
    assert torch.allclose(hv, fd, rtol=1e-5, atol=1e-8 * float(fd.abs().max()))
    assert torch.allclose(loss.g, grad_at(loss.w0))
    # and the Taylor expansion predicts a small step's loss change to third order
    dw = 1e-3 * v
    first, second, dloss = loss.terms(dw)
    assert abs(first + second - dloss) < 1e-3 * abs(second) + 1e-12


def test_weight_search_runs_again_only_when_the_weights_change(monkeypatch):
    """freeze fits every weight quantizer on each call; an lp search is skipped for weights it
    has already searched (same values), and redone when they move."""
    import observer
    calls = []
    real = observer.weight_range
    monkeypatch.setattr(observer, "weight_range", lambda *a, **k: calls.append(1) or real(*a, **k))
    obs = observer.WeightObserver(weight_grid(4, True), per_channel=True, method="lp")
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    obs(w)
    first = [t.clone() for t in obs.range()]
    obs(w.clone())                                   # the same values in a new tensor
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(first, obs.range()))
    w2 = w.clone()
    w2[0, 0, 0, 0] += 1.0
    obs(w2)
    assert len(calls) == 2 and not torch.equal(first[1], obs.range()[1])
