"""MAX_POOL_2D and AVERAGE_POOL_2D: pooling that keeps the input's S and Z."""
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from errors import IntsimError
from module import QAdaptiveAvgPool

from .base import NO_ACTIVATION, POOL, SAME, FrozenOp, Op, is_function, is_module, pair

FLOAT32_EXACT = 2 ** 24   # every integer of magnitude <= 2^24 is exact in float32


class IntMaxPool(FrozenOp):
    """MAX_POOL_2D: picks values, so the output keeps the input's S and Z.

    When it directly follows an op that can pool its accumulator (an IntConv: `pool_first`,
    `run_by_producer`), that op pools before the rescale and this op passes its input on: the
    rescale, + Z_out and the clamp are non-decreasing per channel (M0 > 0), so max and epilogue
    commute exactly, and 4x fewer values are rescaled. Only the execution moves; the graph keeps
    TFLite's two ops, each with its own settings, and every integer is the same (tested)."""
    CONFIG = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "run_by_producer")
    integer = True
    selects = True            # its values are its producer's, on the producer's grid

    def __init__(self, pool):
        super().__init__()
        self.kernel_size, self.stride, self.padding = pool.kernel_size, pool.stride, pool.padding
        self.dilation, self.ceil_mode = pool.dilation, pool.ceil_mode
        self.run_by_producer = False

    def settings(self):
        return (self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)

    def real_forward(self, x):
        return x if self.run_by_producer else F.max_pool2d(x, *self.settings())

    int_forward = real_forward          # max-pool runs on integer tensors as they are


class IntAvgPool(FrozenOp):
    """AVERAGE_POOL_2D. The output keeps the input's S and Z (TFLite's kernel has no rescale),
    so it averages the integers themselves:
        acc   = sum of q_in over the window's positions inside the input (padding not counted)
        q_out = clamp(acc / count, act_min, act_max), the division rounding half up,
                (acc + count / 2) / count, for uint8 and half away from zero for int8
                (reference_ops::AveragePool and reference_integer_ops::AveragePool; C's
                truncating division).
    The two differ at exact halves (an even count): an unsigned tensor frozen for the int8
    kernel (`kernel="int8"`, the file shifts it by -128) is averaged as q - 128, the int8 way
    (`offset` 128). `pad` is explicit per side, (left, right, top, bottom), as TFLite's SAME
    padding needs."""
    CONFIG = ("kernel_size", "stride", "pad", "act_min", "act_max", "out_bits", "out_signed", "signed", "count_pad",
              "offset")
    integer = True
    count_pad = False         # a model saved before the choice
    offset = 0

    def __init__(self, kernel_size, stride, pad, inp, act_range=NO_ACTIVATION, count_pad=False, kernel=None):
        super().__init__()
        self.kernel_size, self.stride, self.pad = pair(kernel_size), pair(stride), tuple(pad)
        if self.kernel_size[0] * self.kernel_size[1] * 2 ** 8 > FLOAT32_EXACT:    # |q| <= 2^8 per term
            raise IntsimError(f"average pool window {self.kernel_size} is too large for an exact sum")
        self.signed, self.count_pad = inp.grid.signed, count_pad
        if kernel == "int8" and not inp.grid.signed:
            self.signed, self.offset = True, 2 ** (inp.grid.bits - 1)
        self._set_out(inp, act_range)

    def _sums(self, x, zero):
        """(window sums, counts), in x's dtype: exact, the values being small integers. The
        padding is real 0 (`zero`: Z of integers, 0 of reals); `count_pad` (PyTorch's
        count_include_pad, or a PAD op before TFLite's VALID pool) counts it, else only the
        positions inside the input count (TFLite's SAME)."""
        ones = torch.ones_like(x[:1, :1])
        pool = lambda t, v: F.avg_pool2d(F.pad(t, self.pad, value=v), self.kernel_size, self.stride, divisor_override=1)
        return pool(x, zero), pool(ones, 1.0 if self.count_pad else 0.0)

    def real_forward(self, x):
        total, count = self._sums(x, 0.0)
        return self._real_out(total / count)

    def int_forward(self, q):
        total, count = self._sums(q.to(torch.float32), float(self.out_zero_point) if self.count_pad else 0.0)
        acc, count = total.to(torch.int64), count.to(torch.int64)
        acc = acc - self.offset * count
        half = count // 2
        acc = torch.where(acc > 0, acc + half, acc - half) if self.signed else acc + half
        acc = torch.div(acc, count, rounding_mode="trunc") + self.offset
        return acc.clamp_(self.act_min, self.act_max).to(torch.int32)


# ----------------------------------------------------------------------------- convert and freeze

class _PoolSettings:
    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        self.kernel_size, self.stride = kernel_size, stride if stride is not None else kernel_size
        self.padding, self.dilation, self.ceil_mode = padding, dilation, ceil_mode


def _pool_settings(gm, node):
    """nn.MaxPool2d or F.max_pool2d's settings."""
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
    kwargs = dict(zip(names, node.args[1:]), **{k: v for k, v in node.kwargs.items() if k in names})
    return _PoolSettings(**kwargs)


def _is_max_pool(gm, node):
    return is_module(gm, node, nn.MaxPool2d) or (is_function(node, (F.max_pool2d,))
                                                 and not node.kwargs.get("return_indices", False))


def _freeze_max_pool(freezer, node, grid):
    return IntMaxPool(_pool_settings(freezer.qmodel, node))


AVG_NAMES = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def _avg_settings(gm, node):
    """{kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override} of
    nn.AvgPool2d or F.avg_pool2d."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        settings = {k: getattr(m, k) for k in AVG_NAMES}
    else:
        settings = dict(zip(AVG_NAMES, node.args[1:]), **{k: v for k, v in node.kwargs.items() if k in AVG_NAMES})
    settings.setdefault("stride", None)
    settings["stride"] = settings["stride"] or settings["kernel_size"]
    return {"padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None, **settings}


def _is_avg_pool(gm, node):
    return is_module(gm, node, nn.AvgPool2d) or is_function(node, (F.avg_pool2d,)) or is_module(gm, node, QAdaptiveAvgPool)


def _is_adaptive_source(gm, node):
    """A non-global nn.AdaptiveAvgPool2d (VGG's and AlexNet's, before the classifier)."""
    return is_module(gm, node, nn.AdaptiveAvgPool2d) and gm.get_submodule(node.target).output_size not in (1, (1, 1))


def _adaptive_to_recording(gm, node, qconfig, name, module):
    gm.add_submodule(name, QAdaptiveAvgPool(module.output_size))
    node.target = name


def _freeze_avg_pool(freezer, node, grid):
    gm = freezer.qmodel
    if is_module(gm, node, QAdaptiveAvgPool):
        m = gm.get_submodule(node.target)
        size = [int(v) for v in m.input_size]
        out = [size[i] if o is None else o for i, o in enumerate(pair(m.output_size))]
        if 0 in size or any(n % o for n, o in zip(size, out)):
            raise IntsimError(f"{node.target}: an adaptive average pool from {size[0]}x{size[1]} to {out[0]}x{out[1]} "
                              f"has windows of unequal size, which no TFLite op computes; use an input size whose "
                              f"feature map is a multiple of {out[0]}x{out[1]} (224x224 for VGG, AlexNet)")
        kernel = tuple(n // o for n, o in zip(size, out))
        return IntAvgPool(kernel, kernel, (0, 0, 0, 0), grid, kernel=freezer.kernel)
    st = _avg_settings(gm, node)
    if st["ceil_mode"] or st["divisor_override"]:
        raise IntsimError(f"{node.name}: an average pool with ceil_mode or divisor_override has no TFLite "
                          f"AVERAGE_POOL_2D; drop them")
    ph, pw = pair(st["padding"])
    return IntAvgPool(st["kernel_size"], st["stride"], (pw, pw, ph, ph), grid, count_pad=st["count_include_pad"],
                      kernel=freezer.kernel)


# ----------------------------------------------------------------------------- TFLite

def _read_max_pool(imp, op, kind):
    r = imp.reader
    x, o = op.inputs[0], op.builtinOptions
    kernel, stride = (o.filterHeight, o.filterWidth), (o.strideH, o.strideW)
    left, right, top, bottom = r.padding(o, r.shape(x), kernel, stride, (1, 1))
    if (left, top) != (right, bottom) or r.act(o, kind) != NO_ACTIVATION:
        raise IntsimError(f"{r.path}: MAX_POOL_2D with uneven SAME padding or a fused activation is not imported")
    module = IntMaxPool(SimpleNamespace(kernel_size=kernel, stride=stride, padding=(top, left), dilation=1,
                                        ceil_mode=False))
    return imp.module(f"max_pool_2d_{imp.index}", module, op, [x])


def _read_avg_pool(imp, op, kind):
    r = imp.reader
    x, o = op.inputs[0], op.builtinOptions
    inp, out = r.activation(x), r.activation(op.outputs[0])
    if not (torch.equal(inp.scale, out.scale) and torch.equal(inp.zero_point, out.zero_point)):
        raise IntsimError(f"{r.path}: AVERAGE_POOL_2D with different input and output quantization "
                          f"(TFLite's kernel does not rescale)")
    kernel, stride = (o.filterHeight, o.filterWidth), (o.strideH, o.strideW)
    pad = r.padding(o, r.shape(x), kernel, stride, (1, 1))
    module = IntAvgPool(kernel, stride, pad, out, act_range=r.act(o, kind))
    module.is_global = kernel == tuple(r.shape(x)[1:3]) and pad == (0, 0, 0, 0)   # for the float rebuild
    return imp.module(f"average_pool_2d_{imp.index}", module, op, [x])


def _pool_options(ex, kernel, stride, padding, act):
    o = ex.w.s.Pool2DOptionsT()
    o.filterHeight, o.filterWidth = kernel
    o.strideH, o.strideW = stride
    o.padding, o.fusedActivationFunction = padding, act
    return o


def _max_pool_out(size, k, s, p, ceil):
    """PyTorch's max-pool output size along one dimension (dilation 1)."""
    span = size + 2 * p - k
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= size + p:           # the last window must start inside the input or its left pad
        out -= 1
    return out


def _write_max_pool(ex, node, op):
    x, qp, _, in_shape = ex.src(node)
    k, s_, p_, d_, ceil = op.settings()
    k, s_, p_, d_ = pair(k), pair(s_ if s_ is not None else k), pair(p_), pair(d_)
    if d_ != (1, 1):
        raise IntsimError(f"cannot export {node.name}: TFLite's MAX_POOL_2D has no dilation")
    # PyTorch's padding (and ceil_mode's windows past the bottom/right edge) as an explicit PAD
    # before a VALID pool: (after, per dimension) so that every output window lies inside
    after = [max((_max_pool_out(n, kk, ss, pp, ceil) - 1) * ss + kk - n - pp, 0)
             for n, kk, ss, pp in zip(in_shape[2:], k, s_, p_)]
    pad = (p_[1], after[1], p_[0], after[0])         # (left, right, top, bottom)
    if any(pad):
        # PyTorch pads a max-pool with -inf (and a window past the edge ignores it); a PAD with the
        # zero point (real 0) is the same whenever no input is below real 0, i.e. after a ReLU
        _, _, offset, _ = ex.t[node.args[0]]
        if ex.lowest.get(node.args[0], qp.grid.qmin) < int(qp.zero_point):
            raise IntsimError(f"cannot export {node.name}: a padded (or ceil_mode) max-pool whose input can be "
                              f"negative (TFLite pads with the zero point, PyTorch with -inf)")
        x, in_shape = ex.pad(node, x, qp, offset, in_shape, pad)
    options = _pool_options(ex, k, s_, ex.w.s.Padding.VALID, ex.w.s.ActivationFunctionType.NONE)
    ex.w.op("MAX_POOL_2D", [x], [ex.act_tensor(node, qp, node.name)], options, "Pool2DOptions")
    ex.lowest[node] = ex.lowest.get(node.args[0], qp.grid.qmin)


def _write_avg_pool(ex, node, op):
    x, qp, offset, in_shape = ex.src(node)
    if op.count_pad and any(op.pad):       # padding counted in the average: a PAD (real 0), then VALID
        x, in_shape = ex.pad(node, x, qp, offset, in_shape, op.pad)
        pad = ex.w.s.Padding.VALID
    else:
        pad = ex.padding_of(op.pad, in_shape, op.kernel_size, op.stride, (1, 1))
    if pad is None:         # a PAD would be counted in the average
        raise IntsimError(f"cannot export {node.name}: average pool padding {op.pad} is neither VALID nor SAME")
    act = ex.fused_activation(op, qp, node.name)
    ex.w.op("AVERAGE_POOL_2D", [x], [ex.act_tensor(node, qp, node.name)],
            _pool_options(ex, op.kernel_size, op.stride, pad, act), "Pool2DOptions")
    ex.lowest[node] = max(ex.lowest.get(node.args[0], qp.grid.qmin), op.act_min)   # an average of values >= it


def _float_max_pool(fb, node, op, args):
    return fb.call(node.target, nn.MaxPool2d(op.kernel_size, op.stride, op.padding), args)


def _float_avg_pool(fb, node, op, args):
    if not getattr(op, "is_global", False):
        raise IntsimError(f"{fb.path}: an AVERAGE_POOL_2D that is not a global average pool has no float "
                          f"counterpart intsim converts")
    return fb.call(node.target, nn.AdaptiveAvgPool2d(1), args)


MAX_POOL = Op("max-pool", POOL, _is_max_pool, spelling="max-pool (nn.MaxPool2d, F.max_pool2d)",
              freeze=_freeze_max_pool, frozen=(IntMaxPool,),
              float_modules={"MaxPool2d": (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode"))},
              functions=(F.max_pool2d,), tflite_read={"MAX_POOL_2D": _read_max_pool},
              tflite_write={IntMaxPool: _write_max_pool}, to_float={IntMaxPool: _float_max_pool})
AVG_POOL = Op("average pooling", SAME, _is_avg_pool,
              spelling="average pooling (nn.AvgPool2d, F.avg_pool2d, nn.AdaptiveAvgPool2d with uniform windows)",
              source=_is_adaptive_source, convert=_adaptive_to_recording, freeze=_freeze_avg_pool,
              frozen=(IntAvgPool,),
              float_modules={"AvgPool2d": (nn.AvgPool2d, AVG_NAMES),
                             "QAdaptiveAvgPool": (QAdaptiveAvgPool, ("output_size",))},
              functions=(F.avg_pool2d,),
              tflite_read={"AVERAGE_POOL_2D": _read_avg_pool}, tflite_write={IntAvgPool: _write_avg_pool},
              to_float={IntAvgPool: _float_avg_pool})
