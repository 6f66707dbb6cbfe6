"""AdaRound (AdaRound.py): soft rounding starts at the float weights, the regulariser drives h(V)
to 0 or 1, the beta schedule, and the learned rounding never reconstructs worse than nearest."""
import pytest
import torch
from torch import nn

from AdaRound import (GAMMA, ZETA, AdaRoundWeights, beta_at, full_loss, optimise, rectified_sigmoid)
from function import FLOAT_BITS, round_half_away
from module import QConfig, QLayer
from test_module import random_bn
from test_scripts import result_of, run


def tiny_layer(bits, conv=False, seed=0, per_channel=False):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    qconfig = QConfig(w_bits=bits, a_bits=FLOAT_BITS, per_channel=per_channel)
    if conv:
        layer = QLayer(nn.Conv2d(3, 6, 3, padding=1), qconfig, bn=random_bn(6, g), relu=True)
        x = torch.randn(256, 3, 6, 6, generator=g)
    else:
        layer = QLayer(nn.Linear(24, 8), qconfig, relu=True)
        x = torch.randn(512, 24, generator=g)
    layer.eval()
    with torch.no_grad():
        target = layer(x)                     # float mode: the float layer's output after ReLU
    return layer, x, target


def test_rectified_sigmoid_and_its_inverse():
    v = torch.linspace(-12, 12, 101)
    h = rectified_sigmoid(v)
    assert h.min() == 0 and h.max() == 1
    assert torch.allclose(h, torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1))


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_soft_rounding_at_initialisation_reproduces_the_float_weights(conv, per_channel):
    layer, x, target = tiny_layer(4, conv=conv, per_channel=per_channel)
    ada = AdaRoundWeights(layer)
    w_soft = ada.scale * (ada.integers(hard=False) - ada.zero_point)
    w, _ = layer.folded_weight_bias()
    assert torch.allclose(w_soft, w, atol=1e-6 * float(ada.scale.max()))      # min/max range: nothing clipped
    assert float(full_loss(ada, x, target, ada.integers(hard=False))) < 1e-9
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
def test_adaround_drives_h_to_0_or_1_and_beats_nearest(bits, conv, seed):
    layer, x, target = tiny_layer(bits, conv=conv, seed=seed)
    ada = AdaRoundWeights(layer)
    nearest = full_loss(ada, x, target, ada.nearest)
    with torch.enable_grad():
        optimise(ada, x, target, iters=3000, batch_size=32, lr=1e-2, reg_weight=0.01,
                 generator=torch.Generator().manual_seed(seed))
    h = ada.h().detach()
    assert torch.all(torch.minimum(h, 1 - h) <= 0.01)               # every h within 0.01 of 0 or 1
    soft = full_loss(ada, x, target, ada.integers(hard=False))
    hard = full_loss(ada, x, target, ada.integers(hard=True))
    assert abs(hard - soft) <= 0.02 * soft + 1e-6                    # rounding hard changes little
    assert hard <= nearest                                           # never worse than nearest
    assert not torch.equal(ada.integers(hard=True), ada.nearest)     # and it did change something


def test_adaround_end_to_end_on_real_fashion_mnist(data_dir, tmp_path):
    save, png = tmp_path / "ada.pt", tmp_path / "h.png"
    r = result_of(run("AdaRound.py", "--model", "cnn_bn", "--w-bits", 4, "--a-bits", 8, "--per-channel",
                      "--dry-run", "--save", save, "--plot", png, "--data-dir", data_dir))
    assert r["rounding"] == "adaround" and r["iters"] == 20 and r["num_calib"] == 64
    assert [s["layer"] for s in r["layers"]] == ["features.0", "features.4", "classifier"]
    assert all(s["loss_adaround"] <= s["loss_nearest"] * 1.05 for s in r["layers"])
    assert r["int_acc"] > 80 and r["int_fq_same_class"] > 97 and save.exists() and png.stat().st_size > 5000
    # the saved model reloads into the same integers and is scored again by QAT.py --eval's loader
    from model import load_quantized
    qmodel, qconfig, ckpt = load_quantized(str(save), "fashion-mnist", "cnn_bn")
    assert ckpt["rounding"] == "adaround" and qconfig.w_bits == 4


def test_adaround_at_2_bits_still_beats_nearest():
    # At 2 bits a tiny layer's reconstruction error outweighs the regulariser (lambda 0.01) for
    # some weights, so h need not reach 0/1 in a few thousand steps; the hard rounding must
    # still reconstruct better than nearest.
    layer, x, target = tiny_layer(2, seed=2)
    ada = AdaRoundWeights(layer)
    nearest = full_loss(ada, x, target, ada.nearest)
    with torch.enable_grad():
        optimise(ada, x, target, iters=2000, batch_size=32, lr=3e-2, reg_weight=0.01,
                 generator=torch.Generator().manual_seed(2))
    assert full_loss(ada, x, target, ada.integers(hard=True)) < nearest
