"""Ops that move values without changing them (flatten, reshape: RESHAPE), shape arithmetic
(x.size(), x.shape[0]: no tensor), and dropout, the identity in eval (removed by convert)."""
import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from errors import IntsimError

from .base import SAME, SHAPE, FrozenOp, Op, arg, is_function, is_method, is_module


SPLITS = ("chunk", "split")            # tensor methods returning a tuple of views


def _is_split(node):
    return is_method(node, SPLITS) or is_function(node, (torch.chunk, torch.split))


def _is_same_grid(gm, node):
    """Ops that move values and keep the grid: flatten, reshape, view, transpose, permute,
    chunk/split and the tensors taken from them (ShuffleNet's channel shuffle and its halves)."""
    piece = is_function(node, (operator.getitem,)) and isinstance(node.args[0], fx.Node) and _is_split(node.args[0])
    return (is_module(gm, node, nn.Flatten) or is_function(node, (torch.flatten, torch.reshape, torch.transpose,
                                                                  torch.permute))
            or is_method(node, ("view", "reshape", "flatten", "contiguous", "transpose", "permute"))
            or _is_split(node) or piece)


def _flatten_function(gm, node, qconfig, name, module):
    """nn.Flatten -> torch.flatten(x, start_dim[, end_dim]): the frozen graph keeps no float
    module for it, and flatten(x, 1) is what export writes as RESHAPE."""
    dims = (module.start_dim,) + (() if module.end_dim == -1 else (module.end_dim,))
    with gm.graph.inserting_after(node):
        new = gm.graph.call_function(torch.flatten, (node.args[0], *dims))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


SHAPE_ARITHMETIC = (operator.mul, operator.add, operator.sub, operator.floordiv)


def is_shape(gm, node):
    """Shape arithmetic, no tensor: x.size(), x.dim(), x.shape, x.shape[0], and products, sums,
    differences and floor quotients of those (x.view(-1, x.size(1) * x.size(2)))."""
    shape_attr = is_function(node, (getattr,)) and node.args[1] == "shape"
    item = is_function(node, (operator.getitem,)) and isinstance(node.args[0], fx.Node) and \
        is_shape(gm, node.args[0])
    nodes = [a for a in node.args if isinstance(a, fx.Node)]
    arithmetic = is_function(node, SHAPE_ARITHMETIC) and nodes and all(is_shape(gm, a) for a in nodes)
    return shape_attr or item or arithmetic or is_method(node, ("size", "dim"))


def _is_stochastic_depth(node):
    """torchvision.ops.stochastic_depth(x, p, mode, training): a leaf of fx's trace."""
    fn = node.target if node.op == "call_function" else None
    return getattr(fn, "__name__", "") == "stochastic_depth" and \
        getattr(fn, "__module__", "").startswith("torchvision.ops")


def _is_dropout(gm, node):
    """Dropout and stochastic depth in eval mode (the identity). F.dropout with its default
    training=True drops even in eval: refused."""
    return (is_module(gm, node, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity))
            or (is_function(node, (F.dropout, F.dropout2d)) and node.kwargs.get("training", True) is False)
            or (_is_stochastic_depth(node) and arg(node, 3, "training", True) is False))


def _remove(gm, node, qconfig, name, module):
    node.replace_all_uses_with(node.args[0])
    gm.graph.erase_node(node)


def _refuse_dropout(gm, node):
    if is_function(node, (F.dropout, F.dropout2d)):
        return ("F.dropout(x, p) drops values even in eval mode (training=True is its default); pass "
                "training=self.training or use nn.Dropout")
    return None


def _read_reshape(imp, op, kind):
    """RESHAPE / SQUEEZE of NHWC data to [N, H W C]: a flatten. A FULLY_CONNECTED after it
    reorders its weight columns from (H, W, C) to intsim's (C, H, W) (imp.spatial)."""
    r = imp.reader
    src, out = op.inputs[0], op.outputs[0]
    shape_in, shape_out = r.shape(src), r.shape(out)
    if len(shape_in) != 4 or shape_out[-1] != int(np.prod(shape_in[1:])) or len(shape_out) != 2:
        raise IntsimError(f"{r.path}: {kind} {shape_in} -> {shape_out} is not a flatten of NHWC data, "
                          f"the only reshape intsim imports")
    value = imp.function(torch.flatten, src, 1)
    if shape_in[1] * shape_in[2] > 1:
        imp.spatial[out] = tuple(shape_in[1:])     # (H, W, C): a following FULLY_CONNECTED must reorder
    return value


def _write_reshape(ex, node, how):
    """Every spelling of flatten/reshape/view/transpose/permute. To [N, C H W] of NCHW data:
    TFLite's RESHAPE (a following linear layer's weight columns are reordered from (C, H, W) to
    TFLite's (H, W, C)); keeping the shape: nothing (`contiguous`). A chain of them that leaves
    NCHW and comes back to it (ShuffleNet's channel shuffle, view -> transpose -> view) is a
    permutation of the channels: a GATHER along TFLite's channel axis, written where the chain
    ends; the tensors in between are not written."""
    src = node.args[0]
    out_shape = list(node.meta["tensor_meta"].shape)
    origin = ex.pending.get(src)
    if origin is None:
        x, qp, _, in_shape = ex.src(node)
        name = node.target if isinstance(node.target, str) else node.target.__name__
        if out_shape == in_shape and name not in ("transpose", "permute"):      # the same values in the same order
            ex.t[node] = ex.t[src]
            return
        features = int(np.prod(in_shape[1:]))
        if out_shape == [in_shape[0], features]:
            spatial = len(in_shape) == 4 and in_shape[2] * in_shape[3] > 1
            ex.flattened_from, ex.flattened_node = (tuple(in_shape[1:]) if spatial else None), node
            shape = ex.w.tensor(f"{node.name}.shape", [2], "INT32", data=np.array([-1, features], dtype=np.int32))
            o = ex.w.s.ReshapeOptionsT()
            o.newShape = [-1, features]
            ex.w.op("RESHAPE", [x, shape], [ex.act_tensor(node, qp, node.name)], o, "ReshapeOptions")
            return
        if len(in_shape) != 4:
            raise IntsimError(f"cannot export {node.name}: a reshape {in_shape} -> {out_shape}; the exporter writes "
                              f"flattens to [N, {features}] as RESHAPE and channel permutations as GATHER")
        origin = src
    ex.pending[node] = origin                          # inside a chain: not written
    start = list(origin.meta["tensor_meta"].shape)
    if out_shape != start:
        return
    perm = _channel_permutation(ex, origin, node)
    x, qp, _, _ = ex.t[origin]
    indices = ex.w.tensor(f"{node.name}.indices", [len(perm)], "INT32", data=np.asarray(perm, dtype=np.int32))
    o = ex.w.s.GatherOptionsT()
    o.axis, o.batchDims = 3, 0
    ex.w.op("GATHER", [x, indices], [ex.act_tensor(node, qp, node.name)], o, "GatherOptions")
    ex.lowest[node] = ex.lowest.get(origin, qp.grid.qmin)


def _channel_permutation(ex, origin, end):
    """The channel order a chain of views and transposes from `origin` to `end` (both NCHW of
    one shape) makes, found by running it on the positions themselves; one line if it is not a
    permutation of whole channels."""
    chain, n = [], end
    while n is not origin:
        chain.append(n)
        n = n.args[0]
    _, c, h, w = list(origin.meta["tensor_meta"].shape)
    probe = torch.arange(c * h * w).reshape(1, c, h, w)
    for n in reversed(chain):
        name = n.target if isinstance(n.target, str) else n.target.__name__
        shape = [1] + list(n.meta["tensor_meta"].shape)[1:]
        if name in ("view", "reshape", "flatten"):
            probe = probe.reshape(shape)
        elif name in ("transpose", "permute"):
            probe = getattr(probe, name)(*n.args[1:])
        probe = probe.contiguous()
    perm = (probe[0, :, 0, 0] // (h * w)).tolist()
    if not torch.equal(probe, (torch.tensor(perm).view(1, c, 1, 1) * h * w + torch.arange(h * w).view(1, 1, h, w))):
        raise IntsimError(f"cannot export {end.name}: its reshapes and transposes move values other than whole channels")
    return perm


def _write_split(ex, node, how):
    """chunk / split along the channels: TFLite's SPLIT, one output tensor a piece (taken by getitem)."""
    x, qp, _, in_shape = ex.src(node)
    dim = arg(node, 2, "dim", 0)
    if dim % len(in_shape) != 1 or len(in_shape) != 4:
        raise IntsimError(f"cannot export {node.name}: a split along dimension {dim}; the exporter writes channel splits")
    pieces = [list(t.shape) for t in node.meta["tensor_meta"]]
    sizes = [p[1] for p in pieces]
    if len(set(sizes)) != 1:
        raise IntsimError(f"cannot export {node.name}: pieces of unequal size {sizes} (TFLite's SPLIT cuts equal ones)")
    axis = ex.w.tensor(f"{node.name}.axis", [], "INT32", data=np.array(3, dtype=np.int32))
    outs = []
    for i, p in enumerate(pieces):
        outs.append(ex.w.tensor(f"{node.name}.{i}", [p[0], p[2], p[3], p[1]], ex.scheme.upper(), qp.scale.numpy(),
                                (qp.zero_point + ex.offset_of(qp, node.name)).numpy()))
    o = ex.w.s.SplitOptionsT()
    o.numSplits = len(pieces)
    ex.w.op("SPLIT", [axis, x], outs, o, "SplitOptions")
    ex.split_outputs[node] = [(t, qp, ex.offset_of(qp, node.name), [p[0], p[1], p[2], p[3]]) for t, p in zip(outs, pieces)]
    ex.lowest[node] = ex.lowest.get(node.args[0], qp.grid.qmin)


def _write_piece(ex, node, how):
    src, i = node.args
    if src not in ex.split_outputs:
        raise IntsimError(f"cannot export {node.name}: an item of something other than a split")
    ex.t[node] = ex.split_outputs[src][i]
    ex.lowest[node] = ex.lowest.get(src, ex.t[node][1].grid.qmin)


class IntGather(FrozenOp):
    """GATHER of whole channels (a TFLite file's channel shuffle): the values move, the grid stays."""
    CONFIG = ("dim",)
    integer = True

    def __init__(self, indices, dim=1):
        super().__init__()
        self.dim = dim
        self.register_buffer("indices", torch.as_tensor(indices, dtype=torch.int64))

    def int_forward(self, x):
        return x.index_select(self.dim, self.indices.to(x.device))

    real_forward = int_forward


def _read_gather(imp, op, kind):
    r = imp.reader
    x, idx = int(op.inputs[0]), int(op.inputs[1])
    if len(r.shape(x)) != 4 or op.builtinOptions.axis % 4 != 3 or not r.is_constant(idx):
        raise IntsimError(f"{r.path}: op {imp.index} GATHER other than of channels by constant indices is not imported")
    return imp.module(f"gather_{imp.index}", IntGather(r.data(idx).reshape(-1).astype(np.int64)), op, [x])


def _write_gather(ex, node, op):
    x, qp, _, _ = ex.src(node)
    indices = ex.w.tensor(f"{node.name}.indices", [len(op.indices)], "INT32", data=op.indices.numpy().astype(np.int32))
    o = ex.w.s.GatherOptionsT()
    o.axis, o.batchDims = 3, 0
    ex.w.op("GATHER", [x, indices], [ex.act_tensor(node, qp, node.name)], o, "GatherOptions")
    ex.lowest[node] = ex.lowest.get(node.args[0], qp.grid.qmin)


def _read_split(imp, op, kind):
    """SPLIT into equal pieces along the channels: torch.chunk, each output an item of it."""
    r = imp.reader
    axis, x = int(op.inputs[0]), int(op.inputs[1])
    rank = len(r.shape(x))
    if rank != 4 or int(r.data(axis).reshape(-1)[0]) % 4 != 3:
        raise IntsimError(f"{r.path}: op {imp.index} SPLIT other than along the channels is not imported")
    pieces = imp.function(torch.chunk, x, op.builtinOptions.numSplits, 1)
    items = [imp.graph.call_function(operator.getitem, (pieces, i)) for i in range(len(op.outputs))]
    for t, item in zip(op.outputs[1:], items[1:]):
        imp.nodes[int(t)] = item
    return items[0]


TO_NCHW, TO_NHWC = (0, 3, 1, 2), (0, 2, 3, 1)      # TRANSPOSE's perm between TFLite's NHWC and NCHW


def _read_transpose(imp, op, kind):
    """TRANSPOSE between NHWC and NCHW (files from PyTorch's exporters put one around each PAD):
    intsim's tensors are NCHW whatever the file's order, so it changes nothing here; the importer
    knows which tensors the file stores as NCHW (imp.nchw). A TRANSPOSE that moves the data
    itself is refused."""
    r = imp.reader
    x, y = int(op.inputs[0]), int(op.outputs[0])
    perm = tuple(int(v) for v in r.data(int(op.inputs[1]))) if r.is_constant(int(op.inputs[1])) else None
    relabel = (perm == TO_NCHW and x not in imp.nchw and y in imp.nchw) or \
        (perm == TO_NHWC and x in imp.nchw and y not in imp.nchw)
    a, b = r.activation(x), r.activation(y)
    if not relabel or not (torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)):
        raise IntsimError(f"{r.path}: op {imp.index} TRANSPOSE (perm {list(perm) if perm else 'not constant'}, output "
                          f"tensor {r.tensor(y).name.decode()!r}) moves the data itself: intsim imports a TRANSPOSE "
                          f"only between the NHWC and NCHW orders of one tensor (on one grid), as PyTorch's exporters "
                          f"write them")
    return imp.nodes[x]


def _float_gather(fb, node, op, args):
    return fb.call(node.target, IntGather(op.indices, op.dim), args)


RESHAPES = (torch.flatten, torch.reshape, torch.transpose, torch.permute,        # functions, tensor methods
            "view", "reshape", "flatten", "contiguous", "transpose", "permute")


FLATTEN = Op("flatten/reshape", SAME, _is_same_grid, spelling="flatten/reshape/view",
             source=lambda gm, n: is_module(gm, n, nn.Flatten), convert=_flatten_function,
             float_modules={"Flatten": (nn.Flatten, ("start_dim", "end_dim"))},
             functions=(torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.chunk, torch.split),
             frozen=(IntGather,),
             tflite_read={"RESHAPE": _read_reshape, "SQUEEZE": _read_reshape, "GATHER": _read_gather,
                          "SPLIT": _read_split, "TRANSPOSE": _read_transpose}, to_float={IntGather: _float_gather},
             tflite_write={**{how: _write_reshape for how in RESHAPES}, **{how: _write_split for how in
                           ("chunk", "split", torch.chunk, torch.split)}, operator.getitem: _write_piece,
                           IntGather: _write_gather})
SHAPE_OF = Op("shape", SHAPE, is_shape, spelling="x.size()/x.shape (and arithmetic on them)",
              functions=(operator.getitem, getattr, *SHAPE_ARITHMETIC))
DROPOUT = Op("dropout", SAME, lambda gm, n: False, spelling="dropout and stochastic depth (eval)", source=_is_dropout, convert=_remove,
             refuse=_refuse_dropout)
