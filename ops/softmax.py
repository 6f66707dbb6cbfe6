"""SOFTMAX and LOG_SOFTMAX on 8-bit tensors, as TFLite's reference kernels compute them
(kernels/activations.cc SoftmaxPrepare / LogSoftmaxPrepare with kReference;
internal/reference/softmax.h, internal/reference/log_softmax.h; gemmlowp's fixed point, fixedpoint.py).

Both read only the differences q - max(q) of a row and S_in: the input's zero point cancels.
The output grids are fixed: SOFTMAX S = 1 / 2^b, Z = QMIN (p in [0, 1)); LOG_SOFTMAX S = 1/16,
Z = QMAX (log p in [-(2^b - 1) / 16, 0]). TFLite's kernels hard-code b = 8; at fewer bits
intsim keeps the kernel and the step (a fake-quant run; the integer path is for 8 bits).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from errors import IntsimError
from fixedpoint import exp_on_negative_values, get_reciprocal, log_x_for_x_greater_than_or_equal_to_1, rescale, srdhm
from function import INT32_MIN, multiply_by_quantized_multiplier, quantize_multiplier, round_half_away, rounding_divide_by_pot

from .base import PRODUCER, FrozenOp, Op, arg, is_function, is_method, is_module

SCALED_DIFF_BITS = 5        # q - max rescaled to Q5.26: exp(-32) is nothing next to exp(0)
ACCUMULATION_BITS = 12      # the sum of exps in Q12.19: room for 2^12 terms
LOG_OUTPUT_BITS = 4         # LOG_SOFTMAX's output in Q4.27, then in steps of 1/16
LOG_SOFTMAX_STEP = 1.0 / 16


def fixed_softmax_range(grid):
    """[0, 1 - 2^-b]: S = 2^-b, Z = QMIN."""
    levels = grid.qmax - grid.qmin + 1
    return 0.0, (levels - 1) / levels


def fixed_log_softmax_range(grid):
    """[-(2^b - 1) / 16, 0]: S = 1/16, Z = QMAX."""
    return -(grid.qmax - grid.qmin) * LOG_SOFTMAX_STEP, 0.0


def softmax_scaling(in_scale, beta):
    """TFLite's PreprocessSoftmaxScaling (double): beta S_in 2^(31 - 5) capped at 2^31 - 1, as
    (M0, left shift >= 0); and diff_min = -CalculateInputRadius(5, left shift): the most negative
    q - max whose rescaled value still fits int32."""
    real = min(beta * float(in_scale) * 2.0 ** (31 - SCALED_DIFF_BITS), 2.0 ** 31 - 1.0)
    m0, shift = (int(v) for v in quantize_multiplier(torch.tensor(real, dtype=torch.float64)))
    if shift < 0:
        raise IntsimError(f"softmax input scale {float(in_scale):.3g} is too small for TFLite's kernel "
                          f"(beta S_in 2^26 < 1): recalibrate the layer before it")
    radius = math.floor((2 ** SCALED_DIFF_BITS - 1) * 2.0 ** (31 - SCALED_DIFF_BITS) / 2.0 ** shift)
    return m0, shift, -radius


def reverse_scaling(m0, left_shift):
    """LOG_SOFTMAX's inverse of the input rescale (PreprocessLogSoftmaxScalingExp): 2^(31 - left
    shift) / M0 as (M0', shift' <= 0)."""
    m, shift = (int(v) for v in quantize_multiplier(torch.tensor(2.0 ** (31 - left_shift) / m0, dtype=torch.float64)))
    return m, shift


class IntSoftmax(FrozenOp):
    """SOFTMAX (log=False) or LOG_SOFTMAX (log=True) over `dim` (TFLite's last axis: NCHW's 1).
    Per row, d = q - max(q); where d >= diff_min:
        x   = SRDHM(d 2^left_shift, M0)                      Q5.26 of beta S_in d
        e   = exp(x)                                         Q0.31 (gemmlowp exp_on_negative_values)
        sum = sum of RoundingDivideByPOT(e, 12)              Q12.19
    SOFTMAX:     q_out = RDBPOT(SRDHM(1 / sum, e), k + 31 - b) + QMIN, k the bits over unit of sum
    LOG_SOFTMAX: q_out = RDBPOT(x - log(sum), 22) + QMAX     (log sum in Q5.26)
    clamped to the grid; a value below the cut-off (diff_min, or for LOG_SOFTMAX the lowest
    representable) is QMIN."""
    CONFIG = ("dim", "log", "beta", "m0", "left_shift", "diff_min", "rev_m0", "rev_shift",
              "act_min", "act_max", "out_bits", "out_signed")
    integer = True
    new_grid = True

    def __init__(self, inp, out, dim=1, log=False, beta=1.0):
        super().__init__()
        self.dim, self.log, self.beta = dim, log, float(beta)
        self._set_in(inp)
        self._set_out(out)
        self.m0, self.left_shift, self.diff_min = softmax_scaling(self.in_scale, self.beta)
        self.rev_m0, self.rev_shift = reverse_scaling(self.m0, self.left_shift) if log else (0, 0)

    def int_forward(self, q):
        x = q.long().movedim(self.dim, -1)                                     # rows along the last axis
        d = x - x.max(-1, keepdim=True).values
        inside = d >= self.diff_min
        scaled = srdhm(torch.maximum(d, torch.tensor(self.diff_min)) << self.left_shift, torch.tensor(self.m0))
        e = exp_on_negative_values(scaled, SCALED_DIFF_BITS)
        total = torch.where(inside, rescale(e, 0, ACCUMULATION_BITS), torch.zeros_like(e)).sum(-1, keepdim=True)
        out = self._log_softmax(d, scaled, total) if self.log else self._softmax(inside, e, total)
        return out.clamp(self.act_min, self.act_max).movedim(-1, self.dim).to(torch.int32)

    def _softmax(self, inside, e, total):
        recip, bits_over_unit = get_reciprocal(total, ACCUMULATION_BITS)
        exponent = bits_over_unit + 31 - self.out_bits
        if ((exponent < 0) | (exponent > 31)).any():
            raise IntsimError(f"{self.layer_name}: a row's exponentials sum to 2^{self.out_bits} times its "
                              f"largest or more (that many values near the row's maximum): TFLite's {self.out_bits}-bit "
                              f"SOFTMAX stops there (TFLITE_CHECK on its output shift; LiteRT aborts), so intsim refuses it")
        out = rounding_divide_by_pot(srdhm(recip.expand_as(e), e), exponent) + self.act_min
        return torch.where(inside, out, torch.full_like(out, self.act_min))

    def _log_softmax(self, d, scaled, total):
        log_sum = log_x_for_x_greater_than_or_equal_to_1(total, ACCUMULATION_BITS, SCALED_DIFF_BITS)
        cut = multiply_by_quantized_multiplier(log_sum + INT32_MIN, torch.tensor(self.rev_m0), torch.tensor(self.rev_shift))
        keep = d > torch.maximum(cut, torch.tensor(self.diff_min - 1))
        out = rounding_divide_by_pot(scaled - log_sum, 31 - SCALED_DIFF_BITS - LOG_OUTPUT_BITS) + self.act_max
        return torch.where(keep, out, torch.full_like(out, self.act_min))

    def real_forward(self, x):
        """The exact (log) probabilities rounded onto the kernel's grid (steps of 1 / 2^b from
        QMIN, or 1/16 down from QMAX), read with the tensor's own (S, Z)."""
        p = (F.log_softmax if self.log else F.softmax)(self.beta * x.double(), dim=self.dim)
        step, base = (LOG_SOFTMAX_STEP, self.act_max) if self.log else (2.0 ** -self.out_bits, self.act_min)
        q = (round_half_away(p / step) + base).clamp(self.act_min, self.act_max)
        return (self.out_scale.double() * (q - self.out_zero_point)).to(x.dtype)


def _dim(node):
    d = arg(node, 1, "dim")
    return 1 if d is None else d          # torch's implicit dim for 2-D and 4-D inputs


def _kind(gm, node):
    """'softmax', 'log_softmax' or None: nn.Softmax / nn.LogSoftmax, F. and torch. functions, methods."""
    for name, module, fns in (("softmax", nn.Softmax, (F.softmax, torch.softmax)),
                              ("log_softmax", nn.LogSoftmax, (F.log_softmax, torch.log_softmax))):
        if is_module(gm, node, module) or is_function(node, fns) or is_method(node, (name,)):
            return name
    return None


def _axis(gm, node):
    if node.op == "call_module":
        d = gm.get_submodule(node.target).dim
        return 1 if d is None else d
    return _dim(node)


def _freeze(freezer, node, ins, out, act):
    gm = freezer.qmodel
    return [IntSoftmax(ins[0], out, dim=_axis(gm, node), log=_kind(gm, node) == "log_softmax")]


def _read(imp, op, kind):
    r = imp.reader
    x = int(op.inputs[0])
    rank = len(r.shape(x))
    if rank not in (2, 4):
        raise IntsimError(f"{r.path}: op {imp.index} {kind} on a {rank}-D tensor: intsim imports it on 2-D "
                          f"[N, C] or 4-D NHWC tensors (over their last axis)")
    beta = float(op.builtinOptions.beta) if kind == "SOFTMAX" and op.builtinOptions is not None else 1.0
    module = IntSoftmax(r.activation(x), r.activation(op.outputs[0]), dim=1, log=kind == "LOG_SOFTMAX", beta=beta)
    return imp.module(f"{kind.lower()}_{imp.index}", module, op, [x])


def _write(ex, node, op):
    x, qp, offset, shape = ex.src(node)
    if op.dim % len(shape) != 1:
        raise IntsimError(f"cannot export {node.name}: a softmax over dimension {op.dim} of an NCHW tensor; "
                          f"TFLite's SOFTMAX is over the last axis of NHWC, intsim's dimension 1")
    out = ex.act_tensor(node, op.out_params(), node.name)
    if op.log:
        ex.w.op("LOG_SOFTMAX", [x], [out], ex.w.s.LogSoftmaxOptionsT(), "LogSoftmaxOptions")
    else:
        o = ex.w.s.SoftmaxOptionsT()
        o.beta = op.beta
        ex.w.op("SOFTMAX", [x], [out], o, "SoftmaxOptions")


def _float(fb, node, op, args):
    return fb.graph.call_function(F.log_softmax if op.log else F.softmax, (args[0],), {"dim": op.dim})


def _output_range(gm, node, grid):
    return (fixed_log_softmax_range if _kind(gm, node) == "log_softmax" else fixed_softmax_range)(grid)


def _is_softmax(gm, node):
    return _kind(gm, node) is not None


SOFTMAX = Op("softmax", PRODUCER, _is_softmax, spelling="softmax, log_softmax (nn., F., torch., methods; over channels)",
             freeze=_freeze, output_range=_output_range, frozen=(IntSoftmax,),
             float_modules={"Softmax": (nn.Softmax, ("dim",)), "LogSoftmax": (nn.LogSoftmax, ("dim",))},
             functions=(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax),
             tflite_read={"SOFTMAX": _read, "LOG_SOFTMAX": _read}, tflite_write={IntSoftmax: _write},
             to_float={IntSoftmax: _float})
