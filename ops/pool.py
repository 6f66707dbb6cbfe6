"""MAX_POOL_2D and AVERAGE_POOL_2D: pooling that keeps the input's S and Z."""
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from errors import IntsimError

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
    `pad` is explicit per side, (left, right, top, bottom), as TFLite's SAME padding needs."""
    CONFIG = ("kernel_size", "stride", "pad", "act_min", "act_max", "out_bits", "out_signed", "signed")
    integer = True

    def __init__(self, kernel_size, stride, pad, inp, act_range=NO_ACTIVATION):
        super().__init__()
        self.kernel_size, self.stride, self.pad = pair(kernel_size), pair(stride), tuple(pad)
        if self.kernel_size[0] * self.kernel_size[1] * 2 ** 8 > FLOAT32_EXACT:    # |q| <= 2^8 per term
            raise IntsimError(f"average pool window {self.kernel_size} is too large for an exact sum")
        self.signed = inp.grid.signed
        self._set_out(inp, act_range)

    def _sums(self, x):
        """(window sums, in-bounds counts), in x's dtype: exact, the values being small integers."""
        ones = torch.ones_like(x[:1, :1])
        pool = lambda t: F.avg_pool2d(F.pad(t, self.pad), self.kernel_size, self.stride, divisor_override=1)
        return pool(x), pool(ones)

    def real_forward(self, x):
        total, count = self._sums(x)
        return self._real_out(total / count)

    def int_forward(self, q):
        total, count = self._sums(q.to(torch.float32))
        acc, count = total.to(torch.int64), count.to(torch.int64)
        half = count // 2
        acc = torch.where(acc > 0, acc + half, acc - half) if self.signed else acc + half
        acc = torch.div(acc, count, rounding_mode="trunc")
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


def _write_max_pool(ex, node, op):
    x, qp, _, in_shape = ex.src(node)
    k, s_, p_, d_, ceil = op.settings()
    k, s_, p_, d_ = pair(k), pair(s_ if s_ is not None else k), pair(p_), pair(d_)
    if d_ != (1, 1) or ceil:
        raise IntsimError(f"cannot export {node.name}: TFLite's MAX_POOL_2D has no dilation or ceil_mode")
    if p_ != (0, 0):
        # PyTorch pads a max-pool with -inf; a PAD with the zero point (real 0) is the same
        # whenever no input is below real 0, i.e. after a ReLU
        _, _, offset, _ = ex.t[node.args[0]]
        if ex.lowest.get(node.args[0], qp.grid.qmin) < int(qp.zero_point):
            raise IntsimError(f"cannot export {node.name}: a padded max-pool whose input can be negative "
                              f"(TFLite pads with the zero point, PyTorch with -inf)")
        x, in_shape = ex.pad(node, x, qp, offset, in_shape, (p_[1], p_[1], p_[0], p_[0]))
    options = _pool_options(ex, k, s_, ex.w.s.Padding.VALID, ex.w.s.ActivationFunctionType.NONE)
    ex.w.op("MAX_POOL_2D", [x], [ex.act_tensor(node, qp, node.name)], options, "Pool2DOptions")
    ex.lowest[node] = ex.lowest.get(node.args[0], qp.grid.qmin)


def _write_avg_pool(ex, node, op):
    x, qp, _, in_shape = ex.src(node)
    pad = ex.padding_of(op.pad, in_shape, op.kernel_size, op.stride, (1, 1))
    if pad is None:         # a PAD would be counted in the average
        raise IntsimError(f"cannot export {node.name}: average pool padding {op.pad} is neither VALID nor SAME")
    act = ex.fused_activation(op, qp, node.name)
    ex.w.op("AVERAGE_POOL_2D", [x], [ex.act_tensor(node, qp, node.name)],
            _pool_options(ex, op.kernel_size, op.stride, pad, act), "Pool2DOptions")


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
# Average pooling with a window is read from and written to .tflite files; convert does not make it yet.
AVG_POOL = Op("average pooling", SAME, lambda gm, n: False, frozen=(IntAvgPool,),
              tflite_read={"AVERAGE_POOL_2D": _read_avg_pool}, tflite_write={IntAvgPool: _write_avg_pool},
              to_float={IntAvgPool: _float_avg_pool})
