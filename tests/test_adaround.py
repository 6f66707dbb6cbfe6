"""AdaRound: soft rounding starts at the float weights, the regulariser drives h(V) to 0 or 1,
the beta schedule, and the learned rounding never reconstructs worse than nearest. The layer
reconstructed is the converted model's own (an AdaRoundQuantizer swapped in)."""
import pytest
import torch
from torch import nn

from AdaRound import REG_WEIGHT, beta_at
from config import QConfig
from function import FLOAT_BITS, round_half_away
from model import convert, qlayers, set_phase
from ops.conv import freeze_layer
from quantizer import GAMMA, ZETA, AdaRoundQuantizer, rectified_sigmoid
from reconstruct import full_loss, optimise, unit


@pytest.fixture
def tiny_unit(random_bn):
    """tiny_unit(bits, conv, seed, per_channel) -> (ada, unit, x, target): one layer (+BN) + ReLU,
    converted, its weight quantizer replaced by an AdaRoundQuantizer."""
    def make(bits, conv=False, seed=0, per_channel=False):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        if conv:
            model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), random_bn(6, g), nn.ReLU())
            x = torch.randn(256, 3, 6, 6, generator=g)
        else:
            model = nn.Sequential(nn.Linear(24, 8), nn.ReLU())
            x = torch.randn(512, 24, generator=g)
        qmodel = convert(model.eval(), QConfig(w_bits=bits, a_bits=FLOAT_BITS, per_channel=per_channel))
        name, layer = qlayers(qmodel)[0]
        module, _ = unit(qmodel, name)
        with torch.no_grad():
            target = module(x)               # float phase: the float layer's output after ReLU
        set_phase(qmodel, "fakequant")
        ada = AdaRoundQuantizer(layer.w_quantizer, layer.weight_bias()[0].detach())
        layer.w_quantizer = ada
        return ada, module, layer, x, target
    return make


def loss_with(ada, module, x, target, mode):
    ada.mode = mode
    return full_loss(module, x, target)


def run_adaround(ada, module, x, target, iters, lr, seed):
    reg = lambda t: None if beta_at(t, iters) is None else REG_WEIGHT * ada.regulariser(beta_at(t, iters))
    ada.mode = "soft"
    with torch.enable_grad():
        optimise(module, [ada.v], x, target, iters, 32, lr, torch.Generator().manual_seed(seed), reg)


def test_rectified_sigmoid_and_its_inverse():
    v = torch.linspace(-12, 12, 101)
    h = rectified_sigmoid(v)
    assert h.min() == 0 and h.max() == 1
    assert torch.allclose(h, torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1))


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_soft_rounding_at_initialisation_reproduces_the_float_weights(conv, per_channel, tiny_unit):
    ada, module, layer, x, target = tiny_unit(4, conv=conv, per_channel=per_channel)
    w, _ = layer.folded_weight_bias()
    assert torch.allclose(ada(w), w, atol=1e-6 * float(ada.scale.max()))      # min/max range: nothing clipped
    assert float(loss_with(ada, module, x, target, "soft")) < 1e-9
    # the nearest integers it starts from are TFLite's
    assert torch.equal(ada.nearest, torch.clamp(round_half_away(w / ada.scale), -7, 7))


def test_beta_schedule_warm_start_then_linear_from_20_to_2():
    iters = 100
    betas = [beta_at(t, iters) for t in range(iters)]
    assert all(b is None for b in betas[:20])                  # warm start 0.2: no regulariser
    assert betas[20] == 20.0 and betas[-1] == pytest.approx(2.0)
    steps = [a - b for a, b in zip(betas[20:], betas[21:])]
    assert all(s == pytest.approx(18.0 / 79) for s in steps)  # linear, decreasing
    assert beta_at(10, 100, warm_start=0.05, beta_start=10, beta_end=4) == pytest.approx(10 - 6 * 5 / 94)


@pytest.mark.parametrize("bits,conv,seed", [(4, False, 0), (3, False, 1), (4, True, 3), (3, True, 4)])
def test_adaround_drives_h_to_0_or_1_and_beats_nearest(bits, conv, seed, tiny_unit):
    ada, module, _, x, target = tiny_unit(bits, conv=conv, seed=seed)
    nearest = loss_with(ada, module, x, target, "nearest")
    run_adaround(ada, module, x, target, 3000, 1e-2, seed)
    h = ada.h().detach()
    assert torch.all(torch.minimum(h, 1 - h) <= 0.01)               # every h within 0.01 of 0 or 1
    soft = loss_with(ada, module, x, target, "soft")
    hard = loss_with(ada, module, x, target, "hard")
    assert abs(hard - soft) <= 0.02 * soft + 1e-6                    # rounding hard changes little
    assert hard <= nearest                                           # never worse than nearest
    assert not torch.equal(ada.integers(), ada.nearest)              # and it did change something


def test_adaround_at_2_bits_still_beats_nearest(tiny_unit):
    # At 2 bits a tiny layer's reconstruction error outweighs the regulariser (lambda 0.01) for
    # some weights, so h need not reach 0/1 in a few thousand steps; the hard rounding must
    # still reconstruct better than nearest.
    ada, module, _, x, target = tiny_unit(2, seed=2)
    nearest = loss_with(ada, module, x, target, "nearest")
    run_adaround(ada, module, x, target, 2000, 3e-2, 2)
    assert loss_with(ada, module, x, target, "hard") < nearest


def test_frozen_model_takes_the_learned_integers(tiny_unit):
    """The quantizer swapped in is what freeze reads: its hard integers become the IntConv's."""
    ada, module, layer, x, target = tiny_unit(3, seed=5)
    run_adaround(ada, module, x, target, 300, 1e-2, 5)
    ada.mode = "hard"
    op, = freeze_layer(layer, None, None, (0.0, float("inf")))
    assert torch.equal(op.w_q.float(), ada.integers())


def test_run_names_of_a_sweep_differ_and_the_defaults_keep_the_short_name():
    """Each sweep point (observer, BN folding, lr, iterations, 8-bit edges) writes its own
    model and plot; the default run keeps data_model_WxAy_pc."""
    from argparse import Namespace
    from AdaRound import ADAROUND, ITERS, LR, run_name
    args = Namespace(dataset="fashion-mnist", model="cnn_bn", iters=ITERS, lr=LR)
    base = dict(w_bits=4, a_bits=8, per_channel=True)
    variants = [{}, {"w_observer": "lp", "lp_p": 2.0}, {"w_observer": "lp", "lp_p": 2.4}, {"w_observer": "sqnr"},
                {"fold_bn": False, "a_bits": FLOAT_BITS}, {"first_last_bits": 8}]
    names = [run_name(args, QConfig(**{**base, **v}), ADAROUND) for v in variants]
    names += [run_name(Namespace(**{**vars(args), **change}), QConfig(**base), ADAROUND)
              for change in ({"lr": 1e-2}, {"iters": 2000})]
    assert names[0] == "fashion-mnist_cnn_bn_W4A8_pc"
    assert len(set(names)) == len(names), names
    from BRECQ import BRECQ
    brecq = Namespace(**{**vars(args), "iters": BRECQ.iters, "layers_per_group": 1, "loss": BRECQ.loss,
                         "scale_lr": BRECQ.scale_lr})
    changes = ({}, {"layers_per_group": 2}, {"loss": "mse"}, {"scale_lr": 0.0})
    names = [run_name(Namespace(**{**vars(brecq), **c}), QConfig(**base), BRECQ) for c in changes]
    assert names[0] == "fashion-mnist_cnn_bn_W4A8_pc" and len(set(names)) == len(changes), names
