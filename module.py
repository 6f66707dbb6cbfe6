"""Quantized layers. Each lives in phases, chosen by its `mode`:

  'float'      the float function (BN folded into the conv: the same function, see tests)
  'calibrate'  the float function, while activation observers record ranges
  'fakequant'  weights and activations rounded to their integer grids, computed in float
  'qat'        fake-quant training: as 'fakequant', but in train() the activation observers
               keep moving and BN uses batch statistics (both until frozen)
  'int'        integer inference: int32 tensors in, int32 tensors out (after `freeze`)

`freeze(in_scale, in_zero_point)` turns a calibrated layer into integers: integer weights,
int32 biases at scale S_in * S_w with zero point 0, and per-channel (M0, shift) pairs for
the fixed-point rescale. Everything it computes is a buffer, so it follows `.to(device)` and
`state_dict()`.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from function import (FLOAT_BITS, INT32_MAX, INT_MAX_BITS, ROUNDINGS, IntsimError, check_act_bits, check_bits, dequantize,
                      fake_quantize, int32_check, multiply_by_quantized_multiplier,
                      multiply_by_quantized_multiplier_single_rounding, quantize, quantize_multiplier,
                      qrange, requantize, round_half_away, scale_zero_point)
from observer import LP_DEFAULT_P, OBSERVERS, WEIGHT_OBSERVERS, check_p, make_observer, weight_range

MODES = ("float", "calibrate", "fakequant", "qat", "int")
FLOAT32_EXACT = 2 ** 24   # every integer of magnitude <= 2^24 is exact in float32
SPLIT_BASE = 16           # digit base of the split accumulation (QLayer.accumulation)
LAYER_CHOICES = ("all", "first")   # which conv/linear layers get quantized weights


@dataclass
class QConfig:
    w_bits: int = 8
    a_bits: int = 8              # FLOAT_BITS (32): activations stay float, only weights are quantized
    per_channel: bool = False    # one weight scale per output channel instead of per tensor
    w_symmetric: bool = True     # signed narrow-range weights with Z_w = 0 (TFLite); else unsigned
    a_observer: str = "minmax"   # activation ranges: one of observer.OBSERVERS ("ema" for QAT)
    single_rounding: bool = False  # rescale as TFLite built with TFLITE_SINGLE_ROUNDING (default: double)
    out_bits: Optional[int] = None  # bits of the model's output (the logits); None: a_bits
    w_observer: str = "minmax"   # weight ranges: one of observer.WEIGHT_OBSERVERS
    lp_p: float = LP_DEFAULT_P   # p of the "lp" observers
    rounding: str = "nearest"    # weight rounding at freeze: one of function.ROUNDINGS
    fold_bn: bool = True         # quantize the BN-folded weights (False: the conv's own, BN in float)
    bias_bits: int = 32          # 32: int32 bias at S_in S_w (TFLite); fewer: its own scale first
    layers: str = "all"          # quantize "all" conv/linear layers or only the "first" (AdaRound Table 1)

    def __post_init__(self):
        check_bits(self.w_bits, "weight bits")
        check_act_bits(self.a_bits, "activation bits")
        if self.out_bits is not None:
            check_act_bits(self.out_bits, "output bits")
            if self.float_activations and self.out_bits != FLOAT_BITS:
                raise IntsimError("--out-bits needs integer activations: with --a-bits 32 the logits stay float")
        if self.a_observer not in OBSERVERS:
            raise IntsimError(f"unknown activation observer {self.a_observer!r}; use one of {', '.join(OBSERVERS)}")
        if self.w_observer not in WEIGHT_OBSERVERS:
            raise IntsimError(f"unknown weight observer {self.w_observer!r}; use one of {', '.join(WEIGHT_OBSERVERS)}")
        check_p(self.lp_p)
        if self.rounding not in ROUNDINGS:
            raise IntsimError(f"unknown rounding {self.rounding!r}; use one of {', '.join(ROUNDINGS)}")
        if not self.fold_bn and self.a_bits != FLOAT_BITS:
            raise IntsimError("BN can stay unfolded only with float activations (--a-bits 32): "
                              "integer inference needs it folded into the conv")
        if self.bias_bits != 32:
            check_bits(self.bias_bits, "bias bits (or 32)")
        if self.layers not in LAYER_CHOICES:
            raise IntsimError(f"unknown layer choice {self.layers!r}; use one of {', '.join(LAYER_CHOICES)}")

    @property
    def float_activations(self):
        return self.a_bits == FLOAT_BITS

    @property
    def integer_capable(self):
        """Whether the integer path exists: integer activations and at most INT_MAX_BITS
        everywhere (wider, e.g. W16A16, runs in fake-quant only)."""
        bits = (self.w_bits, self.a_bits, self.out_bits or self.a_bits)
        return not self.float_activations and max(bits) <= INT_MAX_BITS


class QModule(nn.Module):
    """Base of the modules the conversion inserts: holds the mode and the activation observer."""

    def __init__(self, qconfig, observe_output=True, a_bits=None):
        super().__init__()
        self.qconfig = qconfig
        self.mode = "float"
        a_bits = a_bits or qconfig.a_bits           # the model's output layer may differ (out_bits)
        self.a_float = a_bits == FLOAT_BITS         # the output stays float: nothing to observe
        self.a_qmin, self.a_qmax = qrange(a_bits if not self.a_float else 8, symmetric=False)
        self.act = (make_observer(qconfig.a_observer, a_bits, qconfig.lp_p)
                    if observe_output and not self.a_float else None)
        self.observer_frozen = False     # QAT: stop moving the ranges for the last steps
        self.register_buffer("frozen", torch.tensor(False))

    def set_mode(self, mode):
        if mode not in MODES:
            raise IntsimError(f"unknown mode {mode!r}; use one of {MODES}")
        if mode == "int" and not bool(self.frozen):
            raise IntsimError("integer inference needs a frozen model: calibrate, then freeze")
        if mode == "int" and self.qconfig.float_activations:
            raise IntsimError("integer inference needs integer activations: with --a-bits 32 the "
                              "model runs in fake-quant only")
        if mode == "int" and not self.qconfig.integer_capable:
            raise IntsimError(f"integer inference is for up to {INT_MAX_BITS} bits (TFLite's 8-bit kernels): "
                              f"W{self.qconfig.w_bits}A{self.qconfig.a_bits} runs in fake-quant only")
        if mode in ("calibrate", "qat") and bool(self.frozen):   # ranges would move under frozen M0
            raise IntsimError(f"cannot {mode} a frozen model: convert the float model again")
        self.mode = mode

    def output_qparams(self):
        return self.act.qparams(name=self._get_name())

    def _observe_or_fake_quantize(self, y):
        """The float output in the float phases: recorded ('calibrate', and 'qat' while training)
        and rounded to the integer grid ('fakequant', 'qat')."""
        if self.act is None:
            return y
        if self.mode == "calibrate" or (self.mode == "qat" and self.training and not self.observer_frozen):
            self.act(y)
        if self.mode in ("fakequant", "qat"):
            s, z = self.output_qparams()
            y = fake_quantize(y, s.to(y.device), z.to(y.device), self.a_qmin, self.a_qmax)
        return y


class QuantStub(QModule):
    """The model's input: float in; in 'int' mode, integers q = round(x / S) + Z out."""

    def forward(self, x):
        if self.mode == "int":
            s, z = self.output_qparams()
            return quantize(x, s.to(x.device), z.to(x.device), self.a_qmin, self.a_qmax)
        return self._observe_or_fake_quantize(x)

    def freeze(self):
        if self.act is not None:
            self.output_qparams()   # fails with a clear message when calibration saw nothing
        self.frozen.fill_(True)


class DeQuantStub(QModule):
    """The model's output: in 'int' mode, integers in, float S (q - Z) out."""

    def __init__(self, qconfig):
        super().__init__(qconfig, observe_output=False)
        self.register_buffer("in_scale", torch.ones(1))
        self.register_buffer("in_zero_point", torch.zeros(1, dtype=torch.int64))

    def forward(self, x):
        if self.mode == "int":
            return dequantize(x, self.in_scale, self.in_zero_point)
        return x

    def freeze(self, in_scale, in_zero_point):
        self.in_scale.copy_(in_scale)
        self.in_zero_point.copy_(in_zero_point)
        self.frozen.fill_(True)


def fold_bn(weight, bias, bn):
    """Fold an eval-mode BatchNorm into the conv before it (per output channel c):
    W' = W * gamma / std, b' = beta + (b - mean) * gamma / std, std = sqrt(var + eps)."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    factor = gamma / std                                               # (C_out,)
    weight = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
    bias = torch.zeros_like(std) if bias is None else bias
    return weight, beta + (bias - bn.running_mean) * factor


class QLayer(QModule):
    """A conv or linear layer, with the BatchNorm, ReLU and max-pool that follow it fused in.

    One implementation for both: `self.fn` is F.conv2d or F.linear, with the layer's own
    stride/padding/groups. Integer forward (Jacob et al. 2018, eq. 7):
        acc[c]  = sum (q_in - Z_in)(q_w[c] - Z_w[c]) + q_b[c]          (int32, exact)
        q_out   = clamp(MultiplyByQuantizedMultiplier(acc, M0[c], shift[c]) + Z_out, lo, QMAX)
    with lo = Z_out when a ReLU is fused (ReLU is a clamp at real 0) and QMIN otherwise.
    """

    def __init__(self, layer, qconfig, bn=None, relu=False, pool=None, a_bits=None):
        super().__init__(qconfig, a_bits=a_bits)
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise IntsimError(f"QLayer wraps nn.Conv2d or nn.Linear, not {type(layer).__name__}")
        self.layer, self.bn, self.relu, self.pool = layer, bn, relu, pool
        self.is_conv = isinstance(layer, nn.Conv2d)
        if self.is_conv:
            self.fn_kwargs = dict(stride=layer.stride, padding=layer.padding,
                                  dilation=layer.dilation, groups=layer.groups)
            if layer.padding_mode != "zeros":
                raise IntsimError(f"only zero padding is supported, not {layer.padding_mode!r}")
        else:
            self.fn_kwargs = {}
        self.w_qmin, self.w_qmax = qrange(qconfig.w_bits, qconfig.w_symmetric)
        c_out = layer.weight.shape[0]
        self.channel_shape = (-1, 1, 1) if self.is_conv else (-1,)    # broadcast (C,) over (B, C, H, W)
        # Filled by freeze(); registered now so that a frozen state_dict loads into a new model.
        self.register_buffer("in_scale", torch.ones(1))
        self.register_buffer("in_zero_point", torch.zeros(1, dtype=torch.int64))
        self.register_buffer("w_scale", torch.ones(c_out))
        self.register_buffer("w_zero_point", torch.zeros(c_out, dtype=torch.int64))
        self.register_buffer("w_q", torch.zeros(layer.weight.shape, dtype=torch.int32))
        self.register_buffer("b_q", torch.zeros(c_out, dtype=torch.int64))   # int32 values up to 8 bits
        self.register_buffer("m0", torch.zeros(c_out, dtype=torch.int64))
        self.register_buffer("shift", torch.zeros(c_out, dtype=torch.int64))
        self.register_buffer("acc_bound", torch.zeros((), dtype=torch.float64))
        self.register_buffer("bias", torch.zeros(c_out))   # the real bias the frozen layer adds
        self.bn_frozen = False   # QAT: BN uses running statistics from now on
        self.enabled = True      # False: this layer stays float in every mode (qconfig.layers)

    def extra_repr(self):
        q = self.qconfig
        fused = "+".join(n for n, on in (("bn", self.bn is not None), ("relu", self.relu),
                                         ("maxpool", self.pool is not None)) if on)
        if not self.enabled:
            return "float (not quantized)" + (f", fused={fused}" if fused else "")
        return (f"mode={self.mode}, w_bits={q.w_bits}, a_bits={q.a_bits}, per_channel={q.per_channel}"
                + (f", fused={fused}" if fused else "") + ("" if q.fold_bn else ", BN unfolded"))

    def set_mode(self, mode):
        if mode == "int" and not self.enabled:
            raise IntsimError("integer inference needs every layer quantized (--quantize-layers all)")
        super().set_mode(mode)

    def fn(self, x, w, b=None):
        return (F.conv2d if self.is_conv else F.linear)(x, w, b, **self.fn_kwargs)

    def _channels(self, t):
        """(C_out,) -> broadcastable over the output (B, C_out, H, W) or (B, C_out)."""
        return t.reshape(self.channel_shape)

    def _w_channels(self, t):
        """(C_out,) -> broadcastable over the weight (C_out, C_in, kh, kw) or (C_out, C_in)."""
        return t.to(self.w_q.device).reshape((-1,) + (1,) * (self.w_q.dim() - 1))

    # --------------------------------------------------------------- float and fake-quant

    def folded_weight_bias(self):
        """The weight and bias of conv followed by (eval-mode) BN, as one conv."""
        w, b = self.layer.weight, self.layer.bias
        if self.bn is not None:
            return fold_bn(w, b, self.bn)
        return w, (torch.zeros(w.shape[0], device=w.device) if b is None else b)

    def weight_bias(self):
        """The weight and bias that get quantized: BN-folded (the default, and what integer
        inference needs) or, with qconfig.fold_bn False, the conv's own (BN then runs in float)."""
        if self.qconfig.fold_bn or self.bn is None:
            return self.folded_weight_bias()
        w, b = self.layer.weight, self.layer.bias
        return w, (torch.zeros(w.shape[0], device=w.device) if b is None else b)

    def _unfolded_bn(self, y):
        return self.bn(y) if self.bn is not None and not self.qconfig.fold_bn else y

    def weight_qparams(self, w):
        """(S_w, Z_w), each of shape (C_out,), from the range the weight observer picks."""
        q = self.qconfig
        lo, hi = weight_range(w, q.per_channel, q.w_observer, q.w_bits, q.w_symmetric, q.lp_p)
        return scale_zero_point(lo, hi, q.w_bits, q.w_symmetric)

    def quantize_bias(self, b):
        """The real bias after qconfig.bias_bits: unchanged for 32 (it becomes int32 at S_in S_w,
        as fine a grid as the accumulator's), else rounded to a b-bit grid with its own
        per-tensor symmetric scale max|b| / QMAX (the ablation in the README)."""
        bits = self.qconfig.bias_bits
        if bits == 32:
            return b
        amax = b.detach().abs().max().reshape(1)
        s, z = scale_zero_point(-amax, amax, bits, symmetric=True)
        return fake_quantize(b, s.to(b), z.to(b.device), *qrange(bits, symmetric=True))

    def fake_quant_weight(self, w):
        s, z = self.weight_qparams(w)
        return fake_quantize(w, self._w_channels(s), self._w_channels(z), self.w_qmin, self.w_qmax)

    def _activate(self, y):
        if self.relu:
            y = F.relu(y)
        if self.pool is not None:
            y = self.pool(y)
        return y

    def forward(self, x):
        if self.mode == "int":
            return self.int_forward(x)
        if not self.enabled:                                         # a layer left in float
            return self._activate(self.fn(x, *self.folded_weight_bias()))
        quantized = self.mode in ("fakequant", "qat")
        if self.mode == "qat" and self.training and self.bn is not None and not self.bn_frozen:
            y = self.conv_bn_batch_stats(x, self.fake_quant_weight)
        elif self.mode == "fakequant" and bool(self.frozen):
            y = self._unfolded_bn(self.fn(x, *self.frozen_weight_bias(x.dtype)))
        else:
            w, b = self.weight_bias()
            if quantized:
                w = self.fake_quant_weight(w)
            y = self._unfolded_bn(self.fn(x, w, b))
        return self._observe_or_fake_quantize(self._activate(y))

    def frozen_weight_bias(self, dtype):
        """Exactly the frozen integers the integer path uses, as reals: S_w (q_w - Z_w) and
        q_b S_in S_w (the float bias when activations are float), in `dtype` (float64 gives an
        all but exact simulation of the integer path)."""
        w = self._w_channels(self.w_scale) * (self.w_q - self._w_channels(self.w_zero_point)).to(dtype)
        if self.qconfig.float_activations:
            return w, self.bias.to(dtype)
        return w, self.b_q.to(dtype) * (self.in_scale * self.w_scale)

    def conv_bn_batch_stats(self, x, weight_fn):
        """Conv + BN while training with BN in the graph (Krishnamoorthi 2018, sec. 3.2.2;
        Jacob et al. 2018, sec. 3.2 and fig. C.8). Two passes over the same input:

          1. y = conv(x, W) + b in float, only to measure this batch's mean mu_B and standard
             deviation sigma_B per channel (and to move BN's running statistics, as BN would);
          2. the conv that is quantized. Its weight is folded with the *running* sigma,
             W' = W gamma / sigma, which is the form integer inference will use, so the weights
             seen in training are the ones that get frozen. The output is then corrected by
             c = sigma / sigma_B and given the batch-statistics bias, so that the layer computes
             what BN with batch statistics computes:
                conv(x, Q(W')) sigma / sigma_B + beta + (b - mu_B) gamma / sigma_B
                  = gamma (conv(x, W) + b - mu_B) / sigma_B + beta      when Q is the identity.
        Gradients flow through both passes (mu_B and sigma_B depend on W, as in BN). After
        `bn_frozen` is set, training uses the running statistics: the plain folded conv.
        `weight_fn` is the weight quantizer (the identity in the tests)."""
        bn, w = self.bn, self.layer.weight
        b = self.layer.bias if self.layer.bias is not None else torch.zeros_like(bn.running_mean)
        y_float = self.fn(x, w, b)                                              # pass 1
        dims = [0, 2, 3]
        mean, var = y_float.mean(dims), y_float.var(dims, unbiased=False)
        sigma = torch.sqrt(bn.running_var + bn.eps)                             # before this batch
        with torch.no_grad():                                                   # BN's own update
            n = y_float.numel() / y_float.shape[1]
            bn.num_batches_tracked += 1
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.lerp_(mean, momentum)
            bn.running_var.lerp_(var * n / (n - 1), momentum)                   # unbiased, as BN keeps it
        sigma_b = torch.sqrt(var + bn.eps)
        w_fold = w * self._w_channels(bn.weight / sigma)
        y = self.fn(x, weight_fn(w_fold)) * self._channels(sigma / sigma_b)     # pass 2
        return y + self._channels(bn.bias + (b - mean) * bn.weight / sigma_b)

    # --------------------------------------------------------------- integer

    @torch.no_grad()
    def freeze(self, in_scale, in_zero_point, rounding=None, generator=None, weight_integers=None):
        """Compute the integer weights (rounded by `rounding`, default qconfig.rounding;
        `generator` seeds the stochastic rounding; or given as `weight_integers`, e.g. learned
        by AdaRound on the same grid), int32 bias and (M0, shift) from the calibrated ranges.
        With float activations only the weights are quantized (in_scale, in_zero_point None)."""
        w, b = self.weight_bias()
        s_w, z_w = self.weight_qparams(w)
        if weight_integers is not None:
            w_q = weight_integers.to(torch.int32)
        else:
            w_q = quantize(w, self._w_channels(s_w), self._w_channels(z_w), self.w_qmin, self.w_qmax,
                           rounding or self.qconfig.rounding, generator)
        b = self.quantize_bias(b)
        self.w_scale.copy_(s_w)
        self.w_zero_point.copy_(z_w)
        self.w_q.copy_(w_q)
        self.bias.copy_(b)
        if self.qconfig.float_activations:
            self.frozen.fill_(True)
            return False
        s_out, z_out = self.output_qparams()
        in_scale = in_scale.to(w.device)
        # Bias: int32 at scale S_in * S_w[c], zero point 0 (computed in float64 as TFLite does).
        bias_scale = in_scale.double() * s_w.double().to(w.device)
        b_q = round_half_away(b.double() / bias_scale)
        if self.qconfig.integer_capable and b_q.abs().max() > INT32_MAX:
            raise IntsimError(f"{self._get_name()}: bias does not fit int32 at scale S_in*S_w")
        # Requantization multiplier M[c] = S_in S_w[c] / S_out = M0[c] 2^(shift[c] - 31).
        m0, shift = quantize_multiplier(bias_scale / s_out.double().to(w.device))
        # Worst case |acc| over the input range: sum_k |q_w - Z_w| * max|q_in - Z_in| + |q_b|.
        self.in_zero_point.copy_(in_zero_point)
        a_max = self._in_abs_max()
        w_l1 = (w_q.long() - self._w_channels(z_w)).abs().reshape(w.shape[0], -1).sum(1)
        bound = (w_l1 * a_max + b_q.abs().long()).max()

        self.in_scale.copy_(in_scale)
        self.b_q.copy_(b_q.long())
        self.m0.copy_(m0)
        self.shift.copy_(shift)
        self.acc_bound.fill_(float(bound))
        self.frozen.fill_(True)
        return self.qconfig.integer_capable and self.int32_overflow_possible()

    def int32_overflow_possible(self):
        return float(self.acc_bound) > INT32_MAX

    def _in_abs_max(self):
        """max |q_in - Z_in| over the input's integer range (inputs are hidden activations)."""
        in_qmin, in_qmax = qrange(self.qconfig.a_bits, symmetric=False)
        z = int(self.in_zero_point)
        return max(in_qmax - z, z - in_qmin)

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

    @torch.no_grad()
    def accumulate(self, q_in):
        """sum_k (q_w - Z_w)(q_in - Z_in) for every output, exact (integers held in float32 or
        float64, by `accumulation`)."""
        how = self.accumulation(q_in.device)
        dtype = torch.float64 if how == "float64" else torch.float32
        x = q_in.to(dtype)
        x -= float(self.in_zero_point)                            # (q_in - Z_in); zero padding is real 0
        w = (self.w_q.long() - self._w_channels(self.w_zero_point)).to(dtype)
        with torch.backends.nnpack.flags(enabled=False):           # NNPACK uses inexact Winograd/FFT
            if how != "split":
                return self.fn(x, w)
            hi = torch.div(x, SPLIT_BASE, rounding_mode="floor")
            x -= hi * SPLIT_BASE                                   # lo; one conv over both digit planes
            hi_lo = self.fn(torch.cat([hi, x]), w).double()
            return hi_lo[:len(x)].mul_(SPLIT_BASE).add_(hi_lo[len(x):])

    @torch.no_grad()
    def int_forward(self, q_in):
        acc = self.accumulate(q_in)
        if self.pool is not None:
            # Max-pool before the rescale: the rescale, + Z_out and the clamp are non-decreasing
            # per channel (M0 > 0), so max and rescale commute, and 4x fewer values are rescaled.
            acc = self.pool(acc)
        acc += self._channels(self.b_q.to(acc.dtype))             # exact: acc_bound counts |q_b| too
        if acc.device.type != "cpu":
            acc.round_()                                           # undo any sub-0.5 error of GPU kernels
        acc = acc.to(torch.int64)
        if self.int32_overflow_possible():
            int32_check(acc, self._get_name())
        z_out = self._out_zero_point()
        lo = int(z_out) if self.relu else self.a_qmin             # a fused ReLU is a clamp at Z_out
        q = requantize(acc, self._channels(self.m0), self._channels(self.shift), z_out, lo, self.a_qmax,
                       self.qconfig.single_rounding)
        return q.to(torch.int32)

    def _out_zero_point(self):
        return self.output_qparams()[1].to(self.m0.device)


ADD_LEFT_SHIFT = 20   # TFLite's ADD: inputs (q - Z) are scaled by 2^20 before the rescale (8-bit kernels)


class QAdd(QModule):
    """Elementwise add of two quantized tensors (ResNet's residual), with an optional fused ReLU.
    Integer forward, TFLite's ADD kernel (reference_ops::Add; S1, S2 inputs, S_out output):
        twice_max = 2 max(S1, S2)
        a_i       = MultiplyByQuantizedMultiplier((q_i - Z_i) 2^20, S_i / twice_max)     i = 1, 2
        q_out     = clamp(MultiplyByQuantizedMultiplier(a_1 + a_2, twice_max / (2^20 S_out)) + Z_out, lo, QMAX)
    The 2^20 keeps 20 fractional bits through the input rescale, so the two inputs meet on a
    common fine grid; lo = Z_out with a fused ReLU (a clamp), else QMIN."""

    def __init__(self, qconfig, relu=False):
        super().__init__(qconfig)
        self.relu = relu
        for name in ("m1", "shift1", "m2", "shift2", "m_out", "shift_out"):
            self.register_buffer(name, torch.zeros(1, dtype=torch.int64))
        for name in ("in_scale1", "in_scale2"):
            self.register_buffer(name, torch.ones(1))
        for name in ("in_zero_point1", "in_zero_point2"):
            self.register_buffer(name, torch.zeros(1, dtype=torch.int64))

    def extra_repr(self):
        return f"mode={self.mode}" + (", fused=relu" if self.relu else "")

    def forward(self, x1, x2):
        if self.mode == "int":
            return self.int_forward(x1, x2)
        y = x1 + x2
        return self._observe_or_fake_quantize(F.relu(y) if self.relu else y)

    @torch.no_grad()
    def freeze(self, in1, in2):
        """in1, in2: (S, Z) of the two inputs."""
        (s1, z1), (s2, z2) = in1, in2
        s_out, _ = self.output_qparams()
        twice_max = 2 * torch.maximum(s1.double(), s2.double())
        for (m, sh), real in (((self.m1, self.shift1), s1.double() / twice_max),
                              ((self.m2, self.shift2), s2.double() / twice_max),
                              ((self.m_out, self.shift_out), twice_max / (2 ** ADD_LEFT_SHIFT * s_out.double()))):
            m0, shift = quantize_multiplier(real)
            m.copy_(m0)
            sh.copy_(shift)
        self.in_scale1.copy_(s1)
        self.in_scale2.copy_(s2)
        self.in_zero_point1.copy_(z1)
        self.in_zero_point2.copy_(z2)
        self.frozen.fill_(True)

    @torch.no_grad()
    def int_forward(self, q1, q2):
        single = self.qconfig.single_rounding
        multiply = multiply_by_quantized_multiplier_single_rounding if single else multiply_by_quantized_multiplier
        a1 = multiply((q1.long() - self.in_zero_point1) << ADD_LEFT_SHIFT, self.m1, self.shift1)
        a2 = multiply((q2.long() - self.in_zero_point2) << ADD_LEFT_SHIFT, self.m2, self.shift2)
        z_out = self.output_qparams()[1].to(q1.device)
        lo = int(z_out) if self.relu else self.a_qmin
        return requantize(a1 + a2, self.m_out, self.shift_out, z_out, lo, self.a_qmax, single).to(torch.int32)


class QAvgPool(QModule):
    """Global average pooling (B, C, H, W) -> (B, C, 1, 1) of a quantized tensor. Integer forward:
        acc   = sum_{h,w} (q_in - Z_in)                                          int32
        q_out = clamp(MultiplyByQuantizedMultiplier(acc, S_in / (H W S_out)) + Z_out, QMIN, QMAX)
    (as TFLite's quantized MEAN, with the output on its own observed scale). H W is known only
    from the input, so the multiplier for the input size seen at freeze time is kept, and a
    different size at inference is refused."""

    def __init__(self, qconfig):
        super().__init__(qconfig)
        self.register_buffer("m0", torch.zeros(1, dtype=torch.int64))
        self.register_buffer("shift", torch.zeros(1, dtype=torch.int64))
        self.register_buffer("in_zero_point", torch.zeros(1, dtype=torch.int64))
        self.register_buffer("in_scale", torch.ones(1))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))   # H W at freeze time

    def forward(self, x):
        if self.mode == "int":
            return self.int_forward(x)
        if self.mode == "calibrate" or not bool(self.frozen):
            self.count.fill_(x.shape[-1] * x.shape[-2])
        return self._observe_or_fake_quantize(x.mean((-2, -1), keepdim=True))

    @torch.no_grad()
    def freeze(self, in_scale, in_zero_point):
        if int(self.count) == 0:
            raise IntsimError("average pooling saw no input: calibrate the model before freezing it")
        s_out, _ = self.output_qparams()
        m0, shift = quantize_multiplier(in_scale.double() / (int(self.count) * s_out.double()))
        self.m0.copy_(m0)
        self.shift.copy_(shift)
        self.in_scale.copy_(in_scale)
        self.in_zero_point.copy_(in_zero_point)
        self.frozen.fill_(True)

    @torch.no_grad()
    def int_forward(self, q):
        if q.shape[-1] * q.shape[-2] != int(self.count):
            raise IntsimError(f"average pooling was frozen for {int(self.count)} positions, got "
                              f"{q.shape[-2]}x{q.shape[-1]}: use the image size it was calibrated on")
        acc = (q.long() - self.in_zero_point).sum((-2, -1), keepdim=True)
        z_out = self.output_qparams()[1].to(q.device)
        return requantize(acc, self.m0, self.shift, z_out, self.a_qmin, self.a_qmax,
                          self.qconfig.single_rounding).to(torch.int32)
