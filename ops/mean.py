"""MEAN over height and width: global average pooling, the output on a scale of its own.

In the converted graph every spelling of it (nn.AdaptiveAvgPool2d(1), F.adaptive_avg_pool2d(x,
1), x.mean((2, 3))) is a QMean (module.py), which remembers the window it pooled.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from errors import IntsimError
from function import quantize_multiplier
from module import QMean

from .base import PRODUCER, FrozenOp, Op, is_function, is_method, is_module


class IntMean(FrozenOp):
    """Global average pooling over (H, W), TFLite's quantized MEAN with the output on its own scale:
        acc   = sum_{h,w} (q_in - Z_in)                                                int32
        q_out = clamp(rescale(acc, S_in / (H W S_out)) + Z_out, QMIN, QMAX)
    for the window H W it was frozen with (another size is refused).

    `tflite_fold` computes the multiplier as LiteRT's reference MEAN does (QuantizedMeanOrSum):
    M0, shift of S_in / S_out, then 1/N folded in as M0' = (M0 << k) / N (C's integer division),
    shift' = shift - k, k = min(floor(log2 N), 32, 31 + shift). Equal to the above when N is a
    power of two; for 7x7 a few outputs in 10^3 differ by one."""
    CONFIG = ("count", "keepdim", "act_min", "act_max", "out_bits", "out_signed", "single_rounding", "tflite_fold")
    integer = True
    new_grid = True
    tflite_fold = False      # a model saved before the choice

    def __init__(self, count, inp, out, keepdim=True, single_rounding=False, tflite_fold=False):
        super().__init__()
        if count == 0:
            raise IntsimError("average pooling saw no input: calibrate the model before freezing it")
        self.count, self.keepdim, self.single_rounding, self.tflite_fold = count, keepdim, single_rounding, tflite_fold
        self._set_in(inp)
        self._set_out(out)
        if tflite_fold:
            m0, shift = quantize_multiplier(self.in_scale.double() / self.out_scale.double())
            k = torch.clamp(torch.clamp(torch.tensor(count.bit_length() - 1), max=32), max=31 + shift)
            m0, shift = torch.div(m0 << k, count, rounding_mode="trunc"), shift - k
        else:
            m0, shift = quantize_multiplier(self.in_scale.double() / (count * self.out_scale.double()))
        self.register_buffer("m0", m0)
        self.register_buffer("shift", shift)

    def real_forward(self, x):
        return self._real_out(x.mean((-2, -1), keepdim=self.keepdim))

    def int_forward(self, q):
        if q.shape[-1] * q.shape[-2] != self.count:
            raise IntsimError(f"average pooling was frozen for {self.count} positions, got "
                              f"{q.shape[-2]}x{q.shape[-1]}: use the image size it was calibrated on")
        acc = (q.long() - self.in_zero_point).sum((-2, -1), keepdim=self.keepdim)
        return self._int_out(acc, self.m0, self.shift)


def _is_source(gm, node):
    """Global average pooling: AdaptiveAvgPool2d(1), F.adaptive_avg_pool2d(x, 1), x.mean((2, 3))."""
    if is_module(gm, node, nn.AdaptiveAvgPool2d):
        return gm.get_submodule(node.target).output_size in (1, (1, 1))
    if is_function(node, (F.adaptive_avg_pool2d,)):
        return tuple(node.args[1:]) in ((1,), ((1, 1),)) or node.kwargs.get("output_size") in (1, (1, 1))
    if is_function(node, (torch.mean,)) or is_method(node, ("mean",)):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return dims is not None and sorted(d % 4 for d in (dims if isinstance(dims, (tuple, list)) else [dims])) == [2, 3]
    return False


def _convert(gm, node, qconfig, name, module):
    """The pool at this call site -> a QMean of its own (keepdim as the spelling keeps it)."""
    functional = node.op != "call_module"
    keepdim = not functional or node.target is F.adaptive_avg_pool2d or \
        bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
    name = f"mean_{node.name}" if functional else name
    gm.add_submodule(name, QMean(keepdim))
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node.args[0],))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _refuse(gm, node):
    if is_function(node, (F.adaptive_avg_pool2d,)):
        return "F.adaptive_avg_pool2d converts to output size 1 only; use nn.AdaptiveAvgPool2d for other sizes"
    if is_function(node, (torch.mean,)) or is_method(node, ("mean",)):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return (f"a mean over dims {dims if dims is not None else 'all'}: intsim converts the mean over H and W "
                f"(dims (2, 3) of NCHW: TFLite's global MEAN) only; a mean over other dims is not converted yet")
    return None


def _freeze(freezer, node, ins, out, act):
    mean, qconfig = freezer.qmodel.get_submodule(node.target), freezer.qmodel.qconfig
    return [IntMean(int(mean.count), ins[0], out, mean.keepdim, single_rounding=qconfig.single_rounding,
                    tflite_fold=not qconfig.legacy_kernels)]


def _read(imp, op, kind):
    r = imp.reader
    x, axis = op.inputs[0], op.inputs[1]
    n, h, w, c = r.shape(x)
    if sorted(int(a) for a in r.data(axis).reshape(-1)) != [1, 2]:
        raise IntsimError(f"{r.path}: MEAN over axes other than (1, 2) (height, width) is not imported")
    module = IntMean(h * w, r.activation(x), r.activation(op.outputs[0]), keepdim=op.builtinOptions.keepDims,
                     tflite_fold=True)
    return imp.module(f"mean_{imp.index}", module, op, [x])


def _write(ex, node, op):
    x, _, _, _ = ex.src(node)
    out_qp = op.out_params()
    axis = ex.w.tensor(f"{node.name}.axis", [2], "INT32", data=np.array([1, 2], dtype=np.int32))
    o = ex.w.s.ReducerOptionsT()
    o.keepDims = bool(op.keepdim)
    ex.w.op("MEAN", [x, axis], [ex.act_tensor(node, out_qp, node.name)], o, "ReducerOptions")


def _float(fb, node, op, args):
    value = fb.call(node.target, nn.AdaptiveAvgPool2d(1), args)
    return value if op.keepdim else fb.graph.call_function(torch.flatten, (value, 1))


MEAN = Op("global average pooling", PRODUCER, lambda gm, n: is_module(gm, n, QMean),
          spelling="global average pooling (nn.AdaptiveAvgPool2d(1), F.adaptive_avg_pool2d(x, 1), x.mean((2, 3)))",
          source=_is_source, convert=_convert, freeze=_freeze, refuse=_refuse, frozen=(IntMean,),
          float_modules={"QMean": (QMean, ("keepdim",))},       # global average pooling left float (A32 models)
          tflite_read={"MEAN": _read}, tflite_write={IntMean: _write}, to_float={IntMean: _float})
