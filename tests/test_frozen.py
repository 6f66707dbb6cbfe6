"""The frozen integer ops against independent references: the integer conv against NumPy int64
with the Python transcription of TFLite's rescale, ADD and MEAN against TFLite's reference
kernels written out in Python, the exact-accumulation choices against each other, and the
frozen model saved and loaded without the float network."""
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from config import QConfig
from errors import IntsimError
from frozen import output_integers, set_mode
from ops.add import IntAdd
from ops.base import QParams
from ops.clamp import IntClamp
from ops.conv import IntConv, freeze_layer
from ops.mean import IntMean
from function import activation_grid, weight_grid
from module import QLayer
from observer import WeightObserver
from quantizer import Quantizer
from reference import ref_int_conv, ref_max_pool2, ref_mean, ref_round_half_away, ref_tflite_add


def qp(scale, zero_point, grid):
    return QParams(torch.tensor([scale], dtype=torch.float32), torch.tensor([zero_point]), grid)


def frozen_conv(bits=8, per_channel=False, w_symmetric=True, bn=None, relu=True, stride=1, padding=1, seed=0,
                in_channels=3, single_rounding=False, a_signed=False):
    """A QLayer on a 3->4 channel 3x3 conv, frozen with chosen input and output (S, Z)."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(in_channels, 4, 3, stride=stride, padding=padding, bias=bn is None)
    conv.weight.data.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
    if bn is None:
        conv.bias.data.copy_(torch.randn(4, generator=g) * 0.2)
    grid = weight_grid(bits, w_symmetric)
    wq = Quantizer(grid, WeightObserver(grid, per_channel), channels=4)
    layer = QLayer(conv, wq, bn=bn, single_rounding=single_rounding)
    a = activation_grid(bits, a_signed)
    inp = qp(0.05, (a.qmin + a.qmax) // 3, a)
    out = qp(5.0 / (a.qmax - a.qmin), a.qmin + (a.qmax - a.qmin) * 2 // 5, a)
    op, = freeze_layer(layer, inp, out, (0.0, math.inf) if relu else (-math.inf, math.inf))
    q_in = torch.randint(a.qmin, a.qmax + 1, (2, in_channels, 8, 8), generator=g, dtype=torch.int32)
    return op, q_in


def reference(op, q_in):
    return ref_int_conv(q_in.numpy(), int(op.in_zero_point), op.w_q.numpy(), op.w_zero_point.numpy(),
                        op.b_q.numpy(), op.m0.numpy(), op.shift.numpy(), int(op.out_zero_point), op.act_min,
                        op.act_max, op.pad, op.stride[0], op.single_rounding)


@pytest.mark.parametrize("bits", [8, 5, 2])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("w_symmetric", [True, False])
@pytest.mark.parametrize("bn,relu,stride", [(False, True, 1), (True, True, 1), (False, False, 2), (True, False, 1)])
def test_integer_conv_equals_bruteforce_reference(bits, per_channel, w_symmetric, bn, relu, stride, random_bn):
    op, q_in = frozen_conv(bits, per_channel, w_symmetric, random_bn(4, torch.Generator().manual_seed(1)) if bn
                           else None, relu, stride)
    got = op(q_in)
    assert got.dtype == torch.int32
    assert np.array_equal(got.numpy(), reference(op, q_in))
    assert relu == (op.act_min == int(op.out_zero_point))              # a fused ReLU is a clamp at Z_out


@pytest.mark.parametrize("single_rounding", [False, True])
def test_int8_signed_activations_and_single_rounding_equal_the_reference(single_rounding):
    op, q_in = frozen_conv(8, per_channel=True, single_rounding=single_rounding, a_signed=True)
    assert q_in.min() < 0 and op.act_max == 127
    assert np.array_equal(op(q_in).numpy(), reference(op, q_in))


def test_asymmetric_same_padding_is_padded_with_real_zero():
    """TFLite's SAME padding with an even kernel or stride 2 puts the extra pixel on one side:
    explicit per-side padding, padded with Z_in."""
    op, q_in = frozen_conv(8, per_channel=True, padding=0)
    op.pad = (0, 1, 1, 0)                                          # left, right, top, bottom
    got = op(q_in)
    assert got.shape[-2:] == (7, 7)
    assert np.array_equal(got.numpy(), reference(op, q_in))


def test_max_pool_after_the_rescale_equals_the_pooled_reference(random_bn):
    from ops.pool import IntMaxPool
    op, q_in = frozen_conv(8, per_channel=True, bn=random_bn(4, torch.Generator().manual_seed(2)))
    pool = IntMaxPool(nn.MaxPool2d(2))
    assert np.array_equal(pool(op(q_in)).numpy(), ref_max_pool2(reference(op, q_in)))


@pytest.mark.parametrize("zero_point", [0, 100])
def test_float32_split_and_float64_accumulation_agree_bit_for_bit(zero_point):
    op, q_in = frozen_conv(8, per_channel=True)
    op.in_zero_point.fill_(zero_point)                 # negative and positive q_in - Z_in
    cpu = torch.device("cpu")
    assert op.exact_accumulations(cpu) == ["float32", "int8", "float64"]
    exact32 = op(q_in)
    assert np.array_equal(exact32.numpy(), reference(op, q_in))
    op._sum_bound = lambda: 2.0 ** 25                  # pretend the bound is larger: int8 GEMM or digit split
    assert op.exact_accumulations(cpu) == ["int8", "split", "float64"]
    assert all(torch.equal(op.accumulate(q_in, how), op.accumulate(q_in, "float32")) for how in ("int8", "split"))
    op._sum_bound = lambda: 2.0 ** 30                  # larger still: no split
    assert op.exact_accumulations(cpu) == ["int8", "float64"]
    assert torch.equal(op(q_in), exact32)


def test_split_accumulation_is_exact_where_float32_is_not():
    """Weights and inputs near the extremes, 256 input channels: sums far above 2^24, where a
    float32 conv rounds; the split into 16 hi + lo must still give the int64 sum."""
    g = torch.Generator().manual_seed(0)
    w_q = torch.randint(100, 128, (2, 256, 3, 3), generator=g, dtype=torch.int32)
    w_q[1].neg_()
    a = activation_grid(8)
    op = IntConv(w_q, torch.ones(2), torch.zeros(2, dtype=torch.long), torch.zeros(2), weight_grid(8),
                 padding=1, inp=qp(1.0, 3, a), out=qp(1.0, 0, a))
    assert op.exact_accumulations(torch.device("cpu")) == ["int8", "split", "float64"]
    q_in = torch.randint(0, 256, (2, 256, 5, 5), generator=g, dtype=torch.int32)
    q_in[0] = torch.randint(240, 256, (256, 5, 5), generator=g, dtype=torch.int32)
    acc = op.accumulate(q_in, "split")
    want = ref_int_conv(q_in.numpy(), 3, w_q.numpy(), np.zeros(2), np.zeros(2), [1 << 30] * 2, [1] * 2, 0,
                        -2 ** 40, 2 ** 40, (1, 1, 1, 1), 1)                  # M = 1: the accumulator itself
    assert np.abs(want).max() > 2 ** 24                               # float32 alone could not hold it
    assert np.array_equal(acc.numpy().astype(np.int64), want)


def test_integer_linear_equals_reference():
    g = torch.Generator().manual_seed(5)
    fc = nn.Linear(20, 6)
    fc.weight.data.copy_(torch.randn(6, 20, generator=g))
    fc.bias.data.copy_(torch.randn(6, generator=g))         # not torch's global RNG: the same case in any test order
    grid = weight_grid(6)
    layer = QLayer(fc, Quantizer(grid, WeightObserver(grid, True), channels=6))
    a = activation_grid(7)
    op, = freeze_layer(layer, qp(0.1, 11, a), qp(9 / 127, 56, a), (0.0, math.inf))
    q_in = torch.randint(0, 128, (5, 20), generator=g, dtype=torch.int32)
    acc = (q_in.long() - 11) @ (op.w_q.long() - op.w_zero_point[:, None]).T + op.b_q
    # LiteRT's reference FULLY_CONNECTED: one std::round of acc * M, M = S_in S_w / S_out in double
    m = [float(op.in_scale) * float(s) / float(op.out_scale) for s in op.w_scale]
    want = [[int(min(max(ref_round_half_away(float(v) * m[c]) + 56, 56), 127))
             for c, v in enumerate(row)] for row in acc.tolist()]
    assert op(q_in).tolist() == want


def test_reals_mode_follows_the_integer_path_within_one(random_bn):
    op, q_in = frozen_conv(8, per_channel=True, bn=random_bn(4, torch.Generator().manual_seed(3)))
    q_int = op(q_in)
    op.mode = "reals"
    x = (q_in.double() - op.in_zero_point) * op.in_scale.double()     # the same input, as reals
    q_fq = torch.round(op.double()(x) / op.out_scale).long() + op.out_zero_point
    diff = (q_fq - q_int.long()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99


def test_int32_overflow_is_detected():
    k = 70_000                                          # 70000 * 255 * 127 > 2^31
    a = activation_grid(8)
    with pytest.warns(UserWarning, match="exceeds int32"):
        op = IntConv(torch.full((1, k), 127, dtype=torch.int32), torch.ones(1), torch.zeros(1, dtype=torch.long),
                     torch.zeros(1), weight_grid(8), is_conv=False, inp=qp(1.0, 0, a), out=qp(1e9, 0, a))
    assert float(op.acc_bound) > 2 ** 31                # possible: every forward checks ...
    op(torch.ones(1, k, dtype=torch.int32))             # ... small inputs pass ...
    with pytest.raises(IntsimError, match="overflow"):
        op(torch.full((1, k), 255, dtype=torch.int32))  # ... a real overflow stops


def frozen_add(s1, z1, s2, z2, s_out, z_out, relu, bits=8):
    a = activation_grid(bits)
    return IntAdd(qp(s1, z1, a), qp(s2, z2, a), qp(s_out, z_out, a), (0.0, math.inf) if relu else (-math.inf, math.inf))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_integer_add_equals_tflite_reference_bit_for_bit(relu, bits):
    rnd = random.Random(bits + relu)
    qmin, qmax = 0, 2 ** bits - 1
    for trial in range(20):
        s1, s2 = rnd.uniform(0.001, 0.1), rnd.uniform(0.001, 0.1)
        z1, z2, z_out = rnd.randint(qmin, qmax), rnd.randint(qmin, qmax), rnd.randint(qmin, qmax)
        # trial 0..4: a narrow output range, so that many sums saturate at QMIN/QMAX
        s_out = rnd.uniform(0.001, 0.01) if trial < 5 else rnd.uniform(0.01, 0.2)
        add = frozen_add(s1, z1, s2, z2, s_out, z_out, relu, bits)
        f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))     # the scales as stored
        q1 = torch.randint(qmin, qmax + 1, (400,), dtype=torch.int32)
        q2 = torch.randint(qmin, qmax + 1, (400,), dtype=torch.int32)
        got = add(q1, q2).tolist()
        want = [ref_tflite_add(a, z1, f32(s1), b, z2, f32(s2), z_out, f32(s_out), qmin, qmax, relu)
                for a, b in zip(q1.tolist(), q2.tolist())]
        assert got == want
        if trial < 5:
            assert qmin in got or qmax in got or (relu and z_out in got)   # saturation exercised


def test_integer_add_follows_the_real_sum():
    add = frozen_add(0.05, 3, 0.02, 200, 0.06, 100, relu=False)
    q1, q2 = torch.arange(256, dtype=torch.int32), torch.arange(255, -1, -1, dtype=torch.int32)
    got = add(q1, q2).double()
    real = 0.05 * (q1.double() - 3) + float(add.in_scale2) * (q2.double() - 200)
    exact = torch.clamp(torch.round(real / float(add.out_scale)) + 100, 0, 255)
    assert (got - exact).abs().max() <= 1


def test_integer_mean_equals_reference():
    g = torch.Generator().manual_seed(0)
    a = activation_grid(8)
    s_in, s_out, z_out = 3 / 255, 2.5 / 255, 7
    mean = IntMean(49, qp(s_in, 5, a), qp(s_out, z_out, a))
    q = torch.randint(0, 256, (4, 6, 7, 7), generator=g, dtype=torch.int32)
    got = mean(q)
    assert got.shape == (4, 6, 1, 1)
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))
    want = [ref_mean(q[b, c].flatten().tolist(), 5, f32(s_in), f32(s_out), z_out, 0, 255)
            for b in range(4) for c in range(6)]
    assert got.flatten().tolist() == want
    with pytest.raises(IntsimError, match="frozen for 49 positions"):
        mean(q[:, :, :5, :5])


def test_relu6_and_standalone_relu_clamp_where_tflite_does():
    a = activation_grid(8)
    out = qp(0.05, 20, a)                                 # 6 / 0.05 = 120 steps above Z
    relu6 = IntClamp(out, (0.0, 6.0))
    assert (relu6.act_min, relu6.act_max) == (20, 140)
    q = torch.arange(256, dtype=torch.int32)
    assert torch.equal(relu6(q), q.clamp(20, 140))
    relu6.mode = "reals"
    x = (q.double() - 20) * 0.05
    assert torch.allclose(relu6(x), x.clamp(0.0, 6.0), atol=1e-12)   # the grid holds 0 and 6 exactly here


def test_weights_only_resnet18_saves_and_loads_with_its_float_mean(tmp_path, small_resnet18, quantize):
    """At A32 the global average pool stays a float QMean in the frozen graph: it must save too
    (a BRECQ/AdaRound ResNet18 W2A32 run failed at its end on this)."""
    from checkpoint import load_frozen, save_frozen
    from model import ModelConfig
    x = torch.randn(4, 1, 28, 28)
    qconfig = QConfig(w_bits=2, a_bits=32, per_channel=True)
    _, frozen = quantize(small_resnet18(), qconfig, x)
    assert any(type(m).__name__ == "QMean" for m in frozen.modules())
    save_frozen(tmp_path / "q.pt", frozen, qconfig, ModelConfig(arch="resnet18"), "fashion-mnist", "PTQ")
    again, _ = load_frozen(tmp_path / "q.pt", "fashion-mnist", "resnet18")
    assert torch.equal(set_mode(again, "reals")(x), set_mode(frozen, "reals")(x))


def test_frozen_model_saves_and_loads_without_the_float_network(tmp_path, trained_like, quantize):
    from checkpoint import load_frozen, save_frozen
    from model import ModelConfig
    x = torch.randn(32, 1, 28, 28)
    qconfig = QConfig(w_bits=4, a_bits=8, per_channel=True)
    _, frozen = quantize(trained_like("cnn_bn"), qconfig, x)
    before = set_mode(frozen, "int")(x)
    save_frozen(tmp_path / "q.pt", frozen, qconfig, ModelConfig(arch="cnn_bn", width=8), "fashion-mnist", "PTQ")
    again, ckpt = load_frozen(tmp_path / "q.pt", "fashion-mnist", "cnn_bn")
    assert ckpt["qconfig"]["w_bits"] == 4
    assert torch.equal(set_mode(again, "int")(x), before)
    assert torch.equal(output_integers(again, again(x)), output_integers(frozen, before))
    assert {"features.0.m0", "features.0.shift", "features.0.w_q", "features.0.b_q", "quant_in.out_scale",
            "dequant_out.in_scale"} <= set(again.state_dict())
    with pytest.raises(IntsimError, match="not a frozen quantized model"):
        torch.save({"quantized": True}, tmp_path / "old.pt")
        load_frozen(tmp_path / "old.pt")


@pytest.mark.parametrize("per_channel", [True, False])
def test_a_bias_too_large_for_its_scale_raises_the_weight_scale_as_tflite_does(per_channel):
    """BN folding leaves channels of almost-zero weights: S_w tiny, and b / (S_in S_w) beyond
    int32. TFLite's converter raises such a channel's S_w (AdjustWeightsForBiasScale); freeze
    does the same, and the rest of the layer is untouched."""
    from ops.conv import adjust_weight_scale
    from reference import ref_adjust_weights_for_bias_scale
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
        conv.weight[1 if per_channel else slice(None)] *= 1e-7   # weights near 0 (per tensor: all), normal biases
        conv.bias.copy_(torch.tensor([0.1, 2.0, -0.3, 0.05]))
    grid = weight_grid(8)
    layer = QLayer(conv, Quantizer(grid, WeightObserver(grid, per_channel), channels=4))
    a = activation_grid(8)
    inp, out = qp(0.02, 3, a), qp(0.05, 120, a)
    op, = freeze_layer(layer, inp, out, (-math.inf, math.inf))
    layer.w_quantizer.fit(conv.weight)
    before = layer.w_quantizer.qparams()[0]
    want = ref_adjust_weights_for_bias_scale(conv.bias.tolist(), 0.02, before.tolist() if per_channel else [float(before[0])])
    assert op.w_scale.tolist() == (want if per_channel else want * 4)
    assert op.bias_scale_adjusted == (1 if per_channel else 4)
    assert op.b_q.abs().max() < 2 ** 30 * 1.0001      # about the middle of int32 (the float32 S_w rounds)
    if per_channel:                                                # the other channels as they were
        assert torch.equal(op.w_scale[[0, 2, 3]], before[[0, 2, 3]])
    scales, changed = adjust_weight_scale(conv.bias, torch.tensor([0.02]), before * 1e6, grid)
    assert not changed.any()                                       # nothing to do where the bias fits
    q_in = torch.randint(0, 256, (2, 3, 6, 6), generator=g, dtype=torch.int32)
    assert np.array_equal(op(q_in).numpy(), reference(op, q_in))  # and the integer conv stays exact


@pytest.mark.parametrize("signed", [True, False])
def test_hard_swish_logistic_and_mul_equal_tflites_reference_integer_by_integer(signed):
    """Every input integer through HARD_SWISH and LOGISTIC, and random pairs through MUL, for
    random scales and zero points, against plain-Python transcriptions of TFLite's kernels."""
    from ops.hardswish import IntHardSwish
    from ops.logistic import IntLogistic
    from ops.mul import IntMul
    from reference import ref_hard_swish, ref_logistic_table, ref_mul
    rng = random.Random(7 + signed)
    a = activation_grid(8, signed)
    q = torch.arange(a.qmin, a.qmax + 1, dtype=torch.int32)
    for _ in range(20):
        s_in, s_out = rng.uniform(0.005, 0.2), rng.uniform(0.005, 0.2)
        z_in, z_out = rng.randint(a.qmin, a.qmax), rng.randint(a.qmin, a.qmax)
        op = IntHardSwish(qp(s_in, z_in, a), qp(s_out, z_out, a))
        if op.e_out > 0:
            continue                           # TFLite's Prepare refuses that output scale
        assert op(q).tolist() == ref_hard_swish(q.tolist(), s_in, z_in, s_out, z_out, a.qmin, a.qmax)
        fixed = qp(1 / 256, a.qmin, a)
        assert IntLogistic(qp(s_in, z_in, a), fixed)(q).tolist() == \
            ref_logistic_table(s_in, z_in, 1 / 256, a.qmin, a.qmin, a.qmax)
        q2 = torch.randint(a.qmin, a.qmax + 1, q.shape, dtype=torch.int32)
        s2, z2 = rng.uniform(0.005, 0.2), rng.randint(a.qmin, a.qmax)
        got = IntMul(qp(s_in, z_in, a), qp(s2, z2, a), qp(s_out, z_out, a))(q, q2).tolist()
        assert got == ref_mul(q.tolist(), z_in, s_in, q2.tolist(), z2, s2, z_out, s_out, a.qmin, a.qmax)
