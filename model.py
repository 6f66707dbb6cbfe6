"""The networks, and the one conversion of a float network into its quantized form.

`convert` traces any float model with torch.fx, then rewrites the graph:
  conv/linear [-> BatchNorm] [-> ReLU] [-> MaxPool]   becomes one QLayer (BN folded, rest fused)
  the input                                           gets a QuantStub (float -> integers)
  the output                                          gets a DeQuantStub (integers -> float)
  max-pool, flatten, reshape, dropout                 stay: they act on integers unchanged
and refuses anything else by name. No network is written out again in quantized form.
Then: `calibrate` (observe ranges on training data) -> `freeze` (walk the graph in order,
handing each layer the S and Z of its input) -> integer inference (`set_mode(m, "int")`).
"""
import copy
import dataclasses
import operator
import os
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from function import IntsimError, integers_of
from module import DeQuantStub, QAdd, QAvgPool, QConfig, QLayer, QModule, QuantStub

ARCHS = ("cnn", "cnn_bn", "resnet18")
IMAGENET_SIZE = 224   # input size from which resnet18 is torchvision's ImageNet network


# ----------------------------------------------------------------------------- networks

@dataclass
class ModelConfig:
    arch: str = "cnn"          # one of ARCHS
    in_channels: int = 1       # 1 for Fashion-MNIST, 3 for CIFAR-10
    image_size: int = 28       # 28 or 32 (square)
    num_classes: int = 10
    width: int = 32            # channels of the first conv; the second has twice as many


class SmallCNN(nn.Module):
    """(conv3x3 -> [BN] -> ReLU -> maxpool2) x 2 -> linear. 28x28: 32x14x14 -> 64x7x7 -> 10."""

    def __init__(self, cfg):
        super().__init__()
        bn = cfg.arch == "cnn_bn"
        w = cfg.width

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not bn),   # BN's beta is the bias
                    *([nn.BatchNorm2d(c_out)] if bn else []),
                    nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(cfg.in_channels, w), *block(w, 2 * w))
        self.classifier = nn.Linear(2 * w * (cfg.image_size // 4) ** 2, cfg.num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def resnet18(cfg):
    """torchvision's ResNet18. For ImageNet-sized inputs, unchanged (7x7 stride-2 stem, max-pool).
    For 28x28 / 32x32 inputs the stem is a 3x3 stride-1 conv followed by the usual stride-2
    max-pool, so layer1 sees 14x14 (16x16): about four times cheaper to train on a CPU than
    the full-resolution stem without max-pool that CIFAR ResNets use, and it keeps
    torchvision's module names, so its checkpoints and code paths are the ImageNet model's."""
    from torchvision.models import resnet18 as tv_resnet18
    model = tv_resnet18(num_classes=cfg.num_classes)
    if cfg.image_size < IMAGENET_SIZE:
        model.conv1 = nn.Conv2d(cfg.in_channels, 64, 3, stride=1, padding=1, bias=False)
    elif cfg.in_channels != 3:
        raise IntsimError("the ImageNet ResNet18 takes 3-channel images")
    return model


def build_model(cfg):
    if cfg.arch not in ARCHS:
        raise IntsimError(f"unknown model {cfg.arch!r}; choose one of {', '.join(ARCHS)}")
    return resnet18(cfg) if cfg.arch == "resnet18" else SmallCNN(cfg)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, model, cfg, dataset, half=False, **info):
    """`half`: store floating-point tensors as float16 (loaded back as float32, which is then the
    float reference every script uses)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    state = {k: v.half() if half and v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"intsim": 1, "model_config": asdict(cfg), "dataset": dataset, "half": half,
                "state_dict": state, **info}, path)


def load_checkpoint(path, dataset, arch):
    """Load a float checkpoint written by train.py and check that it is the one asked for."""
    if not os.path.isfile(path):
        raise IntsimError(f"checkpoint {path} not found: train it with "
                          f"`python train.py --dataset {dataset} --model {arch}` or pass --ckpt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # a truncated or foreign file: say which, not where torch failed
        raise IntsimError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt:
        raise IntsimError(f"{path} is not an intsim checkpoint (no model_config); use one saved by train.py")
    got = (ckpt["model_config"]["arch"], ckpt["dataset"])
    if got != (arch, dataset):
        raise IntsimError(f"{path} holds model {got[0]!r} trained on {got[1]!r}, not {arch!r} on "
                          f"{dataset!r}: pass the matching --model/--dataset or another --ckpt")
    cfg = ModelConfig(**ckpt["model_config"])
    model = build_model(cfg)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()})
    return model, cfg, ckpt


def save_quantized(path, qmodel, qconfig, cfg, dataset, **info):
    """A frozen quantized model: its state_dict (integer weights, biases, M0, shifts, ranges)
    and what is needed to rebuild the graph it loads into."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save({"intsim": 1, "quantized": True, "model_config": asdict(cfg), "qconfig": asdict(qconfig),
                "dataset": dataset, "state_dict": qmodel.state_dict(), **info}, path)


def load_quantized(path, dataset, arch, single_rounding=None):
    """Rebuild a model saved by save_quantized: convert a fresh float model with the saved
    QConfig, then load the frozen state (the float weights come back from it too).
    `single_rounding` may override the rescale kernel: M0 and shift are the same for both."""
    if not os.path.isfile(path):
        raise IntsimError(f"quantized checkpoint {path} not found: run QAT.py (or PTQ.py --save) first")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not ckpt.get("quantized"):
        raise IntsimError(f"{path} is not a quantized checkpoint: it was not written by QAT.py or PTQ.py --save")
    got = (ckpt["model_config"]["arch"], ckpt["dataset"])
    if got != (arch, dataset):
        raise IntsimError(f"{path} holds model {got[0]!r} on {got[1]!r}, not {arch!r} on {dataset!r}")
    qconfig = QConfig(**ckpt["qconfig"])
    if single_rounding is not None:
        qconfig = dataclasses.replace(qconfig, single_rounding=single_rounding)
    qmodel = convert(build_model(ModelConfig(**ckpt["model_config"])), qconfig)
    qmodel.load_state_dict(ckpt["state_dict"])
    return qmodel, qconfig, ckpt


# ----------------------------------------------------------------------------- conversion

def _is_module(gm, node, types):
    return node is not None and node.op == "call_module" and isinstance(gm.get_submodule(node.target), types)


def _is_relu(gm, node):
    return node is not None and (_is_module(gm, node, nn.ReLU)
                                 or (node.op == "call_function" and node.target in (F.relu, torch.relu))
                                 or (node.op == "call_method" and node.target in ("relu", "relu_")))


def _sole_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


# Ops that act on quantized integers exactly as on reals (they only move or pick values).
PASSTHROUGH_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)
PASSTHROUGH_FUNCTIONS = (torch.flatten, F.max_pool2d, F.dropout, operator.getitem)
PASSTHROUGH_METHODS = ("view", "reshape", "flatten", "size", "contiguous")


def _check_supported(gm, node):
    if node.op in ("placeholder", "output", "get_attr"):
        return
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, (QModule,) + PASSTHROUGH_MODULES):
            return
        what = f"module {node.target} ({type(mod).__name__})"
    elif node.op == "call_function":
        if node.target in PASSTHROUGH_FUNCTIONS:
            return
        what = f"function {getattr(node.target, '__name__', node.target)}"
    else:
        if node.target in PASSTHROUGH_METHODS:
            return
        what = f"method .{node.target}()"
    raise IntsimError(f"cannot convert {what} to integers: supported are conv/linear "
                      f"[+BN][+ReLU][+max-pool], add [+ReLU], global average pooling, max-pool, "
                      f"flatten and reshape")


ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def _is_global_avg_pool(gm, node):
    if _is_module(gm, node, nn.AdaptiveAvgPool2d):
        size = gm.get_submodule(node.target).output_size
        return size in (1, (1, 1))
    return (node.op == "call_function" and node.target is F.adaptive_avg_pool2d
            and node.args[1:] in ((1,), ((1, 1),)))


def _convert_adds_and_pools(gm, qconfig):
    """Residual adds (two tensors, with the ReLU after them fused) become QAdd, global average
    pooling becomes QAvgPool; each gets a submodule named after its graph node."""
    graph = gm.graph
    for node in list(graph.nodes):
        is_add = (node.op == "call_function" and node.target in ADD_FUNCTIONS and len(node.args) == 2
                  and all(isinstance(a, fx.Node) for a in node.args) and not node.kwargs)
        if is_add:
            relu = _sole_user(node) if _is_relu(gm, _sole_user(node)) else None
            name = f"qadd_{node.name}"
            gm.add_submodule(name, QAdd(qconfig, relu=relu is not None))
        elif _is_global_avg_pool(gm, node):
            relu, name = None, f"qavgpool_{node.name}"
            gm.add_submodule(name, QAvgPool(qconfig))
        else:
            continue
        with graph.inserting_after(relu or node):
            new = graph.call_module(name, tuple(node.args[:2]) if is_add else (node.args[0],))
        (relu or node).replace_all_uses_with(new)
        if relu is not None:
            graph.erase_node(relu)
        graph.erase_node(node)


def convert(model, qconfig):
    """A quantized copy of a float model (the float model is left as it is). BN must be in
    eval mode when folded, so the copy is put in eval mode."""
    model = copy.deepcopy(model).eval()
    gm = fx.symbolic_trace(model)
    graph = gm.graph
    for node in list(graph.nodes):
        if not _is_module(gm, node, (nn.Conv2d, nn.Linear)):
            continue
        layer = gm.get_submodule(node.target)
        chain, bn, relu, pool = [node], None, False, None
        nxt = _sole_user(chain[-1])
        if isinstance(layer, nn.Conv2d) and _is_module(gm, nxt, nn.BatchNorm2d):
            bn = gm.get_submodule(nxt.target)
            chain.append(nxt)
            nxt = _sole_user(nxt)
        if _is_relu(gm, nxt):
            relu = True
            chain.append(nxt)
            nxt = _sole_user(nxt)
        if isinstance(layer, nn.Conv2d) and _is_module(gm, nxt, nn.MaxPool2d):
            pool = gm.get_submodule(nxt.target)
            chain.append(nxt)
        is_output = any(user.op == "output" for user in chain[-1].users)   # produces the logits
        gm.add_submodule(node.target, QLayer(layer, qconfig, bn=bn, relu=relu, pool=pool,
                                             a_bits=qconfig.out_bits if is_output else None))
        if len(chain) > 1:
            chain[-1].replace_all_uses_with(node)
            for fused in reversed(chain[1:]):
                graph.erase_node(fused)

    _convert_adds_and_pools(gm, qconfig)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise IntsimError("convert handles models with exactly one input")
    gm.add_submodule("quant_in", QuantStub(qconfig))
    with graph.inserting_after(placeholders[0]):
        q = graph.call_module("quant_in", (placeholders[0],))
    placeholders[0].replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
    output = next(n for n in graph.nodes if n.op == "output")
    gm.add_submodule("dequant_out", DeQuantStub(qconfig))
    with graph.inserting_before(output):
        d = graph.call_module("dequant_out", (output.args[0],))
    output.args = (d,)

    if qconfig.layers == "first":            # the rest stay float (AdaRound's Table 1 setting)
        for _, layer in qlayers(gm)[1:]:
            layer.enabled = False
    for node in graph.nodes:
        _check_supported(gm, node)
    gm.delete_all_unused_submodules()
    graph.lint()
    gm.recompile()
    return gm


# ----------------------------------------------------------------------------- phases

def set_mode(qmodel, mode):
    for m in qmodel.modules():
        if isinstance(m, QModule):
            m.set_mode(mode)


def qlayers(qmodel):
    """(name, QLayer) pairs in the order the graph runs them (module order without a graph)."""
    if not isinstance(qmodel, fx.GraphModule):
        return [(name, m) for name, m in qmodel.named_modules() if isinstance(m, QLayer)]
    return [(n.target, qmodel.get_submodule(n.target)) for n in qmodel.graph.nodes
            if n.op == "call_module" and isinstance(qmodel.get_submodule(n.target), QLayer)]


def freeze_bn(qmodel):
    """QAT: from now on BN uses its running statistics (and stops updating them)."""
    for _, layer in qlayers(qmodel):
        layer.bn_frozen = True


def freeze_observers(qmodel):
    """QAT: from now on the activation ranges stay where the moving average left them."""
    for m in qmodel.modules():
        if isinstance(m, QModule):
            m.observer_frozen = True


@torch.no_grad()
def calibrate(qmodel, batches, device, num_batches):
    """Record activation ranges on `num_batches` batches (BN statistics stay as trained: the
    model is in eval mode, so nothing but the observers changes). Returns the images seen."""
    qmodel.eval()
    set_mode(qmodel, "calibrate")
    seen = images = 0
    for x, _ in batches:
        if seen == num_batches:
            break
        qmodel(x.to(device))
        seen, images = seen + 1, images + len(x)
    set_mode(qmodel, "float")
    if seen == 0:
        raise IntsimError("calibration saw no data: check the data set and --calib-batches")
    for m in qmodel.modules():
        if isinstance(m, QModule) and m.act is not None:
            m.act.finish()                  # the lp/sqnr observers search their samples now
    return images


@torch.no_grad()
def freeze(qmodel, rounding=None, generator=None, weight_integers=None):
    """Walk the graph in execution order: each layer is frozen with the (S, Z) of the tensor
    that feeds it, taken from its producer (through pass-through ops such as flatten).
    (S, Z) is None for float tensors (float activations, layers left in float). `rounding`
    overrides qconfig.rounding; `generator` seeds stochastic rounding; `weight_integers`
    ({layer name: integer weights}) gives some layers' integers directly (AdaRound)."""
    weight_integers = weight_integers or {}
    qparams = {}   # fx node -> (S, Z) of the integers it produces, or None
    for node in qmodel.graph.nodes:
        mod = qmodel.get_submodule(node.target) if node.op == "call_module" else None
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if isinstance(mod, QuantStub):
            mod.freeze()
            qparams[node] = mod.output_qparams() if mod.act is not None else None
        elif isinstance(mod, QLayer):
            if not mod.enabled:
                qparams[node] = None
                continue
            if mod.freeze(*(qparams[src] or (None, None)), rounding=rounding, generator=generator,
                          weight_integers=weight_integers.get(node.target)):
                warnings.warn(f"{node.target}: the worst-case accumulator exceeds int32; "
                              f"each integer forward checks for overflow")
            qparams[node] = mod.output_qparams() if mod.act is not None else None
        elif isinstance(mod, QAdd):
            inputs = [qparams[a] for a in node.args]
            if inputs[0] is not None and inputs[1] is not None:
                mod.freeze(*inputs)
            qparams[node] = mod.output_qparams() if mod.act is not None else None
        elif isinstance(mod, QAvgPool):
            if qparams[src] is not None:
                mod.freeze(*qparams[src])
            qparams[node] = mod.output_qparams() if mod.act is not None else None
        elif isinstance(mod, DeQuantStub):
            if qparams[src] is not None:
                mod.freeze(*qparams[src])
        elif src in qparams:
            qparams[node] = qparams[src]
    return qmodel


def runs_in_integers(qmodel):
    """Whether the integer path exists: integer activations of at most 8 bits and every layer quantized."""
    return all(m.qconfig.integer_capable and getattr(m, "enabled", True)
               for m in qmodel.modules() if isinstance(m, QModule))


def output_integers(qmodel, logits):
    """The integers q = round(y / S) + Z behind a (fake-)quantized output y = S (q - Z)."""
    dq = qmodel.get_submodule("dequant_out")
    return integers_of(logits, dq.in_scale, dq.in_zero_point)
