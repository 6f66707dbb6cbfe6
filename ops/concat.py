"""CONCATENATION: tensors joined along a dimension (SqueezeNet's fire modules, GoogLeNet's and
Inception's branches, DenseNet's growing features).

TFLite's int8 kernel (kernels/concatenation.cc) requires every input on the output's S and Z and
only copies; its uint8 kernel rescales an input on another grid (ConcatenationWithScaling). So
convert puts every input of a concatenation on one grid: their activation quantizers become one
(`share_grids`, transitively through concatenations of concatenations), observing the union of
their ranges, and the frozen op copies integers. A file read from TFLite may still rescale.
"""
import torch

from errors import IntsimError

from .base import JOIN, QUANT, FrozenOp, Op, arg, is_function

NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}      # intsim's NCHW dimension -> TFLite's NHWC axis (4-D tensors)


class IntConcat(FrozenOp):
    """CONCATENATION along `dim`. An input on the output's (S, Z) is copied; one on another grid
    (uint8 files only) is rescaled as reference_ops::ConcatenationWithScaling does, in float32:
        scale = S_i * (1 / S_out),  bias = -Z_i * scale,
        q_out = clamp(round(q_i * scale + bias) + Z_out, 0, 255)   (round: half away from zero)."""
    CONFIG = ("dim", "count", "act_min", "act_max", "out_bits", "out_signed")
    integer = True

    def __init__(self, inputs, out, dim):
        super().__init__()
        self.dim, self.count = dim, len(inputs)
        self._set_out(out)
        for i, inp in enumerate(inputs):
            self._set_in(inp, str(i))

    def _same(self, i):
        return bool(getattr(self, f"in_scale{i}") == self.out_scale) and \
            bool(getattr(self, f"in_zero_point{i}") == self.out_zero_point)

    def int_forward(self, *qs):
        out = []
        inverse = torch.tensor(1.0, dtype=torch.float32) / self.out_scale
        for i, q in enumerate(qs):
            if self._same(i):
                out.append(q)
                continue
            scale = getattr(self, f"in_scale{i}") * inverse                      # float32, as the kernel
            bias = -getattr(self, f"in_zero_point{i}").float() * scale
            v = q.float() * scale + bias
            v = torch.where(v >= 0, torch.floor(v + 0.5), torch.ceil(v - 0.5))  # TfLiteRound: half away
            out.append((v.long() + self.out_zero_point).clamp(self.act_min, self.act_max).to(torch.int32))
        return torch.cat(out, self.dim)

    def real_forward(self, *xs):
        return self._real_out(torch.cat(xs, self.dim))


def _tensors(node):
    return list(arg(node, 0, "tensors"))


def _dim(node):
    return arg(node, 1, "dim", 0)


def _is_cat(gm, node):
    return is_function(node, (torch.cat, torch.concat, torch.concatenate)) and \
        isinstance(arg(node, 0, "tensors"), (list, tuple))


def _freeze(freezer, node, grids):
    return IntConcat(grids, grids[0], _dim(node))


def _read(imp, op, kind):
    r = imp.reader
    inputs = [int(t) for t in op.inputs]
    rank = len(r.shape(inputs[0]))
    axis = op.builtinOptions.axis % rank
    dim = {v: k for k, v in NHWC_AXIS.items()}[axis] if rank == 4 else axis
    if r.act(op.builtinOptions, kind) != (-float("inf"), float("inf")):
        raise IntsimError(f"{r.path}: op {imp.index} CONCATENATION with a fused activation is not imported")
    module = IntConcat([r.activation(t) for t in inputs], r.activation(op.outputs[0]), dim)
    return imp.module(f"concatenation_{imp.index}", module, op, inputs)


def _write(ex, node, op):
    srcs = list(node.args)                               # the frozen op takes its inputs one by one
    if any(a not in ex.t for a in srcs):
        raise IntsimError(f"cannot export {node.name}: an input is not a quantized tensor")
    out_qp = op.out_params()
    if ex.scheme == "int8" and not all(op._same(i) for i in range(op.count)):
        raise IntsimError(f"cannot export {node.name} as int8: TFLite's int8 CONCATENATION needs every input on the "
                          f"output's scale and zero point")
    rank = len(ex.t[srcs[0]][3])
    o = ex.w.s.ConcatenationOptionsT()
    o.axis = NHWC_AXIS[op.dim % rank] if rank == 4 else op.dim % rank
    ex.w.op("CONCATENATION", [ex.t[a][0] for a in srcs], [ex.act_tensor(node, out_qp, node.name)], o,
            "ConcatenationOptions")
    ex.lowest[node] = min(ex.lowest.get(a, out_qp.grid.qmin) for a in srcs)


def _float(fb, node, op, args):
    return fb.graph.call_function(torch.cat, (list(args), op.dim))


def share_grids(gm, op_of):
    """Every input of a concatenation on one grid: the activation quantizers behind its inputs
    (through ops that keep the grid) and those of concatenations it feeds become one module, which
    observes all of them (its range: their union). Returns the number of quantizers merged."""
    parent = {}

    def find(n):
        while parent.setdefault(n, n) is not n:
            n = parent[n]
        return n

    def quantizer_of(n):                 # the QUANT node whose grid `n`'s value carries, or None
        while isinstance(n, torch.fx.Node) and op_of(gm, n).role != QUANT:
            if op_of(gm, n).role == JOIN:
                return quantizer_of(_tensors(n)[0])
            if not n.args or not isinstance(n.args[0], torch.fx.Node):
                return None
            n = n.args[0]
        return n if isinstance(n, torch.fx.Node) else None

    merged = 0
    for node in gm.graph.nodes:
        if op_of(gm, node).role != JOIN:
            continue
        quants = [quantizer_of(a) for a in _tensors(node)]
        if any(q is None for q in quants):
            continue                                     # float activations: nothing to share
        for q in quants[1:]:
            a, b = find(quants[0]), find(q)
            if a is not b:
                parent[b] = a
                merged += 1
    for n in list(parent):
        root = find(n)
        if root is not n:
            n.target = root.target                       # one module: one observer, one S and Z
    return merged


CONCAT = Op("concatenation", JOIN, _is_cat, spelling="concatenation (torch.cat)", freeze=_freeze, link_grids=share_grids,
            frozen=(IntConcat,), functions=(torch.cat, torch.concat, torch.concatenate),
            tflite_read={"CONCATENATION": _read}, tflite_write={IntConcat: _write}, to_float={IntConcat: _float})
