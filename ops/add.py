"""ADD: the elementwise sum of two quantized tensors (a residual connection)."""
import operator

import torch

from errors import IntsimError
from function import quantize_multiplier, rescale

from .base import NO_ACTIVATION, PRODUCER, FrozenOp, Op, is_function, is_method
from .binary import Tabulated, float_for, freezer_for, is_binary, reader_for, writer_for

ADD_LEFT_SHIFT = 20       # TFLite's ADD: inputs (q - Z) are scaled by 2^20 before the rescale (8-bit kernels)


class IntAdd(Tabulated, FrozenOp):
    """TFLite's ADD kernel (reference_ops::Add; S1, S2 inputs, S_out output):
        twice_max = 2 max(S1, S2)
        a_i       = rescale((q_i - Z_i) 2^20, S_i / twice_max)                       i = 1, 2
        q_out     = clamp(rescale(a_1 + a_2, twice_max / (2^20 S_out)) + Z_out, act_min, act_max)
    The 2^20 keeps 20 fractional bits through the input rescale, so the two inputs meet on a
    common fine grid. Shapes broadcast. `constant`: the second operand is one constant integer
    on a grid of its own (x + 3 of Hardsigmoid: a real constant on its grid exactly). The
    integer forward looks the outputs up in a table of this kernel over all input pairs (Tabulated)."""
    CONFIG = ("act_min", "act_max", "out_bits", "out_signed", "single_rounding", "constant", "range1", "range2")
    integer = True
    new_grid = True
    constant = None

    def __init__(self, in1, in2, out, act_range=NO_ACTIVATION, single_rounding=False, constant=None):
        super().__init__()
        self.single_rounding, self.constant = single_rounding, constant
        self._set_in(in1, "1")
        self._set_in(in2, "2")
        self._set_out(out, act_range)
        self._set_ranges(in1, in2)
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

    def direct(self, q1, q2=None):
        if self.constant is not None:
            q2 = torch.tensor(self.constant, device=q1.device)
        a1 = rescale((q1.long() - self.in_zero_point1) << ADD_LEFT_SHIFT, self.m1, self.shift1, self.single_rounding)
        a2 = rescale((q2.long() - self.in_zero_point2) << ADD_LEFT_SHIFT, self.m2, self.shift2, self.single_rounding)
        return self._int_out(a1 + a2, self.m_out, self.shift_out)


class FloatAdd(FrozenOp):
    """TFLite's ADD on float32 tensors inside a quantized model: litert-torch keeps some residual
    sums in float (DEQUANTIZE both inputs, ADD, QUANTIZE the sum). y = clamp(x1 + x2, act) in
    float32, as LiteRT's reference Add computes it; the tensors around it are floats, not on a grid."""
    CONFIG = ("act_lo", "act_hi")
    integer = True            # the file's own arithmetic: LiteRT runs it so in the integer model
    float_output = True

    def __init__(self, act_range=NO_ACTIVATION):
        super().__init__()
        self.act_lo, self.act_hi = (float(v) for v in act_range)

    def int_forward(self, x1, x2):
        return (x1 + x2).clamp(self.act_lo, self.act_hi)

    def real_forward(self, x1, x2):
        return self.int_forward(x1, x2)


def _read(imp, op, kind):
    """ADD of two quantized tensors (IntAdd), or of two float32 ones (FloatAdd)."""
    r = imp.reader
    a, b, out = int(op.inputs[0]), int(op.inputs[1]), int(op.outputs[0])
    kinds = {r.type_name(t) for t in (a, b, out)}
    if "FLOAT32" not in kinds:
        return _read_quantized(imp, op, kind)
    if kinds != {"FLOAT32"} or r.is_constant(a) or r.is_constant(b):
        raise IntsimError(f"{r.path}: op {imp.index} ADD mixes float32 and quantized tensors or a constant: intsim "
                          f"imports a float ADD of two float32 tensors (each a DEQUANTIZE or float ADD output)")
    return imp.module(f"add_{imp.index}", FloatAdd(r.act(op.builtinOptions, kind)), op, [a, b])


def _refuse(gm, node):
    if is_function(node, (operator.add, torch.add)) or is_method(node, ("add",)):
        return "add is supported for two tensors computed from the input, or a tensor and a number (no alpha)"
    return None


ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_read_quantized = reader_for(IntAdd, "ADD")
ADD = Op("add", PRODUCER, lambda gm, n: is_binary(gm, n, ADD_FUNCTIONS, ("add", "add_")),
         spelling="add (x + y, torch.add)", freeze=freezer_for(IntAdd, "an add"), refuse=_refuse,
         frozen=(IntAdd, FloatAdd), functions=ADD_FUNCTIONS, tflite_read={"ADD": _read},
         tflite_write={IntAdd: writer_for("ADD")},
         to_float={IntAdd: float_for(operator.add), FloatAdd: float_for(operator.add)})
