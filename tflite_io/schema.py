"""The .tflite format: LiteRT's generated schema API (ai-edge-litert) for reading a file's
tensors and operators (`Reader`) and for building one (`Writer`), and the format's rules that
every op shares (SAME padding, fused activations)."""
import math
import os

import numpy as np
import torch

from errors import IntsimError
from function import Grid
from ops.base import NO_ACTIVATION, QParams, activation_bounds

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


def same_padding(size, kernel, stride, dilation):
    """TFLite's SAME padding of one dimension as (before, after): the output is ceil(size /
    stride), and an odd total goes after (ComputePaddingWithOffset)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class Reader:
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

    def padding(self, options, in_shape, kernel, stride, dilation):
        """(left, right, top, bottom) of an op's SAME or VALID padding, for an NHWC input of `in_shape`."""
        if self.padding_names[options.padding] == "VALID":
            return (0, 0, 0, 0)
        top, bottom = same_padding(in_shape[1], kernel[0], stride[0], dilation[0])
        left, right = same_padding(in_shape[2], kernel[1], stride[1], dilation[1])
        return (left, right, top, bottom)

    def act(self, options, where):
        """The real range of an op's fused activation."""
        name = self.activation_names[options.fusedActivationFunction]
        if name not in ACTIVATIONS:
            raise IntsimError(f"{self.path}: {where} has fused activation {name}; intsim supports {sorted(ACTIVATIONS)}")
        return ACTIVATIONS[name]


def fused_activation(op, qp, what):
    """TFLite's fused activation (its enum value) whose range (CalculateActivationRangeQuantized)
    is the op's clamp on its output grid `qp`."""
    for name, real_range in ACTIVATIONS.items():
        if activation_bounds(qp, real_range) == (op.act_min, op.act_max):
            return getattr(litert()[1].ActivationFunctionType, name)
    raise IntsimError(f"{what} clamps to [{op.act_min}, {op.act_max}], which no TFLite fused activation "
                      f"(NONE, RELU, RELU6, RELU_N1_TO_1) gives on its output grid")


class Writer:
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
