"""The frozen model: a graph of frozen integer ops (ops/, each shaped like a TFLite kernel, built
by `model.freeze` or read from a .tflite file) and what is done with the graph as a whole.

Two modes (`set_mode`):
  "int"    int32 tensors in, int32 tensors out: integer inference.
  "reals"  the same integers as reals, S (q - Z), computed in the input's float dtype. In
           float64 this rounds like exact arithmetic: it is the frozen model's fake-quant, the
           reference the integer path is compared with.

Every op's output goes through the same epilogue: rescale (the kernel is chosen in
function.rescale) -> + Z_out -> clamp to [act_min, act_max], the output grid intersected with
the fused activation's range (ReLU: [Z_out, QMAX]; ReLU6: [Z_out, Z_out + round(6 / S_out)]).
"""
import functools

import torch.fx as fx

from errors import IntsimError
from function import INT_MAX_BITS, integers_of
from ops.base import FrozenOp
from ops.conv import FloatLayer
from ops.quant import Dequantize


def frozen_ops(frozen):
    return [m for m in frozen.modules() if isinstance(m, FrozenOp)]


def graph_modules(gm):
    """The modules the graph calls, in order."""
    return [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]


def set_mode(frozen, mode):
    """'int' (integer inference) or 'reals' (the frozen integers as reals: fake-quant)."""
    if mode not in ("int", "reals"):
        raise IntsimError(f"unknown mode {mode!r} of a frozen model; use 'int' or 'reals'")
    if not frozen_ops(frozen) or (mode == "int" and not runs_in_integers(frozen)):
        raise IntsimError(why_not_integer(frozen))
    for op in frozen_ops(frozen):
        op.mode = mode
    return frozen


def runs_in_integers(frozen):
    """Whether the integer path exists: integer activations of at most 8 bits, every layer quantized."""
    return (isinstance(getattr(frozen, "dequant_out", None), Dequantize)
            and all(isinstance(m, FrozenOp) and m.integer for m in graph_modules(frozen)))


def _called(frozen):
    """(name, module) of each module call in the graph, in order."""
    return [(n.target, frozen.get_submodule(n.target)) for n in frozen.graph.nodes if n.op == "call_module"]


def why_not_integer(frozen):
    """Why `frozen` has no integer path, naming the first op that stops it (None if it has one)."""
    if not frozen_ops(frozen):
        return ("set_mode takes a frozen model: " + ("this one is converted, not frozen: frozen = freeze(qmodel) "
                "after calibrate, then set_mode(frozen, 'int')" if getattr(frozen, "qconfig", None) is not None
                else f"a {type(frozen).__name__} has no frozen ops; convert, calibrate and freeze it first"))
    if runs_in_integers(frozen):
        return None
    if not isinstance(getattr(frozen, "dequant_out", None), Dequantize):
        return "integer inference needs integer activations: with --a-bits 32 the model runs in fake-quant only"
    called = _called(frozen)
    for name, m in called:
        if isinstance(m, FloatLayer):
            return f"integer inference needs every layer quantized (--quantize-layers all): {name} is float"
    for name, m in called:
        w_bits = getattr(m, "w_bits", 0) or 0
        a_bits = max(getattr(m, "in_bits", 0) or 0, getattr(m, "out_bits", 0) or 0)
        if isinstance(m, FrozenOp) and max(w_bits, a_bits) > INT_MAX_BITS:
            what = f"{w_bits}-bit weights" if w_bits > INT_MAX_BITS else f"{a_bits}-bit activations"
            return (f"integer inference is for up to {INT_MAX_BITS} bits (TFLite's 8-bit kernels): {name} "
                    f"({type(m).__name__}) has {what}, which run in fake-quant only")
    for name, m in called:
        if not (isinstance(m, FrozenOp) and m.integer):
            return (f"integer inference: {name} ({type(m).__name__}) stayed a float module in the frozen graph, "
                    f"with no integer form in intsim; the model runs in fake-quant only")
    return "integer inference: the frozen graph holds an op without an integer form"


def output_integers(frozen, logits):
    """The integers q = round(y / S) + Z behind the model's (fake-)quantized output y = S (q - Z)."""
    return integers_of(logits, *frozen.dequant_out.in_qparams())


def bias_scale_adjustments(frozen):
    """{layer: channels} whose weight scale freeze raised so that the int32 bias fits
    (ops.conv.adjust_weight_scale); empty where none was."""
    return {name: m.bias_scale_adjusted for name, m in frozen.named_modules() if getattr(m, "bias_scale_adjusted", 0)}


def op_agreement(frozen, x):
    """Each op against its own float64 reference fed the same integers: the frozen graph is run
    in integers, and every op is run a second time in mode "reals" on the reals S (q - Z) of the
    very integers its integer kernel got. [name, op, largest output-integer difference, share of
    outputs that differ in %] per op, in graph order: where the integer kernels differ from
    exact arithmetic, without the differences of earlier ops carried along (layer_agreement
    compares whole runs). `x`: the float input batch."""
    qparams, values, rows = {}, {}, []

    def real(node_arg):          # the reals behind an argument's integers (float input: as it is)
        if not isinstance(node_arg, fx.Node):
            return node_arg
        v, qp = values[node_arg], qparams.get(node_arg)
        return v.double() if qp is None else qp[0].double() * (v.double() - qp[1])

    set_mode(frozen, "int")
    for node in frozen.graph.nodes:
        args = fx.node.map_arg(node.args, lambda n: values[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n])
        if node.op == "placeholder":
            values[node] = x
            continue
        if node.op == "output":
            break
        if node.op == "get_attr":
            values[node] = functools.reduce(getattr, node.target.split("."), frozen)
            continue
        first = next((a for a in node.all_input_nodes), None)
        if node.op == "call_module":
            op = frozen.get_submodule(node.target)
            values[node] = op(*args, **kwargs)
            if isinstance(op, Dequantize) or not isinstance(op, FrozenOp):
                continue
            qparams[node] = op.out_qparams() if hasattr(op, "out_scale") else qparams.get(first)
            op.mode = "reals"
            try:
                y = op(*fx.node.map_arg(node.args, real), **fx.node.map_arg(node.kwargs, real))
            finally:
                op.mode = "int"
            diff = (integers_of(y, *qparams[node]) - values[node].long()).abs()
            rows.append([node.target, type(op).__name__, int(diff.max()), round(100.0 * (diff > 0).double().mean().item(), 4)])
        else:                    # shape ops (reshape, transpose, getitem ...) keep the integers' grid
            fn = getattr(args[0], node.target) if node.op == "call_method" else node.target
            values[node] = fn(*args[1:], **kwargs) if node.op == "call_method" else fn(*args, **kwargs)
            qparams[node] = qparams.get(first)
    return rows
