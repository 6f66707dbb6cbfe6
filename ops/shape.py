"""Ops that move values without changing them (flatten, reshape: RESHAPE), shape arithmetic
(x.size(), x.shape[0]: no tensor), and dropout, the identity in eval (removed by convert)."""
import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from errors import IntsimError

from .base import SAME, SHAPE, Op, is_function, is_method, is_module


def _is_same_grid(gm, node):
    return (is_module(gm, node, nn.Flatten) or is_function(node, (torch.flatten, torch.reshape))
            or is_method(node, ("view", "reshape", "flatten", "contiguous")))


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


def _is_dropout(gm, node):
    """Dropout in eval mode (the identity). F.dropout with its default training=True drops even
    in eval: refused."""
    return (is_module(gm, node, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity))
            or (is_function(node, (F.dropout, F.dropout2d)) and node.kwargs.get("training", True) is False))


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
    """Every spelling of flatten/reshape/view, as TFLite's RESHAPE where its output is [N, C H W]
    of NCHW data (a following linear layer's weight columns are reordered from (C, H, W) to
    TFLite's (H, W, C)); one that keeps the shape writes nothing (`contiguous`)."""
    x, qp, _, in_shape = ex.src(node)
    out_shape = list(node.meta["tensor_meta"].shape)
    if out_shape == in_shape:
        ex.t[node] = ex.t[node.args[0]]
        return
    features = int(np.prod(in_shape[1:]))
    if out_shape != [in_shape[0], features]:
        raise IntsimError(f"cannot export {node.name}: a reshape {in_shape} -> {out_shape}; the exporter writes "
                          f"flattens to [N, {features}] as RESHAPE")
    spatial = len(in_shape) == 4 and in_shape[2] * in_shape[3] > 1
    ex.flattened_from, ex.flattened_node = (tuple(in_shape[1:]) if spatial else None), node
    shape = ex.w.tensor(f"{node.name}.shape", [2], "INT32", data=np.array([-1, features], dtype=np.int32))
    o = ex.w.s.ReshapeOptionsT()
    o.newShape = [-1, features]
    ex.w.op("RESHAPE", [x, shape], [ex.act_tensor(node, qp, node.name)], o, "ReshapeOptions")


RESHAPES = (torch.flatten, torch.reshape, "view", "reshape", "flatten", "contiguous")   # functions, tensor methods


FLATTEN = Op("flatten/reshape", SAME, _is_same_grid, spelling="flatten/reshape/view",
             source=lambda gm, n: is_module(gm, n, nn.Flatten), convert=_flatten_function,
             float_modules={"Flatten": (nn.Flatten, ("start_dim", "end_dim"))}, functions=(torch.flatten, torch.reshape),
             tflite_read={"RESHAPE": _read_reshape, "SQUEEZE": _read_reshape},
             tflite_write={how: _write_reshape for how in RESHAPES})
SHAPE_OF = Op("shape", SHAPE, is_shape, spelling="x.size()/x.shape (and arithmetic on them)",
              functions=(operator.getitem, getattr, *SHAPE_ARITHMETIC))
DROPOUT = Op("dropout", SAME, lambda gm, n: False, spelling="dropout (eval)", source=_is_dropout, convert=_remove,
             refuse=_refuse_dropout)
