"""Real TFLite files in intsim: read a quantized .tflite model into the same frozen integer ops
PTQ produces (frozen.py), so a deployed, pretrained network runs in readable PyTorch, layer by
layer, and its integers can be compared with LiteRT's; and write a frozen model as a .tflite
file (export_tflite), checked in LiteRT (export_and_check).

    frozen, info = import_tflite("mobilenet_v1_0.25_128_quant.tflite")
    set_mode(frozen, "int"); logits = frozen(x)        # x: NCHW reals S (q - Z) of the input bytes
    data, tensor, offset = export_tflite(frozen, "int8", x[:1])    # .tflite bytes

The .tflite schema is read with LiteRT's own generated object API (ai-edge-litert), never a
hand-written parser. TFLite is NHWC, intsim NCHW: weights are transposed on import and every
tensor in between is the same integers in another layout.

Ops and the kernel each maps to (TFLite's reference kernels decide):
  CONV_2D, DEPTHWISE_CONV_2D  IntConv (groups = input channels for depthwise); uint8 models take M
                              from the float32 product S_in S_w, int8 models (per-tensor or
                              per-channel) from the double product (kernel_util.cc)
  FULLY_CONNECTED             IntConv(is_conv=False), rescaled in double (the pinned LiteRT's
                              reference kernel: one rounding of acc * M, no fixed-point multiplier)
  AVERAGE_POOL_2D             IntAvgPool (no rescale; uint8 rounds half up, int8 half away)
  MAX_POOL_2D, ADD, PAD       IntMaxPool, IntAdd (TFLite's ADD), IntPad (with the zero point)
  MEAN                        IntMean with TFLite's 1/N folding into the multiplier
  RESHAPE                     a flatten of NHWC data (a following FULLY_CONNECTED's weight columns
                              are reordered from (H, W, C) to intsim's (C, H, W))
  QUANTIZE / DEQUANTIZE       the model's float input and output
  SOFTMAX                     not run: the model stops before it (the logits' integers are what
                              is compared; the class ranking is the same)
Fused activations (NONE, RELU, RELU6, RELU_N1_TO_1) become the op's act_min / act_max, and
SAME padding is TFLite's: the odd pixel goes after (bottom / right), padded with the input's Z.
"""
import math
import operator
import os
from types import SimpleNamespace

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from checkpoint import write_bytes
from data import Batches
from engine import predict
from errors import IntsimError
from frozen import (NO_ACTIVATION, Dequantize, IntAdd, IntAvgPool, IntConv, IntMaxPool, IntMean, IntPad, QParams,
                    Quantize, activation_bounds, output_integers, set_mode)
from function import Grid

LITERT_MISSING = ("this needs the LiteRT interpreter and the .tflite schema: pip install ai-edge-litert "
                  "(where it has no wheel for your platform, the rest of intsim works without it)")
TFLITE_IDENTIFIER = b"TFL3"      # the flatbuffer file identifier, bytes 4..8 of every .tflite file
ACTIVATIONS = {"NONE": NO_ACTIVATION, "RELU": (0.0, math.inf), "RELU6": (0.0, 6.0), "RELU_N1_TO_1": (-1.0, 1.0)}
INTEGER_TYPES = {"UINT8": False, "INT8": True}     # activation type -> signed


def litert():
    """(interpreter module, schema module) of ai-edge-litert, or a one-line error saying how to install it."""
    try:
        from ai_edge_litert import interpreter, schema_py_generated
    except ImportError:
        raise IntsimError(LITERT_MISSING) from None
    return interpreter, schema_py_generated


def _names(enum_class):
    return {v: k for k, v in vars(enum_class).items() if not k.startswith("_")}


def read_model(path):
    """The file's ModelT (the schema's object API), after checking it is a .tflite file."""
    _, schema = litert()
    if not os.path.isfile(path):
        raise IntsimError(f"{path} not found: give the path of a .tflite file")
    with open(path, "rb") as f:
        buf = f.read()
    if len(buf) < 8 or buf[4:8] != TFLITE_IDENTIFIER:
        raise IntsimError(f"{path} is not a TFLite flatbuffer (no 'TFL3' identifier): is it truncated, "
                          f"or another format?")
    try:
        model = schema.ModelT.InitFromPackedBuf(buf, 0)
    except Exception as e:      # a corrupt flatbuffer fails anywhere inside the generated reader
        raise IntsimError(f"{path} could not be read as a TFLite model ({type(e).__name__}): "
                          f"is it truncated?") from None
    if len(model.subgraphs) != 1:
        raise IntsimError(f"{path} has {len(model.subgraphs)} subgraphs; intsim imports single-graph models")
    return model


class _Reader:
    """One subgraph's tensors: quantization parameters, constant data, names of enums."""

    def __init__(self, model, path):
        _, schema = litert()
        self.model, self.path, self.graph = model, path, model.subgraphs[0]
        self.type_names = _names(schema.TensorType)
        self.op_names = _names(schema.BuiltinOperator)
        self.activation_names = _names(schema.ActivationFunctionType)
        self.padding_names = _names(schema.Padding)

    def op_name(self, op):
        code = self.model.operatorCodes[op.opcodeIndex]
        return self.op_names[max(code.builtinCode, code.deprecatedBuiltinCode)]

    def tensor(self, i):
        return self.graph.tensors[i]

    def shape(self, i):
        return [int(d) for d in self.tensor(i).shape]

    def type_name(self, i):
        return self.type_names[self.tensor(i).type]

    def scales(self, i):
        """(scale (C,) float32, zero point (C,) int64, quantized dimension) of a tensor."""
        q = self.tensor(i).quantization
        if q is None or q.scale is None or len(q.scale) == 0:
            raise IntsimError(f"{self.path}: tensor {self.tensor(i).name.decode()!r} is not quantized "
                              f"(a float model?): intsim imports uint8 / int8 quantized models")
        return (torch.tensor(np.asarray(q.scale, dtype=np.float32)),
                torch.tensor(np.asarray(q.zeroPoint, dtype=np.int64)), int(q.quantizedDimension))

    def activation(self, i):
        """QParams of an activation tensor (uint8 or int8, one scale)."""
        kind = self.type_name(i)
        if kind not in INTEGER_TYPES:
            raise IntsimError(f"{self.path}: tensor {self.tensor(i).name.decode()!r} is {kind}; intsim's "
                              f"integer path imports 8-bit activations (uint8 or int8)")
        scale, zero_point, _ = self.scales(i)
        return QParams(scale[:1], zero_point[:1], Grid(8, signed=INTEGER_TYPES[kind]))

    def is_constant(self, i):
        raw = self.model.buffers[self.tensor(i).buffer].data
        return raw is not None and len(raw) > 0

    def data(self, i):
        """A constant tensor's values (numpy, in its own type and shape)."""
        t = self.tensor(i)
        raw = self.model.buffers[t.buffer].data
        if raw is None:
            raise IntsimError(f"{self.path}: tensor {t.name.decode()!r} should be constant but has no data")
        dtype = {"UINT8": np.uint8, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64}[self.type_name(i)]
        return np.frombuffer(bytes(raw), dtype=dtype).reshape(self.shape(i))


def same_padding(size, kernel, stride, dilation):
    """TFLite's SAME padding of one dimension as (before, after): the output is ceil(size /
    stride), and an odd total goes after (ComputePaddingWithOffset)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _padding(reader, options, in_shape, kernel, stride, dilation):
    """(left, right, top, bottom) for an NHWC input of `in_shape`."""
    if reader.padding_names[options.padding] == "VALID":
        return (0, 0, 0, 0)
    top, bottom = same_padding(in_shape[1], kernel[0], stride[0], dilation[0])
    left, right = same_padding(in_shape[2], kernel[1], stride[1], dilation[1])
    return (left, right, top, bottom)


def _act(reader, options, where):
    name = reader.activation_names[options.fusedActivationFunction]
    if name not in ACTIVATIONS:
        raise IntsimError(f"{reader.path}: {where} has fused activation {name}; intsim supports {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _conv(reader, op, kind):
    x, w, b = op.inputs[0], op.inputs[1], op.inputs[2]
    o = op.builtinOptions
    w_int = torch.from_numpy(reader.data(w).astype(np.int64))
    # CONV_2D filters are [O, KH, KW, I], DEPTHWISE_CONV_2D filters [1, KH, KW, O]: to [O, I/groups, KH, KW]
    w_int = w_int.permute(3, 0, 1, 2) if kind == "DEPTHWISE_CONV_2D" else w_int.permute(0, 3, 1, 2)
    groups = reader.shape(x)[3] if kind == "DEPTHWISE_CONV_2D" else 1
    w_scale, w_zero_point, _ = reader.scales(w)
    bias = torch.from_numpy(reader.data(b).astype(np.int64)) if b >= 0 else torch.zeros(len(w_int), dtype=torch.int64)
    stride, dilation = (o.strideH, o.strideW), (o.dilationHFactor, o.dilationWFactor)
    pad = _padding(reader, o, reader.shape(x), w_int.shape[2:], stride, dilation)
    grid = Grid(8, signed=reader.type_name(w) == "INT8")
    return IntConv(w_int.contiguous(), w_scale, w_zero_point, bias, grid, is_conv=True, stride=stride, padding=pad,
                   dilation=dilation, groups=groups, inp=reader.activation(x), out=reader.activation(op.outputs[0]),
                   act_range=_act(reader, o, kind),
                   scale_product="float32" if reader.type_name(x) == "UINT8" else "double")


def _avg_pool(reader, op, kind):
    x, o = op.inputs[0], op.builtinOptions
    inp, out = reader.activation(x), reader.activation(op.outputs[0])
    if not (torch.equal(inp.scale, out.scale) and torch.equal(inp.zero_point, out.zero_point)):
        raise IntsimError(f"{reader.path}: AVERAGE_POOL_2D with different input and output quantization "
                          f"(TFLite's kernel does not rescale)")
    kernel, stride = (o.filterHeight, o.filterWidth), (o.strideH, o.strideW)
    pad = _padding(reader, o, reader.shape(x), kernel, stride, (1, 1))
    pool = IntAvgPool(kernel, stride, pad, out, act_range=_act(reader, o, kind))
    pool.is_global = kernel == tuple(reader.shape(x)[1:3]) and pad == (0, 0, 0, 0)   # for import_tflite_float
    return pool


def _max_pool(reader, op, kind):
    x, o = op.inputs[0], op.builtinOptions
    kernel, stride = (o.filterHeight, o.filterWidth), (o.strideH, o.strideW)
    left, right, top, bottom = _padding(reader, o, reader.shape(x), kernel, stride, (1, 1))
    if (left, top) != (right, bottom) or _act(reader, o, kind) != NO_ACTIVATION:
        raise IntsimError(f"{reader.path}: MAX_POOL_2D with uneven SAME padding or a fused activation "
                          f"is not imported")
    return IntMaxPool(SimpleNamespace(kernel_size=kernel, stride=stride, padding=(top, left), dilation=1,
                                      ceil_mode=False))


def _fully_connected(reader, op, kind, spatial=None):
    """FULLY_CONNECTED, rescaled in double as LiteRT's reference kernel does. `spatial` (H, W, C)
    when its input is a TFLite flatten of NHWC data: the weight columns go to intsim's (C, H, W)."""
    x, w, b = op.inputs[0], op.inputs[1], op.inputs[2]
    o = op.builtinOptions
    w_int = torch.from_numpy(reader.data(w).astype(np.int64))
    if spatial is not None:
        h, wd, c = spatial
        w_int = w_int.reshape(len(w_int), h, wd, c).permute(0, 3, 1, 2).reshape(len(w_int), -1)
    w_scale, w_zero_point, _ = reader.scales(w)
    bias = torch.from_numpy(reader.data(b).astype(np.int64)) if b >= 0 else torch.zeros(len(w_int), dtype=torch.int64)
    return IntConv(w_int.contiguous(), w_scale, w_zero_point, bias, Grid(8, signed=reader.type_name(w) == "INT8"),
                   is_conv=False, inp=reader.activation(x), out=reader.activation(op.outputs[0]),
                   act_range=_act(reader, o, kind), rescale_in_double=True)


def _add(reader, op, kind):
    a, b = op.inputs[0], op.inputs[1]
    if reader.shape(a) != reader.shape(b):
        raise IntsimError(f"{reader.path}: ADD with broadcasting ({reader.shape(a)} + {reader.shape(b)}) "
                          f"is not imported")
    return IntAdd(reader.activation(a), reader.activation(b), reader.activation(op.outputs[0]),
                  act_range=_act(reader, op.builtinOptions, kind))


def _mean(reader, op, kind):
    x, axis = op.inputs[0], op.inputs[1]
    n, h, w, c = reader.shape(x)
    if sorted(int(a) for a in reader.data(axis).reshape(-1)) != [1, 2]:
        raise IntsimError(f"{reader.path}: MEAN over axes other than (1, 2) (height, width) is not imported")
    return IntMean(h * w, reader.activation(x), reader.activation(op.outputs[0]), keepdim=op.builtinOptions.keepDims,
                   tflite_fold=True)


def _pad(reader, op, kind):
    x, paddings = op.inputs[0], reader.data(op.inputs[1]).reshape(-1, 2)
    inp, out = reader.activation(x), reader.activation(op.outputs[0])
    if len(paddings) != 4 or paddings[0].any() or paddings[3].any() or not (
            torch.equal(inp.scale, out.scale) and torch.equal(inp.zero_point, out.zero_point)):
        raise IntsimError(f"{reader.path}: PAD other than of height and width on one grid is not imported")
    (top, bottom), (left, right) = paddings[1], paddings[2]
    return IntPad((int(left), int(right), int(top), int(bottom)), inp)


IMPORTERS = {"CONV_2D": _conv, "DEPTHWISE_CONV_2D": _conv, "PAD": _pad, "AVERAGE_POOL_2D": _avg_pool,
             "MAX_POOL_2D": _max_pool,
             "ADD": _add, "MEAN": _mean}
SHAPE_OPS = ("RESHAPE", "SQUEEZE")
EDGE_OPS = ("QUANTIZE", "DEQUANTIZE")    # float in / float out at the model's edges
STOP_OPS = ("SOFTMAX",)
SUPPORTED = sorted(IMPORTERS) + ["FULLY_CONNECTED"] + list(SHAPE_OPS) + list(EDGE_OPS) + list(STOP_OPS)


def import_tflite(path):
    """A quantized .tflite model as a frozen intsim graph (Quantize -> integer ops -> Dequantize),
    and an info dict: input shape (NHWC) and QParams, the output tensor compared with LiteRT's
    (`compare_tensor`: its index in the file), and which op the import stopped before, if any."""
    reader = _Reader(read_model(path), path)
    graph, ops = reader.graph, list(reader.graph.operators)
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise IntsimError(f"{path}: intsim imports models with one input and one output")
    fx_graph, modules, nodes, spatial = fx.Graph(), {}, {}, {}
    x_index = int(graph.inputs[0])
    if reader.type_name(x_index) == "FLOAT32":      # float input: the model starts with its QUANTIZE
        if not ops or reader.op_name(ops[0]) != "QUANTIZE":
            raise IntsimError(f"{path} is a float model (its input is FLOAT32 and is not quantized first): "
                              f"intsim imports uint8 / int8 quantized models")
        x_index, ops = int(ops[0].outputs[0]), ops[1:]
    modules["quant_in"] = Quantize(reader.activation(x_index))
    nodes[x_index] = fx_graph.call_module("quant_in", (fx_graph.placeholder("x"),))
    last, stopped = x_index, None
    for i, op in enumerate(ops):
        kind = reader.op_name(op)
        if kind in STOP_OPS or kind == "DEQUANTIZE":
            stopped = kind if kind in STOP_OPS else None
            if i != len(ops) - 1:
                raise IntsimError(f"{path}: {kind} is op {i} of {len(ops)}; intsim stops only before a final {kind}")
            break
        inputs = [int(t) for t in op.inputs if int(t) >= 0 and not reader.is_constant(int(t))]   # activations
        missing = [t for t in inputs if t not in nodes]
        if missing:
            raise IntsimError(f"{path}: op {i} ({kind}) reads tensor {missing[0]}, which no imported op produced")
        src, out = inputs[0], int(op.outputs[0])
        if kind in SHAPE_OPS:
            shape_in, shape_out = reader.shape(src), reader.shape(out)
            if len(shape_in) != 4 or shape_out[-1] != int(np.prod(shape_in[1:])) or len(shape_out) != 2:
                raise IntsimError(f"{path}: {kind} {shape_in} -> {shape_out} is not a flatten of NHWC data, "
                                  f"the only reshape intsim imports")
            nodes[out] = fx_graph.call_function(torch.flatten, (nodes[src], 1))
            if shape_in[1] * shape_in[2] > 1:
                spatial[out] = tuple(shape_in[1:])     # (H, W, C): a following FULLY_CONNECTED must reorder
        elif kind in IMPORTERS or kind == "FULLY_CONNECTED":
            name = f"{kind.lower()}_{i}"
            if kind == "FULLY_CONNECTED":
                modules[name] = _fully_connected(reader, op, kind, spatial.pop(src, None))
            else:
                modules[name] = IMPORTERS[kind](reader, op, kind)
            options = op.builtinOptions
            if hasattr(options, "fusedActivationFunction"):   # kept for import_tflite_float
                modules[name].fused_activation = _act(reader, options, kind)
            nodes[out] = fx_graph.call_module(name, tuple(nodes[t] for t in inputs))
        else:
            raise IntsimError(f"{path}: op {i} is {kind}, which intsim does not import "
                              f"(supported: {', '.join(SUPPORTED)})")
        if spatial and src in spatial:
            raise IntsimError(f"{path}: a flatten of NHWC data feeds {kind}, not a FULLY_CONNECTED: intsim's NCHW "
                              f"layout orders it differently")
        last = out
    modules["dequant_out"] = Dequantize(reader.activation(last))
    fx_graph.output(fx_graph.call_module("dequant_out", (nodes[last],)))
    frozen = fx.GraphModule(modules, fx_graph, class_name="ImportedModel")
    info = {"input_shape": reader.shape(x_index), "input": reader.activation(x_index), "compare_tensor": last,
            "output_shape": reader.shape(last), "stopped_before": stopped,
            "input_type": reader.type_name(int(graph.inputs[0]))}
    return frozen, info


# What TFLite's ImageNet evaluation feeds a model's input tensor, by its type, from the RGB bytes
# (tools/evaluation's AddDefaultNormalizationStep): (bytes - mean) * scale.
EVAL_NORMALIZATION = {"UINT8": (0.0, 1.0), "INT8": (128.0, 1.0), "FLOAT32": (127.5, 1.0 / 127.5)}
IMAGENET_OUTPUTS = (1000, 1001)      # ImageNet classes, with or without TF-slim's background class at 0


def imagenet_classifier(path, info):
    """(input size, background classes) of an imported model that ImageNet images can be fed to
    and scored on: a square 3-channel input and 1000 or 1001 outputs; otherwise one line naming
    what the file takes, before any image is loaded."""
    shape, out = info["input_shape"], info["output_shape"]
    if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
        raise IntsimError(f"{path} takes inputs of shape {list(shape)} (NHWC): intsim feeds it ImageNet images, "
                          f"which need a square RGB input [1, H, H, 3]; score this model on its own data set")
    if out[-1] not in IMAGENET_OUTPUTS:
        raise IntsimError(f"{path} has {out[-1]} outputs: not an ImageNet classifier (1000 or 1001), so its "
                          f"predictions cannot be scored against ImageNet labels")
    return shape[1], out[-1] - IMAGENET_OUTPUTS[0]


def model_input(images, input_type):
    """RGB bytes (N, 3, H, W) uint8 as TFLite's evaluation feeds an input tensor of `input_type`:
    the bytes (UINT8), bytes - 128 (INT8), (bytes - 127.5) / 127.5 in float32 (FLOAT32)."""
    if input_type not in EVAL_NORMALIZATION:
        raise IntsimError(f"the model's input is {input_type}: intsim feeds images to UINT8, INT8 or FLOAT32 inputs")
    mean, scale = EVAL_NORMALIZATION[input_type]
    if input_type == "UINT8":
        return images
    if input_type == "INT8":
        return (images.to(torch.int16) - int(mean)).to(torch.int8)
    return (images.float() - mean) * torch.tensor(scale, dtype=torch.float32)


def input_reals(images, info):
    """What the imported model (Quantize first) takes for those images: the reals S (q - Z) of
    an integer input, in float64 (exact), or a float input as it is (the model's own QUANTIZE,
    imported as intsim's Quantize, rounds it as LiteRT's reference QUANTIZE does, in float32)."""
    x = model_input(images, info["input_type"])
    if x.is_floating_point():
        return x
    return info["input"].scale.double() * (x.double() - info["input"].zero_point)


def _float_activation(op):
    """The float module of an imported op's fused activation (None: no activation)."""
    act = getattr(op, "fused_activation", NO_ACTIVATION)
    if act == NO_ACTIVATION:
        return None
    if act == ACTIVATIONS["RELU"]:
        return nn.ReLU()
    if act == ACTIVATIONS["RELU6"]:
        return nn.ReLU6()
    return nn.Hardtanh(*act)


def _float_layer(op):
    """An imported IntConv as nn.Conv2d / nn.Linear with W = S_w (q_w - Z_w) and b = S_in S_w q_b
    (a bias of zero point 0 at scale S_in S_w, as TFLite stores it), and the nn.ZeroPad2d before
    it when TFLite's SAME padding is uneven (PyTorch's conv pads both sides alike)."""
    w = op.real_weight(torch.float32)
    b = (op.b_q.double() * (op.in_scale.double() * op.w_scale.double())).float()
    if not op.is_conv:
        layer = nn.Linear(w.shape[1], w.shape[0])
        return [], layer, w, b
    left, right, top, bottom = op.pad
    even = left == right and top == bottom
    layer = nn.Conv2d(w.shape[1] * op.groups, w.shape[0], tuple(w.shape[2:]), op.stride,
                      (top, left) if even else 0, op.dilation, op.groups)
    return ([] if even else [nn.ZeroPad2d(op.pad)]), layer, w, b


def import_tflite_float(path):
    """A quantized .tflite model as an ordinary float nn.Module (an fx.GraphModule of nn.Conv2d,
    nn.Linear, ReLU6, pools, adds): every weight dequantized, S (q - Z), every bias S_in S_w q_b,
    no quantization left. Its input is the reals the file's input integers stand for,
    S_in (q - Z_in). What intsim's own pipeline (convert, PTQ, AdaRound) then quantizes anew.
    Returns (model, info) with import_tflite's info."""
    frozen, info = import_tflite(path)
    graph, modules, env = fx.Graph(), {}, {}

    def call(name, module, args):
        modules[name] = module
        return graph.call_module(name, args)

    for node in frozen.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
            continue
        if node.op == "output":
            graph.output(env[node.args[0]])
            continue
        args = tuple(env[a] for a in node.args if isinstance(a, fx.Node))
        if node.op == "call_function":                       # the flatten before FULLY_CONNECTED
            env[node] = graph.call_function(node.target, (args[0],) + tuple(node.args[1:]))
            continue
        op, name = frozen.get_submodule(node.target), node.target
        if isinstance(op, (Quantize, Dequantize)):
            env[node] = args[0]                               # the float model has no edges to cross
            continue
        if isinstance(op, IntConv):
            pads, layer, w, b = _float_layer(op)
            with torch.no_grad():
                layer.weight.copy_(w.reshape(layer.weight.shape))
                layer.bias.copy_(b)
            x = call(f"{name}_pad", pads[0], args) if pads else args[0]
            value = call(name, layer, (x,))
        elif isinstance(op, IntAdd):
            value = graph.call_function(operator.add, args)
        elif isinstance(op, (IntMean, IntAvgPool)):
            if isinstance(op, IntAvgPool) and not getattr(op, "is_global", False):
                raise IntsimError(f"{path}: an AVERAGE_POOL_2D that is not a global average pool has no "
                                  f"float counterpart intsim converts")
            value = call(name, nn.AdaptiveAvgPool2d(1), args)
            if isinstance(op, IntMean) and not op.keepdim:
                value = graph.call_function(torch.flatten, (value, 1))
        elif isinstance(op, IntPad):
            value = call(name, nn.ZeroPad2d(op.pad), args)
        elif isinstance(op, IntMaxPool):
            value = call(name, nn.MaxPool2d(op.kernel_size, op.stride, op.padding), args)
        else:
            raise IntsimError(f"{path}: no float counterpart for {type(op).__name__}")
        act = _float_activation(op)
        env[node] = call(f"{name}_act", act, (value,)) if act is not None else value
    model = fx.GraphModule(modules, graph, class_name="TFLiteFloatModel")
    return model.eval(), info


# ----------------------------------------------------------------------------- export

SCHEMES = ("uint8", "int8")
# uint8: the 2018 paper's scheme (uint8 activations, per-tensor uint8 weights with zero points);
# int8: TFLite's current one (int8 activations, int8 weights symmetric per channel, Z_w = 0).
UINT8_TO_INT8 = 128      # the same reals on the other grid: q - 128 with Z - 128


class _Writer:
    """A ModelT built op by op: tensors, their buffers, operator codes."""

    def __init__(self, scheme):
        _, self.s = litert()
        self.scheme = scheme
        self.model = self.s.ModelT()
        self.model.version = 3
        self.model.buffers = [self.s.BufferT()]          # buffer 0: the empty buffer of non-constant tensors
        self.model.operatorCodes, self.codes = [], {}
        self.graph = self.s.SubGraphT()
        self.graph.tensors, self.graph.operators = [], []
        self.model.subgraphs = [self.graph]

    def tensor(self, name, shape, kind, scale=None, zero_point=None, data=None, dim=0):
        t = self.s.TensorT()
        t.name, t.shape, t.type = name.encode(), np.asarray(shape, dtype=np.int32), getattr(self.s.TensorType, kind)
        if data is not None:
            b = self.s.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
            self.model.buffers.append(b)
            t.buffer = len(self.model.buffers) - 1
        if scale is not None:
            q = self.s.QuantizationParametersT()
            q.scale = np.asarray(scale, dtype=np.float32).reshape(-1)
            q.zeroPoint = np.asarray(zero_point, dtype=np.int64).reshape(-1)
            q.quantizedDimension = dim
            t.quantization = q
        self.graph.tensors.append(t)
        return len(self.graph.tensors) - 1

    def op(self, kind, inputs, outputs, options=None, options_type=None):
        if kind not in self.codes:
            code = self.s.OperatorCodeT()
            code.builtinCode = getattr(self.s.BuiltinOperator, kind)
            code.deprecatedBuiltinCode = min(code.builtinCode, 127)   # the field's range: larger codes say 127
            code.version = 1
            self.model.operatorCodes.append(code)
            self.codes[kind] = len(self.model.operatorCodes) - 1
        o = self.s.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = self.codes[kind], list(inputs), list(outputs)
        if options is not None:
            o.builtinOptionsType, o.builtinOptions = getattr(self.s.BuiltinOptions, options_type), options
        self.graph.operators.append(o)

    def pack(self):
        import flatbuffers
        builder = flatbuffers.Builder(1024)
        builder.Finish(self.model.Pack(builder), file_identifier=TFLITE_IDENTIFIER)
        return bytes(builder.Output())


def _grid_offset(qp, scheme, what):
    """What to add to intsim's integers of a tensor to put them on the scheme's 8-bit type."""
    if qp.grid.bits != 8:
        raise IntsimError(f"{what} has {qp.grid.bits}-bit activations: TFLite's kernels clamp to the full "
                          f"8-bit range, so only 8-bit activations export exactly (use --a-bits 8)")
    want_signed = scheme == "int8"
    return 0 if qp.grid.signed == want_signed else (-UINT8_TO_INT8 if want_signed else UINT8_TO_INT8)


def _fused_activation(op, qp, what):
    """TFLite's fused activation whose range (CalculateActivationRangeQuantized) is the op's clamp."""
    for name, real_range in ACTIVATIONS.items():
        if activation_bounds(qp, real_range) == (op.act_min, op.act_max):
            return getattr(litert()[1].ActivationFunctionType, name)
    raise IntsimError(f"{what} clamps to [{op.act_min}, {op.act_max}], which no TFLite fused activation "
                      f"(NONE, RELU, RELU6, RELU_N1_TO_1) gives on its output grid")


class _Exporter:
    """Walks a frozen graph and writes each op as its TFLite op (NHWC)."""

    def __init__(self, frozen, scheme, example):
        if scheme not in SCHEMES:
            raise IntsimError(f"unknown TFLite scheme {scheme!r}; use one of {SCHEMES}")
        self.frozen, self.scheme, self.w = frozen, scheme, _Writer(scheme)
        set_mode(frozen, "int")
        # every node's output shape as TFLite's ops produce it: the max-pool-on-accumulator shortcut
        # (IntMaxPool.run_by_producer) off, so a conv's output is the unpooled tensor
        fused = [(m, m.pool_first) for m in frozen.modules() if isinstance(m, IntConv)]
        pools = [(m, m.run_by_producer) for m in frozen.modules() if isinstance(m, IntMaxPool)]
        for m, _ in fused:
            m.pool_first = None
        for m, _ in pools:
            m.run_by_producer = False
        try:
            ShapeProp(frozen).propagate(example)
        finally:
            for m, v in fused:
                m.pool_first = v
            for m, v in pools:
                m.run_by_producer = v
        self.lowest = {}     # fx node -> the smallest integer the tensor can hold (its producer's act_min)
        self.flattened_from = self.flattened_node = None   # the last flatten of spatial data, (C, H, W)
        self.t = {}          # fx node -> (tensor index, QParams as intsim holds them, offset, NCHW shape)

    def act_tensor(self, node, qp, name):
        offset = _grid_offset(qp, self.scheme, name)
        shape = list(node.meta["tensor_meta"].shape)
        tflite_shape = [shape[0], *shape[2:], shape[1]] if len(shape) == 4 else shape
        index = self.w.tensor(name, tflite_shape, self.scheme.upper(), qp.scale.numpy(),
                              (qp.zero_point + offset).numpy())
        self.t[node] = (index, qp, offset, shape)
        return index

    def pad(self, node, x, qp, offset, in_shape, pad):
        """A PAD op (padding with the zero point: real 0) in front of a VALID op: (left, right,
        top, bottom) that TFLite's SAME cannot say (PyTorch's symmetric padding at stride 2)."""
        left, right, top, bottom = pad
        n, c, h, w = in_shape
        paddings = self.paddings(node, pad)
        out = self.w.tensor(f"{node.name}.padded", [n, h + top + bottom, w + left + right, c], self.scheme.upper(),
                            qp.scale.numpy(), (qp.zero_point + offset).numpy())
        self.w.op("PAD", [x, paddings], [out], self.w.s.PadOptionsT(), "PadOptions")
        return out, [n, c, h + top + bottom, w + left + right]

    def paddings(self, node, pad):
        """PAD's constant [[0, 0], [top, bottom], [left, right], [0, 0]] for pad = (left, right, top, bottom)."""
        left, right, top, bottom = pad
        return self.w.tensor(f"{node.name}.paddings", [4, 2], "INT32",
                             data=np.array([[0, 0], [top, bottom], [left, right], [0, 0]], dtype=np.int32))

    def src(self, node):
        arg = node.args[0]
        if arg not in self.t:
            raise IntsimError(f"cannot export {node.name}: its input {arg} is not a quantized tensor")
        return self.t[arg]

    def export(self):
        handlers = {"Quantize": self.quantize, "Dequantize": self.dequantize, "IntConv": self.conv,
                    "IntMaxPool": self.max_pool, "IntAdd": self.add, "IntMean": self.mean, "IntAvgPool": self.avg_pool,
                    "IntPad": self.int_pad}
        for node in self.frozen.graph.nodes:
            if node.op == "placeholder":
                shape = list(node.meta["tensor_meta"].shape)
                self.x = self.w.tensor("input", [shape[0], *shape[2:], shape[1]], "FLOAT32")
                self.w.graph.inputs = [self.x]
            elif node.op == "output":
                continue
            elif node.op == "call_module":
                op = self.frozen.get_submodule(node.target)
                kind = type(op).__name__
                if kind not in handlers:
                    raise IntsimError(f"cannot export {node.name}: {kind} has no TFLite op in intsim's exporter "
                                      f"(it writes {', '.join(sorted(handlers))} and flatten)")
                handlers[kind](node, op)
            elif node.op == "call_function" and node.target is torch.flatten and node.args[1:] == (1,):
                self.flatten(node)
            else:
                what = getattr(node.target, "__name__", node.target)
                raise IntsimError(f"cannot export {node.name} ({node.op} {what}): "
                                  f"the exporter writes flatten(x, 1) as RESHAPE, no other function")
        return self.w.pack()

    def quantize(self, node, op):
        qp = op.out_params()
        self.w.op("QUANTIZE", [self.x], [self.act_tensor(node, qp, node.name)])

    def dequantize(self, node, op):
        index, _, offset, shape = self.src(node)
        self.compare_tensor, self.offset = index, offset
        out = self.w.tensor("output", shape, "FLOAT32")
        self.w.op("DEQUANTIZE", [index], [out])
        self.w.graph.outputs = [out]

    def conv(self, node, op):
        x, in_qp, in_off, in_shape = self.src(node)
        out_qp = op.out_params()
        w_q, z_w, s_w = op.w_q.long(), op.w_zero_point.long(), op.w_scale.float()
        per_channel = len(s_w) > 1 and not bool((s_w == s_w[0]).all() and (z_w == z_w[0]).all())
        if not per_channel:
            s_w, z_w = s_w[:1], z_w[:1]
        if self.scheme == "uint8":
            if per_channel:
                raise IntsimError(f"cannot export {node.name} as uint8: TFLite's per-channel weights are int8 "
                                  f"(use --tflite-scheme int8, or per-tensor weights)")
            if op.w_q.min() < 0:               # signed symmetric weights: the same differences q - Z on uint8
                w_q, z_w = w_q + UINT8_TO_INT8, z_w + UINT8_TO_INT8
        elif bool((z_w != 0).any()) or op.w_q.min() < -127:
            raise IntsimError(f"cannot export {node.name} as int8: TFLite's int8 weights are symmetric in "
                              f"[-127, 127] (Z = 0); drop --w-asymmetric or use --tflite-scheme uint8")
        w_type = "UINT8" if self.scheme == "uint8" else "INT8"
        w_np = w_q.numpy().astype(np.uint8 if w_type == "UINT8" else np.int8)
        bias = op.b_q.numpy().astype(np.int32)
        b_scale = (in_qp.scale.float() * s_w).numpy()       # the bias's scale S_in S_w, per weight scale
        act = _fused_activation(op, out_qp, node.name)
        if not op.is_conv:
            if len(in_shape) == 4:
                raise IntsimError(f"cannot export {node.name}: a linear layer on a 4-D tensor")
            if self.flattened_from is not None and node.args[0] is self.flattened_node:
                c, h, wd = self.flattened_from            # intsim flattened (C, H, W); TFLite flattens (H, W, C)
                w_np = w_np.reshape(len(w_np), c, h, wd).transpose(0, 2, 3, 1).reshape(len(w_np), -1)
            w, b = self.weights(node, w_np, w_type, s_w, z_w, 0, bias, b_scale)
            out = self.act_tensor(node, out_qp, node.name)
            o = self.w.s.FullyConnectedOptionsT()
            o.fusedActivationFunction = act
            self.w.op("FULLY_CONNECTED", [x, w, b], [out], o, "FullyConnectedOptions")
            return
        groups, (o_ch, _, kh, kw) = op.groups, w_np.shape
        depthwise = op.depthwise
        if groups > 1 and not depthwise:
            raise IntsimError(f"cannot export {node.name}: a grouped conv that is not depthwise (groups {groups})")
        pad = self._padding(node, op.pad, in_shape, (kh, kw), op.stride, op.dilation)
        if pad is None:
            x, in_shape = self.pad(node, x, in_qp, in_off, in_shape, op.pad)
            pad = self.w.s.Padding.VALID
        if depthwise:        # [O, 1, KH, KW] -> [1, KH, KW, O], channels along dimension 3
            w_np, dim, kind = w_np.transpose(1, 2, 3, 0), 3, "DEPTHWISE_CONV_2D"
            options = self.w.s.DepthwiseConv2DOptionsT()
            options.depthMultiplier = o_ch // groups
        else:                # [O, I, KH, KW] -> [O, KH, KW, I]
            w_np, dim, kind, options = w_np.transpose(0, 2, 3, 1), 0, "CONV_2D", self.w.s.Conv2DOptionsT()
        options.padding, options.fusedActivationFunction = pad, act
        options.strideH, options.strideW = op.stride
        options.dilationHFactor, options.dilationWFactor = op.dilation
        w, b = self.weights(node, w_np, w_type, s_w, z_w, dim, bias, b_scale)
        out = self.act_tensor(node, out_qp, node.name)
        self.w.op(kind, [x, w, b], [out], options, "DepthwiseConv2DOptions" if depthwise else "Conv2DOptions")
        self.lowest[node] = op.act_min

    def weights(self, node, w_np, w_type, s_w, z_w, dim, bias, b_scale):
        """The weight tensor (channels along `dim`) and the int32 bias at S_in S_w (zero point 0)."""
        w = self.w.tensor(f"{node.name}.weight", w_np.shape, w_type, s_w.numpy(), z_w.numpy(), w_np, dim=dim)
        b = self.w.tensor(f"{node.name}.bias", bias.shape, "INT32", b_scale, np.zeros(len(b_scale), dtype=np.int64),
                          bias, dim=0)
        return w, b

    def _padding(self, node, pad, in_shape, kernel, stride, dilation):
        """TFLite's SAME or VALID for the op's explicit (left, right, top, bottom), or a one-line refusal."""
        if tuple(pad) == (0, 0, 0, 0):
            return self.w.s.Padding.VALID
        top, bottom = same_padding(in_shape[2], kernel[0], stride[0], dilation[0])
        left, right = same_padding(in_shape[3], kernel[1], stride[1], dilation[1])
        if tuple(pad) == (left, right, top, bottom):
            return self.w.s.Padding.SAME
        return None          # an explicit PAD, then VALID

    def int_pad(self, node, op):
        x, qp, offset, in_shape = self.src(node)
        self.w.op("PAD", [x, self.paddings(node, op.pad)], [self.act_tensor(node, qp, node.name)], self.w.s.PadOptionsT(), "PadOptions")
        self.lowest[node] = self.lowest.get(node.args[0], qp.grid.qmin)

    def max_pool(self, node, op):
        x, qp, _, in_shape = self.src(node)
        k, s_, p_, d_, ceil = op.settings()
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
        k, s_, p_, d_ = pair(k), pair(s_ if s_ is not None else k), pair(p_), pair(d_)
        if d_ != (1, 1) or ceil:
            raise IntsimError(f"cannot export {node.name}: TFLite's MAX_POOL_2D has no dilation or ceil_mode")
        if p_ != (0, 0):
            # PyTorch pads a max-pool with -inf; a PAD with the zero point (real 0) is the same
            # whenever no input is below real 0, i.e. after a ReLU
            _, _, offset, _ = self.t[node.args[0]]
            if self.lowest.get(node.args[0], qp.grid.qmin) < int(qp.zero_point):
                raise IntsimError(f"cannot export {node.name}: a padded max-pool whose input can be negative "
                                  f"(TFLite pads with the zero point, PyTorch with -inf)")
            x, in_shape = self.pad(node, x, qp, offset, in_shape, (p_[1], p_[1], p_[0], p_[0]))
        options = self._pool_options(k, s_, self.w.s.Padding.VALID, self.w.s.ActivationFunctionType.NONE)
        self.w.op("MAX_POOL_2D", [x], [self.act_tensor(node, qp, node.name)], options, "Pool2DOptions")
        self.lowest[node] = self.lowest.get(node.args[0], qp.grid.qmin)

    def avg_pool(self, node, op):
        x, qp, _, in_shape = self.src(node)
        pad = self._padding(node, op.pad, in_shape, op.kernel_size, op.stride, (1, 1))
        if pad is None:         # a PAD would be counted in the average
            raise IntsimError(f"cannot export {node.name}: average pool padding {op.pad} is neither VALID nor SAME")
        act = _fused_activation(op, qp, node.name)
        self.w.op("AVERAGE_POOL_2D", [x], [self.act_tensor(node, qp, node.name)],
                  self._pool_options(op.kernel_size, op.stride, pad, act), "Pool2DOptions")

    def _pool_options(self, kernel, stride, padding, act):
        o = self.w.s.Pool2DOptionsT()
        o.filterHeight, o.filterWidth = kernel
        o.strideH, o.strideW = stride
        o.padding, o.fusedActivationFunction = padding, act
        return o

    def add(self, node, op):
        (x1, _, _, _), (x2, _, _, _) = self.t[node.args[0]], self.t[node.args[1]]
        out_qp = op.out_params()
        o = self.w.s.AddOptionsT()
        o.fusedActivationFunction = _fused_activation(op, out_qp, node.name)
        self.w.op("ADD", [x1, x2], [self.act_tensor(node, out_qp, node.name)], o, "AddOptions")
        self.lowest[node] = op.act_min

    def mean(self, node, op):
        x, _, _, _ = self.src(node)
        out_qp = op.out_params()
        axis = self.w.tensor(f"{node.name}.axis", [2], "INT32", data=np.array([1, 2], dtype=np.int32))
        o = self.w.s.ReducerOptionsT()
        o.keepDims = bool(op.keepdim)
        self.w.op("MEAN", [x, axis], [self.act_tensor(node, out_qp, node.name)], o, "ReducerOptions")

    def flatten(self, node):
        x, qp, _, in_shape = self.src(node)
        features = int(np.prod(in_shape[1:]))
        spatial = len(in_shape) == 4 and in_shape[2] * in_shape[3] > 1
        self.flattened_from, self.flattened_node = (tuple(in_shape[1:]) if spatial else None), node
        shape = self.w.tensor(f"{node.name}.shape", [2], "INT32", data=np.array([-1, features], dtype=np.int32))
        o = self.w.s.ReshapeOptionsT()
        o.newShape = [-1, features]
        self.w.op("RESHAPE", [x, shape], [self.act_tensor(node, qp, node.name)], o, "ReshapeOptions")


def export_tflite(frozen, scheme, example):
    """A frozen intsim model as .tflite bytes (validated by LiteRT) and the index of the tensor
    whose integers equal intsim's output integers (plus `offset`: 0, or -128 / +128 where the
    scheme's 8-bit type is the other signedness)."""
    ex = _Exporter(frozen, scheme, example)
    data = ex.export()
    interpreter, _ = litert()
    try:
        reference = interpreter.OpResolverType.BUILTIN_REF
        interpreter.Interpreter(model_content=data, experimental_op_resolver_type=reference).allocate_tensors()
    except Exception as e:        # LiteRT reports a rejected model as a RuntimeError/ValueError with its log
        why = str(e).strip().splitlines()[-1][:200]
        raise IntsimError(f"LiteRT rejects the exported model ({why}); nothing written") from None
    return data, ex.compare_tensor, ex.offset


def run_litert_integers(model, images_nhwc, tensor, reference=True, batch_size=100):
    """The integers of `tensor` (N, ...) for NHWC inputs (in the model's input type), the model
    given as bytes or a path: LiteRT's reference kernels (BUILTIN_REF, the bit-exact claim) or
    its default interpreter (XNNPACK). A model with a fixed batch (a RESHAPE to [1, C]) needs
    batch_size=1. Inner tensors are preserved: without that LiteRT may overwrite `tensor`."""
    interpreter, _ = litert()
    kind = interpreter.OpResolverType.BUILTIN_REF if reference else interpreter.OpResolverType.AUTO
    source = {"model_content": model} if isinstance(model, bytes) else {"model_path": model}
    it = interpreter.Interpreter(**source, experimental_op_resolver_type=kind, experimental_preserve_all_tensors=True)
    index, out, shape = it.get_input_details()[0]["index"], [], None
    for i in range(0, len(images_nhwc), batch_size):
        chunk = np.ascontiguousarray(images_nhwc[i:i + batch_size])
        if chunk.shape != shape:                       # a new batch size: resize once, not per call
            it.resize_tensor_input(index, list(chunk.shape))
            it.allocate_tensors()
            shape = chunk.shape
        it.set_tensor(index, chunk)
        it.invoke()
        out.append(it.get_tensor(tensor).astype(np.int64))
    return np.concatenate(out)


def agreement(a, b):
    """How two runs' output integers (N, ...) compare: images identical in every integer, the
    largest difference, the share of integers that differ (%)."""
    diff = np.abs(np.asarray(a, dtype=np.int64) - np.asarray(b, dtype=np.int64)).reshape(len(a), -1)
    return {"images_identical": int((diff.max(1) == 0).sum()), "max_diff": int(diff.max()),
            "diff_share": round(100.0 * float((diff > 0).mean()), 4)}


def export_and_check(frozen, path, scheme, images, device, batch_size=256):
    """Write the frozen model as a .tflite file (validated by LiteRT, then atomically) and run it
    in LiteRT's reference kernels on `images` (NCHW reals): its output integers against intsim's
    integer path, and against intsim's integer path of the file read back (import_tflite, whose
    ops follow TFLite's Prepare: the float32 scale product of per-tensor layers, the double
    rescale of FULLY_CONNECTED)."""
    data, tensor, offset = export_tflite(frozen.cpu(), scheme, images[:1].cpu())
    write_bytes(path, data)
    frozen.to(device)
    ref = run_litert_integers(data, images.permute(0, 2, 3, 1).contiguous().numpy(), tensor)
    ref = ref.transpose(0, 3, 1, 2) if ref.ndim == 4 else ref          # NHWC -> intsim's NCHW
    batches = Batches(images, torch.zeros(len(images), dtype=torch.int64), batch_size)
    mine = output_integers(set_mode(frozen, "int"), predict(frozen, batches, device)).numpy() + offset
    back, _ = import_tflite(path)
    again = output_integers(set_mode(back, "int"), predict(back.to(device), batches, device)).numpy()
    return {"tflite": path, "tflite_scheme": scheme, "tflite_images": len(images),
            "tflite_vs_intsim": agreement(mine, ref), "tflite_vs_reimported": agreement(again, ref)}
