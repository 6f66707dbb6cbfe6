"""MEAN: global average pooling (over height and width), or a mean over other dims (not the
batch), the output on a scale of its own.

In the converted graph every spelling of it (nn.AdaptiveAvgPool2d(1), F.adaptive_avg_pool2d(x,
1), x.mean((2, 3)), x.mean(1, keepdim=True)) is a QMean (module.py), which remembers how many
values it averaged. TFLite's MEAN takes its axes in NHWC order: NCHW dim 1 (channels) is axis 3.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from errors import IntsimError
from function import quantize_multiplier
from module import QMean, mean_dims

from . import compiled
from .base import PRODUCER, FrozenOp, Op, int_out, is_function, is_method, is_module


class IntMean(FrozenOp):
    """TFLite's quantized MEAN over `dims` (global average pooling: (2, 3), H and W of NCHW), the
    output on its own scale; N values averaged:
        acc   = sum over dims (q_in - Z_in)                                             int32
        q_out = clamp(rescale(acc, S_in / (N S_out)) + Z_out, QMIN, QMAX)
    for the N it was frozen with (another size is refused).

    `tflite_fold` computes the multiplier as LiteRT's reference MEAN does (QuantizedMeanOrSum):
    M0, shift of S_in / S_out, then 1/N folded in as M0' = (M0 << k) / N (C's integer division),
    shift' = shift - k, k = min(floor(log2 N), 32, 31 + shift). Equal to the above when N is a
    power of two; for 7x7 a few outputs in 10^3 differ by one."""
    CONFIG = ("count", "keepdim", "act_min", "act_max", "out_bits", "out_signed", "single_rounding", "tflite_fold",
              "dims")
    integer = True
    new_grid = True
    tflite_fold = False      # a model saved before the choice
    dims = (2, 3)            # a model saved before other dims: global average pooling

    def __init__(self, count, inp, out, keepdim=True, single_rounding=False, tflite_fold=False, dims=(2, 3)):
        super().__init__()
        if count == 0:
            raise IntsimError("average pooling saw no input: calibrate the model before freezing it")
        self.count, self.keepdim, self.single_rounding, self.tflite_fold = count, keepdim, single_rounding, tflite_fold
        self.dims = tuple(dims)
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
        return self._real_out(x.mean(mean_dims(self.dims, x.dim()), keepdim=self.keepdim))

    def int_forward(self, q):
        dims = mean_dims(self.dims, q.dim())
        if math.prod(q.shape[d] for d in dims) != self.count:
            raise IntsimError(f"a mean (average pooling) was frozen for {self.count} positions, got {'x'.join(str(q.shape[d]) for d in dims)}: "
                              f"use the image size it was calibrated on")
        return compiled.call(mean_kernel, q.device, q, self.in_zero_point, dims, self.keepdim, self.m0, self.shift,
                             self.out_zero_point, self.act_min, self.act_max, self.single_rounding)


def mean_kernel(q, z_in, dims, keepdim, m0, shift, z_out, act_min, act_max, single_rounding):
    """IntMean's arithmetic: clamp(rescale(sum over dims (q - Z_in), M0, shift) + Z_out, act_min, act_max)."""
    return int_out((q.long() - z_in).sum(dims, keepdim=keepdim), m0, shift, z_out, act_min, act_max, single_rounding)


def _mean_dims(node):
    """The dims of torch.mean(x, dims) / x.mean(dims) as a tuple (None: over everything)."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return None if dims is None else tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)


def _is_source(gm, node):
    """Global average pooling (AdaptiveAvgPool2d(1), F.adaptive_avg_pool2d(x, 1)) and means over
    dims other than the batch (x.mean((2, 3)), torch.mean(x, 1, keepdim=True))."""
    if is_module(gm, node, nn.AdaptiveAvgPool2d):
        return gm.get_submodule(node.target).output_size in (1, (1, 1))
    if is_function(node, (F.adaptive_avg_pool2d,)):
        return tuple(node.args[1:]) in ((1,), ((1, 1),)) or node.kwargs.get("output_size") in (1, (1, 1))
    if is_function(node, (torch.mean,)) or is_method(node, ("mean",)):
        dims = _mean_dims(node)
        return bool(dims) and 0 not in dims and node.kwargs.get("dtype") is None
    return False


def _convert(gm, node, qconfig, name, module):
    """The pool at this call site -> a QMean of its own (keepdim as the spelling keeps it)."""
    functional = node.op != "call_module"
    mean = is_function(node, (torch.mean,)) or is_method(node, ("mean",))
    keepdim = not functional or node.target is F.adaptive_avg_pool2d or \
        bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
    name = f"mean_{node.name}" if functional else name
    gm.add_submodule(name, QMean(keepdim, _mean_dims(node) if mean else (2, 3)))
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node.args[0],))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _refuse(gm, node):
    if is_function(node, (F.adaptive_avg_pool2d,)):
        return "F.adaptive_avg_pool2d converts to output size 1 only; use nn.AdaptiveAvgPool2d for other sizes"
    if is_function(node, (torch.mean,)) or is_method(node, ("mean",)):
        dims = _mean_dims(node)
        return (f"a mean over {'dims ' + str(dims) if dims else 'all dims'} averages over the batch (dim 0)"
                + (" or casts" if node.kwargs.get("dtype") is not None else "") +
                ": intsim converts means over the other dims, each image on its own (x.mean((2, 3)), x.mean(1))")
    return None


def _freeze(freezer, node, ins, out, act):
    mean, qconfig = freezer.qmodel.get_submodule(node.target), freezer.qmodel.qconfig
    return [IntMean(int(mean.count), ins[0], out, mean.keepdim, single_rounding=qconfig.single_rounding,
                    tflite_fold=not qconfig.legacy_kernels, dims=mean.dims)]


NCHW_OF_NHWC = (0, 2, 3, 1)      # TFLite's NHWC axis a is intsim's NCHW dim NCHW_OF_NHWC[a]


def _read(imp, op, kind):
    r = imp.reader
    x, axis = op.inputs[0], op.inputs[1]
    shape, axes = r.shape(x), [int(a) % len(r.shape(x)) for a in r.data(axis).reshape(-1)]
    if not axes or 0 in axes:
        raise IntsimError(f"{r.path}: op {imp.index} MEAN over axes {axes} averages over the batch: intsim imports "
                          f"a MEAN over the other axes")
    dims = tuple(sorted(NCHW_OF_NHWC[a] for a in axes)) if len(shape) == 4 else tuple(sorted(axes))
    if len(shape) == 4 and not op.builtinOptions.keepDims and dims in ((2,), (3,)):
        raise IntsimError(f"{r.path}: op {imp.index} MEAN over axis {axes[0]} without keep_dims leaves (one of H, W, C), "
                          f"which intsim's NCHW order holds as (C, one of H, W): not imported")
    module = IntMean(math.prod(shape[a] for a in axes), r.activation(x), r.activation(op.outputs[0]),
                     keepdim=op.builtinOptions.keepDims, tflite_fold=True, dims=dims)
    return imp.module(f"mean_{imp.index}", module, op, [x])


def _write(ex, node, op):
    x, _, _, in_shape = ex.src(node)
    out_qp = op.out_params()
    dims = mean_dims(op.dims, len(in_shape))
    if len(in_shape) == 4 and not op.keepdim and 1 not in dims and len(dims) == 1:
        raise IntsimError(f"cannot export {node.name}: a mean over dim {dims[0]} without keepdim leaves (C, one of H, W) "
                          f"in intsim's order and (one of H, W, C) in TFLite's; export it with keepdim=True")
    axes = sorted(NCHW_OF_NHWC.index(d) for d in dims) if len(in_shape) == 4 else list(dims)
    axis = ex.w.tensor(f"{node.name}.axis", [len(axes)], "INT32", data=np.array(axes, dtype=np.int32))
    o = ex.w.s.ReducerOptionsT()
    o.keepDims = bool(op.keepdim)
    ex.w.op("MEAN", [x, axis], [ex.act_tensor(node, out_qp, node.name)], o, "ReducerOptions")


def _float(fb, node, op, args):
    if tuple(op.dims) != (2, 3):
        return fb.graph.call_function(torch.mean, (args[0], tuple(op.dims)), {"keepdim": bool(op.keepdim)})
    value = fb.call(node.target, nn.AdaptiveAvgPool2d(1), args)
    return value if op.keepdim else fb.graph.call_function(torch.flatten, (value, 1))


MEAN = Op("mean", PRODUCER, lambda gm, n: is_module(gm, n, QMean),
          spelling="global average pooling (nn.AdaptiveAvgPool2d(1), F.adaptive_avg_pool2d(x, 1), x.mean((2, 3))), "
                   "a mean over other dims (x.mean(1))",
          source=_is_source, convert=_convert, freeze=_freeze, refuse=_refuse, frozen=(IntMean,),
          float_modules={"QMean": (QMean, ("keepdim", "dims"))},       # global average pooling left float (A32 models)
          tflite_read={"MEAN": _read}, tflite_write={IntMean: _write}, to_float={IntMean: _float})
