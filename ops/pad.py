"""PAD: zero padding of a quantized tensor, with the zero point (real 0)."""
import torch
import torch.nn.functional as F
from torch import nn

from errors import IntsimError

from .base import SAME, FrozenOp, Op, arg, is_function, is_module


class IntPad(FrozenOp):
    """PAD (of a quantized tensor): `pad` = (left, right, top, bottom) positions of real 0, i.e.
    of the zero point Z; the output keeps the input's S and Z."""
    CONFIG = ("pad", "act_min", "act_max", "out_bits", "out_signed")
    integer = True

    def __init__(self, pad, inp):
        super().__init__()
        self.pad = tuple(pad)
        self._set_out(inp)

    def real_forward(self, x):
        return F.pad(x, self.pad, value=0.0)

    def int_forward(self, q):
        return F.pad(q, self.pad, value=int(self.out_zero_point))


def zero_padding(gm, node):
    """(left, right, top, bottom) of nn.ZeroPad2d or F.pad(x, (l, r, t, b)) with zeros; None otherwise."""
    if is_module(gm, node, nn.ZeroPad2d):
        return tuple(gm.get_submodule(node.target).padding)
    if is_function(node, (F.pad,)):
        pad, mode, value = arg(node, 1, "pad"), arg(node, 2, "mode", "constant"), arg(node, 3, "value", None)
        if isinstance(pad, (tuple, list)) and len(pad) == 4 and mode == "constant" and not value:
            return tuple(pad)
    return None


def _read(imp, op, kind):
    r = imp.reader
    x, paddings = op.inputs[0], r.data(op.inputs[1]).reshape(-1, 2)
    if int(x) in imp.nchw and len(paddings) == 4:     # a PAD of the NCHW tensor: its rows in NHWC order
        paddings = paddings[[0, 2, 3, 1]]
    inp, out = r.activation(x), r.activation(op.outputs[0])
    if len(paddings) != 4 or paddings[0].any() or paddings[3].any() or not (
            torch.equal(inp.scale, out.scale) and torch.equal(inp.zero_point, out.zero_point)):
        raise IntsimError(f"{r.path}: PAD other than of height and width on one grid is not imported")
    (top, bottom), (left, right) = paddings[1], paddings[2]
    return imp.module(f"pad_{imp.index}", IntPad((int(left), int(right), int(top), int(bottom)), inp), op, [x])


def _write(ex, node, op):
    x, qp, offset, in_shape = ex.src(node)
    ex.w.op("PAD", [x, ex.paddings(node, op.pad)], [ex.act_tensor(node, qp, node.name)], ex.w.s.PadOptionsT(),
            "PadOptions")
    ex.lowest[node] = ex.lowest.get(node.args[0], qp.grid.qmin)


def _float(fb, node, op, args):
    return fb.call(node.target, nn.ZeroPad2d(op.pad), args)


PAD = Op("zero padding", SAME, lambda gm, n: zero_padding(gm, n) is not None,
         spelling="zero padding (nn.ZeroPad2d, F.pad)",
         freeze=lambda freezer, node, grid: IntPad(zero_padding(freezer.qmodel, node), grid),   # pads with Z: real 0
         frozen=(IntPad,), float_modules={"ZeroPad2d": (nn.ZeroPad2d, ("padding",))}, functions=(F.pad,),
         tflite_read={"PAD": _read}, tflite_write={IntPad: _write}, to_float={IntPad: _float})
