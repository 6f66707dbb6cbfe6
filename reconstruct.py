"""Reconstruction, the machinery AdaRound (and block reconstruction) is built on: cut a unit out
of the converted graph, cache its inputs from the quantized model and its targets from the
float model, and fit a quantizer's learnable tensors so that the unit's output matches.

A unit starts at a layer and ends where its values reach their activation quantizer: the
layer, its ReLU and max-pool (model.chain). Units are subgraphs (fx), so a unit could as well
be a residual block; the loop below does not care what is inside.
"""
import torch
from torch import fx

from model import chain, qlayers

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


def unit(gm, name):
    """The unit of layer `name`: a GraphModule from the layer's input to the end of its chain."""
    start = _node(gm, name)
    nodes = [start] + chain(gm, start)
    graph = fx.Graph()
    env = {start.args[0]: graph.placeholder("x")}
    for n in nodes:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[nodes[-1]])
    return fx.GraphModule(gm, graph), nodes[-1]


@torch.no_grad()
def collect(gm, node, images, device):
    """`node`'s value for all `images` (forward passes of CACHE_BATCH images), on `device`."""
    part = truncated(gm, node).eval()
    return torch.cat([part(xb.to(device)) for xb in images.split(CACHE_BATCH)])


def layer_input(frozen, name):
    """The node whose value feeds layer `name` of a frozen model."""
    return _node(frozen, name).args[0]


def reconstruction_loss(out, target):
    """Squared error summed over channels, averaged over images and positions (AIMET, BRECQ)."""
    return (out - target).pow(2).sum(1).mean()


@torch.no_grad()
def full_loss(module, x, target):
    total = sum(float(reconstruction_loss(module(xb), tb)) * len(xb)
                for xb, tb in zip(x.split(CACHE_BATCH), target.split(CACHE_BATCH)))
    return total / len(x)


def optimise(module, params, x, target, iters, batch_size, lr, generator, regulariser=None, on_step=None):
    """Adam on `params`: minimise reconstruction_loss(module(x), target) on random batches of
    the cache, plus regulariser(t) when it returns a tensor (None: no term this step).
    `on_step(t)` runs before each step (snapshots)."""
    opt = torch.optim.Adam(params, lr=lr)
    for t in range(iters):
        if on_step:
            on_step(t)
        idx = torch.randint(len(x), (batch_size,), generator=generator).to(x.device)
        loss = reconstruction_loss(module(x[idx]), target[idx])
        reg = regulariser(t) if regulariser else None
        if reg is not None:
            loss = loss + reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (t + 1) % PRINT_EVERY == 0:
            print(f"    iter {t + 1}/{iters} loss {loss.item():.5f}", flush=True)
    if on_step:
        on_step(iters)


def layers_to_reconstruct(qmodel):
    """(name, QLayer) of the layers with quantized weights, in graph order."""
    return [(name, layer) for name, layer in qlayers(qmodel) if layer.w_quantizer is not None]
