"""HARD_SWISH, x relu6(x + 3) / 6 (MobileNetV3), in TFLite's 16-bit fixed-point scheme
(kernels/internal/reference/hard_swish.h; HardSwishPrepare in kernels/activations.cc), and
Hardsigmoid, relu6(x + 3) / 6, which TFLite has no op for: it converts to ADD of the constant 3
with a fused RELU6, then MUL by the constant 1/6, as TFLite's converter lowers it."""
import operator

import torch
import torch.nn.functional as F
from torch import nn

from function import quantize_multiplier

from .base import PRODUCER, FrozenOp, Op, is_function, is_module

INT16_MIN, INT16_MAX = -(2 ** 15), 2 ** 15 - 1
HIRES_SHIFT = 7                   # input differences on a scale 2^7 finer ("hires input scale")
RELUISH_SCALE = 3.0 / 32768.0     # the scale on which real 3 is 32768


def _f32(v):
    return torch.tensor(v, dtype=torch.float32)


def down_scale_to_int16(m0):
    """DownScaleInt32ToInt16Multiplier: the Q31 multiplier's top 16 bits, rounded."""
    m0 = int(m0)
    return INT16_MAX if m0 >= 2 ** 31 - 1 - 2 ** 15 else (m0 + 2 ** 15) >> 16


def _srdhm16(a, b):
    """gemmlowp's SaturatingRoundingDoublingHighMul on int16 values (int64 tensors)."""
    ab = a * b
    nudge = torch.where(ab >= 0, torch.full_like(ab, 1 << 14), torch.full_like(ab, 1 - (1 << 14)))
    q = torch.div(ab + nudge, 1 << 15, rounding_mode="trunc")
    return torch.where((a == INT16_MIN) & (b == INT16_MIN), torch.full_like(q, INT16_MAX), q)


def _sdhm16(a, b):
    """SaturatingDoublingHighMul (hard_swish.h): like SRDHM but truncating toward zero."""
    q = torch.div(a * b, 1 << 15, rounding_mode="trunc")
    return torch.where((a == INT16_MIN) & (b == INT16_MIN), torch.full_like(q, INT16_MAX), q)


def _rdbpot(x, e):
    """RoundingDivideByPOT (e >= 0)."""
    mask = (1 << e) - 1
    threshold = (mask >> 1) + (x < 0).long()
    return (x >> e) + ((x & mask) > threshold).long()


def _saturating_left_shift(x, amount):
    return (x * (1 << amount)).clamp(INT16_MIN, INT16_MAX)


class IntHardSwish(FrozenOp):
    """HARD_SWISH on 8-bit tensors: with x = q_in - Z_in on the hires scale S_in / 2^7,
        relu-ish   r = ((SRDHM(x 2^7 shifted by the reluish exponent, m_r) + 2^15) >> 1   in [0, 1] as Q15
        out        q_out = RDBPOT(SDHM(r, SRDHM(x 2^7, m_o)), -e_o) + Z_out, clamped
    m_o, e_o from S_in / 2^7 / S_out and m_r, e_r from S_in / 2^7 / (3 / 32768), each a float32
    quotient, QuantizeMultiplier'd and cut to 16 bits (DownScaleInt32ToInt16Multiplier)."""
    CONFIG = ("act_min", "act_max", "out_bits", "out_signed", "m_out", "e_out", "m_relu", "e_relu")
    integer = True
    new_grid = True

    def __init__(self, inp, out):
        super().__init__()
        self._set_in(inp)
        self._set_out(out)
        hires = _f32(1.0 / 128.0) * inp.scale.float()
        m_out, e_out = quantize_multiplier((hires / out.scale.float()).double())
        m_relu, e_relu = quantize_multiplier((hires / _f32(RELUISH_SCALE)).double())
        self.m_out, self.e_out = down_scale_to_int16(m_out), int(e_out)
        self.m_relu, self.e_relu = down_scale_to_int16(m_relu), int(e_relu)

    def int_forward(self, q):
        x = (q.long() - self.in_zero_point) * (1 << HIRES_SHIFT)
        pre_out = _srdhm16(x, torch.tensor(self.m_out))
        r = x
        if self.e_relu > 0:
            r = _saturating_left_shift(r, self.e_relu - 1)
        r = _srdhm16(r, torch.tensor(self.m_relu))
        if self.e_relu > 0:
            r = _saturating_left_shift(r, 1)
        if self.e_relu < 0:
            r = _rdbpot(r, -self.e_relu)
        r = (r + (1 << 15)) >> 1
        y = _rdbpot(_sdhm16(r, pre_out), -self.e_out) + self.out_zero_point
        return y.clamp(self.act_min, self.act_max).to(torch.int32)

    def real_forward(self, x):
        return self._real_out(F.hardswish(x))


def _is_hardswish(gm, node):
    return is_module(gm, node, nn.Hardswish) or is_function(node, (F.hardswish,))


def _is_hardsigmoid(gm, node):
    return is_module(gm, node, nn.Hardsigmoid) or is_function(node, (F.hardsigmoid,))


def _hardsigmoid_lowered(gm, node, qconfig, name, module):
    """relu6(x + 3) * (1 / 6): ADD of a constant with RELU6, then MUL by a constant."""
    with gm.graph.inserting_after(node):
        added = gm.graph.call_function(operator.add, (node.args[0], 3.0))
    with gm.graph.inserting_after(added):
        clamped = gm.graph.call_function(F.relu6, (added,))
    with gm.graph.inserting_after(clamped):
        scaled = gm.graph.call_function(operator.mul, (clamped, 1.0 / 6.0))
    node.replace_all_uses_with(scaled)
    gm.graph.erase_node(node)


def _freeze(freezer, node, ins, out, act):
    return [IntHardSwish(ins[0], out)]


def _read(imp, op, kind):
    r = imp.reader
    x = int(op.inputs[0])
    return imp.module(f"hard_swish_{imp.index}", IntHardSwish(r.activation(x), r.activation(op.outputs[0])), op, [x])


def _write(ex, node, op):
    ex.w.op("HARD_SWISH", [ex.src(node)[0]], [ex.act_tensor(node, op.out_params(), node.name)])


def _float(fb, node, op, args):
    return fb.call(node.target, nn.Hardswish(), args)


HARD_SWISH = Op("hardswish", PRODUCER, _is_hardswish,
                spelling="hardswish (nn.Hardswish), hardsigmoid (as add, ReLU6 and mul)",
                source=_is_hardsigmoid, convert=_hardsigmoid_lowered, freeze=_freeze, frozen=(IntHardSwish,),
                float_modules={"Hardswish": (nn.Hardswish, ())},
                tflite_read={"HARD_SWISH": _read}, tflite_write={IntHardSwish: _write}, to_float={IntHardSwish: _float})
