"""LOGISTIC and TANH: the sigmoid and tanh, as TFLite runs them on 8-bit tensors: a table of 2^b
entries built once from the input's and output's (S, Z) (kernels/activations.cc, SigmoidPrepare's
and TanhPrepare's LUTPopulate), the output on TFLite's fixed grid: LOGISTIC S = 1 / 2^b, Z = QMIN
([0, 1)); TANH S = 2 / 2^b, Z = QMIN + 2^(b-1) ([-1, 1)). SiLU, x * sigmoid(x), converts to
LOGISTIC and MUL, as TFLite's converter lowers it."""
import operator

import torch
import torch.nn.functional as F
from torch import nn

from .base import PRODUCER, FrozenOp, Op, is_function, is_method, is_module


def fixed_sigmoid_range(grid):
    """The real range whose grid is TFLite's LOGISTIC output: [0, 1 - 2^-b], S = 2^-b, Z = QMIN."""
    levels = grid.qmax - grid.qmin + 1
    return 0.0, (levels - 1) / levels


def fixed_tanh_range(grid):
    """The real range whose grid is TFLite's TANH output: [-1, 1 - 2^(1-b)], S = 2^(1-b), Z = QMIN + 2^(b-1)."""
    levels = grid.qmax - grid.qmin + 1
    return -1.0, (levels - 2) / levels


def float32_tanh(x):
    """std::tanh on a float32: computed in float64 and rounded once to float32."""
    return torch.tanh(x.double()).float()


def float32_sigmoid(x):
    """1.0f / (1.0f + std::exp(-x)) in float32: the exponential correctly rounded to float32
    (computed in float64 and rounded once), the sum and quotient in float32."""
    e = torch.exp(-x.double()).float()
    return torch.tensor(1.0, dtype=torch.float32) / (torch.tensor(1.0, dtype=torch.float32) + e)


def populate_table(inp, out, transform):
    """TFLite's LUTPopulate, every step in float32: for each input integer q,
    table[q] = clamp(round(transform(S_in (q - Z_in)) * (1 / S_out)) + Z_out, QMIN, QMAX)."""
    q = torch.arange(inp.grid.qmin, inp.grid.qmax + 1)
    dequantized = inp.scale.float() * (q - inp.zero_point).float()
    inverse = torch.tensor(1.0, dtype=torch.float32) / out.scale.float()
    v = transform(dequantized) * inverse
    rescaled = torch.where(v >= 0, torch.floor(v + 0.5), torch.ceil(v - 0.5))       # TfLiteRound: half away
    return (rescaled + float(out.zero_point)).long().clamp(out.grid.qmin, out.grid.qmax)


class IntLogistic(FrozenOp):
    """LOGISTIC: q_out = table[q_in - QMIN_in] (populate_table with the sigmoid)."""
    transform, real_function = staticmethod(float32_sigmoid), staticmethod(torch.sigmoid)
    CONFIG = ("in_qmin", "act_min", "act_max", "out_bits", "out_signed")
    integer = True
    new_grid = True

    def __init__(self, inp, out):
        super().__init__()
        self._set_in(inp)
        self._set_out(out)
        self.in_qmin = inp.grid.qmin
        self.register_buffer("table", populate_table(inp, out, self.transform).to(torch.int32))

    def int_forward(self, q):
        return self.table[(q.long() - self.in_qmin)]

    def real_forward(self, x):
        return self._real_out(self.real_function(x))


class IntTanh(IntLogistic):
    """TANH: q_out = table[q_in - QMIN_in] (populate_table with tanh)."""
    transform, real_function = staticmethod(float32_tanh), staticmethod(torch.tanh)


def _is_sigmoid(gm, node):
    return is_module(gm, node, nn.Sigmoid) or is_function(node, (torch.sigmoid, F.sigmoid)) or \
        is_method(node, ("sigmoid",))


def _is_silu(gm, node):
    return is_module(gm, node, nn.SiLU) or is_function(node, (F.silu,))


def _silu_as_sigmoid_times_x(gm, node, qconfig, name, module):
    x = node.args[0]
    with gm.graph.inserting_after(node):
        s = gm.graph.call_function(torch.sigmoid, (x,))
    with gm.graph.inserting_after(s):
        y = gm.graph.call_function(operator.mul, (x, s))
    node.replace_all_uses_with(y)
    gm.graph.erase_node(node)


def _is_tanh(gm, node):
    return is_module(gm, node, nn.Tanh) or is_function(node, (torch.tanh, F.tanh)) or is_method(node, ("tanh",))


def _freeze(freezer, node, ins, out, act):
    return [(IntTanh if _is_tanh(freezer.qmodel, node) else IntLogistic)(ins[0], out)]


def _output_range(gm, node, grid):
    return (fixed_tanh_range if _is_tanh(gm, node) else fixed_sigmoid_range)(grid)


def _read(imp, op, kind):
    r = imp.reader
    x = int(op.inputs[0])
    cls = IntTanh if kind == "TANH" else IntLogistic
    return imp.module(f"{kind.lower()}_{imp.index}", cls(r.activation(x), r.activation(op.outputs[0])), op, [x])


def _write(ex, node, op):
    x = ex.src(node)[0]
    ex.w.op("TANH" if isinstance(op, IntTanh) else "LOGISTIC", [x], [ex.act_tensor(node, op.out_params(), node.name)])


def _float(fb, node, op, args):
    return fb.graph.call_function(op.real_function, args)


LOGISTIC = Op("sigmoid", PRODUCER, lambda gm, n: _is_sigmoid(gm, n) or _is_tanh(gm, n),
              spelling="sigmoid, tanh (nn.Sigmoid, nn.Tanh, torch.sigmoid, torch.tanh), SiLU (as sigmoid and mul)",
              source=_is_silu, convert=_silu_as_sigmoid_times_x, freeze=_freeze, output_range=_output_range,
              frozen=(IntLogistic, IntTanh), functions=(torch.sigmoid, torch.tanh),
              float_modules={"Sigmoid": (nn.Sigmoid, ()), "Tanh": (nn.Tanh, ())},
              tflite_read={"LOGISTIC": _read, "TANH": _read}, tflite_write={IntLogistic: _write, IntTanh: _write},
              to_float={IntLogistic: _float, IntTanh: _float})
