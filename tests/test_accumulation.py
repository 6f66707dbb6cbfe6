"""The exact accumulations of IntConv (float32, the int8 GEMM, the digit split, float64) against the
int64 sum of products, on the bounds and operand ranges where the choice switches: sums above
2^24, uint8 inputs shifted by 128 (the zero-point term folded in), int8 and 4-bit inputs, padding
with Z_in, strides, 1x1 and k x k convs, linear layers on 2-D and 4-D inputs."""
import numpy as np
import pytest
import torch

from function import activation_grid, weight_grid
from ops.base import QParams
from ops.conv import IntConv

CPU = torch.device("cpu")


def qp(scale, zero_point, grid):
    return QParams(torch.tensor([scale], dtype=torch.float32), torch.tensor([zero_point]), grid)


def int64_sum(op, q_in):
    """sum_k (q_in - Z_in)(q_w - Z_w) in int64 (NumPy), the input padded with real 0."""
    x = q_in.numpy().astype(np.int64) - int(op.in_zero_point)
    w = op.w_q.numpy().astype(np.int64) - op.w_zero_point.numpy().reshape(-1, *([1] * (op.w_q.dim() - 1)))
    if not op.is_conv:
        return x @ w.T
    left, right, top, bottom = op.pad
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    kh, kw = w.shape[2:]
    sh, sw = op.stride
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    return np.einsum("bchwij,ocij->bohw", windows, w)


def layer(kind, a_bits, a_signed, z_in, w_asymmetric=False, big=False, seed=0, stride=1, pad=1):
    """A frozen layer whose weights sit at the grid's ends when `big` (sums above 2^24) and its input."""
    g = torch.Generator().manual_seed(seed)
    grid = weight_grid(8, symmetric=not w_asymmetric)
    lo, hi = (100, grid.qmax) if big else (grid.qmin, grid.qmax)
    channels = (288 if kind == "conv3" else 2400) if big else 5
    shape = (4, channels, 3, 3) if kind == "conv3" else (4, channels, 1, 1) if kind == "conv1" else (4, channels)
    w_q = torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int32)
    if big:
        w_q[1::2].neg_()
    z_w = torch.randint(-20, 21, (4,), generator=g) if w_asymmetric else torch.zeros(4, dtype=torch.long)
    a = activation_grid(a_bits, a_signed)
    op = IntConv(w_q, torch.full((4,), 0.01), z_w, torch.zeros(4), grid, is_conv=kind != "linear", stride=stride,
                 padding=pad if kind == "conv3" else 0, inp=qp(0.02, z_in, a), out=qp(1.0, 0, a))
    size = (3, channels, 7, 6) if kind != "linear" else (3, channels)
    q_in = torch.randint(a.qmin, a.qmax + 1, size, generator=g, dtype=torch.int32)
    if big:
        q_in[0] = a.qmax                               # the largest sums
    return op, q_in


def test_a_large_bias_does_not_move_the_sum_off_float32():
    """The int32 bias is added after the sum, in int64: a bias far above 2^24 (as in EfficientNet-Lite0's
    depthwise layers, 9 taps a sum) leaves a small sum on the float32 kernel, and the output is the
    reference's (a 3x3 conv of one input channel)."""
    from reference import ref_int_conv
    g = torch.Generator().manual_seed(4)
    grid, a = weight_grid(8), activation_grid(8)
    w_q = torch.randint(-127, 128, (4, 1, 3, 3), generator=g, dtype=torch.int32)
    bias = torch.tensor([2 ** 25 + 1, -2 ** 25 - 3, 2 ** 26 + 5, 0])                  # q_b, int32
    op = IntConv(w_q, torch.full((4,), 0.01), torch.zeros(4, dtype=torch.long), bias, grid, is_conv=True,
                 padding=1, inp=qp(0.02, 128, a), out=qp(0.0256, 3, a))
    assert op.b_q.abs().max() > 2 ** 24 and float(op.acc_bound) > 2 ** 24
    assert op.exact_accumulations(CPU)[0] == "float32"
    q_in = torch.randint(0, 256, (2, 1, 6, 5), generator=g, dtype=torch.int32)
    want = ref_int_conv(q_in.numpy(), 128, w_q.numpy(), np.zeros(4, dtype=np.int64), op.b_q.numpy(),
                        op.m0.numpy(), op.shift.numpy(), 3, op.act_min, op.act_max, (1, 1, 1, 1), 1)
    assert np.array_equal(op(q_in).numpy(), want)
    assert set(want.flatten()) - {0, 255}                                 # not every output saturated


CASES = [("conv3", 8, False, 0), ("conv3", 8, False, 131), ("conv3", 8, False, 255), ("conv3", 8, True, -128),
         ("conv3", 8, True, 17), ("conv3", 4, False, 3), ("conv1", 8, False, 77), ("linear", 8, False, 200),
         ("linear", 8, True, -5)]


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("kind,a_bits,a_signed,z_in", CASES)
def test_every_exact_accumulation_gives_the_int64_sum(kind, a_bits, a_signed, z_in, big):
    op, q_in = layer(kind, a_bits, a_signed, z_in, big=big)
    want = int64_sum(op, q_in)
    kernels = op.exact_accumulations(CPU)
    assert "int8" in kernels and kernels[-1] == "float64"
    sum_bound = np.abs(op.w_q.numpy().astype(np.int64)).reshape(4, -1).sum(1).max() * max(
        op.in_qmax - z_in, z_in - op.in_qmin)                        # symmetric weights: Z_w = 0
    assert ("float32" in kernels) == (sum_bound < 2 ** 24)
    assert (np.abs(want).max() > 2 ** 24) == (big and a_bits == 8)       # beyond float32's exact integers
    for how in kernels:
        got = op.accumulate(q_in, how)
        assert np.array_equal(got.numpy().astype(np.int64), want), how
    assert np.array_equal(op.accumulate(q_in).numpy().astype(np.int64), want)      # the measured choice
    assert op.accumulation(CPU, q_in.shape) in kernels


@pytest.mark.parametrize("stride,pad", [(2, 1), (1, 0), (2, 0)])
def test_the_int8_gemm_strides_and_pads_as_the_conv_does(stride, pad):
    op, q_in = layer("conv3", 8, False, 201, stride=stride, pad=pad, seed=3)
    op.pad = (pad, 0, 0, pad) if pad else op.pad                     # uneven padding (left, right, top, bottom)
    assert np.array_equal(op.accumulate(q_in, "int8").numpy().astype(np.int64), int64_sum(op, q_in))


def test_a_linear_layer_on_a_4d_tensor_accumulates_over_its_last_dim():
    op, _ = layer("linear", 8, False, 90)
    q_in = torch.randint(0, 256, (2, 3, 4, 5), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    want = int64_sum(op, q_in.reshape(-1, 5)).reshape(2, 3, 4, 4)
    for how in op.exact_accumulations(CPU):
        assert np.array_equal(op.accumulate(q_in, how).numpy().astype(np.int64), want), how


def test_the_int8_gemm_is_not_offered_where_its_operands_leave_int8():
    """Asymmetric 8-bit weights (q_w - Z_w up to 255 - (-20)), a dilated conv, a grouped conv."""
    op, _ = layer("conv3", 8, False, 0, w_asymmetric=True)
    op.w_q[0, 0, 0, 0], op.w_zero_point[0] = 127, -20
    assert "int8" not in op.exact_accumulations(CPU)
    op, _ = layer("conv3", 8, False, 0)
    op.dilation = (2, 2)
    assert "int8" not in op.exact_accumulations(CPU)
    op, _ = layer("conv3", 8, False, 0)
    op.groups = 5
    assert "int8" not in op.exact_accumulations(CPU)


@pytest.mark.parametrize("kind", ["add", "mul"])
@pytest.mark.parametrize("signed1,signed2,bits", [(False, False, 8), (True, True, 8), (False, True, 8), (False, False, 4)])
@pytest.mark.parametrize("constant", [None, 7])
def test_add_and_mul_look_up_what_their_kernel_computes(kind, signed1, signed2, bits, constant):
    """The table over every pair of input integers (ops.binary.Tabulated) gives the kernel's own
    integers, on broadcasting shapes and with a constant operand."""
    from ops.add import IntAdd
    from ops.mul import IntMul
    g = torch.Generator().manual_seed(bits + 2 * signed1 + signed2)
    a1, a2, out = activation_grid(bits, signed1), activation_grid(bits, signed2), activation_grid(8, True)
    in1, in2 = qp(0.031, (a1.qmin + a1.qmax) // 2 + 3, a1), qp(0.047, a2.qmin + 5, a2)
    q1 = torch.randint(a1.qmin, a1.qmax + 1, (3, 4, 5, 6), generator=g, dtype=torch.int32)
    q2 = None if constant is not None else torch.randint(a2.qmin, a2.qmax + 1, (3, 4, 1, 1), generator=g, dtype=torch.int32)
    x1, x2 = 0.031 * (q1 - in1.zero_point), 0.047 * ((torch.tensor(constant) if q2 is None else q2) - in2.zero_point)
    s_out = float((x1 + x2 if kind == "add" else x1 * x2).abs().max()) / 100        # the results spread over the grid
    op = (IntAdd if kind == "add" else IntMul)(in1, in2, qp(s_out, -4, out), constant=constant)
    looked_up = op.int_forward(q1, q2)
    assert op._lut is not None and len(op._lut) == (a1.qmax - a1.qmin + 1) * (1 if constant is not None else a2.qmax - a2.qmin + 1)
    assert looked_up.dtype == torch.int32 and torch.equal(looked_up, op.direct(q1, q2))
    assert len(torch.unique(looked_up)) > 5
