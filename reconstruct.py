"""Reconstruction, the machinery AdaRound and BRECQ are built on: cut a unit out of the
converted graph, cache its inputs from the quantized model and its targets from the float
model, and fit the quantizers' learnable tensors (the rounding h(V), step sizes) so that the
unit's output matches.

Units (`Unit`, found by `layer_units` for AdaRound, `find_units` for BRECQ) are subgraphs from
one node's value to another's (`region`): a layer with its ReLU and max-pool (model.chain),
a residual block (an add's immediate dominator to the add's ReLU), or several layers in a row;
with `to_quantizer` a unit also takes in the activation quantizer of its output. The loop
(`reconstruct_unit`, `optimise`) does not care what is inside.
"""
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from errors import IntsimError
from frozen import set_mode
from model import chain, op_of, qlayers, set_phase
from freezing import freeze
from module import QLayer
from quantizer import AdaRoundQuantizer, Quantizer

CACHE_BATCH = 256             # images per forward pass while filling the cache
PRINT_EVERY = 2000            # iterations between progress lines


def _node(gm, target):
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def truncated(gm, node):
    """A GraphModule that computes `node`'s value from the model's input (the rest is cut off)."""
    graph, env = fx.Graph(), {}
    for n in gm.graph.nodes:
        env[n] = graph.node_copy(n, lambda a: env[a])
        if n is node:
            break
    graph.output(env[node])
    return fx.GraphModule(gm, graph)


def _between(start, end):
    """The nodes that compute `end`'s value from `start`'s (end included, start not); refused if
    `end` also depends on the model's input by another path (a unit has one input)."""
    inside, todo = set(), [end]
    while todo:
        n = todo.pop()
        if n is start or n in inside:
            continue
        if n.op == "placeholder":
            raise IntsimError(f"{end.name} does not depend on the input through {start.name} alone: "
                              f"not a unit with one input")
        inside.add(n)
        todo.extend(n.all_input_nodes)
    return inside


def region(gm, start, end):
    """A GraphModule from `start`'s value (its one input) to `end`'s, sharing gm's modules."""
    inside = _between(start, end)
    graph = fx.Graph()
    env = {start: graph.placeholder("x")}
    for n in gm.graph.nodes:
        if n in inside:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[end])
    return fx.GraphModule(gm, graph)


def unit(gm, name):
    """The unit of layer `name`: a GraphModule from the layer's input to the end of its chain."""
    start = _node(gm, name)
    end = ([start] + chain(gm, start))[-1]
    return region(gm, start.args[0], end), end


# ----------------------------------------------------------------------------- blocks

@dataclass
class Unit:
    """What one reconstruction fits: `layers` ((name, QLayer) with quantized weights, graph
    order), computed from `start`'s value to `end`'s. kind: "layer" (a layer, its ReLU and
    max-pool), "block" (from an add's dominator to the add's ReLU) or "group" (several layers)."""
    name: str
    kind: str
    start: fx.Node
    end: fx.Node
    layers: list = field(default_factory=list)


def _immediate_dominators(gm):
    """For each node, the latest node every path from the input to it passes through (None for
    the input). fx graphs are in topological order, so one pass: dom(n) = {n} | the
    intersection of dom(p) over n's inputs p."""
    dom, order, idom = {}, {n: i for i, n in enumerate(gm.graph.nodes)}, {}
    for n in gm.graph.nodes:
        ins = n.all_input_nodes
        common = set.intersection(*(dom[p] for p in ins)) if ins else set()
        dom[n] = common | {n}
        idom[n] = max(common, key=order.get) if common else None
    return idom


def _extend_to_quantizer(gm, end):
    """`end`, or the activation quantizer that is its only user."""
    users = list(end.users)
    if len(users) == 1 and users[0].op == "call_module" and isinstance(gm.get_submodule(users[0].target), Quantizer):
        return users[0]
    return end


def _common_name(names):
    """"layer1.0" for layer1.0.conv1, layer1.0.conv2, layer1.0.downsample.0; else a+b."""
    parts = [n.split(".") for n in names]
    prefix = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        prefix.append(level[0])
    return ".".join(prefix) if prefix and all(len(p) > len(prefix) for p in parts) else "+".join(names)


def find_units(qmodel, layers_per_group=1, to_quantizer=False):
    """The units of a converted model, in graph order. A residual block is one unit: from the
    immediate dominator of an add (the block's input, which both branches start from) to the
    end of the add's chain (its ReLU), holding every layer in between (two convs and the
    downsample conv of a ResNet BasicBlock); overlapping blocks merge. Every other layer with
    quantized weights is a unit of its own, or `layers_per_group` consecutive ones make one.
    `to_quantizer`: each unit ends at its output's activation quantizer (BRECQ: the block's
    quantized output is what is compared, and its step size is learned in the unit)."""
    if layers_per_group < 1:
        raise IntsimError(f"layers per group must be >= 1, got {layers_per_group}")
    idom, order = _immediate_dominators(qmodel), {n: i for i, n in enumerate(qmodel.graph.nodes)}
    blocks = []                                            # [start, end, nodes]
    for node in qmodel.graph.nodes:
        if op_of(qmodel, node).name != "add":
            continue
        start, end = idom[node], ([node] + chain(qmodel, node))[-1]
        nodes = _between(start, end)
        for b in [b for b in blocks if b[2] & nodes]:      # nested or overlapping: one block
            blocks.remove(b)
            start, end = min(start, b[0], key=order.get), max(end, b[1], key=order.get)
            nodes = _between(start, end)
        blocks.append([start, end, nodes])
    weighted = [(n, qmodel.get_submodule(n.target)) for n in qmodel.graph.nodes
                if n.op == "call_module" and isinstance(qmodel.get_submodule(n.target), QLayer)
                and qmodel.get_submodule(n.target).w_quantizer is not None]
    units, in_block = [], {}
    for start, end, nodes in sorted(blocks, key=lambda b: order[b[0]]):
        layers = [(n.target, layer) for n, layer in weighted if n in nodes]
        if layers:
            u = Unit(_common_name([name for name, _ in layers]), "block", start, end, layers)
            units.append(u)
            in_block.update({n: u for n, _ in weighted if n in nodes})
    for n, layer in weighted:
        if n not in in_block:
            units.append(Unit(n.target, "layer", n.args[0], ([n] + chain(qmodel, n))[-1], [(n.target, layer)]))
    units.sort(key=lambda u: order[u.start])
    if layers_per_group > 1:
        units = _group(units, layers_per_group)
    for u in units:
        if to_quantizer:
            u.end = _extend_to_quantizer(qmodel, u.end)
        first = next(n for n in qmodel.graph.nodes if n.op == "call_module" and n.target == u.layers[0][0])
        if first.args[0] is not u.start:
            raise IntsimError(f"unit {u.name}: its first layer {u.layers[0][0]} does not read the unit's input "
                              f"{u.start.name}; cannot cache that input")
    return units


def _group(units, size):
    """Runs of `size` consecutive single-layer units become one (blocks stay as they are)."""
    out, run = [], []

    def flush():
        for i in range(0, len(run), size):
            part = run[i:i + size]
            if len(part) == 1:
                out.append(part[0])
            else:
                out.append(Unit("+".join(u.name for u in part), "group", part[0].start, part[-1].end,
                                [lay for u in part for lay in u.layers]))
        run.clear()
    for u in units:
        if u.kind == "layer":
            run.append(u)
        else:
            flush()
            out.append(u)
    flush()
    return out


def unit_quantizers(qmodel, u):
    """The activation quantizers inside unit u (its output's included when u ends there)."""
    inside = _between(u.start, u.end)
    return [qmodel.get_submodule(n.target) for n in qmodel.graph.nodes if n in inside and n.op == "call_module"
            and isinstance(qmodel.get_submodule(n.target), Quantizer)]


@torch.no_grad()
def collect(gm, node, images, device):
    """`node`'s value for all `images` (forward passes of CACHE_BATCH images), on `device`."""
    part = truncated(gm, node).eval()
    return torch.cat([part(xb.to(device)) for xb in images.split(CACHE_BATCH)])


def layer_input(frozen, name):
    """The node whose value feeds layer `name` of a frozen model."""
    return _node(frozen, name).args[0]


def reconstruction_loss(out, target, weights=None):
    """Squared error summed over channels, averaged over images and positions (AIMET, BRECQ);
    with `weights` (BRECQ's Fisher diagonal, the shape of out) each error is weighted by w^2."""
    err = (out - target).pow(2)
    return (err if weights is None else err * weights.pow(2)).sum(1).mean()


def _batches(*tensors):
    """The tensors (None stays None) cut into CACHE_BATCH-image batches, side by side."""
    parts = [t.split(CACHE_BATCH) if t is not None else None for t in tensors]
    n = len(parts[0])
    return zip(*[p if p is not None else [None] * n for p in parts])


@torch.no_grad()
def full_loss(module, x, target, weights=None):
    total = sum(float(reconstruction_loss(module(xb), tb, wb)) * len(xb) for xb, tb, wb in _batches(x, target, weights))
    return total / len(x)


def optimise(module, params, x, target, iters, batch_size, lr, generator, regulariser=None, on_step=None,
             weights=None, scale_params=(), scale_lr=None):
    """Adam on `params`: minimise reconstruction_loss(module(x), target, weights) on random batches
    of the cache, plus regulariser(t) when it returns a tensor (None: no term this step).
    `scale_params` (learned step sizes) are a second group at `scale_lr`, annealed to 0 by a
    cosine over the iterations (BRECQ). `on_step(t)` runs before each step (snapshots)."""
    groups = [{"params": list(params), "lr": lr}]
    if scale_params:
        groups.append({"params": list(scale_params), "lr": scale_lr})
    opt = torch.optim.Adam(groups, lr=lr)
    cosine = (torch.optim.lr_scheduler.LambdaLR(opt, [lambda t: 1.0, lambda t: 0.5 * (1 + math.cos(math.pi * t / iters))])
              if scale_params else None)
    for t in range(iters):
        if on_step:
            on_step(t)
        idx = torch.randint(len(x), (batch_size,), generator=generator).to(x.device)
        loss = reconstruction_loss(module(x[idx]), target[idx], None if weights is None else weights[idx])
        reg = regulariser(t) if regulariser else None
        if reg is not None:
            loss = loss + reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cosine:
            cosine.step()
        if (t + 1) % PRINT_EVERY == 0:
            print(f"    iter {t + 1}/{iters} loss {loss.item():.5f}", flush=True)
    if on_step:
        on_step(iters)


def _output_node(gm):
    return next(n for n in gm.graph.nodes if n.op == "output").args[0]


def fisher_weights(qmodel, u, images, fp_logits, device, batch_size):
    """BRECQ's Fisher diagonal for unit u (Li et al. 2021, sec. 3.3; its code adds 1): |dL/dz| + 1
    for each element z of the unit's output on each image, L = KL(softmax(float logits) ||
    softmax(logits)) of the model quantized up to and including the unit (later layers float),
    batches of `batch_size` images (KL averaged over the batch, as BRECQ's code does)."""
    out_node = _output_node(qmodel)
    set_phase(qmodel, "fakequant")
    prefix = truncated(qmodel, u.end).eval()
    rest = region(qmodel, u.end, out_node) if u.end is not out_node else None
    later = _between(u.end, out_node) if rest is not None else set()
    for n in later:                                          # after the unit: the float function
        if n.op == "call_module":
            m = qmodel.get_submodule(n.target)
            if isinstance(m, Quantizer):
                m.enabled = False
            elif isinstance(m, QLayer) and m.w_quantizer is not None:
                m.w_quantizer.enabled = False
    grads = []
    try:
        for xb, fb in zip(images.split(batch_size), fp_logits.split(batch_size)):
            with torch.no_grad():
                z = prefix(xb.to(device))
            z.requires_grad_(True)
            with torch.enable_grad():
                out = rest(z) if rest is not None else z
                loss = F.kl_div(F.log_softmax(out, 1), F.softmax(fb.to(device), 1), reduction="batchmean")
                g, = torch.autograd.grad(loss, z)
            grads.append(g.abs() + 1.0)
    finally:
        set_phase(qmodel, "fakequant")
    return torch.cat(grads)


def reconstruct_unit(qmodel, u, images, device, iters, batch_size, lr, reg_weight, generator, schedule,
                     fp_logits=None, scale_lr=None, snapshot_layer=None, snapshots=None, label="AdaRound"):
    """Learn unit u's rounding (AdaRound's h(V), regulariser and beta schedule, every layer of the
    unit at once), earlier units done; with `fp_logits`, the loss weighted by the Fisher diagonal
    (BRECQ), else plain MSE; with `scale_lr`, the step sizes of the unit's activation quantizers
    learned alongside (straight-through rounding, LSQ's gradient). Leaves the AdaRoundQuantizers
    in hard mode."""
    frozen = set_mode(freeze(qmodel), "reals")                     # earlier units done, this one nearest
    x = collect(frozen, layer_input(frozen, u.layers[0][0]), images, device)   # x~, quantized model
    module = region(qmodel, u.start, u.end)
    target = collect(set_phase(qmodel, "float"), u.end, images, device)        # the float model's output
    set_phase(qmodel, "fakequant")
    weights = None if fp_logits is None else fisher_weights(qmodel, u, images, fp_logits, device, batch_size)
    adas = []
    for _, layer in u.layers:
        layer.w_quantizer = AdaRoundQuantizer(layer.w_quantizer, layer.weight_bias()[0].detach())
        adas.append(layer.w_quantizer)
    for ada in adas:
        ada.mode = "nearest"
    before = full_loss(module, x, target, weights)
    scales = []
    if scale_lr is not None:
        for q in unit_quantizers(qmodel, u):
            if not q.learned:
                q.learn_scale()                                    # from the calibrated S
            scales.append(q.scale)
    watched = next((ada for (name, _), ada in zip(u.layers, adas) if name == snapshot_layer), None)

    def regulariser(t):
        beta = schedule(t, iters)
        return None if beta is None else reg_weight * sum(ada.regulariser(beta) for ada in adas)

    def snapshot(t):
        if snapshots is not None and watched is not None and t in (0, iters // 2, iters):
            snapshots[t] = watched.h().detach().flatten().cpu()

    for ada in adas:
        ada.mode = "soft"
    start = time.time()
    with torch.enable_grad():
        optimise(module, [ada.v for ada in adas], x, target, iters, batch_size, lr, generator, regulariser, snapshot,
                 weights=weights, scale_params=scales, scale_lr=scale_lr)
    seconds = time.time() - start
    for ada in adas:
        ada.mode = "hard"
    after = full_loss(module, x, target, weights)
    n = sum(ada.v.numel() for ada in adas)
    changed = 100.0 * sum(float((ada.integers() != ada.nearest).sum()) for ada in adas) / n
    speed = iters / max(seconds, 1e-9)
    print(f"  {u.name:12s} {n:7d} weights  reconstruction loss nearest {before:.5f} -> {label} {after:.5f}  "
          f"({changed:.1f}% rounded differently{f', {len(scales)} step sizes learned' if scales else ''}, "
          f"{speed:.0f} it/s)", flush=True)
    return {"unit": u.name, "kind": u.kind, "layers": [name for name, _ in u.layers], "weights": n,
            "step_sizes": len(scales), "loss_nearest": round(before, 6), "loss_after": round(after, 6),
            "changed_from_nearest_pct": round(changed, 2), "iters_per_s": round(speed, 1)}


def layer_units(qmodel):
    """AdaRound's units: each layer with quantized weights on its own (its ReLU and max-pool)."""
    units = []
    for name, layer in layers_to_reconstruct(qmodel):
        node = _node(qmodel, name)
        units.append(Unit(name, "layer", node.args[0], ([node] + chain(qmodel, node))[-1], [(name, layer)]))
    return units


def layers_to_reconstruct(qmodel):
    """(name, QLayer) of the layers with quantized weights, in graph order."""
    return [(name, layer) for name, layer in qlayers(qmodel) if layer.w_quantizer is not None]
