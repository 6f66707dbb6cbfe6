"""MUL: the elementwise product of two quantized tensors, broadcasting (squeeze-excitation's
x * sigmoid(s), SiLU's x * sigmoid(x)), or of a tensor and a constant (Hardsigmoid's 1/6)."""
import operator

import torch

from function import quantize_multiplier

from .base import NO_ACTIVATION, PRODUCER, FrozenOp, Op
from .binary import Tabulated, float_for, freezer_for, is_binary, reader_for, writer_for


class IntMul(Tabulated, FrozenOp):
    """TFLite's MUL (reference_integer_ops::Mul / BroadcastMul4DSlow; kernels/mul.cc):
        q_out = clamp(rescale((q1 - Z1)(q2 - Z2), M) + Z_out, act_min, act_max)
    with M = S1 S2 / S_out computed in float32, as mul.cc's Prepare does (a float expression
    assigned to a double). The product of two 8-bit differences fits int32. `constant`: the
    second operand is a constant integer of its own (S, Z) (a real constant on its grid). The
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
        real = (self.in_scale1.float() * self.in_scale2.float() / self.out_scale.float()).double()
        m0, shift = quantize_multiplier(real)
        self.register_buffer("m0", m0)
        self.register_buffer("shift", shift)

    def _second(self, q2):
        return torch.tensor(self.constant) if self.constant is not None else q2

    def real_forward(self, x1, x2=None):
        x2 = self.in_scale2 * (self.constant - self.in_zero_point2) if self.constant is not None else x2
        return self._real_out(x1 * x2.to(x1.dtype))

    def direct(self, q1, q2=None):
        q2 = self._second(q2).to(q1.device)
        return self._int_out((q1.long() - self.in_zero_point1) * (q2.long() - self.in_zero_point2), self.m0, self.shift)


MUL_FUNCTIONS = (operator.mul, operator.imul, torch.mul)
MUL = Op("mul", PRODUCER, lambda gm, n: is_binary(gm, n, MUL_FUNCTIONS, ("mul", "mul_")),
         spelling="mul (x * y broadcasting, x * c)", freeze=freezer_for(IntMul, "a product"),
         frozen=(IntMul,), functions=MUL_FUNCTIONS, tflite_read={"MUL": reader_for(IntMul, "MUL")},
         tflite_write={IntMul: writer_for("MUL")}, to_float={IntMul: float_for(operator.mul)})
