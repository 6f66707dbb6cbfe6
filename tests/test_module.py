"""The quantized layers and the conversion: the integer path against a brute-force NumPy
int64 reference of the paper's arithmetic (plus the Python TFLite transcription), BN
folding against conv-then-BN, and the phases' bookkeeping."""
import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

from function import IntsimError, qrange
from model import (ModelConfig, build_model, calibrate, convert, freeze, output_integers, qlayers,
                   set_mode)
from module import QConfig, QLayer
from test_function import ref_mbqm


def random_bn(c, g):
    bn = nn.BatchNorm2d(c)
    bn.running_mean.copy_(torch.randn(c, generator=g))
    bn.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
    bn.weight.data.copy_(torch.randn(c, generator=g))
    bn.bias.data.copy_(torch.randn(c, generator=g))
    return bn.eval()


def frozen_layer(qconfig, bn=False, relu=True, pool=False, stride=1, padding=1, seed=0):
    """A calibrated, frozen QLayer on a 3->4 channel 3x3 conv, with a chosen input scale and Z."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding, bias=not bn)
    conv.weight.data.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
    if not bn:
        conv.bias.data.copy_(torch.randn(4, generator=g) * 0.2)
    layer = QLayer(conv, qconfig, bn=random_bn(4, g) if bn else None, relu=relu,
                   pool=nn.MaxPool2d(2) if pool else None)
    layer.act.min_val.fill_(-2.0)
    layer.act.max_val.fill_(3.0)
    qmin, qmax = qrange(qconfig.a_bits, symmetric=False)
    in_zero_point = (qmin + qmax) // 3
    layer.freeze(torch.tensor([0.05]), torch.tensor([in_zero_point]))
    q_in = torch.randint(qmin, qmax + 1, (2, 3, 8, 8), generator=g, dtype=torch.int32)
    return layer, q_in


def reference_int_conv(layer, q_in):
    """The paper's integer conv written with NumPy int64 and Python ints, sharing nothing with
    module.py but the frozen integer parameters."""
    x = q_in.numpy().astype(np.int64) - int(layer.in_zero_point)                 # (B, C, H, W)
    pad, stride = layer.layer.padding[0], layer.layer.stride[0]
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))                      # real 0 pads
    w = layer.w_q.numpy().astype(np.int64) - layer.w_zero_point.numpy()[:, None, None, None]
    windows = sliding_window_view(x, w.shape[2:], axis=(2, 3))[:, :, ::stride, ::stride]  # (B,C,Ho,Wo,kh,kw)
    acc = np.einsum("bchwij,ocij->bohw", windows, w) + layer.b_q.numpy()[None, :, None, None]
    z_out = int(layer.output_qparams()[1])
    qmin, qmax = qrange(layer.qconfig.a_bits, symmetric=False)
    lo = z_out if layer.relu else qmin
    out = np.empty_like(acc)
    for idx in np.ndindex(*acc.shape):
        c = idx[1]
        out[idx] = min(max(ref_mbqm(int(acc[idx]), int(layer.m0[c]), int(layer.shift[c])) + z_out, lo), qmax)
    if layer.pool is not None:                         # pool after the rescale, as the float model does
        b, c, h, w_ = out.shape
        out = out.reshape(b, c, h // 2, 2, w_ // 2, 2).max(axis=(3, 5))
    return out


@pytest.mark.parametrize("bits", [8, 5, 2])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("w_symmetric", [True, False])
@pytest.mark.parametrize("bn,relu,pool,stride", [(False, True, False, 1), (True, True, True, 1),
                                                  (False, False, False, 2), (True, False, True, 1)])
def test_integer_conv_equals_bruteforce_reference(bits, per_channel, w_symmetric, bn, relu, pool, stride):
    layer, q_in = frozen_layer(QConfig(bits, bits, per_channel, w_symmetric), bn, relu, pool, stride)
    layer.set_mode("int")
    got = layer(q_in)
    assert got.dtype == torch.int32
    assert np.array_equal(got.numpy(), reference_int_conv(layer, q_in))


@pytest.mark.parametrize("zero_point", [0, 100])
def test_float32_split_and_float64_accumulation_agree_bit_for_bit(zero_point):
    layer, q_in = frozen_layer(QConfig(8, 8, per_channel=True), bn=True, pool=True)
    layer.in_zero_point.fill_(zero_point)            # negative and positive q_in - Z_in
    layer.set_mode("int")
    cpu = torch.device("cpu")
    assert layer.accumulation(cpu) == "float32"
    exact32 = layer(q_in)
    assert np.array_equal(exact32.numpy(), reference_int_conv(layer, q_in))
    layer.acc_bound.fill_(2.0 ** 25)                 # pretend the bound is larger: digit split
    assert layer.accumulation(cpu) == "split"
    assert torch.equal(layer(q_in), exact32)
    layer.acc_bound.fill_(2.0 ** 30)                 # larger still: float64
    assert layer.accumulation(cpu) == "float64"
    assert torch.equal(layer(q_in), exact32)


def test_split_accumulation_is_exact_where_float32_is_not():
    """Weights and inputs near the extremes, 256 input channels: sums far above 2^24, where a
    float32 conv rounds; the split into 16 hi + lo must still give the int64 sum."""
    layer = QLayer(nn.Conv2d(256, 2, 3, padding=1, bias=False), QConfig(8, 8, per_channel=True))
    layer.act.min_val.fill_(-1.0)
    layer.act.max_val.fill_(1.0)
    layer.freeze(torch.tensor([1.0]), torch.tensor([3]))
    g = torch.Generator().manual_seed(0)
    layer.w_q.copy_(torch.randint(100, 128, layer.w_q.shape, generator=g, dtype=torch.int32))
    layer.w_q[1].neg_()
    w_l1 = (layer.w_q.long() - layer.w_zero_point[:, None, None, None]).abs().reshape(2, -1).sum(1)
    layer.acc_bound.fill_(float(w_l1.max() * 252))                 # the bound freeze computes (a_max 252)
    assert layer.accumulation(torch.device("cpu")) == "split"
    q_in = torch.randint(0, 256, (2, 256, 5, 5), generator=g, dtype=torch.int32)
    q_in[0] = torch.randint(240, 256, (256, 5, 5), generator=g, dtype=torch.int32)
    acc = layer.accumulate(q_in)
    x = (q_in.numpy().astype(np.int64) - 3)
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    w = layer.w_q.numpy().astype(np.int64) - layer.w_zero_point.numpy()[:, None, None, None]
    want = np.einsum("bchwij,ocij->bohw", sliding_window_view(x, (3, 3), axis=(2, 3)), w)
    assert np.abs(want).max() > 2 ** 24                           # float32 alone could not hold it
    assert np.array_equal(acc.numpy().astype(np.int64), want)


def test_integer_linear_equals_reference():
    g = torch.Generator().manual_seed(5)
    fc = nn.Linear(20, 6)
    fc.weight.data.copy_(torch.randn(6, 20, generator=g))
    layer = QLayer(fc, QConfig(6, 7, per_channel=True))
    layer.act.min_val.fill_(-4.0)
    layer.act.max_val.fill_(5.0)
    layer.freeze(torch.tensor([0.1]), torch.tensor([11]))
    layer.set_mode("int")
    q_in = torch.randint(0, 128, (5, 20), generator=g, dtype=torch.int32)
    acc = (q_in.long() - 11) @ (layer.w_q.long() - layer.w_zero_point[:, None]).T + layer.b_q.long()
    z = int(layer.output_qparams()[1])
    want = [[min(max(ref_mbqm(int(a), int(layer.m0[c]), int(layer.shift[c])) + z, 0), 127)
             for c, a in enumerate(row)] for row in acc.tolist()]
    assert layer(q_in).tolist() == want


def test_fake_quant_follows_integer_path_within_one():
    layer, q_in = frozen_layer(QConfig(8, 8, per_channel=True), bn=True)
    layer.set_mode("int")
    q_int = layer(q_in)
    layer.set_mode("fakequant")
    x = (q_in.float() - layer.in_zero_point) * layer.in_scale           # the same input, dequantized
    s, z = layer.output_qparams()
    q_fq = torch.round(layer(x) / s).long() + z
    diff = (q_fq - q_int.long()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99


def test_bn_folding_leaves_float_output_unchanged():
    g = torch.Generator().manual_seed(1)
    for bias in (True, False):
        conv, bn = nn.Conv2d(3, 5, 3, padding=1, bias=bias), random_bn(5, g)
        layer = QLayer(conv, QConfig(), bn=bn)
        x = torch.randn(4, 3, 9, 9, generator=g)
        assert torch.allclose(layer(x), bn(conv(x)), atol=1e-5)


def trained_like(arch, seed=0):
    """A model with random weights and non-trivial BN statistics, as if trained."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch=arch, width=8))
    g = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            model.features[int(name.split(".")[1])] = random_bn(m.num_features, g)
    return model.eval()


def test_converted_model_in_float_mode_equals_float_model():
    model = trained_like("cnn_bn")
    qmodel = convert(model, QConfig())
    x = torch.randn(8, 1, 28, 28)
    assert torch.allclose(qmodel(x), model(x), atol=1e-5)
    assert [type(m).__name__ for m in qmodel.modules() if isinstance(m, (nn.BatchNorm2d, nn.ReLU))] == \
        ["BatchNorm2d", "BatchNorm2d"]                       # BN held inside the QLayers, ReLU fused
    assert [n for n, _ in qlayers(qmodel)] == ["features.0", "features.4", "classifier"]


def quantized(arch, qconfig, x):
    qmodel = convert(trained_like(arch), qconfig)
    calibrate(qmodel, [(x, None)], "cpu", 1)
    return freeze(qmodel)


@pytest.mark.parametrize("w_bits", range(2, 9))
@pytest.mark.parametrize("a_bits", [2, 4, 8])
def test_every_bit_width_runs(w_bits, a_bits):
    x = torch.randn(16, 1, 28, 28)
    qmodel = quantized("cnn_bn", QConfig(w_bits, a_bits, per_channel=w_bits % 2 == 0), x)
    set_mode(qmodel, "int")
    q = output_integers(qmodel, qmodel(x))
    assert torch.isfinite(qmodel(x)).all()
    assert q.min() >= 0 and q.max() <= 2 ** a_bits - 1
    for _, layer in qlayers(qmodel):
        w_qmin, w_qmax = qrange(w_bits, symmetric=True)
        assert layer.w_q.min() >= w_qmin and layer.w_q.max() <= w_qmax


def test_save_and_reload_of_frozen_model_gives_identical_integers(tmp_path):
    x = torch.randn(32, 1, 28, 28)
    qconfig = QConfig(4, 8, per_channel=True)
    qmodel = quantized("cnn_bn", qconfig, x)
    set_mode(qmodel, "int")
    before = qmodel(x)
    torch.save(qmodel.state_dict(), tmp_path / "q.pt")
    fresh = convert(build_model(ModelConfig(arch="cnn_bn", width=8)), qconfig)   # other float weights
    fresh.load_state_dict(torch.load(tmp_path / "q.pt"))
    set_mode(fresh, "int")
    assert torch.equal(fresh(x), before)
    assert {"features.0.m0", "features.0.shift", "features.0.w_q", "features.0.b_q",
            "features.0.act.min_val", "quant_in.act.max_val", "dequant_out.in_scale"} <= set(fresh.state_dict())


def test_int_mode_needs_freeze_and_freeze_needs_calibration():
    qmodel = convert(trained_like("cnn"), QConfig())
    with pytest.raises(IntsimError, match="frozen"):
        set_mode(qmodel, "int")
    with pytest.raises(IntsimError, match="calibrate"):
        freeze(qmodel)
    calibrate(qmodel, [(torch.randn(4, 1, 28, 28), None)], "cpu", 1)
    freeze(qmodel)
    for mode in ("calibrate", "qat"):          # ranges must not move under frozen multipliers
        with pytest.raises(IntsimError, match="frozen model"):
            set_mode(qmodel, mode)


def test_dead_layer_with_zero_range_quantizes_without_nan():
    model = trained_like("cnn")
    model.features[0].bias.data.fill_(-100.0)          # ReLU output is 0 everywhere: a zero range
    x = torch.randn(8, 1, 28, 28)
    qmodel = convert(model, QConfig())
    calibrate(qmodel, [(x, None)], "cpu", 1)
    freeze(qmodel)
    set_mode(qmodel, "int")
    out = qmodel(x)
    set_mode(qmodel, "float")
    assert torch.isfinite(out).all()
    assert torch.allclose(out, qmodel(x), atol=0.1)    # the output is just the (quantized) bias


def test_int32_overflow_is_detected():
    k = 70_000                                          # 70000 * 255 * 127 > 2^31
    fc = nn.Linear(k, 1)
    fc.weight.data.fill_(1.0)
    layer = QLayer(fc, QConfig(8, 8))
    layer.act.min_val.fill_(0.0)
    layer.act.max_val.fill_(1.0)
    assert layer.freeze(torch.tensor([1.0]), torch.tensor([0]))       # reported as possible ...
    layer.set_mode("int")
    layer(torch.ones(1, k, dtype=torch.int32))                        # ... small inputs pass ...
    with pytest.raises(IntsimError, match="overflow"):
        layer(torch.full((1, k), 255, dtype=torch.int32))            # ... a real overflow stops


def test_unsupported_op_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid())
    with pytest.raises(IntsimError, match="Sigmoid"):
        convert(model, QConfig())


def test_bad_qconfig_bits():
    with pytest.raises(IntsimError, match="weight bits"):
        QConfig(w_bits=1)
    with pytest.raises(IntsimError, match="activation bits"):
        QConfig(a_bits=17)
    assert QConfig(w_bits=12, a_bits=16).integer_capable is False       # fake-quant only
    assert QConfig(w_bits=8, a_bits=8).integer_capable and not QConfig(a_bits=32).integer_capable


def fake_quant_integers_float64(qmodel, x):
    set_mode(qmodel, "fakequant")
    q = output_integers(qmodel, qmodel.double()(x.double()))
    qmodel.float()
    return q


@pytest.mark.parametrize("arch,per_channel", [("cnn", False), ("cnn_bn", True)])
def test_single_rounding_integer_path_equals_float64_fake_quant_exactly(arch, per_channel):
    """With one rounding the integer path computes round(acc * M) exactly as the float64
    simulation does (up to M0's 2^-31 relative error): every output integer is equal."""
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    qmodel = quantized(arch, QConfig(8, 8, per_channel=per_channel, single_rounding=True), x)
    set_mode(qmodel, "int")
    assert torch.equal(output_integers(qmodel, qmodel(x)), fake_quant_integers_float64(qmodel, x))


def test_double_rounding_differs_from_fake_quant_by_at_most_one_and_rarely():
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    qmodel = quantized("cnn_bn", QConfig(8, 8), x)
    set_mode(qmodel, "int")
    diff = (output_integers(qmodel, qmodel(x)) - fake_quant_integers_float64(qmodel, x)).abs()
    assert diff.max() == 1 and 0 < (diff > 0).float().mean() < 0.25   # it does differ, by 1 at most


def test_output_bits_apply_to_the_logits_only():
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    qmodel = quantized("cnn_bn", QConfig(4, 4, per_channel=True, out_bits=8, single_rounding=True), x)
    set_mode(qmodel, "int")
    hidden = qmodel.get_submodule("features.0")(qmodel.quant_in(x))
    q = output_integers(qmodel, qmodel(x))
    assert hidden.max() <= 15 and q.max() <= 255 and len(torch.unique(q)) > 16
    assert torch.equal(q, fake_quant_integers_float64(qmodel, x))          # still exact
    with pytest.raises(IntsimError, match="output bits"):
        QConfig(out_bits=17)
