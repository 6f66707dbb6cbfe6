"""What ADD and MUL share: both are elementwise on two tensors (broadcasting) or on a tensor and a
number. This file recognises the call, freezes it (a number goes on a grid of its own,
ops/constant.py), reads and writes the TFLite op, and rebuilds it in float. Each op's own file
holds its kernel (IntAdd, IntMul) and its table entry."""
import torch
from torch import fx

from errors import IntsimError

from . import compiled
from .base import is_function, is_method
from .constant import constant_qparams, constant_tensor
from .shape import is_shape


LOOKUP_MAX = 1 << 16      # entries of a table over both operands' integers (256 x 256 for two 8-bit tensors)


class Tabulated:
    """ADD and MUL of 8-bit tensors are functions of at most 256 x 256 pairs of integers: the
    first integer forward computes the whole table with the kernel itself (`direct`, on every
    pair of the two input grids), and every output is then looked up, one gather instead of a
    dozen passes of int64 arithmetic. The same integers by construction (LiteRT tabulates its
    int8 LOGISTIC and TANH the same way). `range1`, `range2`: (QMIN, QMAX) of each input's grid
    (None in a model saved before them: no table)."""
    range1 = range2 = None

    def _set_ranges(self, in1, in2):
        self.range1 = (in1.grid.qmin, in1.grid.qmax)
        self.range2 = None if self.constant is not None else (in2.grid.qmin, in2.grid.qmax)

    def int_forward(self, q1, q2=None):
        table = self._table(q1.device)
        if table is None:
            return self.direct(q1, q2)
        if self.constant is not None:
            return compiled.call(lookup, q1.device, table, q1, self.range1[0])
        lo2, hi2 = self.range2
        return compiled.call(lookup2, q1.device, table, q1, q2, self.range1[0], lo2, hi2 - lo2 + 1)

    def _table(self, device):
        if self.range1 is None or (self.constant is None and self.range2 is None):
            return None
        cached = getattr(self, "_lut", None)
        if cached is not None and cached.device == device:
            return cached
        lo1, hi1 = self.range1
        q1 = torch.arange(lo1, hi1 + 1, device=device)
        if self.constant is not None:
            table = self.direct(q1)
        else:
            lo2, hi2 = self.range2
            if len(q1) * (hi2 - lo2 + 1) > LOOKUP_MAX:
                return None
            q2 = torch.arange(lo2, hi2 + 1, device=device)
            table = self.direct(q1.repeat_interleave(len(q2)), q2.repeat(len(q1)))
        self._lut = table.to(torch.int32)
        return self._lut


def lookup(table, q, lo):
    """table[q - lo]: a table over one operand's integers lo, lo + 1, ..."""
    return table[q.long() - lo]


def lookup2(table, q1, q2, lo1, lo2, width):
    """table[(q1 - lo1) width + (q2 - lo2)]: a table over pairs, q2's `width` integers in a row
    (the shapes of q1 and q2 broadcast)."""
    return table[(q1.long() - lo1) * width + (q2.long() - lo2)]


def tensors(gm, node):
    """The operands that are tensors (shape arithmetic, x.size(1) * 2, is not)."""
    return [a for a in node.args if isinstance(a, fx.Node) and not is_shape(gm, a)]


def number(node):
    return next((a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)), None)


def is_binary(gm, node, functions, methods):
    """`functions`(x, y) or x.`methods`(y): two tensors, or a tensor and a number (no alpha)."""
    if not (is_function(node, functions) or is_method(node, methods)) or len(node.args) != 2 or node.kwargs:
        return False
    n = len(tensors(gm, node))
    return n == 2 or (n == 1 and number(node) is not None)


def freezer_for(cls, what):
    """The freeze of a `cls` call site; `what` names it in errors ("an add")."""
    def freeze(freezer, node, ins, out, act):
        single = freezer.qmodel.qconfig.single_rounding
        if len(tensors(freezer.qmodel, node)) == 1:          # x op c: c on a grid of its own, exactly
            if ins[0] is None:
                raise IntsimError(f"{node.name}: {what} of a float tensor and a constant")
            qp, q = constant_qparams(number(node), ins[0].grid)
            return [cls(ins[0], qp, out, act, single_rounding=single, constant=q)]
        if ins[0] is None or ins[1] is None:
            raise IntsimError(f"{node.name}: {what} of a float and a quantized tensor")
        return [cls(ins[0], ins[1], out, act, single_rounding=single)]
    return freeze


def reader_for(cls, kind):
    """The import of a TFLite `kind` op (ADD, MUL): two tensors, or a tensor and one constant."""
    def read(imp, op, _):
        r = imp.reader
        a, b = int(op.inputs[0]), int(op.inputs[1])
        if r.is_constant(a):
            a, b = b, a                              # the tensor first, the constant second
        out, act = r.activation(op.outputs[0]), r.act(op.builtinOptions, kind)
        name = f"{kind.lower()}_{imp.index}"
        if r.is_constant(b):
            values = r.data(b).reshape(-1)
            if len(values) != 1:
                raise IntsimError(f"{r.path}: op {imp.index} {kind} with a constant tensor of {len(values)} values: "
                                  f"intsim imports {kind} of two tensors, or of a tensor and one constant number")
            module = cls(r.activation(a), r.activation(b), out, act_range=act, constant=int(values[0]))
            return imp.module(name, module, op, [a])
        return imp.module(name, cls(r.activation(a), r.activation(b), out, act_range=act), op, [a, b])
    return read


def writer_for(kind):
    """The export of a frozen ADD or MUL as the TFLite op `kind` with its fused activation."""
    def write(ex, node, op):
        x1 = ex.t[node.args[0]][0]
        x2 = constant_tensor(ex, node, op) if op.constant is not None else ex.t[node.args[1]][0]
        out_qp = op.out_params()
        options = f"{kind.capitalize()}Options"
        o = getattr(ex.w.s, f"{options}T")()
        o.fusedActivationFunction = ex.fused_activation(op, out_qp, node.name)
        ex.w.op(kind, [x1, x2], [ex.act_tensor(node, out_qp, node.name)], o, options)
        ex.lowest[node] = op.act_min
    return write


def float_for(fn):
    """The float rebuild: the call `fn`(x, y) on the rebuilt operands."""
    return lambda fb, node, op, args: fb.graph.call_function(fn, args)
