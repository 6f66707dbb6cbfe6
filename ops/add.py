"""ADD: the elementwise sum of two quantized tensors (a residual connection)."""
import operator

import torch
from torch import fx

from errors import IntsimError
from function import quantize_multiplier, rescale

from .base import NO_ACTIVATION, PRODUCER, FrozenOp, Op, is_function, is_method
from .shape import is_shape

ADD_LEFT_SHIFT = 20       # TFLite's ADD: inputs (q - Z) are scaled by 2^20 before the rescale (8-bit kernels)


class IntAdd(FrozenOp):
    """TFLite's ADD kernel (reference_ops::Add; S1, S2 inputs, S_out output):
        twice_max = 2 max(S1, S2)
        a_i       = rescale((q_i - Z_i) 2^20, S_i / twice_max)                       i = 1, 2
        q_out     = clamp(rescale(a_1 + a_2, twice_max / (2^20 S_out)) + Z_out, act_min, act_max)
    The 2^20 keeps 20 fractional bits through the input rescale, so the two inputs meet on a
    common fine grid."""
    CONFIG = ("act_min", "act_max", "out_bits", "out_signed", "single_rounding")
    integer = True
    new_grid = True

    def __init__(self, in1, in2, out, act_range=NO_ACTIVATION, single_rounding=False):
        super().__init__()
        self.single_rounding = single_rounding
        self._set_in(in1, "1")
        self._set_in(in2, "2")
        self._set_out(out, act_range)
        s1, s2 = self.in_scale1.double(), self.in_scale2.double()
        twice_max = 2 * torch.maximum(s1, s2)
        for name, real in (("1", s1 / twice_max), ("2", s2 / twice_max),
                           ("_out", twice_max / (2 ** ADD_LEFT_SHIFT * self.out_scale.double()))):
            m0, shift = quantize_multiplier(real)
            self.register_buffer(f"m{name}", m0)
            self.register_buffer(f"shift{name}", shift)

    def real_forward(self, x1, x2):
        return self._real_out(x1 + x2)

    def int_forward(self, q1, q2):
        a1 = rescale((q1.long() - self.in_zero_point1) << ADD_LEFT_SHIFT, self.m1, self.shift1, self.single_rounding)
        a2 = rescale((q2.long() - self.in_zero_point2) << ADD_LEFT_SHIFT, self.m2, self.shift2, self.single_rounding)
        return self._int_out(a1 + a2, self.m_out, self.shift_out)


def _is_add(gm, node):
    """x + y, x += y, torch.add(x, y), x.add(y): two tensors (no alpha, no constants)."""
    tensors = [a for a in node.args if isinstance(a, fx.Node) and not is_shape(gm, a)]
    binary = is_function(node, (operator.add, operator.iadd, torch.add)) or is_method(node, ("add", "add_"))
    return binary and len(node.args) == 2 and len(tensors) == 2 and not node.kwargs


def _refuse(gm, node):
    if is_function(node, (operator.add, torch.add)) or is_method(node, ("add",)):
        return "add is supported for two tensors computed from the input (no constants, no alpha)"
    return None


def _freeze(freezer, node, ins, out, act):
    if ins[0] is None or ins[1] is None:
        raise IntsimError(f"{node.name}: an add of a float and a quantized tensor")
    return [IntAdd(ins[0], ins[1], out, act, single_rounding=freezer.qmodel.qconfig.single_rounding)]


def _read(imp, op, kind):
    r = imp.reader
    a, b = op.inputs[0], op.inputs[1]
    if r.shape(a) != r.shape(b):
        raise IntsimError(f"{r.path}: ADD with broadcasting ({r.shape(a)} + {r.shape(b)}) is not imported")
    module = IntAdd(r.activation(a), r.activation(b), r.activation(op.outputs[0]),
                    act_range=r.act(op.builtinOptions, kind))
    return imp.module(f"add_{imp.index}", module, op, [a, b])


def _write(ex, node, op):
    (x1, _, _, _), (x2, _, _, _) = ex.t[node.args[0]], ex.t[node.args[1]]
    out_qp = op.out_params()
    o = ex.w.s.AddOptionsT()
    o.fusedActivationFunction = ex.fused_activation(op, out_qp, node.name)
    ex.w.op("ADD", [x1, x2], [ex.act_tensor(node, out_qp, node.name)], o, "AddOptions")
    ex.lowest[node] = op.act_min


def _float(fb, node, op, args):
    return fb.graph.call_function(operator.add, args)


ADD = Op("add", PRODUCER, _is_add, spelling="add (x + y, torch.add)", freeze=_freeze, refuse=_refuse,
         frozen=(IntAdd,), functions=(operator.add, operator.iadd, torch.add),
         tflite_read={"ADD": _read}, tflite_write={IntAdd: _write}, to_float={IntAdd: _float})
