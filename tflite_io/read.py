"""A quantized .tflite model read into intsim: its frozen integer graph (`import_tflite`), or
its network with every weight dequantized into float (`import_tflite_float`).

    frozen, info = import_tflite("mobilenet_v1_0.25_128_quant.tflite")
    set_mode(frozen, "int"); logits = frozen(x)        # x: NCHW reals S (q - Z) of the input bytes

Each operator is read by its op's entry in ops.OPS (ops.TFLITE_READERS; TFLite's reference
kernels decide what each computes), to the model's end (a SOFTMAX too). At the model's edges: a
float input quantized by its first QUANTIZE, the output dequantized by a last DEQUANTIZE; a
QUANTIZE between 8-bit types (TF's converter's uint8 input and output around an int8 body) is a
requantize like any op. The float rebuild (`import_tflite_float`) ends at the logits: a final
SOFTMAX is left out there (the class ranking is the same). Fused activations (NONE, RELU,
RELU6, RELU_N1_TO_1) become the op's act_min / act_max, and SAME padding is TFLite's: the odd
pixel goes after (bottom / right), padded with the input's Z.

Files from PyTorch's exporters (litert-torch) keep some tensors channels-first: a TRANSPOSE to
NCHW after a conv, a PAD of the NCHW tensor, a TRANSPOSE back to NHWC before the next conv, and
an NCHW input. intsim's tensors are NCHW throughout, so such a TRANSPOSE only says how the file
stores the tensor (`file_layouts`): it is read as nothing, and the PAD's rows are reordered. The
same files keep some residual sums in float32 (DEQUANTIZE, ADD in float, QUANTIZE), which are
imported as those three ops, computed in float32 as LiteRT does.
"""
from torch import fx, nn

import ops
from errors import IntsimError
from ops.base import NO_ACTIVATION
from ops.quant import Dequantize, Quantize, Requantize
from ops.shape import TO_NCHW, TO_NHWC
from ops.softmax import IntSoftmax

from .schema import ACTIVATIONS, Reader, read_model

SUPPORTED = sorted(ops.TFLITE_READERS)
FLOAT_OPS = ("ADD", "QUANTIZE", "DEQUANTIZE")       # the ops imported with float32 tensors in or out
LAYOUT_OPS = ("PAD", "QUANTIZE", "DEQUANTIZE")      # unary ops that keep the layout of the tensor they take


def file_layouts(reader, operators):
    """The 4-D tensors the file stores channels-first (NCHW), as a set of tensor indices: the
    output of a TRANSPOSE NHWC -> NCHW, the input of a TRANSPOSE NCHW -> NHWC, and whatever
    reaches or leaves those through PAD, QUANTIZE, DEQUANTIZE. Every other 4-D tensor is TFLite's NHWC."""
    nchw, changed = set(), True
    while changed:
        changed = False
        for op in operators:
            kind, x, y = reader.op_name(op), int(op.inputs[0]), int(op.outputs[0])
            if kind == "TRANSPOSE" and reader.is_constant(int(op.inputs[1])):
                new = {TO_NCHW: {y}, TO_NHWC: {x}}.get(tuple(int(v) for v in reader.data(int(op.inputs[1]))), set())
            elif kind in LAYOUT_OPS and len(reader.shape(x)) == 4 and {x, y} & nchw:
                new = {x, y}
            else:
                continue
            if not new <= nchw:
                nchw |= new
                changed = True
    return nchw


def nhwc(shape, channels_first):
    """A 4-D shape as TFLite's NHWC, from the file's order."""
    return [shape[0], shape[2], shape[3], shape[1]] if channels_first else shape


class _Importer:
    """The fx graph being built, and what the ops' readers share: the reader, the index of the
    op being read, the fx node of each tensor read so far, the flattens of NHWC data a
    FULLY_CONNECTED must reorder its weights for (`spatial`: tensor -> (H, W, C)), and the
    tensors the file stores as NCHW (`nchw`, file_layouts)."""

    def __init__(self, reader, nchw=frozenset()):
        self.reader, self.graph, self.modules, self.nodes, self.spatial, self.index = reader, fx.Graph(), {}, {}, {}, 0
        self.nchw = nchw

    def module(self, name, module, op, inputs):
        """A call of `module` on the tensors `inputs`; its fused activation is kept for the float rebuild."""
        options = op.builtinOptions
        if hasattr(options, "fusedActivationFunction"):
            module.fused_activation = self.reader.act(options, self.reader.op_name(op))
        self.modules[name] = module
        return self.graph.call_module(name, tuple(self.nodes[t] for t in inputs))

    def function(self, fn, tensor, *args):
        return self.graph.call_function(fn, (self.nodes[tensor], *args))


def import_tflite(path):
    """A quantized .tflite model as a frozen intsim graph (Quantize -> integer ops -> Dequantize),
    and an info dict: input shape (NHWC) and QParams, the output tensor compared with LiteRT's
    (`compare_tensor`: its index in the file, the last op's output), its shape, the input's type,
    the last op read (`last_op`), and how the file orders the input's and the compared tensor's
    dimensions (`input_layout`, `output_layout`: "NHWC", or "NCHW" in files from PyTorch)."""
    reader = Reader(read_model(path), path)
    graph, operators = reader.graph, list(reader.graph.operators)
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise IntsimError(f"{path}: intsim imports models with one input and one output")
    imp = _Importer(reader, file_layouts(reader, operators))
    x_index, first = int(graph.inputs[0]), 0        # first: the op after the input's float QUANTIZE, if any
    if reader.type_name(x_index) == "FLOAT32":      # float input: the model starts with its QUANTIZE
        if not operators or reader.op_name(operators[0]) != "QUANTIZE":
            raise IntsimError(f"{path} is a float model (its input is FLOAT32 and is not quantized first): "
                              f"intsim imports uint8 / int8 quantized models")
        x_index, first = int(operators[0].outputs[0]), 1
    imp.modules["quant_in"] = Quantize(reader.activation(x_index))
    imp.nodes[x_index] = imp.graph.call_module("quant_in", (imp.graph.placeholder("x"),))
    last, last_op = x_index, "QUANTIZE"
    for i, op in enumerate(operators[first:], start=first):       # i: the op's index in the file
        kind = reader.op_name(op)
        if kind == "DEQUANTIZE" and i == len(operators) - 1:
            break                                   # the float output: dequant_out below
        if kind not in ops.TFLITE_READERS:
            raise IntsimError(f"{path}: op {i} is {kind} (output tensor {_name(reader, op)!r}), which intsim does "
                              f"not import (supported: {', '.join(SUPPORTED)})")
        inputs = [int(t) for t in op.inputs if int(t) >= 0 and not reader.is_constant(int(t))]   # activations
        missing = [t for t in inputs if t not in imp.nodes]
        if missing:
            raise IntsimError(f"{path}: op {i} ({kind}) reads tensor {missing[0]}, which no imported op produced")
        _check_tensors(reader, i, op, kind, inputs, imp.nchw)
        src, out = inputs[0], int(op.outputs[0])
        imp.index = i
        imp.nodes[out] = ops.TFLITE_READERS[kind](imp, op, kind)
        if src in imp.spatial:
            raise IntsimError(f"{path}: a flatten of NHWC data feeds {kind}, not a FULLY_CONNECTED: intsim's NCHW "
                              f"layout orders it differently")
        last, last_op = out, kind
    if reader.type_name(last) == "FLOAT32":
        raise IntsimError(f"{path}: the model's output {reader.tensor(last).name.decode()!r} is computed in float32 "
                          f"(by its {last_op}): intsim imports models whose output is "
                          f"quantized, or dequantized by a last DEQUANTIZE")
    imp.modules["dequant_out"] = Dequantize(reader.activation(last))
    imp.graph.output(imp.graph.call_module("dequant_out", (imp.nodes[last],)))
    frozen = fx.GraphModule(imp.modules, imp.graph, class_name="ImportedModel")
    info = {"input_shape": nhwc(reader.shape(x_index), x_index in imp.nchw), "input": reader.activation(x_index),
            "compare_tensor": last, "output_shape": nhwc(reader.shape(last), last in imp.nchw), "last_op": last_op,
            "input_type": reader.type_name(int(graph.inputs[0])),
            "input_layout": "NCHW" if x_index in imp.nchw else "NHWC", "output_layout": "NCHW" if last in imp.nchw else "NHWC"}
    return frozen, info


def _name(reader, op):
    return reader.tensor(int(op.outputs[0])).name.decode() if len(op.outputs) else "?"


def _check_tensors(reader, i, op, kind, inputs, nchw):
    """Refuse, before reading op i, what its kernel would not compute right: a float32 tensor
    into an op that intsim imports only on integers, an NCHW tensor into an op that is not
    layout-free."""
    floats = [t for t in inputs if reader.type_name(t) == "FLOAT32"]
    if floats and kind not in FLOAT_OPS:
        raise IntsimError(f"{reader.path}: op {i} ({kind}, output tensor {_name(reader, op)!r}) computes on the float32 "
                          f"tensor {reader.tensor(floats[0]).name.decode()!r}: intsim imports float32 tensors only "
                          f"between DEQUANTIZE and QUANTIZE, through ADD")
    channels_first = [t for t in inputs if t in nchw]
    if channels_first and kind not in LAYOUT_OPS + ("TRANSPOSE",):
        raise IntsimError(f"{reader.path}: op {i} ({kind}, output tensor {_name(reader, op)!r}) reads the tensor "
                          f"{reader.tensor(channels_first[0]).name.decode()!r}, which the file stores as NCHW: intsim "
                          f"imports NCHW tensors only into PAD, QUANTIZE, DEQUANTIZE and a TRANSPOSE back to NHWC")


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


def _ends_in_softmax(frozen, node):
    """A SOFTMAX whose value is the model's output (through a requantize and the DEQUANTIZE)."""
    return isinstance(frozen.get_submodule(node.target), IntSoftmax) and \
        all(_passes_to_output(frozen, u) for u in node.users)


def _passes_to_output(frozen, node):
    if node.op == "output":
        return True
    if node.op == "call_module" and isinstance(frozen.get_submodule(node.target), (Requantize, Dequantize)):
        return all(_passes_to_output(frozen, u) for u in node.users)
    return False


class _FloatBuilder:
    """The float graph being built from a frozen one (what the ops' to_float functions use)."""

    def __init__(self, path):
        self.path, self.graph, self.modules = path, fx.Graph(), {}

    def call(self, name, module, args):
        self.modules[name] = module
        return self.graph.call_module(name, args)


def import_tflite_float(path):
    """A quantized .tflite model as an ordinary float nn.Module (an fx.GraphModule of nn.Conv2d,
    nn.Linear, ReLU6, pools, adds): every weight dequantized, S (q - Z), every bias S_in S_w q_b,
    no quantization left (each op's float form: ops.FLOAT_REBUILDS). Its input is the reals the
    file's input integers stand for, S_in (q - Z_in). What intsim's own pipeline (convert, PTQ,
    AdaRound) then quantizes anew. Returns (model, info) with import_tflite's info."""
    frozen, info = import_tflite(path)
    fb, env = _FloatBuilder(path), {}
    for node in frozen.graph.nodes:
        if node.op == "placeholder":
            env[node] = fb.graph.placeholder(node.name)
            continue
        if node.op == "output":
            fb.graph.output(env[node.args[0]])
            continue
        args = tuple(env[a] for a in node.args if isinstance(a, fx.Node))
        if node.op == "call_function":                       # the flatten before FULLY_CONNECTED
            env[node] = fb.graph.call_function(node.target, (args[0],) + tuple(node.args[1:]))
            continue
        op = frozen.get_submodule(node.target)
        if isinstance(op, (Quantize, Dequantize)) or _ends_in_softmax(frozen, node):
            env[node] = args[0]          # no edges to cross in float; the logits are the float model's output
            continue
        if type(op) not in ops.FLOAT_REBUILDS:
            raise IntsimError(f"{path}: no float counterpart for {type(op).__name__}")
        value = ops.FLOAT_REBUILDS[type(op)](fb, node, op, args)
        act = _float_activation(op)
        env[node] = fb.call(f"{node.target}_act", act, (value,)) if act is not None else value
    model = fx.GraphModule(fb.modules, fb.graph, class_name="TFLiteFloatModel")
    return model.eval(), info
