"""A conv/linear call site in the fx graph: every spelling recognised (nn.Conv2d, nn.Linear,
F.conv2d / F.linear on the model's parameters, a BatchNorm2d on its own), replaced by a QLayer
with the BatchNorm after it folded in, and frozen into an IntConv (freeze_layer, with TFLite's
bias-scale adjustment)."""
import torch
import torch.nn.functional as F
from torch import fx, nn

from errors import IntsimError
from function import INT32_MAX, INT_MAX_BITS, round_half_away, to_grid
from module import QLayer, fold_bn, round_bias
from quantizer import weight_quantizer

from ..base import arg, is_function, is_module, per_channel
from .kernel import FloatLayer, IntConv, rescale_rule


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
