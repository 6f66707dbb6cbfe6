"""ADD: the elementwise sum of two quantized tensors (a residual connection)."""
import operator

import torch
from torch import fx

from errors import IntsimError
from function import quantize_multiplier, rescale

from .base import NO_ACTIVATION, PRODUCER, FrozenOp, Op, is_function, is_method
from .constant import constant_qparams, constant_tensor
from .shape import is_shape

ADD_LEFT_SHIFT = 20       # TFLite's ADD: inputs (q - Z) are scaled by 2^20 before the rescale (8-bit kernels)


class IntAdd(FrozenOp):
    """TFLite's ADD kernel (reference_ops::Add; S1, S2 inputs, S_out output):
        twice_max = 2 max(S1, S2)
        a_i       = rescale((q_i - Z_i) 2^20, S_i / twice_max)                       i = 1, 2
        q_out     = clamp(rescale(a_1 + a_2, twice_max / (2^20 S_out)) + Z_out, act_min, act_max)
    The 2^20 keeps 20 fractional bits through the input rescale, so the two inputs meet on a
    common fine grid. Shapes broadcast. `constant`: the second operand is one constant integer
    on a grid of its own (x + 3 of Hardsigmoid: a real constant on its grid exactly)."""
    CONFIG = ("act_min", "act_max", "out_bits", "out_signed", "single_rounding", "constant")
    integer = True
    new_grid = True
    constant = None

    def __init__(self, in1, in2, out, act_range=NO_ACTIVATION, single_rounding=False, constant=None):
        super().__init__()
        self.single_rounding, self.constant = single_rounding, constant
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

    def real_forward(self, x1, x2=None):
        if self.constant is not None:
            x2 = (self.in_scale2 * (self.constant - self.in_zero_point2)).to(x1.dtype)
        return self._real_out(x1 + x2)

    def int_forward(self, q1, q2=None):
        if self.constant is not None:
            q2 = torch.tensor(self.constant, device=q1.device)
        a1 = rescale((q1.long() - self.in_zero_point1) << ADD_LEFT_SHIFT, self.m1, self.shift1, self.single_rounding)
        a2 = rescale((q2.long() - self.in_zero_point2) << ADD_LEFT_SHIFT, self.m2, self.shift2, self.single_rounding)
        return self._int_out(a1 + a2, self.m_out, self.shift_out)


def _tensors(gm, node):
    return [a for a in node.args if isinstance(a, fx.Node) and not is_shape(gm, a)]


def _number(node):
    return next((a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)), None)


def _is_add(gm, node):
    """x + y, x += y, torch.add(x, y), x.add(y): two tensors (broadcasting) or a tensor and a
    number (no alpha)."""
    binary = is_function(node, (operator.add, operator.iadd, torch.add)) or is_method(node, ("add", "add_"))
    if not binary or len(node.args) != 2 or node.kwargs:
        return False
    tensors = _tensors(gm, node)
    return len(tensors) == 2 or (len(tensors) == 1 and _number(node) is not None)


def _refuse(gm, node):
    if is_function(node, (operator.add, torch.add)) or is_method(node, ("add",)):
        return "add is supported for two tensors computed from the input, or a tensor and a number (no alpha)"
    return None


def _freeze(freezer, node, ins, out, act):
    single = freezer.qmodel.qconfig.single_rounding
    if len(_tensors(freezer.qmodel, node)) == 1:           # x + c: c on a grid of its own, exactly
        if ins[0] is None:
            raise IntsimError(f"{node.name}: an add of a float tensor and a constant")
        qp, q = constant_qparams(_number(node), ins[0].grid)
        return [IntAdd(ins[0], qp, out, act, single_rounding=single, constant=q)]
    if ins[0] is None or ins[1] is None:
        raise IntsimError(f"{node.name}: an add of a float and a quantized tensor")
    return [IntAdd(ins[0], ins[1], out, act, single_rounding=single)]


def _read(imp, op, kind):
    r = imp.reader
    a, b = int(op.inputs[0]), int(op.inputs[1])
    if r.is_constant(a):
        a, b = b, a                              # the tensor first, the constant second
    out, act = r.activation(op.outputs[0]), r.act(op.builtinOptions, kind)
    if r.is_constant(b):
        values = r.data(b).reshape(-1)
        if len(values) != 1:
            raise IntsimError(f"{r.path}: op {imp.index} ADD of a constant tensor of {len(values)} values: intsim "
                              f"imports a sum with one constant number")
        module = IntAdd(r.activation(a), r.activation(b), out, act_range=act, constant=int(values[0]))
        return imp.module(f"add_{imp.index}", module, op, [a])
    return imp.module(f"add_{imp.index}", IntAdd(r.activation(a), r.activation(b), out, act_range=act), op, [a, b])


def _write(ex, node, op):
    x1 = ex.t[node.args[0]][0]
    x2 = constant_tensor(ex, node, op) if op.constant is not None else ex.t[node.args[1]][0]
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
