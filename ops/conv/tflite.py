"""CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED in .tflite files: read into an IntConv, written
from one, and rebuilt as the float nn.Conv2d / nn.Linear."""
import numpy as np
import torch
from torch import nn

from errors import IntsimError
from function import Grid

from ..base import UINT8_TO_INT8
from .kernel import IntConv, rescale_rule


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
