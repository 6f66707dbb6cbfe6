"""Frozen integer ops, shaped like TFLite's kernels. Each is built from integers and the
quantization parameters (S, Z, grid) of its tensors alone, computes what TFLite's Prepare
computes once (multipliers M0 and shifts, activation clamps, the accumulator bound) and then
only runs them (TFLite's Eval). `model.freeze` builds a graph of them; `checkpoint.save_frozen`
saves it and loads it back without the float network.

Two modes (`set_mode`):
  "int"    int32 tensors in, int32 tensors out: integer inference.
  "reals"  the same integers as reals, S (q - Z), computed in the input's float dtype. In
           float64 this rounds like exact arithmetic: it is the frozen model's fake-quant, the
           reference the integer path is compared with.

Every op's output goes through the same epilogue: rescale (the kernel is chosen in
function.rescale) -> + Z_out -> clamp to [act_min, act_max], the output grid intersected with
the fused activation's range (ReLU: [Z_out, QMAX]; ReLU6: [Z_out, Z_out + round(6 / S_out)]).
"""
import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from errors import IntsimError
from function import (INT32_MAX, INT_MAX_BITS, Grid, check_finite, dequantize, fake_quantize, int32_check,
                      quantize, integers_of, quantize_multiplier, requantize, requantize_in_double, rescale, round_half_away,
                      to_grid)

FLOAT32_EXACT = 2 ** 24   # every integer of magnitude <= 2^24 is exact in float32
SPLIT_BASE = 16           # digit base of the split accumulation (IntConv.accumulation)
ADD_LEFT_SHIFT = 20       # TFLite's ADD: inputs (q - Z) are scaled by 2^20 before the rescale (8-bit kernels)
NO_ACTIVATION = (-math.inf, math.inf)
SCALE_PRODUCTS = ("double", "float32")


class QParams(NamedTuple):
    """How a tensor's integers stand for reals: r = S (q - Z), q on `grid`."""
    scale: torch.Tensor          # (1,) float32
    zero_point: torch.Tensor     # (1,) int64
    grid: Grid


def _round_away(v):
    return math.copysign(math.floor(abs(v) + 0.5), v)


def activation_bounds(out, act_range):
    """(act_min, act_max): the output grid intersected with a fused activation's real range
    (TFLite's CalculateActivationRangeQuantized: Z + round(r / S), in float32 as TFLite does)."""
    lo, hi = act_range
    z, s = int(out.zero_point), out.scale.float()
    to_q = lambda r: z + int(_round_away(float(torch.tensor(r, dtype=torch.float32) / s)))
    act_min = out.grid.qmin if lo == -math.inf else max(out.grid.qmin, to_q(lo))
    act_max = out.grid.qmax if hi == math.inf else min(out.grid.qmax, to_q(hi))
    return act_min, act_max


def real_epilogue(y, scale, zero_point, act_min, act_max):
    """The reals form of + Z_out and the clamp: S (clamp(round(y / S) + Z, act_min, act_max) - Z)."""
    return (to_grid(round_half_away(y / scale), zero_point, act_min, act_max) - zero_point) * scale


def per_channel(t, x):
    """(C,) -> (C, 1, ..., 1), broadcasting along the first dimension of x."""
    return t.reshape((-1,) + (1,) * (x.dim() - 1))


class FrozenOp(nn.Module):
    """Base of the frozen ops. CONFIG names the plain settings (ints, floats, strings, tuples)
    that, with the buffers, describe the op completely: what is saved and loaded."""
    CONFIG = ()
    out_signed = False        # the output grid's signedness (a model saved before it was kept: unsigned)

    def __init__(self):
        super().__init__()
        self.mode = "int"
        self.layer_name = type(self).__name__     # the graph's name for it, once it is in one (errors say it)

    def forward(self, *x):
        with torch.no_grad():
            return self.int_forward(*x) if self.mode == "int" else self.real_forward(*x)

    def config(self):
        return {k: getattr(self, k) for k in self.CONFIG}

    @classmethod
    def empty(cls, config, buffers):
        """An op with `config` and zero buffers of the given {name: (shape, dtype)}, for load_state_dict."""
        op = cls.__new__(cls)
        FrozenOp.__init__(op)
        for k, v in config.items():
            setattr(op, k, tuple(v) if isinstance(v, list) else v)
        for name, (shape, dtype) in buffers.items():
            op.register_buffer(name, torch.zeros(shape, dtype=getattr(torch, dtype)))
        return op

    def _set_out(self, out, act_range=NO_ACTIVATION):
        self.register_buffer("out_scale", out.scale.detach().clone().float())
        self.register_buffer("out_zero_point", out.zero_point.detach().clone().long())
        self.out_bits, self.out_signed = out.grid.bits, out.grid.signed
        self.act_min, self.act_max = activation_bounds(out, act_range)

    def _set_in(self, inp, suffix=""):
        self.register_buffer(f"in_scale{suffix}", inp.scale.detach().clone().float())
        self.register_buffer(f"in_zero_point{suffix}", inp.zero_point.detach().clone().long())

    def out_qparams(self):
        return self.out_scale, self.out_zero_point

    def out_params(self):
        """The output tensor's QParams: S, Z and its grid."""
        return QParams(self.out_scale, self.out_zero_point, Grid(self.out_bits, signed=self.out_signed))

    def _real_out(self, y):
        return real_epilogue(y, self.out_scale, self.out_zero_point, self.act_min, self.act_max)

    def _int_out(self, acc, m0, shift):
        # acc is bounded already: IntConv by its acc_bound, ADD and MEAN by their construction
        return requantize(acc, m0, shift, self.out_zero_point.to(acc.device), self.act_min, self.act_max,
                          self.single_rounding, check=False).to(torch.int32)


class Quantize(FrozenOp):
    """The model's input (TFLite's QUANTIZE): q = clamp(round(x / S) + Z, QMIN, QMAX)."""
    CONFIG = ("act_min", "act_max", "out_bits", "out_signed")
    integer = True

    def __init__(self, out):
        super().__init__()
        self._set_out(out)

    def int_forward(self, x):
        return quantize(x, self.out_scale, self.out_zero_point, self.act_min, self.act_max)

    def real_forward(self, x):
        check_finite(x)
        return fake_quantize(x, self.out_scale, self.out_zero_point, self.act_min, self.act_max)



class Dequantize(FrozenOp):
    """The model's output (TFLite's DEQUANTIZE): r = S (q - Z)."""
    integer = True

    def __init__(self, inp):
        super().__init__()
        self._set_in(inp)

    def int_forward(self, q):
        return dequantize(q, self.in_scale, self.in_zero_point)

    def real_forward(self, x):
        return x

    def in_qparams(self):
        return self.in_scale, self.in_zero_point


class IntConv(FrozenOp):
    """CONV_2D (with groups: DEPTHWISE_CONV_2D) or FULLY_CONNECTED (Jacob et al. 2018, eq. 7):
        acc[c]  = sum (q_in - Z_in)(q_w[c] - Z_w[c]) + q_b[c]                    int32, exact
        q_out   = clamp(rescale(acc, M0[c], shift[c]) + Z_out, act_min, act_max)
    with M[c] = S_in S_w[c] / S_out = M0[c] 2^(shift[c] - 31) (TFLite's QuantizeMultiplier).
    `pad` is explicit per side, (left, right, top, bottom), padded with real 0 (q = Z_in).
    `scale_product` is how M is computed (TFLite's kernel_util.cc): "double", S_in S_w[c] / S_out
    in double (its per-channel rule); "float32", the product S_in S_w rounded to float32 first,
    then divided in double (its per-tensor rule, GetQuantizedConvolutionMultipler: uint8 models).
    `rescale_in_double` replaces the fixed-point rescale by one rounding of acc * M in double,
    as LiteRT's reference FULLY_CONNECTED does (function.requantize_in_double).
    Without `inp`/`out` (float activations) only the weights are integers, the bias is real,
    and there is no integer mode."""
    CONFIG = ("is_conv", "stride", "pad", "dilation", "groups", "w_bits", "in_qmin", "in_qmax", "in_bits",
              "out_bits", "out_signed", "act_min", "act_max", "single_rounding", "has_int_io", "pool_first",
              "scale_product", "rescale_in_double")
    scale_product, rescale_in_double = "double", False     # the values of a model saved before the choices

    def __init__(self, w_q, w_scale, w_zero_point, bias, grid, is_conv=True, stride=1, padding=0, dilation=1,
                 groups=1, inp=None, out=None, act_range=NO_ACTIVATION, single_rounding=False,
                 scale_product="double", rescale_in_double=False):
        super().__init__()
        if scale_product not in SCALE_PRODUCTS:
            raise IntsimError(f"unknown scale product {scale_product!r}; use one of {SCALE_PRODUCTS}")
        self.is_conv, self.groups, self.single_rounding = is_conv, groups, single_rounding
        self.scale_product, self.rescale_in_double = scale_product, rescale_in_double
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.pad = _explicit_padding(padding, w_q.shape[2:], self.dilation) if is_conv else (0, 0, 0, 0)
        self.w_bits, self.has_int_io = grid.bits, inp is not None
        self.pool_first = None    # see IntMaxPool.run_by_producer
        self.register_buffer("w_q", w_q.to(torch.int32))
        self.register_buffer("w_scale", w_scale.detach().clone().float())
        self.register_buffer("w_zero_point", w_zero_point.detach().clone().long())
        self.in_qmin = self.in_qmax = self.in_bits = self.out_bits = self.act_min = self.act_max = None
        if inp is None:
            self.register_buffer("bias", bias.detach().clone().float())      # the real bias
            return
        self.register_buffer("b_q", bias.detach().clone().long())          # int32 values
        self._set_in(inp)
        self._set_out(out, act_range)
        self.in_qmin, self.in_qmax, self.in_bits = inp.grid.qmin, inp.grid.qmax, inp.grid.bits
        # Prepare: M[c] = S_in S_w[c] / S_out, and the worst case |acc| over the input range:
        # sum_k |q_w - Z_w| * max|q_in - Z_in| + |q_b| (it decides the exact accumulation).
        m_double = inp.scale.double() * self.w_scale.double() / out.scale.double()
        if scale_product == "float32":
            m0, shift = quantize_multiplier((inp.scale.float() * self.w_scale.float()).double() / out.scale.double())
        else:
            m0, shift = quantize_multiplier(m_double)
        self.register_buffer("m0", m0)
        self.register_buffer("shift", shift)
        if rescale_in_double:
            self.register_buffer("m_real", m_double)
        w_l1 = (self.w_q.long() - per_channel(self.w_zero_point, self.w_q)).abs().reshape(len(self.w_q), -1).sum(1)
        self.register_buffer("acc_bound", (w_l1 * self._in_abs_max() + self.b_q.abs()).max().double())
        if float(self.acc_bound) > INT32_MAX and self.integer:
            warnings.warn(f"a {'conv' if is_conv else 'linear'} layer's worst-case accumulator exceeds int32; "
                          f"each integer forward checks for overflow")

    @property
    def integer(self):
        return self.has_int_io and max(self.w_bits, self.in_bits, self.out_bits) <= INT_MAX_BITS

    @property
    def depthwise(self):
        """DEPTHWISE_CONV_2D: one group per input channel (any channel multiplier)."""
        return self.is_conv and self.groups > 1 and self.w_q.shape[1] == 1

    def extra_repr(self):
        kind = "conv" if self.is_conv else "linear"
        io = f", act [{self.act_min}, {self.act_max}]" if self.has_int_io else ", float activations"
        return f"{kind} {tuple(self.w_q.shape)}, W{self.w_bits}{io}"

    def fn(self, x, w, b=None):
        if not self.is_conv:
            return F.linear(x, w, b)
        left, right, top, bottom = self.pad
        if left == right and top == bottom:          # as the float conv pads (same kernels, same rounding)
            return F.conv2d(x, w, b, self.stride, (top, left), self.dilation, self.groups)
        return F.conv2d(F.pad(x, self.pad), w, b, self.stride, 0, self.dilation, self.groups)

    def real_weight(self, dtype):
        """S_w (q_w - Z_w) in `dtype`."""
        return per_channel(self.w_scale, self.w_q) * (self.w_q - per_channel(self.w_zero_point, self.w_q)).to(dtype)

    def _pool(self, acc):
        return F.max_pool2d(acc, *self.pool_first) if self.pool_first else acc

    def real_forward(self, x):
        if not self.has_int_io:
            return self.fn(x, self.real_weight(x.dtype), self.bias.to(x.dtype))
        y = self.fn(x, self.real_weight(x.dtype), self.b_q.to(x.dtype) * (self.in_scale * self.w_scale))
        return self._real_out(self._pool(y))

    def _in_abs_max(self):
        """max |q_in - Z_in| over the input's integer range."""
        z = int(self.in_zero_point)
        return max(self.in_qmax - z, z - self.in_qmin)

    def accumulation(self, device):
        """How the conv/matmul is made exact (then rounded to int64):
        "float32": every partial sum stays below 2^24 (acc_bound proves it);
        "split":   q_in - Z_in = SPLIT_BASE hi + lo with lo in [0, SPLIT_BASE), and both digit
                   convs stay below 2^24 in float32: acc = SPLIT_BASE conv(hi) + conv(lo), combined
                   in float64. Two float32 convs cost less than one float64 conv on CPU;
        "float64": exact far beyond int32 (always on CUDA, whose float32 convs may use TF32)."""
        if device.type != "cpu":
            return "float64"
        bound = float(self.acc_bound)
        if bound < FLOAT32_EXACT:
            return "float32"
        a_max = self._in_abs_max()
        w_l1 = bound / max(a_max, 1)                               # >= max_c sum |q_w - Z_w|
        digit_max = max(SPLIT_BASE - 1, -(-a_max // SPLIT_BASE))   # |lo| <= 15, |hi| <= ceil(a_max / 16)
        return "split" if w_l1 * digit_max < FLOAT32_EXACT else "float64"

    def accumulate(self, q_in):
        """sum_k (q_w - Z_w)(q_in - Z_in) for every output, exact (integers held in float32 or
        float64, by `accumulation`)."""
        how = self.accumulation(q_in.device)
        dtype = torch.float64 if how == "float64" else torch.float32
        x = q_in.to(dtype)
        x -= float(self.in_zero_point)                            # (q_in - Z_in); zero padding is real 0
        w = (self.w_q.long() - per_channel(self.w_zero_point, self.w_q)).to(dtype)
        with torch.backends.nnpack.flags(enabled=False):           # NNPACK uses inexact Winograd/FFT
            if how != "split":
                return self.fn(x, w)
            hi = torch.div(x, SPLIT_BASE, rounding_mode="floor")
            x -= hi * SPLIT_BASE                                   # lo; one conv over both digit planes
            hi_lo = self.fn(torch.cat([hi, x]), w).double()
            return hi_lo[:len(x)].mul_(SPLIT_BASE).add_(hi_lo[len(x):])

    def int_forward(self, q_in):
        if not self.has_int_io:
            raise IntsimError("integer inference needs integer activations: with --a-bits 32 the "
                              "model runs in fake-quant only")
        acc = self._pool(self.accumulate(q_in))
        channels = (-1,) + (1,) * (acc.dim() - 2)
        acc += self.b_q.to(acc.dtype).reshape(channels)             # exact: acc_bound counts |q_b| too
        if acc.device.type != "cpu":
            acc.round_()                                           # undo any sub-0.5 error of GPU kernels
        acc = acc.to(torch.int64)
        if float(self.acc_bound) > INT32_MAX:
            int32_check(acc, self.layer_name)
        if self.rescale_in_double:
            return requantize_in_double(acc, self.m_real.reshape(channels), self.out_zero_point.to(acc.device),
                                        self.act_min, self.act_max).to(torch.int32)
        return self._int_out(acc, self.m0.reshape(channels), self.shift.reshape(channels))


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _explicit_padding(padding, kernel, dilation):
    """nn.Conv2d's padding (ints, or "valid" / "same") as (left, right, top, bottom); a 4-tuple
    is that already."""
    if isinstance(padding, (tuple, list)) and len(padding) == 4:
        return tuple(padding)
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":                  # PyTorch puts the odd pixel on the right and bottom
        (th, tw) = (d * (k - 1) for d, k in zip(dilation, kernel))
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = _pair(padding)
    return (pw, pw, ph, ph)


class FloatLayer(FrozenOp):
    """A conv or linear layer left in float (quantize_layers "first"), BN folded in."""
    CONFIG = ("is_conv", "stride", "padding", "dilation", "groups")
    integer = False

    def __init__(self, weight, bias, is_conv=True, stride=1, padding=0, dilation=1, groups=1):
        super().__init__()
        self.is_conv, self.stride, self.padding, self.dilation, self.groups = is_conv, stride, padding, dilation, groups
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())

    def real_forward(self, x):
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if not self.is_conv:
            return F.linear(x, w, b)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    int_forward = real_forward


class IntAdd(FrozenOp):
    """Elementwise add of two quantized tensors (ResNet's residual), TFLite's ADD kernel
    (reference_ops::Add; S1, S2 inputs, S_out output):
        twice_max = 2 max(S1, S2)
        a_i       = rescale((q_i - Z_i) 2^20, S_i / twice_max)                       i = 1, 2
        q_out     = clamp(rescale(a_1 + a_2, twice_max / (2^20 S_out)) + Z_out, act_min, act_max)
    The 2^20 keeps 20 fractional bits through the input rescale, so the two inputs meet on a
    common fine grid."""
    CONFIG = ("act_min", "act_max", "out_bits", "out_signed", "single_rounding")
    integer = True

    def __init__(self, in1, in2, out, act_range=NO_ACTIVATION, single_rounding=False):
        super().__init__()
        self.single_rounding = single_rounding
        self._set_in(in1, "1")
        self._set_in(in2, "2")
        self._set_out(out, act_range)
        s1, s2 = self.in_scale1.double(), self.in_scale2.double()
        twice_max = 2 * torch.maximum(s1, s2)
        for name, real in (("1", s1 / twice_max), ("2", s2 / twice_max),
                           ("_out", twice_max / (2 ** ADD_LEFT_SHIFT * self.out_scale.double()))):
            m0, shift = quantize_multiplier(real)
            self.register_buffer(f"m{name}", m0)
            self.register_buffer(f"shift{name}", shift)

    def real_forward(self, x1, x2):
        return self._real_out(x1 + x2)

    def int_forward(self, q1, q2):
        a1 = rescale((q1.long() - self.in_zero_point1) << ADD_LEFT_SHIFT, self.m1, self.shift1, self.single_rounding)
        a2 = rescale((q2.long() - self.in_zero_point2) << ADD_LEFT_SHIFT, self.m2, self.shift2, self.single_rounding)
        return self._int_out(a1 + a2, self.m_out, self.shift_out)


class IntMean(FrozenOp):
    """Global average pooling over (H, W), TFLite's quantized MEAN with the output on its own scale:
        acc   = sum_{h,w} (q_in - Z_in)                                                int32
        q_out = clamp(rescale(acc, S_in / (H W S_out)) + Z_out, QMIN, QMAX)
    for the window H W it was frozen with (another size is refused).

    `tflite_fold` computes the multiplier as LiteRT's reference MEAN does (QuantizedMeanOrSum):
    M0, shift of S_in / S_out, then 1/N folded in as M0' = (M0 << k) / N (C's integer division),
    shift' = shift - k, k = min(floor(log2 N), 32, 31 + shift). Equal to the above when N is a
    power of two; for 7x7 a few outputs in 10^3 differ by one."""
    CONFIG = ("count", "keepdim", "act_min", "act_max", "out_bits", "out_signed", "single_rounding", "tflite_fold")
    integer = True
    tflite_fold = False      # a model saved before the choice

    def __init__(self, count, inp, out, keepdim=True, single_rounding=False, tflite_fold=False):
        super().__init__()
        if count == 0:
            raise IntsimError("average pooling saw no input: calibrate the model before freezing it")
        self.count, self.keepdim, self.single_rounding, self.tflite_fold = count, keepdim, single_rounding, tflite_fold
        self._set_in(inp)
        self._set_out(out)
        if tflite_fold:
            m0, shift = quantize_multiplier(self.in_scale.double() / self.out_scale.double())
            k = torch.clamp(torch.clamp(torch.tensor(count.bit_length() - 1), max=32), max=31 + shift)
            m0, shift = torch.div(m0 << k, count, rounding_mode="trunc"), shift - k
        else:
            m0, shift = quantize_multiplier(self.in_scale.double() / (count * self.out_scale.double()))
        self.register_buffer("m0", m0)
        self.register_buffer("shift", shift)

    def real_forward(self, x):
        return self._real_out(x.mean((-2, -1), keepdim=self.keepdim))

    def int_forward(self, q):
        if q.shape[-1] * q.shape[-2] != self.count:
            raise IntsimError(f"average pooling was frozen for {self.count} positions, got "
                              f"{q.shape[-2]}x{q.shape[-1]}: use the image size it was calibrated on")
        acc = (q.long() - self.in_zero_point).sum((-2, -1), keepdim=self.keepdim)
        return self._int_out(acc, self.m0, self.shift)


class IntAvgPool(FrozenOp):
    """AVERAGE_POOL_2D. The output keeps the input's S and Z (TFLite's kernel has no rescale),
    so it averages the integers themselves:
        acc   = sum of q_in over the window's positions inside the input (padding not counted)
        q_out = clamp(acc / count, act_min, act_max), the division rounding half up,
                (acc + count / 2) / count, for uint8 and half away from zero for int8
                (reference_ops::AveragePool and reference_integer_ops::AveragePool; C's
                truncating division).
    `pad` is explicit per side, (left, right, top, bottom), as TFLite's SAME padding needs."""
    CONFIG = ("kernel_size", "stride", "pad", "act_min", "act_max", "out_bits", "out_signed", "signed")
    integer = True

    def __init__(self, kernel_size, stride, pad, inp, act_range=NO_ACTIVATION):
        super().__init__()
        self.kernel_size, self.stride, self.pad = _pair(kernel_size), _pair(stride), tuple(pad)
        if self.kernel_size[0] * self.kernel_size[1] * 2 ** 8 > FLOAT32_EXACT:    # |q| <= 2^8 per term
            raise IntsimError(f"average pool window {self.kernel_size} is too large for an exact sum")
        self.signed = inp.grid.signed
        self._set_out(inp, act_range)

    def _sums(self, x):
        """(window sums, in-bounds counts), in x's dtype: exact, the values being small integers."""
        ones = torch.ones_like(x[:1, :1])
        pool = lambda t: F.avg_pool2d(F.pad(t, self.pad), self.kernel_size, self.stride, divisor_override=1)
        return pool(x), pool(ones)

    def real_forward(self, x):
        total, count = self._sums(x)
        return self._real_out(total / count)

    def int_forward(self, q):
        total, count = self._sums(q.to(torch.float32))
        acc, count = total.to(torch.int64), count.to(torch.int64)
        half = count // 2
        acc = torch.where(acc > 0, acc + half, acc - half) if self.signed else acc + half
        acc = torch.div(acc, count, rounding_mode="trunc")
        return acc.clamp_(self.act_min, self.act_max).to(torch.int32)


class IntMaxPool(FrozenOp):
    """MAX_POOL_2D: picks values, so the output keeps the input's S and Z.

    When it directly follows an IntConv (`run_by_producer`), that conv pools its accumulator
    before the rescale and this op passes its input on: the rescale, + Z_out and the clamp are
    non-decreasing per channel (M0 > 0), so max and epilogue commute exactly, and 4x fewer
    values are rescaled. Only the execution moves; the graph keeps TFLite's two ops, each with
    its own settings, and every integer is the same (tested)."""
    CONFIG = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "run_by_producer")
    integer = True

    def __init__(self, pool):
        super().__init__()
        self.kernel_size, self.stride, self.padding = pool.kernel_size, pool.stride, pool.padding
        self.dilation, self.ceil_mode = pool.dilation, pool.ceil_mode
        self.run_by_producer = False

    def settings(self):
        return (self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)

    def real_forward(self, x):
        return x if self.run_by_producer else F.max_pool2d(x, *self.settings())

    int_forward = real_forward          # max-pool runs on integer tensors as they are


class IntPad(FrozenOp):
    """PAD (of a quantized tensor): `pad` = (left, right, top, bottom) positions of real 0, i.e.
    of the zero point Z; the output keeps the input's S and Z."""
    CONFIG = ("pad", "act_min", "act_max", "out_bits", "out_signed")
    integer = True

    def __init__(self, pad, inp):
        super().__init__()
        self.pad = tuple(pad)
        self._set_out(inp)

    def real_forward(self, x):
        return F.pad(x, self.pad, value=0.0)

    def int_forward(self, q):
        return F.pad(q, self.pad, value=int(self.out_zero_point))


class IntClamp(FrozenOp):
    """A ReLU or ReLU6 on a quantized tensor (one that could not be fused into the op before it):
    TFLite's RELU with the input's S and Z, a clamp to [act_min, act_max]."""
    CONFIG = ("act_min", "act_max", "out_bits", "out_signed")
    integer = True

    def __init__(self, inp, act_range):
        super().__init__()
        self._set_out(inp, act_range)

    def real_forward(self, x):
        return self._real_out(x)

    def int_forward(self, q):
        return q.clamp(self.act_min, self.act_max)


FROZEN_OPS = {cls.__name__: cls for cls in (Quantize, Dequantize, IntConv, FloatLayer, IntAdd, IntMean,
                                            IntAvgPool, IntMaxPool, IntPad, IntClamp)}


def frozen_ops(frozen):
    return [m for m in frozen.modules() if isinstance(m, FrozenOp)]


def graph_modules(gm):
    """The modules the graph calls, in order."""
    return [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]


def set_mode(frozen, mode):
    """'int' (integer inference) or 'reals' (the frozen integers as reals: fake-quant)."""
    if mode not in ("int", "reals"):
        raise IntsimError(f"unknown mode {mode!r} of a frozen model; use 'int' or 'reals'")
    if not frozen_ops(frozen) or (mode == "int" and not runs_in_integers(frozen)):
        raise IntsimError(why_not_integer(frozen))
    for op in frozen_ops(frozen):
        op.mode = mode
    return frozen


def runs_in_integers(frozen):
    """Whether the integer path exists: integer activations of at most 8 bits, every layer quantized."""
    return (isinstance(getattr(frozen, "dequant_out", None), Dequantize)
            and all(isinstance(m, FrozenOp) and m.integer for m in graph_modules(frozen)))


def _called(frozen):
    """(name, module) of each module call in the graph, in order."""
    return [(n.target, frozen.get_submodule(n.target)) for n in frozen.graph.nodes if n.op == "call_module"]


def why_not_integer(frozen):
    """Why `frozen` has no integer path, naming the first op that stops it (None if it has one)."""
    if not frozen_ops(frozen):
        return ("set_mode takes a frozen model: " + ("this one is converted, not frozen: frozen = freeze(qmodel) "
                "after calibrate, then set_mode(frozen, 'int')" if getattr(frozen, "qconfig", None) is not None
                else f"a {type(frozen).__name__} has no frozen ops; convert, calibrate and freeze it first"))
    if runs_in_integers(frozen):
        return None
    if not isinstance(getattr(frozen, "dequant_out", None), Dequantize):
        return "integer inference needs integer activations: with --a-bits 32 the model runs in fake-quant only"
    called = _called(frozen)
    for name, m in called:
        if isinstance(m, FloatLayer):
            return f"integer inference needs every layer quantized (--quantize-layers all): {name} is float"
    for name, m in called:
        w_bits = getattr(m, "w_bits", 0) or 0
        a_bits = max(getattr(m, "in_bits", 0) or 0, getattr(m, "out_bits", 0) or 0)
        if isinstance(m, FrozenOp) and max(w_bits, a_bits) > INT_MAX_BITS:
            what = f"{w_bits}-bit weights" if w_bits > INT_MAX_BITS else f"{a_bits}-bit activations"
            return (f"integer inference is for up to {INT_MAX_BITS} bits (TFLite's 8-bit kernels): {name} "
                    f"({type(m).__name__}) has {what}, which run in fake-quant only")
    for name, m in called:
        if not (isinstance(m, FrozenOp) and m.integer):
            return (f"integer inference: {name} ({type(m).__name__}) stayed a float module in the frozen graph, "
                    f"with no integer form in intsim; the model runs in fake-quant only")
    return "integer inference: the frozen graph holds an op without an integer form"


def output_integers(frozen, logits):
    """The integers q = round(y / S) + Z behind the model's (fake-)quantized output y = S (q - Z)."""
    return integers_of(logits, *frozen.dequant_out.in_qparams())
