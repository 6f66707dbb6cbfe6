"""CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED: one kernel (IntConv) for conv and linear.

In the converted graph the op is a QLayer (module.py) at each call site of an nn.Conv2d or
nn.Linear, with the BatchNorm after it folded in; `freeze_layer` turns it into an IntConv.
"""
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from errors import IntsimError
from function import (INT32_MAX, INT_MAX_BITS, Grid, int32_check, quantize_multiplier, requantize_in_double,
                      round_half_away, to_grid)
from module import QLayer, fold_bn, round_bias
from quantizer import weight_quantizer

from .base import NO_ACTIVATION, PRODUCER, UINT8_TO_INT8, FrozenOp, Op, arg, is_function, is_module, pair, per_channel

FLOAT32_EXACT = 2 ** 24   # every integer of magnitude <= 2^24 is exact in float32
SPLIT_BASE = 16           # digit base of the split accumulation (IntConv.accumulation)
SCALE_PRODUCTS = ("double", "float32")


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


# ----------------------------------------------------------------------------- convert and freeze

FUNCTIONAL_LAYERS = (F.conv2d, torch.conv2d, F.linear)


def _parameter_node(value):
    return isinstance(value, fx.Node) and value.op == "get_attr"


def _is_functional_layer(node):
    """F.conv2d(x, self.weight, self.bias, ...) or F.linear(x, self.weight, self.bias): the
    layer of timm's Conv2dSame and of every EfficientNet port (a ZeroPad2d, then F.conv2d)."""
    if not is_function(node, FUNCTIONAL_LAYERS):
        return False
    bias = arg(node, 2, "bias")
    return _parameter_node(arg(node, 1, "weight")) and (bias is None or _parameter_node(bias))


def _is_lone_bn(gm, node):
    """A BatchNorm2d that follows no conv/linear it could fold into (DenseNet's BN -> ReLU -> conv,
    a BN after a concatenation): it becomes its per-channel affine, a depthwise 1x1 conv."""
    if not is_module(gm, node, nn.BatchNorm2d) or not isinstance(node.args[0], fx.Node):
        return False
    src = node.args[0]
    return not (_is_layer_source(gm, src) and _sole_user(src) is node)


def _is_layer_source(gm, node):
    return is_module(gm, node, (nn.Conv2d, nn.Linear)) or _is_functional_layer(node) or _is_lone_bn(gm, node)


def _bn_as_conv(gm, node, bn):
    """An eval-mode BatchNorm2d as the depthwise 1x1 conv computing the same affine,
    W = gamma / sqrt(var + eps), b = beta - mean W (new parameters: QAT trains them), and a
    call_module node in the BN's place."""
    if not bn.track_running_stats or bn.running_var is None:
        raise IntsimError(f"cannot convert {node.target}: a BatchNorm without running statistics "
                          f"(track_running_stats=False)")
    c = bn.num_features
    w, b = fold_bn(torch.ones(c, 1, 1, 1, device=bn.running_var.device), None, bn)
    layer = nn.Conv2d(c, c, 1, groups=c, bias=True).to(w.device)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    name = f"{node.target}.as_conv"
    gm.add_submodule(name, layer)
    with gm.graph.inserting_after(node):
        call = gm.graph.call_module(name, (node.args[0],))
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    return call, name, layer


def _functional_layer(gm, node):
    """The nn.Conv2d / nn.Linear a functional call computes, holding the model's own weight and
    bias (the same Parameters: QAT trains them), and a call_module node in the call's place."""
    weight_node, bias_node = arg(node, 1, "weight"), arg(node, 2, "bias")
    try:
        weight = gm.get_parameter(weight_node.target)
        bias = None if bias_node is None else gm.get_parameter(bias_node.target)
    except AttributeError:
        raise IntsimError(f"cannot convert {node.name}: its weight or bias {weight_node.target} is a buffer, not a "
                          f"parameter; register it with nn.Parameter") from None
    if node.target is F.linear:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        if weight.dim() != 4:
            raise IntsimError(f"cannot convert {node.name}: F.conv2d with a {weight.dim()}-d weight")
        groups = arg(node, 6, "groups", 1)
        layer = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                          stride=arg(node, 3, "stride", 1), padding=arg(node, 4, "padding", 0),
                          dilation=arg(node, 5, "dilation", 1), groups=groups, bias=bias is not None)
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    owner = weight_node.target.rpartition(".")[0]
    name, k = f"{owner}.fn" if owner else "fn", 1
    while _has_submodule(gm, name):
        k += 1
        name = f"{owner}.fn_call{k}" if owner else f"fn_call{k}"
    gm.add_submodule(name, layer)
    with gm.graph.inserting_after(node):
        call = gm.graph.call_module(name, (node.args[0],))
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    for attr in (weight_node, bias_node):             # the parameters are read by the layer now
        if attr is not None and not attr.users:
            gm.graph.erase_node(attr)
    return call, name, layer


def _has_submodule(gm, name):
    try:
        gm.get_submodule(name)
        return True
    except AttributeError:
        return False


def _convert(gm, node, qconfig, name, layer):
    """A conv/linear call site -> a QLayer (a functional call first becomes its module)."""
    if node.op == "call_function":
        node, name, layer = _functional_layer(gm, node)
    elif isinstance(layer, nn.BatchNorm2d):
        node, name, layer = _bn_as_conv(gm, node, layer)
    _replace_layer(gm, node, qconfig, name, layer)


def _sole_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _replace_layer(gm, node, qconfig, name, layer):
    """conv/linear `layer` [-> its BatchNorm] at one call site -> a QLayer named `name`."""
    if getattr(layer, "padding_mode", "zeros") != "zeros":
        raise IntsimError(f"cannot convert {node.target}: only zero padding is supported, not {layer.padding_mode!r}")
    bn_type = nn.BatchNorm2d if isinstance(layer, nn.Conv2d) else nn.BatchNorm1d
    nxt, bn = _sole_user(node), None
    if nxt is not None and is_module(gm, nxt, bn_type):
        bn = gm.get_submodule(nxt.target)
        if not bn.track_running_stats or bn.running_var is None:
            raise IntsimError(f"cannot fold {nxt.target} (BatchNorm without running statistics, "
                              f"track_running_stats=False) into {node.target}")
        nxt.replace_all_uses_with(node)
        gm.graph.erase_node(nxt)
    w_quantizer = weight_quantizer(qconfig, qconfig.w_grid, layer.weight.shape[0], f"{name} weights")
    gm.add_submodule(name, QLayer(layer, w_quantizer, bn, qconfig.fold_bn, qconfig.bias_bits,
                                  qconfig.single_rounding, qconfig.legacy_kernels))
    node.target = name


@torch.no_grad()
def freeze_layer(layer, inp, out, act_range, generator=None, kernel="int8"):
    """A QLayer's frozen op: an IntConv holding integer weights (from the weight quantizer: its
    rounding, or AdaRound's), an int32 bias at S_in S_w (zero point 0) and the input and output
    (S, Z); it computes M0, shift and the accumulator bound itself. `inp`, `out`: (S, Z) of the
    input and output, or None for float activations (then the bias stays real). `act_range`:
    the fused activation's real range (ReLU: (0, inf)). A layer left float becomes a FloatLayer;
    with BN unfolded, the BN follows as a second module. `kernel`: the LiteRT kernel whose
    integers a per-tensor layer on unsigned activations reproduces (model.freeze)."""
    w, b = layer.weight_bias()
    geometry = dict(is_conv=layer.is_conv, **{k: v for k, v in layer.fn_kwargs.items()})
    if layer.w_quantizer is None:
        return [FloatLayer(w, b, **geometry)]
    q = layer.w_quantizer
    q.fit(w)
    w_q = q.integers(w, generator).to(torch.int32)
    s_w, z_w = q.qparams()
    b = round_bias(b, layer.bias_bits)
    if inp is None:
        op = IntConv(w_q, s_w, z_w, b, grid=q.grid, **geometry)
    else:
        adjusted = 0
        if q.grid.symmetric and max(q.grid.bits, inp.grid.bits, out.grid.bits) <= INT_MAX_BITS:
            s_w, changed = adjust_weight_scale(b, inp.scale, s_w, q.grid)
            if changed.any():             # those channels' weights on their new, coarser grid (nearest)
                w_c = w.detach()[changed] / per_channel(s_w[changed], w[changed]).to(w.device)
                w_q[changed] = to_grid(round_half_away(w_c), 0, q.grid.qmin, q.grid.qmax).to(torch.int32)
                adjusted = int(changed.sum())
        # Bias: int32 at scale S_in * S_w[c], zero point 0 (computed in float64 as TFLite does).
        b_q = round_half_away(b.double() / (inp[0].double().to(w.device) * s_w.double()))
        if b_q.abs().max() > INT32_MAX and max(q.grid.bits, inp.grid.bits, out.grid.bits) <= INT_MAX_BITS:
            raise IntsimError(f"{q.name.removesuffix(' weights')}: the bias does not fit int32 at scale S_in*S_w "
                              f"(|bias| up to {b.abs().max().item():.3g}, S_in*S_w down to "
                              f"{(inp[0].double().to(w.device) * s_w.double()).min().item():.3g}); symmetric weights "
                              f"(no --w-asymmetric) would get a larger scale there, as TFLite's converter does")
        per_tensor = bool((s_w == s_w.reshape(-1)[0]).all())       # one S_w (a per-tensor quantizer holds C equal ones)
        rule = rescale_rule(kernel == "uint8" and not inp.grid.signed and per_tensor, layer.is_conv,
                            layer.legacy_kernels)
        op = IntConv(w_q, s_w, z_w, b_q, grid=q.grid, inp=inp, out=out, act_range=act_range,
                     single_rounding=layer.single_rounding, **rule, **geometry)
        op.bias_scale_adjusted = adjusted
    return [op, layer.bn] if layer.unfolded else [op]


BIAS_HEADROOM = 0.5     # TFLite keeps a quantized bias within the middle half of int32's range


def adjust_weight_scale(bias, s_in, s_w, grid):
    """TFLite's AdjustWeightsForBiasScale (lite/tools/optimize/quantization_utils.cc), which its
    converter runs before quantizing a conv's weights: where |b| >= 0.5 S_in S_w INT32_MAX (the
    int32 bias b / (S_in S_w) would leave the middle half of its range: BN folding leaves
    channels of almost-zero weights, whose S_w is tiny), the weight range becomes
    max = 2 |b| / INT32_MAX * (QMAX / S_in), S_w = max / QMAX, so the bias lands at INT32_MAX / 2.
    Per tensor (every S_w equal) one range for all, from the largest |b|. Returns (S_w (C,)
    float32, the channels changed (C,) bool). The arithmetic is TFLite's: float32 tensors,
    double expressions, the range stored as float32, S_w = max / QMAX in float32."""
    b = bias.detach().float().abs().double()
    s_in, s_w = float(s_in.float()), s_w.detach().float()
    per_tensor = bool((s_w == s_w[0]).all())
    if per_tensor:
        b = b.max().expand_as(s_w)
    changed = b >= BIAS_HEADROOM * s_in * s_w.double() * INT32_MAX
    if per_tensor:
        changed = changed & changed[0]
    new_max = (2.0 * b / INT32_MAX * (grid.qmax / s_in)).float()
    return torch.where(changed, new_max / grid.qmax, s_w), changed


def _freeze(freezer, node, ins, out, act):
    return freeze_layer(freezer.qmodel.get_submodule(node.target), ins[0], out, act, freezer.generator, freezer.kernel)


def _refuse_bn(gm, node):
    if is_module(gm, node, nn.BatchNorm1d):
        return ("a BatchNorm1d is folded into the linear layer directly before it, and this one follows no "
                "linear whose output it alone uses (a BatchNorm2d on its own converts, as a depthwise 1x1 conv)")
    return None


# ----------------------------------------------------------------------------- TFLite

def _read_conv(imp, op, kind):
    r = imp.reader
    x, w, b = op.inputs[0], op.inputs[1], op.inputs[2]
    o = op.builtinOptions
    w_int = torch.from_numpy(r.data(w).astype(np.int64))
    # CONV_2D filters are [O, KH, KW, I], DEPTHWISE_CONV_2D filters [1, KH, KW, O]: to [O, I/groups, KH, KW]
    w_int = w_int.permute(3, 0, 1, 2) if kind == "DEPTHWISE_CONV_2D" else w_int.permute(0, 3, 1, 2)
    # DEPTHWISE_CONV_2D: a group per input channel; CONV_2D: input depth / filter depth groups
    groups = r.shape(x)[3] if kind == "DEPTHWISE_CONV_2D" else r.shape(x)[3] // w_int.shape[1]
    w_scale, w_zero_point, _ = r.scales(w)
    bias = torch.from_numpy(r.data(b).astype(np.int64)) if b >= 0 else torch.zeros(len(w_int), dtype=torch.int64)
    stride, dilation = (o.strideH, o.strideW), (o.dilationHFactor, o.dilationWFactor)
    pad = r.padding(o, r.shape(x), w_int.shape[2:], stride, dilation)
    grid = Grid(8, signed=r.type_name(w) == "INT8")
    inp = r.activation(x)
    module = IntConv(w_int.contiguous(), w_scale, w_zero_point, bias, grid, is_conv=True, stride=stride, padding=pad,
                     dilation=dilation, groups=groups, inp=inp, out=r.activation(op.outputs[0]),
                     act_range=r.act(o, kind), **rescale_rule(r.type_name(x) == "UINT8", True))
    return imp.module(f"{kind.lower()}_{imp.index}", module, op, [x])


def _read_fully_connected(imp, op, kind):
    """FULLY_CONNECTED, rescaled in double as LiteRT's reference kernel does. When its input is a
    TFLite flatten of NHWC data (imp.spatial), the weight columns go to intsim's (C, H, W)."""
    r = imp.reader
    x, w, b = op.inputs[0], op.inputs[1], op.inputs[2]
    w_int = torch.from_numpy(r.data(w).astype(np.int64))
    source = _fully_connected_source(imp, op, x)
    spatial = imp.spatial.pop(x, None)
    if spatial is not None:
        h, wd, c = spatial
        w_int = w_int.reshape(len(w_int), h, wd, c).permute(0, 3, 1, 2).reshape(len(w_int), -1)
    w_scale, w_zero_point, _ = r.scales(w)
    bias = torch.from_numpy(r.data(b).astype(np.int64)) if b >= 0 else torch.zeros(len(w_int), dtype=torch.int64)
    inp = r.activation(x)
    module = IntConv(w_int.contiguous(), w_scale, w_zero_point, bias, Grid(8, signed=r.type_name(w) == "INT8"),
                     is_conv=False, inp=inp, out=r.activation(op.outputs[0]), act_range=r.act(op.builtinOptions, kind),
                     **rescale_rule(r.type_name(x) == "UINT8", False))
    return imp.module(f"{kind.lower()}_{imp.index}", module, op, [source])


def _fully_connected_source(imp, op, x):
    """What a FULLY_CONNECTED reads. TFLite's flattens every dimension but the last into rows:
    on an N-d input whose inner dimensions are all 1 ([N, 1, 1, C] after a pool), that is
    intsim's flatten(x, 1), put in front; on a larger map it would apply the layer at every
    position, which intsim refuses here (not when running)."""
    r = imp.reader
    shape = r.shape(x)
    if len(shape) <= 2:
        return x
    options = op.builtinOptions
    if any(d != 1 for d in shape[1:-1]) or (options is not None and options.keepNumDims):
        why = "keeps its input's dimensions (keep_num_dims)" if all(d == 1 for d in shape[1:-1]) else \
            f"applies the layer at each of the {int(np.prod(shape[1:-1]))} positions of its {shape} input"
        raise IntsimError(f"{r.path}: op {imp.index} FULLY_CONNECTED {why}: intsim imports a FULLY_CONNECTED on a "
                          f"[N, C] input, or on [N, 1, ..., 1, C] without keep_num_dims")
    key = ("flatten", x)
    imp.nodes[key] = imp.graph.call_function(torch.flatten, (imp.nodes[x], 1))
    return key


def _write(ex, node, op):
    x, in_qp, in_off, in_shape = ex.src(node)
    out_qp = op.out_params()
    w_q, z_w, s_w = op.w_q.long(), op.w_zero_point.long(), op.w_scale.float()
    per_channel_w = len(s_w) > 1 and not bool((s_w == s_w[0]).all() and (z_w == z_w[0]).all())
    if not per_channel_w:
        s_w, z_w = s_w[:1], z_w[:1]
    if ex.scheme == "uint8":
        if per_channel_w:
            raise IntsimError(f"cannot export {node.name} as uint8: TFLite's per-channel weights are int8 "
                              f"(use --tflite-scheme int8, or per-tensor weights)")
        if op.w_q.min() < 0:               # signed symmetric weights: the same differences q - Z on uint8
            w_q, z_w = w_q + UINT8_TO_INT8, z_w + UINT8_TO_INT8
    elif bool((z_w != 0).any()) or op.w_q.min() < -127:
        raise IntsimError(f"cannot export {node.name} as int8: TFLite's int8 weights are symmetric in "
                          f"[-127, 127] (Z = 0); drop --w-asymmetric or use --tflite-scheme uint8")
    w_type = "UINT8" if ex.scheme == "uint8" else "INT8"
    w_np = w_q.numpy().astype(np.uint8 if w_type == "UINT8" else np.int8)
    bias = op.b_q.numpy().astype(np.int32)
    b_scale = (in_qp.scale.float() * s_w).numpy()       # the bias's scale S_in S_w, per weight scale
    act = ex.fused_activation(op, out_qp, node.name)
    if not op.is_conv:
        if len(in_shape) == 4:
            raise IntsimError(f"cannot export {node.name}: a linear layer on a 4-D tensor")
        if ex.flattened_from is not None and node.args[0] is ex.flattened_node:
            c, h, wd = ex.flattened_from            # intsim flattened (C, H, W); TFLite flattens (H, W, C)
            w_np = w_np.reshape(len(w_np), c, h, wd).transpose(0, 2, 3, 1).reshape(len(w_np), -1)
        w, b = _weights(ex, node, w_np, w_type, s_w, z_w, 0, bias, b_scale)
        out = ex.act_tensor(node, out_qp, node.name)
        o = ex.w.s.FullyConnectedOptionsT()
        o.fusedActivationFunction = act
        ex.w.op("FULLY_CONNECTED", [x, w, b], [out], o, "FullyConnectedOptions")
        return
    groups, (o_ch, _, kh, kw) = op.groups, w_np.shape
    depthwise = op.depthwise          # a grouped conv otherwise: CONV_2D with filters of I / groups channels
    pad = ex.padding_of(op.pad, in_shape, (kh, kw), op.stride, op.dilation)
    if pad is None:
        x, in_shape = ex.pad(node, x, in_qp, in_off, in_shape, op.pad)
        pad = ex.w.s.Padding.VALID
    if depthwise:        # [O, 1, KH, KW] -> [1, KH, KW, O], channels along dimension 3
        w_np, dim, kind = w_np.transpose(1, 2, 3, 0), 3, "DEPTHWISE_CONV_2D"
        options = ex.w.s.DepthwiseConv2DOptionsT()
        options.depthMultiplier = o_ch // groups
    else:                # [O, I, KH, KW] -> [O, KH, KW, I]
        w_np, dim, kind, options = w_np.transpose(0, 2, 3, 1), 0, "CONV_2D", ex.w.s.Conv2DOptionsT()
    options.padding, options.fusedActivationFunction = pad, act
    options.strideH, options.strideW = op.stride
    options.dilationHFactor, options.dilationWFactor = op.dilation
    w, b = _weights(ex, node, w_np, w_type, s_w, z_w, dim, bias, b_scale)
    out = ex.act_tensor(node, out_qp, node.name)
    ex.w.op(kind, [x, w, b], [out], options, "DepthwiseConv2DOptions" if depthwise else "Conv2DOptions")
    ex.lowest[node] = op.act_min


def _weights(ex, node, w_np, w_type, s_w, z_w, dim, bias, b_scale):
    """The weight tensor (channels along `dim`) and the int32 bias at S_in S_w (zero point 0)."""
    w = ex.w.tensor(f"{node.name}.weight", w_np.shape, w_type, s_w.numpy(), z_w.numpy(), w_np, dim=dim)
    b = ex.w.tensor(f"{node.name}.bias", bias.shape, "INT32", b_scale, np.zeros(len(b_scale), dtype=np.int64),
                    bias, dim=0)
    return w, b


def _float(fb, node, op, args):
    """An imported IntConv as nn.Conv2d / nn.Linear with W = S_w (q_w - Z_w) and b = S_in S_w q_b
    (a bias of zero point 0 at scale S_in S_w, as TFLite stores it), and the nn.ZeroPad2d before
    it when TFLite's SAME padding is uneven (PyTorch's conv pads both sides alike)."""
    w = op.real_weight(torch.float32)
    b = (op.b_q.double() * (op.in_scale.double() * op.w_scale.double())).float()
    x = args[0]
    if not op.is_conv:
        layer = nn.Linear(w.shape[1], w.shape[0])
    else:
        left, right, top, bottom = op.pad
        even = left == right and top == bottom
        layer = nn.Conv2d(w.shape[1] * op.groups, w.shape[0], tuple(w.shape[2:]), op.stride,
                          (top, left) if even else 0, op.dilation, op.groups)
        if not even:
            x = fb.call(f"{node.target}_pad", nn.ZeroPad2d(op.pad), (x,))
    with torch.no_grad():
        layer.weight.copy_(w.reshape(layer.weight.shape))
        layer.bias.copy_(b)
    return fb.call(node.target, layer, (x,))


CONV = Op("conv/linear", PRODUCER, lambda gm, n: is_module(gm, n, QLayer),
          spelling="conv/linear [+BatchNorm] (nn.Conv2d, nn.Linear, F.conv2d / F.linear on parameters; a BatchNorm2d on its own as a depthwise 1x1 conv)",
          source=_is_layer_source, convert=_convert, freeze=_freeze, float_freeze=True, refuse=_refuse_bn,
          frozen=(IntConv, FloatLayer),
          float_modules={"BatchNorm2d": (nn.BatchNorm2d, ("num_features", "eps", "momentum", "affine")),
                         "BatchNorm1d": (nn.BatchNorm1d, ("num_features", "eps", "momentum", "affine"))},
          tflite_read={"CONV_2D": _read_conv, "DEPTHWISE_CONV_2D": _read_conv,
                       "FULLY_CONNECTED": _read_fully_connected},
          tflite_write={IntConv: _write}, to_float={IntConv: _float})
