"""Files the scripts write and read: JSON results, float checkpoints and frozen models.

Every write goes to a temporary file in the same folder and is then renamed over the target
(os.replace is atomic), so an interrupted write never leaves a half-written file in place of
the last good one.
"""
import json
import os
import tempfile
from dataclasses import asdict

import torch
from torch import fx

from errors import IntsimError
import ops
from ops.base import FrozenOp


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path, write):
    """Call write(file object) on a temporary file beside `path`, then rename it to `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())          # mkstemp's 0600 would make every result private
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, obj):
    _atomic_write(path, lambda f: f.write((json.dumps(obj, sort_keys=True) + "\n").encode()))


def torch_save(path, obj):
    _atomic_write(path, lambda f: torch.save(obj, f))


# ----------------------------------------------------------------------------- float checkpoints

def save_checkpoint(path, model, cfg, dataset, half=False, **info):
    """`half`: store floating-point tensors as float16 (loaded back as float32, which is then the
    float reference every script uses)."""
    state = {k: v.half() if half and v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch_save(path, {"intsim": 1, "model_config": asdict(cfg), "dataset": dataset, "half": half,
                      "state_dict": state, **info})


def _read(path, what, hint):
    if os.path.isdir(path):
        raise IntsimError(f"{what} {path} is a folder: name the file in it")
    if not os.path.isfile(path):
        raise IntsimError(f"{what} {path} not found: {hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # a truncated or foreign file: say which, not where torch failed
        raise IntsimError(f"{path} is not a readable checkpoint: truncated, or not a PyTorch file ({type(e).__name__})") from None


def read_state_dict(path, flag):
    """A state_dict file (a network's weights: {name: tensor}) that `flag` named."""
    state = _read(path, "weights file", f"pass another {flag}")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise IntsimError(f"{flag} {path} is not a state_dict (a dict of tensors): save one with torch.save(model.state_dict())")
    return state


def _require(ckpt, path, keys, hint):
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise IntsimError(f"{path} lacks {', '.join(missing)}: it is incomplete or not intsim's; {hint}")


def load_checkpoint(path, dataset, arch, flag="--ckpt"):
    """Load a float checkpoint written by train.py and check that it is the one asked for
    (`flag`: the option that named it, for the messages)."""
    from model import ModelConfig, build_model
    ckpt = _read(path, "checkpoint", f"train it with `python train.py --dataset {dataset} --model {arch}` "
                                     f"or pass another {flag}")
    if not isinstance(ckpt, dict) or "model_config" not in ckpt:
        raise IntsimError(f"{path} is not an intsim checkpoint (no model_config); use one saved by train.py")
    if ckpt.get("frozen"):
        raise IntsimError(f"{path} is a frozen quantized model, not a float checkpoint: quantize the float "
                          f"one (ckpt/{dataset}_{arch}.pt), or score this one with QAT.py --eval")
    _require(ckpt, path, ("dataset", "state_dict"), "re-save it with train.py")
    got = (ckpt["model_config"].get("arch"), ckpt["dataset"])
    if got != (arch, dataset):
        raise IntsimError(f"{path} holds model {got[0]!r} trained on {got[1]!r}, not {arch!r} on "
                          f"{dataset!r}: pass the matching --model/--dataset or another {flag}")
    try:
        cfg = ModelConfig(**ckpt["model_config"])
    except TypeError as e:
        raise IntsimError(f"{path}: its model_config is not one intsim knows ({e}); re-save it with train.py") from None
    bad = [k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise IntsimError(f"{path}: {bad[0]} holds NaN or inf ({len(bad)} tensors do): the training diverged; "
                          f"train again with a lower --lr")
    model = build_model(cfg)
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()})
    except RuntimeError as e:
        raise IntsimError(f"{path} does not match the {arch} network ({str(e).splitlines()[0][:100]})") from None
    return model, cfg, ckpt


def load_imagenet_weights(model, weights):
    """torchvision ResNet18 ImageNet weights into `model`: 'IMAGENET1K_V1' (downloaded) or a state_dict file."""
    if weights == "IMAGENET1K_V1":
        try:
            from torchvision.models import ResNet18_Weights
            state = ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as e:
            raise IntsimError(f"could not download torchvision's ResNet18 weights ({type(e).__name__}): "
                              f"pass --weights PATH to a local copy") from None
    else:
        state = _read(weights, "weights file", "pass a torchvision ResNet18 state_dict, IMAGENET1K_V1 or random")
        if isinstance(state, dict) and "model_config" in state:
            raise IntsimError(f"{weights} is an intsim checkpoint of {state['model_config']['arch']} on "
                              f"{state.get('dataset')!r}, not ImageNet ResNet18 weights")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise IntsimError(f"{weights} does not hold torchvision ResNet18 ImageNet weights "
                          f"({str(e).splitlines()[0][:120]})") from None
    return model


# ----------------------------------------------------------------------------- frozen models

def _saved_name(fn):
    """A function's name in a saved graph: its module and name (operator's without the underscore
    of its C module), or torch.<name> for torch's functions that name no module."""
    module = getattr(fn, "__module__", None) or "builtins"
    return f"{module.removeprefix('_') if module == '_operator' else module}.{fn.__name__}"


# the functions and torch modules a frozen graph may call where it stays float (weights-only
# runs) or moves values (flatten): the op table's (ops.OPS), by saved name, with the constructor
# arguments that rebuild each module
FUNCTIONS = {_saved_name(fn): fn for fn in ops.FUNCTIONS}
TORCH_MODULES = ops.FLOAT_MODULES


def _function_name(fn):
    name = _saved_name(fn)
    if name not in FUNCTIONS and f"torch.{fn.__name__}" in FUNCTIONS:
        name = f"torch.{fn.__name__}"
    if name not in FUNCTIONS:
        raise IntsimError(f"cannot save a frozen model that calls {name}")
    return name


def _encode(v):
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if isinstance(v, (tuple, list)):
        return {"tuple": [_encode(a) for a in v]}
    if isinstance(v, dict):
        return {"dict": {k: _encode(a) for k, a in v.items()}}
    return v


def _decode(v, nodes):
    if isinstance(v, dict) and "node" in v:
        return nodes[v["node"]]
    if isinstance(v, dict) and "tuple" in v:
        return tuple(_decode(a, nodes) for a in v["tuple"])
    if isinstance(v, dict) and "dict" in v:
        return {k: _decode(a, nodes) for k, a in v["dict"].items()}
    return v


def _module_spec(m):
    buffers = {k: (list(b.shape), str(b.dtype).replace("torch.", "")) for k, b in m.named_buffers(recurse=False)}
    if isinstance(m, FrozenOp):
        return {"class": type(m).__name__, "config": m.config(), "buffers": buffers}
    name = type(m).__name__
    if name not in TORCH_MODULES:
        raise IntsimError(f"cannot save a frozen model holding a {name}")
    return {"class": name, "config": {k: getattr(m, k) for k in TORCH_MODULES[name][1]}, "buffers": buffers}


def _module_from_spec(spec):
    if spec["class"] in ops.FROZEN_OPS:
        return ops.FROZEN_OPS[spec["class"]].empty(spec["config"], spec["buffers"])
    cls, _ = TORCH_MODULES[spec["class"]]
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()})


def graph_spec(frozen):
    """The frozen graph as plain data (nodes, ops, their settings): what `load_frozen` rebuilds."""
    spec = []
    for n in frozen.graph.nodes:
        entry = {"name": n.name, "op": n.op, "args": _encode(n.args), "kwargs": _encode(n.kwargs)}
        if n.op == "call_module":
            entry.update(target=n.target, module=_module_spec(frozen.get_submodule(n.target)))
        elif n.op == "call_function":
            entry["target"] = _function_name(n.target)
        elif n.op == "call_method":
            entry["target"] = n.target
        spec.append(entry)
    return spec


def build_frozen(spec, state_dict):
    """A frozen model from its graph spec and state: no float network is built."""
    graph, nodes, modules = fx.Graph(), {}, {}
    for e in spec:
        args, kwargs = _decode(e["args"], nodes), _decode(e["kwargs"], nodes)
        if e["op"] == "placeholder":
            nodes[e["name"]] = graph.placeholder(e["name"])
        elif e["op"] == "output":
            graph.output(args[0])
        elif e["op"] == "call_module":
            modules[e["target"]] = _module_from_spec(e["module"])
            if hasattr(modules[e["target"]], "layer_name"):
                modules[e["target"]].layer_name = e["target"]
            nodes[e["name"]] = graph.call_module(e["target"], args, kwargs)
        elif e["op"] == "call_function":
            nodes[e["name"]] = graph.call_function(FUNCTIONS[e["target"]], args, kwargs)
        else:
            nodes[e["name"]] = graph.call_method(e["target"], args, kwargs)
    frozen = fx.GraphModule(modules, graph, class_name="FrozenModel")
    frozen.load_state_dict(state_dict)
    return frozen


def save_frozen(path, frozen, qconfig, cfg, dataset, script, **info):
    """A frozen quantized model: its graph of integer ops and their integers, plus what it was
    made from (QConfig, ModelConfig, data set, the script that made it) and anything in `info`
    (accuracies, the QAT schedule)."""
    torch_save(path, {"intsim": 2, "frozen": True, "graph": graph_spec(frozen), "state_dict": frozen.state_dict(),
                      "qconfig": asdict(qconfig), "model_config": asdict(cfg), "dataset": dataset, "script": script,
                      **info})


def made_by(ckpt):
    """The script that saved a frozen model (models saved before it was recorded: QAT's hold
    its schedule, AdaRound's and BRECQ's their rounding, PTQ's neither)."""
    if "script" in ckpt:
        return ckpt["script"]
    if "epochs" in ckpt:
        return "QAT"
    return {"adaround": "AdaRound", "brecq": "BRECQ"}.get(ckpt.get("rounding"), "PTQ")


def load_frozen(path, dataset=None, arch=None, single_rounding=None):
    """A model saved by save_frozen, rebuilt from its graph spec (the float network is never
    built). `single_rounding` may override the rescale kernel: M0 and shift are the same for both."""
    ckpt = _read(path, "frozen model", "save one with PTQ.py --save, QAT.py or AdaRound.py")
    if not isinstance(ckpt, dict) or not ckpt.get("frozen"):
        old = isinstance(ckpt, dict) and ckpt.get("quantized")
        raise IntsimError(f"{path} is not a frozen quantized model" + (
            " (it was saved by an older intsim: run QAT.py, AdaRound.py or PTQ.py --save again)" if old else
            ": it was not written by PTQ.py --save, QAT.py or AdaRound.py"))
    _require(ckpt, path, ("graph", "state_dict", "qconfig", "model_config", "dataset"),
             "save it again with PTQ.py --save, QAT.py or AdaRound.py")
    got = (ckpt["model_config"]["arch"], ckpt["dataset"])
    if arch is not None and got != (arch, dataset):
        raise IntsimError(f"{path} holds model {got[0]!r} on {got[1]!r}, not {arch!r} on {dataset!r}")
    try:
        frozen = build_frozen(ckpt["graph"], ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise IntsimError(f"{path}: its graph or integers do not rebuild ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:100] if str(e) else ''}); save it again") from None
    # a model frozen before TFLite's Prepare rules were adopted (its ops keep the old choices)
    ckpt["qconfig"].setdefault("legacy_kernels", True)
    if single_rounding is not None:
        for m in frozen.modules():
            if hasattr(m, "single_rounding"):
                m.single_rounding = single_rounding
    return frozen, ckpt


def read_result(path):
    """A RESULT file (a script's --result-json): a JSON object holding at least the script and
    the command that made it. One line naming the file for anything else."""
    if os.path.isdir(path):
        raise IntsimError(f"{path} is a folder: name the RESULT .json file in it")
    if not os.path.isfile(path):
        raise IntsimError(f"{path} not found: name a RESULT file a script wrote with --result-json (results/*.json)")
    try:
        with open(path) as f:
            r = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise IntsimError(f"{path} is not a readable RESULT file ({type(e).__name__}): re-run its command") from None
    if not isinstance(r, dict) or not {"script", "command"} <= set(r):
        raise IntsimError(f"{path} is not a RESULT file (no script and command): name one a script wrote "
                          f"with --result-json")
    return r


def write_text(path, text):
    _atomic_write(path, lambda f: f.write(text.encode()))


def write_bytes(path, data):
    _atomic_write(path, lambda f: f.write(data))


def save_figure(path, fig, dpi=110):
    """A matplotlib figure as PNG, written whole or not at all (like every other file)."""
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
