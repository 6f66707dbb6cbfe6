"""MUL: the elementwise product of two quantized tensors, broadcasting (squeeze-excitation's
x * sigmoid(s), SiLU's x * sigmoid(x)), or of a tensor and a constant (Hardsigmoid's 1/6)."""
import operator

import torch
from torch import fx

from errors import IntsimError
from function import quantize_multiplier

from .base import NO_ACTIVATION, PRODUCER, FrozenOp, Op, is_function, is_method
from .constant import constant_qparams, constant_tensor
from .shape import is_shape


class IntMul(FrozenOp):
    """TFLite's MUL (reference_integer_ops::Mul / BroadcastMul4DSlow; kernels/mul.cc):
        q_out = clamp(rescale((q1 - Z1)(q2 - Z2), M) + Z_out, act_min, act_max)
    with M = S1 S2 / S_out computed in float32, as mul.cc's Prepare does (a float expression
    assigned to a double). The product of two 8-bit differences fits int32. `constant`: the
    second operand is a constant integer of its own (S, Z) (a real constant on its grid)."""
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
        real = (self.in_scale1.float() * self.in_scale2.float() / self.out_scale.float()).double()
        m0, shift = quantize_multiplier(real)
        self.register_buffer("m0", m0)
        self.register_buffer("shift", shift)

    def _second(self, q2):
        return torch.tensor(self.constant) if self.constant is not None else q2

    def real_forward(self, x1, x2=None):
        x2 = self.in_scale2 * (self.constant - self.in_zero_point2) if self.constant is not None else x2
        return self._real_out(x1 * x2.to(x1.dtype))

    def int_forward(self, q1, q2=None):
        q2 = self._second(q2).to(q1.device)
        return self._int_out((q1.long() - self.in_zero_point1) * (q2.long() - self.in_zero_point2), self.m0, self.shift)


def _tensors(gm, node):
    return [a for a in node.args if isinstance(a, fx.Node) and not is_shape(gm, a)]


def _is_mul(gm, node):
    """x * y, torch.mul(x, y), x.mul(y): two tensors (broadcasting), or a tensor and a number."""
    binary = is_function(node, (operator.mul, operator.imul, torch.mul)) or is_method(node, ("mul", "mul_"))
    if not binary or len(node.args) != 2 or node.kwargs:
        return False
    tensors = _tensors(gm, node)
    numbers = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    return len(tensors) == 2 or (len(tensors) == 1 and len(numbers) == 1)


def _freeze(freezer, node, ins, out, act):
    qconfig = freezer.qmodel.qconfig
    tensors = _tensors(freezer.qmodel, node)
    if len(tensors) == 1:                       # x * c: c on a grid of its own, exactly
        c = next(a for a in node.args if not isinstance(a, fx.Node))
        if ins[0] is None:
            raise IntsimError(f"{node.name}: a product of a float tensor and a constant")
        qp, q = constant_qparams(c, ins[0].grid)
        return [IntMul(ins[0], qp, out, act, single_rounding=qconfig.single_rounding, constant=q)]
    if ins[0] is None or ins[1] is None:
        raise IntsimError(f"{node.name}: a product of a float and a quantized tensor")
    return [IntMul(ins[0], ins[1], out, act, single_rounding=qconfig.single_rounding)]


def _read(imp, op, kind):
    r = imp.reader
    a, b = int(op.inputs[0]), int(op.inputs[1])
    if r.is_constant(a):
        a, b = b, a                              # the tensor first, the constant second
    out, act = r.activation(op.outputs[0]), r.act(op.builtinOptions, kind)
    if r.is_constant(b):
        values = r.data(b).reshape(-1)
        if len(values) != 1:
            raise IntsimError(f"{r.path}: op {imp.index} MUL by a constant tensor of {len(values)} values: intsim "
                              f"imports a product with one constant number")
        module = IntMul(r.activation(a), r.activation(b), out, act_range=act, constant=int(values[0]))
        return imp.module(f"mul_{imp.index}", module, op, [a])
    module = IntMul(r.activation(a), r.activation(b), out, act_range=act)
    return imp.module(f"mul_{imp.index}", module, op, [a, b])


def _write(ex, node, op):
    x1 = ex.t[node.args[0]][0]
    x2 = constant_tensor(ex, node, op) if op.constant is not None else ex.t[node.args[1]][0]
    out_qp = op.out_params()
    o = ex.w.s.MulOptionsT()
    o.fusedActivationFunction = ex.fused_activation(op, out_qp, node.name)
    ex.w.op("MUL", [x1, x2], [ex.act_tensor(node, out_qp, node.name)], o, "MulOptions")
    ex.lowest[node] = op.act_min


def _float(fb, node, op, args):
    return fb.graph.call_function(operator.mul, args)


MUL = Op("mul", PRODUCER, _is_mul, spelling="mul (x * y broadcasting, x * c)", freeze=_freeze,
         frozen=(IntMul,), functions=(operator.mul, operator.imul, torch.mul),
         tflite_read={"MUL": _read}, tflite_write={IntMul: _write}, to_float={IntMul: _float})
