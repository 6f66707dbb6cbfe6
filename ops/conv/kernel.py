"""The one integer kernel of CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED (IntConv), the rule
that decides how a layer rescales (rescale_rule), and a layer left in float (FloatLayer)."""
import time
import warnings

import torch
import torch.nn.functional as F

from errors import IntsimError
from function import INT32_MAX, INT_MAX_BITS, quantize_multiplier

from .. import epilogue
from ..base import NO_ACTIVATION, FrozenOp, pair, per_channel

FLOAT32_EXACT = 2 ** 24   # every integer of magnitude <= 2^24 is exact in float32
SPLIT_BASE = 16           # digit base of the split accumulation (IntConv.accumulation)
SCALE_PRODUCTS = ("double", "float32")
INT8_MIN, INT8_MAX = -128, 127  # torch._int_mm's operands
INT8_SHIFT = 128          # uint8 q -> q - 128 on int8 (the same offset LiteRT's int8 kernels use)


def rescale_rule(uint8_kernel, is_conv, legacy=False):
    """How LiteRT's Prepare derives a conv/FC layer's rescale (kernel_util.cc): the uint8 kernel
    (unsigned activations, one weight scale) takes M from the float32 product S_in S_w
    (GetQuantizedConvolutionMultipler); the int8 kernel (signed activations or per-channel
    weights) from the double product. FULLY_CONNECTED rescales acc * M in double (the pinned
    LiteRT's reference kernel). `legacy` (--legacy-kernels): double products and the fixed-point
    rescale everywhere. The one place this is decided, for freeze and for .tflite import."""
    if legacy:
        return dict(scale_product="double", rescale_in_double=False)
    return dict(scale_product="float32" if uint8_kernel else "double", rescale_in_double=not is_conv)


class IntConv(FrozenOp):
    """CONV_2D (with groups: DEPTHWISE_CONV_2D) or FULLY_CONNECTED (Jacob et al. 2018, eq. 7):
        acc[c]  = sum (q_in - Z_in)(q_w[c] - Z_w[c]) + q_b[c]                    int32, exact
        q_out   = clamp(rescale(acc, M0[c], shift[c]) + Z_out, act_min, act_max)
    with M[c] = S_in S_w[c] / S_out = M0[c] 2^(shift[c] - 31) (TFLite's QuantizeMultiplier).
    `pad` is explicit per side, (left, right, top, bottom), padded with real 0 (q = Z_in).
    `scale_product` is how M is computed (rescale_rule): "double", S_in S_w[c] / S_out in double;
    "float32", the product S_in S_w rounded to float32 first, then divided in double.
    `rescale_in_double` replaces the fixed-point rescale by one rounding of acc * M in double,
    as LiteRT's reference FULLY_CONNECTED does (function.requantize_in_double).
    Without `inp`/`out` (float activations) only the weights are integers, the bias is real,
    and there is no integer mode."""
    CONFIG = ("is_conv", "stride", "pad", "dilation", "groups", "w_bits", "in_qmin", "in_qmax", "in_bits",
              "out_bits", "out_signed", "act_min", "act_max", "single_rounding", "has_int_io", "pool_first",
              "scale_product", "rescale_in_double", "bias_scale_adjusted")
    # the values of a model saved before the choices were recorded
    scale_product, rescale_in_double, bias_scale_adjusted = "double", False, 0
    new_grid = True

    def __init__(self, w_q, w_scale, w_zero_point, bias, grid, is_conv=True, stride=1, padding=0, dilation=1,
                 groups=1, inp=None, out=None, act_range=NO_ACTIVATION, single_rounding=False,
                 scale_product="double", rescale_in_double=False):
        super().__init__()
        if scale_product not in SCALE_PRODUCTS:
            raise IntsimError(f"unknown scale product {scale_product!r}; use one of {SCALE_PRODUCTS}")
        self.is_conv, self.groups, self.single_rounding = is_conv, groups, single_rounding
        self.scale_product, self.rescale_in_double = scale_product, rescale_in_double
        self.stride, self.dilation = pair(stride), pair(dilation)
        self.pad = explicit_padding(padding, w_q.shape[2:], self.dilation) if is_conv else (0, 0, 0, 0)
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

    def _sum_bound(self):
        """max_c sum_k |q_w - Z_w| max|q_in - Z_in|: the worst |partial sum| of the conv itself, which
        decides its exact accumulation (the int32 bias is added after it, in int64: acc_bound,
        which counts |q_b| too, is for the int32 check only)."""
        w = self.w_q.long() - per_channel(self.w_zero_point, self.w_q)
        return float(w.abs().reshape(len(w), -1).sum(1).max()) * self._in_abs_max()

    def _int8_offset(self):
        """The offset o that puts q_in - o on int8 (0 for signed or narrow inputs, 128 for uint8),
        where the int8 GEMM is exact for this layer: q_w - Z_w on int8 too, no dilation or
        groups, and every int32 partial sum sum (q_in - o)(q_w - Z_w) inside int32. None where not."""
        if self.groups != 1 or self.dilation != (1, 1) or self.in_qmin is None:
            return None
        o = INT8_SHIFT if self.in_qmax > INT8_MAX else 0
        w = self.w_q.long() - per_channel(self.w_zero_point, self.w_q)
        if self.in_qmin - o < INT8_MIN or self.in_qmax - o > INT8_MAX or w.min() < INT8_MIN or w.max() > INT8_MAX:
            return None
        w_l1 = w.abs().reshape(len(w), -1).sum(1).max()
        return o if float(w_l1) * max(o - self.in_qmin, self.in_qmax - o) <= INT32_MAX else None

    def exact_accumulations(self, device):
        """The accumulations that are exact for this layer on `device`, in the order chosen
        without a measurement:
        "float32": every partial sum stays below 2^24 (_sum_bound proves it);
        "int8":    an int8 x int8 -> int32 GEMM (torch._int_mm; im2col for a k x k conv), on
                   q_in - o (o = 128 for uint8) and q_w - Z_w, plus (o - Z_in) sum_k (q_w - Z_w)
                   per output channel (the input is padded with Z_in, real 0, before the shift);
        "split":   q_in - Z_in = SPLIT_BASE hi + lo with lo in [0, SPLIT_BASE), and both digit
                   convs stay below 2^24 in float32: acc = SPLIT_BASE conv(hi) + conv(lo), combined
                   in float64. Two float32 convs cost less than one float64 conv on CPU;
        "float64": exact far beyond int32 (always on CUDA, whose float32 convs may use TF32)."""
        if device.type != "cpu":
            return ["float64"]
        out, bound = [], self._sum_bound()
        if bound < FLOAT32_EXACT:
            out.append("float32")
        if self._int8_offset() is not None:
            out.append("int8")
        a_max = self._in_abs_max()
        w_l1 = bound / max(a_max, 1)                               # >= max_c sum |q_w - Z_w|
        digit_max = max(SPLIT_BASE - 1, -(-a_max // SPLIT_BASE))   # |lo| <= 15, |hi| <= ceil(a_max / 16)
        if bound >= FLOAT32_EXACT and w_l1 * digit_max < FLOAT32_EXACT:
            out.append("split")
        return out + ["float64"]

    def accumulation(self, device, shape=None):
        """The accumulation this layer uses on `device`: for an input `shape` it has run on, the
        fastest exact one as measured there (`accumulate`), else the first of exact_accumulations."""
        chosen = getattr(self, "_measured", {}).get((device.type, tuple(shape))) if shape is not None else None
        return chosen or self.exact_accumulations(device)[0]

    def chosen_accumulations(self, device):
        """The accumulations measured fastest for the input shapes this layer ran on (on
        `device`), most used first; [the unmeasured default] where it has not run."""
        chosen = [h for (dev, _), h in getattr(self, "_measured", {}).items() if dev == device.type]
        return sorted(set(chosen), key=chosen.count, reverse=True) or [self.accumulation(device)]

    def accumulate(self, q_in, how=None):
        """sum_k (q_w - Z_w)(q_in - Z_in) for every output, exact, as a float tensor of integers.
        `how` forces one accumulation; by default the one `choose` measured fastest."""
        return self._accumulate(q_in, how or self.choose(q_in))

    def choose(self, q_in):
        """The fastest exact accumulation for q_in's shape on its device, measured the first time
        that shape comes (each candidate run twice, the second timed; all give the same integers)."""
        key = (q_in.device.type, tuple(q_in.shape))
        if not hasattr(self, "_measured"):
            self._measured = {}
        if key not in self._measured:
            candidates = [h for h in self.exact_accumulations(q_in.device) if h != "float64"] or ["float64"]
            seconds = {candidates[0]: 0.0}                          # one candidate: nothing to measure
            if len(candidates) > 1:
                for h in candidates:
                    self._accumulate_parts(q_in, h)
                    start = time.perf_counter()
                    self._accumulate_parts(q_in, h)
                    seconds[h] = time.perf_counter() - start
            self._measured[key] = min(seconds, key=seconds.get)
        return self._measured[key]

    def _accumulate(self, q_in, how):
        acc, offset = self._accumulate_parts(q_in, how)
        if how != "int8":
            return acc
        channels = (1, -1, 1, 1) if self.is_conv else (-1,)
        return acc.to(torch.float64, memory_format=torch.contiguous_format) + offset.reshape(channels).to(torch.float64)

    def _accumulate_parts(self, q_in, how):
        """(part, offset): the accumulation as `how` leaves it (int8: the GEMM's int32 output, a
        view in NCHW order; else a float tensor of integers) and an int64 per-channel offset
        (int8: (o - Z_in) sum_k (q_w - Z_w); else 0), whose sum is `accumulate`'s."""
        if how == "int8":
            return self._accumulate_int8(q_in)
        dtype = torch.float64 if how == "float64" else torch.float32
        x = q_in.to(dtype)
        x -= float(self.in_zero_point)                            # (q_in - Z_in); zero padding is real 0
        w = (self.w_q.long() - per_channel(self.w_zero_point, self.w_q)).to(dtype)
        with torch.backends.nnpack.flags(enabled=False):           # NNPACK uses inexact Winograd/FFT
            if how != "split":
                return self.fn(x, w), 0
            hi = torch.div(x, SPLIT_BASE, rounding_mode="floor")
            x -= hi * SPLIT_BASE                                   # lo; one conv over both digit planes
            hi_lo = self.fn(torch.cat([hi, x]), w).double()
            return hi_lo[:len(x)].mul_(SPLIT_BASE).add_(hi_lo[len(x):]), 0

    def _int8_weights(self):
        """(q_w - Z_w) as the int8 GEMM's right operand [K, C_out] (K = C_in kh kw), the
        per-channel sums sum_k (q_w - Z_w) and the input offset o: derived once and kept (not
        saved) for the device they were made on, off the forward's path."""
        cached = getattr(self, "_int8_cache", None)
        if cached is None or cached[0].device != self.w_q.device:
            w = self.w_q.long() - per_channel(self.w_zero_point, self.w_q)
            w = w.reshape(len(w), -1)
            self._int8_cache = cached = (w.t().contiguous().to(torch.int8), w.sum(1), self._int8_offset())
        return cached

    def _accumulate_int8(self, q_in):
        w8, w_sum, o = self._int8_weights()
        x = q_in.to(torch.int32)
        if self.is_conv and any(self.pad):
            x = F.pad(x, self.pad, value=int(self.in_zero_point))  # real 0, before the shift
        x8 = (x - o).to(torch.int8)
        if self.is_conv:
            n, c = x8.shape[:2]
            kh, kw = self.w_q.shape[2:]
            cols = x8.unfold(2, kh, self.stride[0]).unfold(3, kw, self.stride[1])    # N, C, Ho, Wo, kh, kw
            ho, wo = cols.shape[2:4]
            cols = cols.permute(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)
            acc = torch._int_mm(cols, w8).reshape(n, ho, wo, -1).permute(0, 3, 1, 2)
        else:
            acc = torch._int_mm(x8.reshape(-1, x8.shape[-1]), w8).reshape(*x8.shape[:-1], -1)
        return acc, (o - self.in_zero_point) * w_sum

    def int_forward(self, q_in):
        if not self.has_int_io:
            raise IntsimError("integer inference needs integer activations: with --a-bits 32 the "
                              "model runs in fake-quant only")
        acc, offset = self._accumulate_parts(q_in, self.choose(q_in))
        if acc.device.type != "cpu" and acc.is_floating_point():
            acc = acc.round()                                      # undo any sub-0.5 error of GPU kernels
        # the output channels: dim 1 of a conv's NCHW, the last dim of a linear layer's (N, ..., C)
        channels = (-1,) + (1,) * (acc.dim() - 2) if self.is_conv else (-1,)
        bias = (self.b_q + offset).reshape(channels)               # exact: acc_bound counts |q_b| too
        return epilogue.run(acc, bias, self.m0.reshape(channels), self.shift.reshape(channels),
                            self.out_zero_point.to(acc.device), self.act_min, self.act_max, self.pool_first,
                            self.single_rounding, self.m_real.reshape(channels) if self.rescale_in_double else None,
                            self.layer_name if float(self.acc_bound) > INT32_MAX else None)


def explicit_padding(padding, kernel, dilation):
    """nn.Conv2d's padding (ints, or "valid" / "same") as (left, right, top, bottom); a 4-tuple
    is that already."""
    if isinstance(padding, (tuple, list)) and len(padding) == 4:
        return tuple(padding)
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":                  # PyTorch puts the odd pixel on the right and bottom
        (th, tw) = (d * (k - 1) for d, k in zip(dilation, kernel))
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = pair(padding)
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
