"""What every op shares: its entry in the op table (`Op`), the base of the frozen integer kernels
(`FrozenOp`), the quantization parameters of a tensor (`QParams`) and the common epilogue.

An op's home is one file of this package: its `Op` entry (how the converter recognises it in the
fx graph, its role, how it freezes) and its frozen kernel class, shaped like a TFLite kernel:
`__init__` is TFLite's Prepare (multipliers, shifts, clamps derived once from the tensors' S and
Z), `int_forward` its Eval, `real_forward` the same integers as reals, and beside them the op's
TFLite form (`from_tflite`, `to_tflite`) and its float rebuild (`to_float`). The converter, the
freezer, the .tflite reader and writer, the checkpoint loader and the per-layer report all look
the op up in `ops.OPS`; none names an op.
"""
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from function import Grid, requantize, round_half_away, to_grid

NO_ACTIVATION = (-math.inf, math.inf)
UINT8_TO_INT8 = 128       # the same reals on the other 8-bit type: q - 128 with Z - 128

# The roles of the ops in a converted graph (what the converter and the freezer do with them):
PRODUCER = "producer"   # makes new values: an activation quantizer follows it (through CLAMP / POOL)
CLAMP = "clamp"         # ReLU, ReLU6: fused into the producer before it as act_min / act_max
POOL = "pool"           # max-pool: picks values, keeps the grid
SAME = "same"           # flatten, reshape, zero padding: move values (or add real 0s), keep the grid
JOIN = "join"           # concatenation: several tensors, on one grid (their quantizers shared)
SHAPE = "shape"         # x.size(), x.shape[0]: no tensor
QUANT = "quantizer"     # an activation quantizer (inserted by convert)
OUTPUT = "output"


class QParams(NamedTuple):
    """How a tensor's integers stand for reals: r = S (q - Z), q on `grid`."""
    scale: torch.Tensor          # (1,) float32
    zero_point: torch.Tensor     # (1,) int64
    grid: Grid


def is_module(gm, node, types):
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), types)


def is_function(node, functions):
    return node.op == "call_function" and node.target in functions


def is_method(node, names):
    return node.op == "call_method" and node.target in names


def pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def arg(node, index, name, default=None):
    """A call's argument by position or keyword (fx keeps them as they were written)."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


@dataclass(frozen=True, eq=False)
class Op:
    """One op kind in the converter's table (ops.OPS, in match order).
    match:   (gm, node) -> bool, on the converted graph;
    source:  (gm, node) -> bool, on the traced float graph: a call convert replaces (a conv by a
             QLayer, global pooling by a QMean, dropout by nothing) with `convert(gm, node, qconfig, name)`;
    freeze:  PRODUCER: (freezer, node, inputs' QParams, output QParams, act range) -> [frozen modules]
             (`float_freeze`: also with float activations, whose QParams are None: weights-only runs);
             CLAMP, POOL, SAME on integers: (freezer, node, the input's QParams) -> the frozen module;
             JOIN: (freezer, node, [every input's QParams]) -> the frozen module;
    refuse:  (gm, node) -> a one-line reason where a near miss of this op is not supported (else None);
    frozen:  the frozen kernel classes it makes (found by these names in a saved model);
    float_modules, functions: the torch modules ({name: (class, constructor fields)}) and functions
             a frozen graph keeps where it stays float (weights-only runs), saved by name;
    tflite_read:  {TFLite builtin: fn(importer, op, kind) -> the fx value of its output};
    tflite_write: {frozen class or function: fn(exporter, node, module)} writes it;
    to_float:     {frozen class: fn(builder, node, module, args) -> fx value}: the float network
                  rebuilt from an imported file (tflite_io.read.import_tflite_float)."""
    name: str
    role: str
    match: Callable
    spelling: str = ""                        # how users write it, for the list of what is supported
    clamp: tuple = NO_ACTIVATION              # CLAMP: the real range it clamps to (or `clamp_of(gm, node)`)
    clamp_of: Optional[Callable] = None
    source: Optional[Callable] = None
    convert: Optional[Callable] = None
    freeze: Optional[Callable] = None
    float_freeze: bool = False
    refuse: Optional[Callable] = None
    link_grids: Optional[Callable] = None     # (gm, op_of) after the quantizers are in: ties grids (JOIN)
    output_range: Optional[Callable] = None   # (gm, node, grid) -> the fixed real range of its output (LOGISTIC's)
    frozen: tuple = ()
    float_modules: dict = field(default_factory=dict)
    functions: tuple = ()
    tflite_read: dict = field(default_factory=dict)
    tflite_write: dict = field(default_factory=dict)
    to_float: dict = field(default_factory=dict)

    def clamp_range(self, gm, node):
        return self.clamp_of(gm, node) if self.clamp_of is not None else self.clamp


def round_away(v):
    return math.copysign(math.floor(abs(v) + 0.5), v)


def activation_bounds(out, act_range):
    """(act_min, act_max): the output grid intersected with a fused activation's real range
    (TFLite's CalculateActivationRangeQuantized: Z + round(r / S), in float32 as TFLite does)."""
    lo, hi = act_range
    z, s = int(out.zero_point), out.scale.float()
    to_q = lambda r: z + int(round_away(float(torch.tensor(r, dtype=torch.float32) / s)))
    act_min = out.grid.qmin if lo == -math.inf else max(out.grid.qmin, to_q(lo))
    act_max = out.grid.qmax if hi == math.inf else min(out.grid.qmax, to_q(hi))
    return act_min, act_max


def real_epilogue(y, scale, zero_point, act_min, act_max):
    """The reals form of + Z_out and the clamp: S (clamp(round(y / S) + Z, act_min, act_max) - Z)."""
    return (to_grid(round_half_away(y / scale), zero_point, act_min, act_max) - zero_point) * scale


def per_channel(t, x):
    """(C,) -> (C, 1, ..., 1), broadcasting along the first dimension of x."""
    return t.reshape((-1,) + (1,) * (x.dim() - 1))


def int_out(acc, m0, shift, zero_point, act_min, act_max, single_rounding):
    """The common integer epilogue: clamp(rescale(acc, M0, shift) + Z_out, act_min, act_max) as int32.
    acc is bounded already (ADD and MEAN by their construction)."""
    return requantize(acc, m0, shift, zero_point, act_min, act_max, single_rounding, check=False).to(torch.int32)


class FrozenOp(nn.Module):
    """Base of the frozen ops. CONFIG names the plain settings (ints, floats, strings, tuples)
    that, with the buffers, describe the op completely: what is saved and loaded. `new_grid`:
    the op puts values onto a grid of its own (the per-layer report compares them there)."""
    CONFIG = ()
    TFLITE = ()               # the TFLite builtin ops `from_tflite` reads
    out_signed = False        # the output grid's signedness (a model saved before it was kept: unsigned)
    new_grid = False

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
        return int_out(acc, m0, shift, self.out_zero_point.to(acc.device), self.act_min, self.act_max,
                       self.single_rounding)
