"""The freeze phase: a converted, calibrated model -> its frozen integer graph (frozen.py), each
op frozen by its ops.OPS entry from the (S, Z) of the tensors around it.

    frozen = freeze(qmodel)                 # after calibrate (or QAT, AdaRound)
    set_mode(frozen, "int")(x)              # integer inference
"""
import math
import sys

import torch
from torch import fx

from errors import IntsimError
from frozen import bias_scale_adjustments
from model import chain, op_of, qlayers, require_converted, sole_user
from ops.base import CLAMP, JOIN, POOL, PRODUCER, QUANT, SAME, SHAPE, QParams
from ops.quant import Dequantize, Quantize
from quantizer import Quantizer


def _qparams(q):
    s, z = q.qparams()
    return QParams(s, z, q.grid)


def _clamp_range(clamps):
    lo = max([c[0] for c in clamps], default=-math.inf)
    hi = min([c[1] for c in clamps], default=math.inf)
    return lo, hi


class _Freezer:
    """Builds the frozen graph node by node, asking each node's ops.OPS entry for its frozen
    form. `env` maps each node of the converted graph to its frozen counterpart, `grid` to the
    QParams of the integers its value carries (None: float)."""

    def __init__(self, qmodel, generator, kernel="int8"):
        self.qmodel, self.generator, self.kernel = qmodel, generator, kernel
        self.graph, self.env, self.grid, self.modules, self.absorbed = fx.Graph(), {}, {}, {}, set()

    def emit(self, name, module, args):
        """A call of `module` under `name` (a module called at several sites gets one op per site)."""
        base, k = name, 1
        while name in self.modules:
            k += 1
            name = f"{base}_call{k}"
        self.modules[name] = module
        if hasattr(module, "layer_name"):
            module.layer_name = name
        return self.graph.call_module(name, args)

    def copy(self, node):
        """The node as it is (flatten, shapes, and float ops where activations are float)."""
        if node.op == "call_module":
            self.modules[node.target] = self.qmodel.get_submodule(node.target)
        return self.graph.node_copy(node, lambda n: self.env[n])

    def quantizer_after(self, node):
        """The activation quantizer behind `node`'s chain (None if there is none), and the chain."""
        links = chain(self.qmodel, node)
        after = sole_user(links[-1] if links else node)
        return (after if after is not None and op_of(self.qmodel, after).role == QUANT else None), links

    def out_grid(self, node):
        """(S, Z, grid) of the quantizer behind `node`'s chain, and the real ranges of the chain's
        clamps (absorbed: the producer clamps to them)."""
        after, links = self.quantizer_after(node)
        if after is None:
            return None, []
        clamps = [n for n in links if op_of(self.qmodel, n).role == CLAMP]
        self.absorbed.update(clamps)
        return _qparams(self.qmodel.get_submodule(after.target)), [op_of(self.qmodel, n).clamp for n in clamps]

    def input(self, node):
        """The input, quantized at once (TFLite's QUANTIZE) where its activation quantizer sits
        behind ReLUs or max-pools on the float input: quantization is non-decreasing and maps
        real 0 to Z, so it commutes with them, and they run on integers after it."""
        x = self.graph.placeholder(node.name)
        after, links = self.quantizer_after(node)
        if after is None or not links:
            return x, None
        q = _qparams(self.qmodel.get_submodule(after.target))
        return self.emit(after.target, Quantize(q), (x,)), q

    def producer(self, node, op):
        out, clamps = self.out_grid(node)
        ins = [self.grid[a] for a in node.args if isinstance(a, fx.Node)]
        if all(i is None for i in ins) and not op.float_freeze:
            return self.copy(node), out                       # float activations: the float op
        made = op.freeze(self, node, ins, out, _clamp_range(clamps))
        name = node.target if node.op == "call_module" else node.name
        value = self.emit(name, made[0], tuple(self.env[a] for a in node.args if isinstance(a, fx.Node)))
        for m in made[1:]:                                     # a BN left unfolded follows in float
            value = self.emit(f"{name}_bn", m, (value,))
        return value, out

    def pool_in_producer(self, pool_node):
        """A max-pool right after an op that can pool its accumulator (an IntConv: `pool_first`),
        which nothing else reads: that op runs it (see ops.pool.IntMaxPool)."""
        src = pool_node.args[0]
        producer = self.modules.get(src.target) if src.op == "call_module" else None
        if hasattr(producer, "pool_first") and len(src.users) == 1:
            pool = self.modules[pool_node.target]
            producer.pool_first, pool.run_by_producer = pool.settings(), True

    def node(self, node):
        """The frozen value of `node`, and its grid."""
        op = op_of(self.qmodel, node)
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if node.op == "placeholder":
            return self.input(node)
        if op.role == PRODUCER:
            return self.producer(node, op)
        if op.role == QUANT and self.grid[src] is None:     # the input: float -> integers
            q = _qparams(self.qmodel.get_submodule(node.target))
            return self.emit(node.target, Quantize(q), (self.env[src],)), q
        if op.role == QUANT or node in self.absorbed:         # the producer requantized to it already
            return self.env[src], self.grid[src]
        if op.role == JOIN:
            return self.join(node, op)
        if op.role in (CLAMP, POOL, SAME) and op.freeze is not None and self.grid[src] is not None:
            name = node.target if node.op == "call_module" else node.name
            value = self.emit(name, op.freeze(self, node, self.grid[src]), (self.env[src],))
            if op.role == POOL:
                self.pool_in_producer(value)
            return value, self.grid[src]
        if node.op == "output":
            value = self.env[src]
            if self.grid[src] is not None:
                value = self.emit("dequant_out", Dequantize(self.grid[src]), (value,))
            return self.graph.output(value), None
        return self.copy(node), (self.grid.get(src) if op.role != SHAPE else None)

    def join(self, node, op):
        """A concatenation: its inputs on one grid (convert shares their quantizers), or float."""
        inputs = list(node.args[0])
        grids = [self.grid[a] for a in inputs]
        if all(g is None for g in grids):
            return self.copy(node), None
        first = grids[0]
        if any(g is None or not (torch.equal(g.scale, first.scale) and torch.equal(g.zero_point, first.zero_point))
               for g in grids):
            raise IntsimError(f"{node.name}: a concatenation of tensors on different grids (or float and quantized)")
        name = node.target if node.op == "call_module" else node.name
        return self.emit(name, op.freeze(self, node, grids), tuple(self.env[a] for a in inputs)), first

    def run(self):
        for node in self.qmodel.graph.nodes:
            self.env[node], self.grid[node] = self.node(node)
        return fx.GraphModule(self.modules, self.graph, class_name="FrozenModel")


KERNELS = ("int8", "uint8")     # the LiteRT kernels a frozen model's integers reproduce


@torch.no_grad()
def freeze(qmodel, rounding=None, generator=None, kernel="int8"):
    """The frozen integer model (a new fx.GraphModule of the ops' frozen kernels; `qmodel` is
    left as it is). Walks the graph in execution order: every producer is frozen with the (S, Z)
    of the tensors that feed it and of the activation quantizer after it, and the ReLU/ReLU6
    between them becomes its act_min/act_max. `rounding` overrides the weight quantizers'
    rounding (a learned one, AdaRound's, keeps its own); `generator` seeds stochastic rounding.
    `kernel`: which LiteRT kernel a layer of one weight scale on unsigned activations follows
    (the two derive M differently, kernel_util.cc): "int8", the kernel of an int8 file (the
    activations shifted by 128; M from the double product S_in S_w), or "uint8", the kernel of a
    uint8 file (the float32 product): `--export --tflite-scheme uint8`."""
    require_converted(qmodel, "freeze")
    if kernel not in KERNELS:
        raise IntsimError(f"unknown kernel {kernel!r} for freeze; use one of {KERNELS}")
    if rounding is not None:
        for _, layer in qlayers(qmodel):
            if isinstance(layer.w_quantizer, Quantizer):
                layer.w_quantizer.rounding = rounding
    frozen = _Freezer(qmodel, generator, kernel).run()
    frozen.kernel = kernel
    adjusted = bias_scale_adjustments(frozen)
    if adjusted:
        print(f"note: {sum(adjusted.values())} channel(s) of {len(adjusted)} layer(s) got a larger weight scale so that "
              f"their int32 bias fits (TFLite's AdjustWeightsForBiasScale): "
              + ", ".join(f"{k} {v}" for k, v in adjusted.items()), file=sys.stderr)
    return frozen
