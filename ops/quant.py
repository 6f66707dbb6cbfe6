"""The model's edges and its activation quantizers: QUANTIZE (reals in, integers out) and
DEQUANTIZE (integers in, reals out), TFLite's ops at a quantized model's float input and output,
and QUANTIZE from one 8-bit tensor to another (a requantize: TF's converter puts one after a
uint8 input and before a uint8 output of an int8 body)."""
import torch

from function import (check_finite, check_quantize, dequantize, fake_quantize, multiply_by_quantized_multiplier,
                      quantize_multiplier, quantize_unchecked)
from quantizer import Quantizer

from . import compiled
from .base import OUTPUT, PRODUCER, QUANT, FrozenOp, Op, is_module


class Quantize(FrozenOp):
    """The model's input (TFLite's QUANTIZE): q = clamp(round(x / S) + Z, QMIN, QMAX), x / S in
    x's dtype (float32 input: as LiteRT's reference QUANTIZE divides)."""
    CONFIG = ("act_min", "act_max", "out_bits", "out_signed")
    integer = True
    new_grid = True

    def __init__(self, out):
        super().__init__()
        self._set_out(out)

    def int_forward(self, x):
        check_quantize(x, self.out_scale)        # the checks on values, before a compiled call
        return compiled.call(quantize_unchecked, x.device, x, self.out_scale, self.out_zero_point, self.act_min,
                             self.act_max)

    def real_forward(self, x):
        check_finite(x)
        return fake_quantize(x, self.out_scale, self.out_zero_point, self.act_min, self.act_max)


class Dequantize(FrozenOp):
    """The model's output (TFLite's DEQUANTIZE): r = S (q - Z)."""
    integer = True

    def __init__(self, inp):
        super().__init__()
        self._set_in(inp)

    def int_forward(self, q):
        return dequantize(q, self.in_scale, self.in_zero_point)

    def real_forward(self, x):
        return x

    def in_qparams(self):
        return self.in_scale, self.in_zero_point


class Requantize(FrozenOp):
    """QUANTIZE of an 8-bit tensor onto another grid (TFLite's reference Requantize, quantize.cc):
        q_out = clamp(MultiplyByQuantizedMultiplier(q - Z_in, M0, shift) + Z_out, QMIN, QMAX),
    (M0, shift) = QuantizeMultiplier(S_in / S_out) in double. Between uint8 and int8 of one S,
    q - Z_in + Z_out exactly (LiteRT's XOR 0x80)."""
    CONFIG = ("act_min", "act_max", "out_bits", "out_signed")
    integer = True
    new_grid = True

    def __init__(self, inp, out):
        super().__init__()
        self._set_in(inp)
        self._set_out(out)
        m0, shift = quantize_multiplier(self.in_scale.double() / self.out_scale.double())
        self.register_buffer("m0", m0)
        self.register_buffer("shift", shift)

    def int_forward(self, q):
        y = multiply_by_quantized_multiplier(q.long() - self.in_zero_point, self.m0, self.shift) + self.out_zero_point
        return y.clamp(self.act_min, self.act_max).to(torch.int32)

    def real_forward(self, x):
        return self._real_out(x)


def _read_quantize(imp, op, kind):
    """QUANTIZE inside the model: of an 8-bit tensor, a requantize; of a float32 one (the end of
    a float ADD that litert-torch writes between DEQUANTIZE and QUANTIZE), a Quantize."""
    r = imp.reader
    x = int(op.inputs[0])
    if r.type_name(x) == "FLOAT32":
        return imp.module(f"quantize_{imp.index}", Quantize(r.activation(op.outputs[0])), op, [x])
    return imp.module(f"requantize_{imp.index}", Requantize(r.activation(x), r.activation(op.outputs[0])), op, [x])


def _read_dequantize(imp, op, kind):
    """DEQUANTIZE inside the model (the model's last one is its output, read by the importer)."""
    x = int(op.inputs[0])
    return imp.module(f"dequantize_{imp.index}", Dequantize(imp.reader.activation(x)), op, [x])


def _write_requantize(ex, node, op):
    x = ex.src(node)[0]
    ex.w.op("QUANTIZE", [x], [ex.act_tensor(node, op.out_params(), node.name)])


def _float_identity(fb, node, op, args):
    return args[0]


def _write_quantize(ex, node, op):
    ex.w.op("QUANTIZE", [ex.x], [ex.act_tensor(node, op.out_params(), node.name)])


def _write_dequantize(ex, node, op):
    index, _, offset, shape = ex.src(node)
    ex.compare_tensor, ex.offset = index, offset
    out = ex.w.tensor("output", shape, "FLOAT32")
    ex.w.op("DEQUANTIZE", [index], [out])
    ex.w.graph.outputs = [out]


INPUT = Op("input", PRODUCER, lambda gm, n: n.op == "placeholder", frozen=(Quantize,),
           tflite_write={Quantize: _write_quantize})
ACTIVATION_QUANTIZER = Op("activation quantizer", QUANT, lambda gm, n: is_module(gm, n, Quantizer))
REQUANTIZE = Op("requantize", PRODUCER, lambda gm, n: False, frozen=(Requantize,),
                 tflite_read={"QUANTIZE": _read_quantize, "DEQUANTIZE": _read_dequantize},
                 tflite_write={Requantize: _write_requantize},
                 to_float={Requantize: _float_identity})
MODEL_OUTPUT = Op("output", OUTPUT, lambda gm, n: n.op == "output", frozen=(Dequantize,),
                  tflite_write={Dequantize: _write_dequantize})
