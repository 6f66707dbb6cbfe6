"""Quantization-aware training: the training-time conv+BN against conv-then-BN, shadow
weights, loss going down, checkpoint reload, and an end-to-end run on real Fashion-MNIST."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import (ModelConfig, calibrate, convert, freeze, freeze_bn, freeze_observers, load_quantized,
                   qlayers, save_quantized, set_mode)
from module import QConfig, QLayer
from test_module import random_bn, trained_like
from test_scripts import result_of, run


def conv_bn_pair(seed=0):
    """A float conv -> BN and a QLayer holding copies of the same two modules."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(3, 6, 3, padding=1)
    conv.weight.data.copy_(torch.randn(conv.weight.shape, generator=g) * 0.5)
    bn = random_bn(6, g)
    layer = QLayer(copy.deepcopy(conv), QConfig(4, 4, a_observer="ema"), bn=copy.deepcopy(bn))
    return conv, bn, layer, torch.randn(8, 3, 10, 10, generator=g) * 2 + 0.5


def no_quant(w):
    return w


def test_training_fold_equals_conv_then_bn_in_train_mode():
    conv, bn, layer, x = conv_bn_pair()
    bn.train()
    want = bn(conv(x))                                          # batch statistics, and BN's update
    got = layer.conv_bn_batch_stats(x, weight_fn=no_quant)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(layer.bn.running_mean, bn.running_mean, atol=1e-6)
    assert torch.allclose(layer.bn.running_var, bn.running_var, atol=1e-6)
    assert int(layer.bn.num_batches_tracked) == int(bn.num_batches_tracked) == 1


def test_training_fold_gradients_equal_conv_then_bn():
    conv, bn, layer, x = conv_bn_pair(1)
    bn.train()
    r = torch.randn(8, 6, 10, 10, generator=torch.Generator().manual_seed(9))   # a loss BN does not normalise away
    (bn(conv(x)) * r).sum().backward()
    (layer.conv_bn_batch_stats(x, weight_fn=no_quant) * r).sum().backward()
    assert torch.allclose(layer.layer.weight.grad, conv.weight.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(layer.bn.weight.grad, bn.weight.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(layer.bn.bias.grad, bn.bias.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("train", [True, False])
def test_eval_and_frozen_bn_use_running_statistics(train):
    conv, bn, layer, x = conv_bn_pair(2)
    bn.eval()
    layer.train(train)
    layer.bn_frozen = True
    layer.set_mode("float")                   # the running-statistics fold, quantization off
    assert torch.allclose(layer(x), bn(conv(x)), atol=1e-5)


def test_qat_with_frozen_bn_and_observers_is_plain_fake_quant():
    conv, bn, layer, x = conv_bn_pair(3)
    layer.act.min_val.fill_(-3.0)
    layer.act.max_val.fill_(4.0)
    layer.set_mode("fakequant")
    layer.eval()
    want = layer(x)
    layer.set_mode("qat")
    layer.train()
    freeze_bn(nn.ModuleList([layer]))
    freeze_observers(nn.ModuleList([layer]))
    stats = layer.bn.running_mean.clone(), layer.act.min_val.clone()
    assert torch.equal(layer(x), want)
    assert torch.equal(layer.bn.running_mean, stats[0]) and torch.equal(layer.act.min_val, stats[1])
    layer.observer_frozen = False             # a moving observer does move in training
    layer(x)
    assert not torch.equal(layer.act.min_val, stats[1])


def tiny_qat_model(seed=0):
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(32) % 10
    qmodel = convert(trained_like("cnn_bn", seed), QConfig(4, 4, per_channel=True, a_observer="ema"))
    calibrate(qmodel, [(x, y)], "cpu", 1)
    set_mode(qmodel, "qat")
    return qmodel.train(), x, y


def test_optimizer_moves_float_shadow_weights_not_onto_the_grid():
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
    assert not torch.equal(layer.fake_quant_weight(w_fold), w_fold)   # ... and not onto the 4-bit grid


def test_a_few_qat_steps_lower_the_loss():
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


def test_qat_checkpoint_reload_gives_identical_integers(tmp_path):
    qmodel, x, y = tiny_qat_model(2)
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(qmodel(x), y).backward()
        opt.step()
    freeze(qmodel)
    set_mode(qmodel, "int")
    before = qmodel(x)
    qconfig = QConfig(4, 4, per_channel=True, a_observer="ema")
    cfg = ModelConfig(arch="cnn_bn", width=8)
    save_quantized(tmp_path / "qat.pt", qmodel, qconfig, cfg, "fashion-mnist")
    again, qconfig2, _ = load_quantized(tmp_path / "qat.pt", "fashion-mnist", "cnn_bn")
    set_mode(again, "int")
    assert qconfig2 == qconfig and torch.equal(again(x), before)


def test_qat_end_to_end_on_real_fashion_mnist(data_dir, tmp_path):
    save = tmp_path / "qat.pt"
    args = ["--model", "cnn_bn", "--w-bits", 4, "--a-bits", 4, "--per-channel", "--single-rounding", "--dry-run",
            "--data-dir", data_dir]
    r = result_of(run("QAT.py", *args, "--save", save))
    assert {"epochs", "lr", "qat_fakequant_acc", "fakequant_acc", "int_acc", "fp32_acc"} <= set(r)
    assert r["fp32_acc"] > 90 and r["int_acc"] > 60
    # frozen with one rounding, the integer model is the trained fake-quant model (the bias now on
    # its int32 grid, and evaluated in float64): the same class for nearly every image
    assert r["int_fq_same_class"] >= 99.5 and abs(r["int_acc"] - r["qat_fakequant_acc"]) <= 1.0
    again = result_of(run("QAT.py", *args, "--eval", save))
    assert again["int_acc"] == r["int_acc"] and again["fakequant_acc"] == r["fakequant_acc"]
