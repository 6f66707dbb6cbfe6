"""Quantization-aware training: the training-time conv+BN against conv-then-BN, shadow
weights, loss going down, checkpoint reload, and an end-to-end run on real Fashion-MNIST."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import load_frozen, save_frozen
from config import QConfig
from frozen import set_mode
from function import Grid, weight_grid
from model import ModelConfig, bn_use_running_stats, calibrate, convert, fix_ranges, qlayers, set_phase
from freezing import freeze
from module import QLayer
from observer import WeightObserver, make_observer
from quantizer import Quantizer


@pytest.fixture
def conv_bn_pair(random_bn):
    """conv_bn_pair(seed, quantized=False): a float conv -> BN, a QLayer holding copies of the
    same two modules (its weight quantizer off unless `quantized`), and an input."""
    def make(seed=0, quantized=False):
        g = torch.Generator().manual_seed(seed)
        conv = nn.Conv2d(3, 6, 3, padding=1)
        conv.weight.data.copy_(torch.randn(conv.weight.shape, generator=g) * 0.5)
        bn = random_bn(6, g)
        grid = weight_grid(4)
        wq = Quantizer(grid, WeightObserver(grid, False), channels=6)
        wq.enabled, wq.observe = quantized, "always"
        layer = QLayer(copy.deepcopy(conv), wq, bn=copy.deepcopy(bn))
        layer.bn_stats = "batch"
        return conv, bn, layer, torch.randn(8, 3, 10, 10, generator=g) * 2 + 0.5
    return make


def test_training_fold_equals_conv_then_bn_in_train_mode(conv_bn_pair):
    conv, bn, layer, x = conv_bn_pair()
    bn.train()
    want = bn(conv(x))                                          # batch statistics, and BN's update
    got = layer.train()(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(layer.bn.running_mean, bn.running_mean, atol=1e-6)
    assert torch.allclose(layer.bn.running_var, bn.running_var, atol=1e-6)
    assert int(layer.bn.num_batches_tracked) == int(bn.num_batches_tracked) == 1


def test_training_fold_gradients_equal_conv_then_bn(conv_bn_pair):
    conv, bn, layer, x = conv_bn_pair(1)
    bn.train()
    r = torch.randn(8, 6, 10, 10, generator=torch.Generator().manual_seed(9))   # a loss BN does not normalise away
    (bn(conv(x)) * r).sum().backward()
    (layer.train()(x) * r).sum().backward()
    assert torch.allclose(layer.layer.weight.grad, conv.weight.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(layer.bn.weight.grad, bn.weight.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(layer.bn.bias.grad, bn.bias.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("train", [True, False])
def test_eval_and_running_bn_statistics_fold_with_running_statistics(train, conv_bn_pair):
    conv, bn, layer, x = conv_bn_pair(2)
    bn.eval()
    layer.train(train)
    layer.bn_stats = "running"                # the running-statistics fold, quantization off
    assert torch.allclose(layer(x), bn(conv(x)), atol=1e-5)
    layer.bn_stats = "batch"                  # in eval mode the batch-statistics fold is not used either
    assert train or torch.allclose(layer(x), bn(conv(x)), atol=1e-5)


def test_qat_with_running_bn_and_fixed_ranges_is_plain_fake_quant(conv_bn_pair):
    conv, bn, layer, x = conv_bn_pair(3, quantized=True)
    act = Quantizer(Grid(4), make_observer("ema", Grid(4)))
    act.observer.min_val.fill_(-3.0)
    act.observer.max_val.fill_(4.0)
    act.update()
    model = nn.Sequential(layer, act)
    act.enabled = True
    layer.bn_stats = "running"
    want = model.eval()(x)
    model.train()
    stats = layer.bn.running_mean.clone(), act.observer.min_val.clone()
    assert torch.equal(model(x), want)                       # observe "never": fixed ranges
    assert torch.equal(layer.bn.running_mean, stats[0]) and torch.equal(act.observer.min_val, stats[1])
    act.observe = "training"                                  # a moving observer does move in training
    model(x)
    assert not torch.equal(act.observer.min_val, stats[1])
    assert not torch.equal(act.scale, torch.tensor([7.0 / 15]))


QAT_CONFIG = QConfig(w_bits=4, a_bits=4, per_channel=True, a_observer="ema")


@pytest.fixture
def tiny_qat_model(trained_like):
    def make(seed=0):
        x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
        y = torch.arange(32) % 10
        qmodel = convert(trained_like("cnn_bn", seed), QAT_CONFIG)
        calibrate(qmodel, [(x, y)], "cpu", 1)
        set_phase(qmodel, "qat")
        return qmodel.train(), x, y
    return make


def test_optimizer_moves_float_shadow_weights_not_onto_the_grid(tiny_qat_model):
    qmodel, x, y = tiny_qat_model()
    layer = qlayers(qmodel)[0][1]
    before = layer.layer.weight.detach().clone()
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.05)
    F.cross_entropy(qmodel(x), y).backward()
    grad = layer.layer.weight.grad.clone()
    opt.step()
    after = layer.layer.weight.detach()
    assert grad.abs().sum() > 0
    assert torch.allclose(after, before - 0.05 * grad, atol=1e-7)     # moved by the gradient ...
    w_fold, _ = layer.folded_weight_bias()
    assert not torch.equal(layer.w_quantizer(w_fold), w_fold)          # ... and not onto the 4-bit grid


def test_a_few_qat_steps_lower_the_loss(tiny_qat_model):
    qmodel, x, y = tiny_qat_model(1)
    opt = torch.optim.Adam(qmodel.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(qmodel(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_qat_checkpoint_reload_gives_identical_integers(tmp_path, tiny_qat_model):
    qmodel, x, y = tiny_qat_model(2)
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(qmodel(x), y).backward()
        opt.step()
    bn_use_running_stats(qmodel)
    fix_ranges(qmodel)
    frozen = set_mode(freeze(qmodel), "int")
    before = frozen(x)
    save_frozen(tmp_path / "qat.pt", frozen, QAT_CONFIG, ModelConfig(arch="cnn_bn", width=8), "fashion-mnist", "QAT")
    again, ckpt = load_frozen(tmp_path / "qat.pt", "fashion-mnist", "cnn_bn")
    assert QConfig(**ckpt["qconfig"]) == QAT_CONFIG and torch.equal(set_mode(again, "int")(x), before)
