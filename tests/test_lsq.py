"""LSQ's learned step sizes (Esser et al. 2019, arXiv 1902.08153) and --first-last-bits:
the step-size gradient against the paper's closed form, its initialisation and gradient scale,
learned scales frozen into integers, and which layers the edge bits change."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from config import QConfig
from errors import IntsimError
from frozen import output_integers, set_mode
from ops.quant import Quantize
from function import activation_grid, fake_quantize, integers_of, weight_grid
from freezing import freeze
from model import (activation_quantizers, calibrate, convert, learn_activation_scales, learn_scales,
                   learn_weight_scales, qlayers, set_phase)
from observer import make_observer
from quantizer import Quantizer, lsq_grad_scale
from reference import np_lsq_scale_gradient


def test_step_size_gradient_is_the_papers_closed_form():
    g = torch.Generator().manual_seed(0)
    for grid in (weight_grid(4), activation_grid(3, signed=True)):
        v = torch.randn(5000, generator=g, dtype=torch.float64) * 3
        s = torch.tensor([0.37], dtype=torch.float64, requires_grad=True)
        upstream = torch.randn(5000, generator=g, dtype=torch.float64)
        (fake_quantize(v, s, torch.zeros(1, dtype=torch.int64), grid.qmin, grid.qmax) * upstream).sum().backward()
        want = np_lsq_scale_gradient(v.numpy(), 0.37, 0, grid.qmin, grid.qmax, upstream.numpy())
        assert math.isclose(s.grad.item(), want, rel_tol=1e-9), (s.grad.item(), want)


def test_gradient_scale_and_init():
    grid = weight_grid(4)
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    q = Quantizer(grid, make_observer("minmax", grid), channels=1)
    q.enabled = True
    init = 2 * w.abs().mean() / math.sqrt(grid.qmax)             # LSQ sec. 2.1, Q_P = 7
    g = lsq_grad_scale(w.numel(), grid)
    assert math.isclose(g, 1 / math.sqrt(w.numel() * 7))
    q.learn_scale(init, g)
    assert torch.allclose(q.scale.detach(), init.reshape(1))
    q(w).sum().backward()
    raw = np_lsq_scale_gradient(w.double().numpy(), float(init), 0, -7, 7, np.ones(w.numel()))  # upstream 1
    assert math.isclose(q.scale.grad.item(), g * raw, rel_tol=1e-5)


def test_learn_scales_starts_every_step_size_at_lsq_init(trained_like):
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    for per_channel in (False, True):
        qmodel = convert(trained_like("cnn_bn"), QConfig(w_bits=4, a_bits=4, per_channel=per_channel))
        calibrate(qmodel, [(x, None)], "cpu", 1)
        set_phase(qmodel, "fakequant")
        learn_weight_scales(qmodel)
        inputs = {}
        hooks = [q.register_forward_pre_hook(lambda m, a: inputs.setdefault(m, a[0].detach()))
                 for q in activation_quantizers(qmodel)]
        qmodel(x)                                  # what each activation quantizer sees, weights' S learned
        for h in hooks:
            h.remove()
        learn_activation_scales(qmodel, [(x, None)], "cpu", 1)
        for _, layer in qlayers(qmodel):
            w, q = layer.weight_bias()[0].detach(), layer.w_quantizer
            want = (w.abs().flatten(1).mean(1) if per_channel else w.abs().mean().reshape(1)) * 2 / math.sqrt(7)
            assert q.learned and q.scale.shape == want.shape and torch.allclose(q.scale.detach(), want)
        for q, v in inputs.items():
            assert q.learned and math.isclose(q.scale.item(), 2 * v.abs().mean().item() / math.sqrt(q.grid.qmax),
                                              rel_tol=1e-5)


def test_lsq_init_range_starts_at_the_calibrated_step_sizes(trained_like):
    """--lsq-init range: every S starts where calibration (activations) and the weight observer
    (the folded weights, per channel or one per tensor) put it; at 8 bits LSQ's own rule starts the
    input's step several times coarser (the reason for the option)."""
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(4)) * 3
    for per_channel in (False, True):
        qmodel = convert(trained_like("cnn_bn"), QConfig(w_bits=4, a_bits=8, per_channel=per_channel))
        calibrate(qmodel, [(x, None)], "cpu", 1)
        set_phase(qmodel, "fakequant")
        calibrated = [q.qparams()[0].clone() for q in activation_quantizers(qmodel)]
        weights = []
        for _, layer in qlayers(qmodel):
            w = layer.weight_bias()[0].detach()
            r = w.abs().flatten(1).amax(1) if per_channel else w.abs().max().reshape(1)
            weights.append(r / 7)                          # symmetric min/max: S = max|w| / Q_P
        mean_init = learn_scales(copy.deepcopy(qmodel), [(x, None)], "cpu", 1)
        learn_scales(qmodel, [(x, None)], "cpu", 1, init="range")
        for q, s in zip(activation_quantizers(qmodel), calibrated):
            assert q.learned and torch.allclose(q.scale.detach(), s)
        for (_, layer), want in zip(qlayers(qmodel), weights):
            q = layer.w_quantizer
            assert q.learned and q.scale.shape == want.shape and torch.allclose(q.scale.detach(), want)
        lsq_input = activation_quantizers(mean_init)[0].scale.item()
        assert lsq_input > 3 * calibrated[0].item()        # LSQ's 2 mean|v| / sqrt(255) on inputs in [0, 3)
    with pytest.raises(IntsimError, match="lsq"):
        learn_scales(qmodel, [(x, None)], "cpu", 1, init="lsq")


def test_learned_scales_freeze_into_the_integer_model(trained_like):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 1, 28, 28, generator=g), torch.arange(32) % 10
    qmodel = convert(trained_like("cnn_bn"), QConfig(w_bits=4, a_bits=4, per_channel=True, a_observer="ema",
                                                       single_rounding=True))
    calibrate(qmodel, [(x, y)], "cpu", 1)
    set_phase(qmodel, "qat")
    learn_scales(qmodel, [(x, y)], "cpu", 1)
    started = {n: p.detach().clone() for n, p in qmodel.named_parameters() if n.endswith("scale")}
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.05)
    qmodel.train()
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(qmodel(x), y).backward()
        opt.step()
    learned = {n: p.detach().clone() for n, p in qmodel.named_parameters() if n.endswith("scale")}
    assert all(not torch.equal(started[n], learned[n]) for n in learned)       # every S moved
    set_phase(qmodel.eval(), "fakequant")
    for _, layer in qlayers(qmodel):
        layer.bn_stats = "running"
    with torch.no_grad():
        fq = qmodel(x)
    frozen = freeze(qmodel)
    s_out, z_out = activation_quantizers(qmodel)[-1].qparams()
    first = next(m for m in frozen.modules() if isinstance(m, Quantize))
    assert torch.equal(first.out_scale, activation_quantizers(qmodel)[0].qparams()[0])   # the learned S, frozen
    q_int = output_integers(frozen, set_mode(frozen, "int")(x)).long()
    diff = (q_int - integers_of(fq, s_out, z_out)).abs()
    # one rounding per layer, as fake-quant rounds (97.8% identical here; with the default double
    # rounding 87.5-92%, depending on the CPU's float kernels)
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.9, diff.float().mean()


def test_first_last_bits_change_exactly_two_layers(trained_like):
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    plain = convert(trained_like("cnn_bn"), QConfig(w_bits=4, a_bits=4))
    edges = convert(trained_like("cnn_bn"), QConfig(w_bits=4, a_bits=4, first_last_bits=8))
    bits = [(a.w_quantizer.grid.bits, b.w_quantizer.grid.bits) for (_, a), (_, b) in zip(qlayers(plain), qlayers(edges))]
    assert len(bits) >= 3 and [b for _, b in bits] == [8] + [4] * (len(bits) - 2) + [8]
    assert all(a == 4 for a, _ in bits)
    for m in (plain, edges):
        calibrate(m, [(x, None)], "cpu", 1)
    fp, fe = freeze(plain), freeze(edges)
    convs = lambda f: [f.get_submodule(n.target) for n in f.graph.nodes
                       if n.op == "call_module" and hasattr(f.get_submodule(n.target), "w_q")]
    differ = [not torch.equal(a.w_q, b.w_q) for a, b in zip(convs(fp), convs(fe))]
    assert differ == [True] + [False] * (len(differ) - 2) + [True]
    quants = activation_quantizers(edges)
    assert quants[0].grid.bits == 8 and quants[-1].grid.bits == 8 and {q.grid.bits for q in quants[1:-1]} == {4}


def test_a_small_learned_step_keeps_both_signs_of_an_asymmetric_tensor():
    """A conv's output before a residual add has both signs: a 4-bit unsigned grid observed on
    [-9, 6] has Z = 9 (round(15 * 9 / 15)); an LSQ step 3x smaller than the range needs keeps
    Z = 9, so the grid still holds positive values (a Z placed to keep -9 representable would
    be 27, clamped to 15: nothing above zero left)."""
    from function import Grid
    grid = Grid(4, signed=False)
    q = Quantizer(grid, make_observer("minmax", grid))
    q.observe, q.enabled = "always", False
    q(torch.tensor([-9.0, 6.0, 0.5]))
    q.update()
    assert int(q.zero_point) == 9
    q.learn_scale(torch.tensor([1.0 / 3]))
    q.enabled = True
    assert int(q.zero_point) == 9
    y = q(torch.tensor([-9.0, -1.0, 1.0, 6.0])).detach()
    assert y.tolist() == pytest.approx([-3.0, -1.0, 1.0, 2.0])       # clipped at -9 S and at 6 S, both signs kept
