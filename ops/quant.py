"""The model's edges and its activation quantizers: QUANTIZE (reals in, integers out) and
DEQUANTIZE (integers in, reals out), TFLite's ops at a quantized model's float input and output."""
from function import check_finite, dequantize, fake_quantize, quantize
from quantizer import Quantizer

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
        return quantize(x, self.out_scale, self.out_zero_point, self.act_min, self.act_max)

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
MODEL_OUTPUT = Op("output", OUTPUT, lambda gm, n: n.op == "output", frozen=(Dequantize,),
                  tflite_write={Dequantize: _write_dequantize})
