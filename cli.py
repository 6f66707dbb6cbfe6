"""Command-line helpers shared by the scripts: common flags, the quantization flags (made from
QConfig's fields), start-up (flags, seed, device, model and data), errors, the RESULT line."""
import argparse
import json
import os
import random
import shlex
import sys
from dataclasses import MISSING, asdict, fields

import numpy as np
import torch

from checkpoint import load_checkpoint, load_imagenet_weights, write_json
from config import QConfig
from data import DATASETS, dataset_info, load_imagenet_bytes, load_imagenet_folder, load_split, load_test
from errors import IntsimError
from model import ARCHS, ModelConfig, build_model

DEFAULT_DATA_DIR = "data"
DEFAULT_CKPT_DIR = "ckpt"
RANDOM_WEIGHTS = "random"   # --weights random: an untrained ImageNet ResNet18 (data path and arithmetic checks)


def parser(description):
    return argparse.ArgumentParser(description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_common(p):
    """Flags every script has: what to run on, where the data is, how to seed and report."""
    p.add_argument("--dataset", default="fashion-mnist", choices=sorted(DATASETS), help="data set")
    p.add_argument("--model", default="cnn", choices=ARCHS, help="network")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder holding the data sets")
    p.add_argument("--download", action="store_true", help="download the data set if it is missing")
    p.add_argument("--batch-size", type=int, default=256, help="batch size")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    p.add_argument("--dry-run", action="store_true", help="quickly check a single pass on a few batches")
    p.add_argument("--result-json", default=None, help="also write the RESULT line's JSON to this file")


def add_qconfig(p, only=None, **defaults):
    """One flag per QConfig field (or the fields in `only`), its help and default from the
    field itself (`defaults` overrides a default for this script). No `choices=`: a wrong value
    gets QConfig's one-line error, which names the options."""
    names = []
    for f in fields(QConfig):
        if only is not None and f.name not in only:
            continue
        meta, default = f.metadata, defaults.get(f.name, f.default if f.default is not MISSING else None)
        if meta["action"]:
            p.add_argument(meta["flag"], dest=f.name, action=meta["action"], help=meta["help"])
            if f.name in defaults:
                p.set_defaults(**{f.name: default})
        else:
            kind = {"int": int, "float": float, "str": str}.get(getattr(f.type, "__name__", ""), int)
            p.add_argument(meta["flag"], dest=f.name, type=kind, default=default, help=meta["help"])
        names.append(f.name)
    p.set_defaults(qconfig_fields=tuple(names))


def qconfig_from(args):
    """The QConfig the flags describe (fields a script has no flag for keep QConfig's defaults)."""
    return QConfig(**{name: getattr(args, name) for name in args.qconfig_fields})


def add_checkpoint(p):
    p.add_argument("--ckpt", default=None, help="float checkpoint (default: ckpt/<dataset>_<model>.pt)")
    add_imagenet(p)


def add_imagenet(p):
    """Where ImageNet's weights and calibration images come from (--dataset imagenet)."""
    p.add_argument("--weights", default=None,
                   help="ImageNet resnet18: a torchvision state_dict file, 'IMAGENET1K_V1' to download them, "
                        "or 'random' (torchvision's initialisation, seeded: tests the data path and the "
                        "integer arithmetic, not accuracy)")
    p.add_argument("--calib-dir", default=None,
                   help="ImageNet: folder of <wnid>/*.JPEG calibration images, separate from --data-dir")
    p.add_argument("--tflite-model", default=None, metavar="PATH.tflite",
                   help="ImageNet: start from this quantized .tflite model, dequantized into a float network "
                        "(instead of --model resnet18); images as TFLite's evaluation feeds it")


EXPORT_CHECK_IMAGES = 1000   # test images an exported .tflite file is run on, in LiteRT and in intsim


def add_export(p):
    p.add_argument("--export", default=None, metavar="PATH.tflite",
                   help="also write the frozen model as a .tflite file, and compare LiteRT's output integers "
                        "with intsim's (needs pip install -r requirements-tflite.txt)")
    p.add_argument("--tflite-scheme", default="int8", choices=("int8", "uint8"),
                   help="int8: TFLite's current scheme (int8 activations, symmetric int8 weights, per-channel "
                        "allowed); uint8: the 2018 paper's (uint8 activations and per-tensor uint8 weights)")
    p.add_argument("--export-check", type=int, default=EXPORT_CHECK_IMAGES, metavar="N",
                   help="test images run through LiteRT's reference kernels for the comparison")


def export_if_asked(args, frozen, x_test, device):
    """--export: write the .tflite file and compare it with intsim on the first --export-check
    test images; the comparison goes into the RESULT ({} without --export)."""
    if not getattr(args, "export", None):
        return {}
    from tflite_io import export_and_check
    from frozen import runs_in_integers
    if not runs_in_integers(frozen):
        raise IntsimError("--export needs an integer model: 8-bit (or fewer) integer activations, every layer quantized")
    r = export_and_check(frozen, args.export, args.tflite_scheme, x_test[:args.export_check], device)
    for name, key in (("intsim's integer path", "tflite_vs_intsim"), ("that file read back into intsim", "tflite_vs_reimported")):
        a = r[key]
        print(f"{args.export} in LiteRT (reference kernels) vs {name}: {a['images_identical']} of "
              f"{r['tflite_images']} images identical (largest difference {a['max_diff']})")
    return r


def require_integer_activations(qconfig, script):
    if qconfig.float_activations:
        raise IntsimError(f"{script} builds integer models: --a-bits 32 (float activations) "
                          f"is for PTQ.py and AdaRound.py")


def start(p):
    """The start of every script's main(): parse the flags, seed everything, pick the device."""
    args = p.parse_args()
    if getattr(args, "export", None):
        from tflite_io import litert
        litert()                     # ai-edge-litert missing: say so now, not after the run
    seed_everything(args.seed)
    return args, device_from(args.device)


def test_limit(args, dry_run_images):
    """How many test images to score: --test-limit, capped at `dry_run_images` with --dry-run."""
    if args.dry_run:
        return min(dry_run_images, args.test_limit or dry_run_images)
    return args.test_limit


def load_float_and_data(args, device, test_limit=None):
    """What the quantizing scripts start from: the float model the flags name (on `device`),
    its ModelConfig and checkpoint dict, the training split and the test split (or its first
    `test_limit` images). ImageNet: torchvision's ResNet18 with --weights, the --calib-dir
    images (to calibrate on) and the --data-dir images (to score)."""
    if args.dataset != "imagenet":
        path = args.ckpt or os.path.join(DEFAULT_CKPT_DIR, f"{args.dataset}_{args.model}.pt")
        model, cfg, ckpt = load_checkpoint(path, args.dataset, args.model)
        train = load_split(args.dataset, args.data_dir, train=True, download=args.download)
        return model.to(device), cfg, ckpt, train, load_test(args.dataset, args.data_dir, args.download, test_limit)
    if not args.calib_dir:
        raise IntsimError("ImageNet needs --calib-dir: a folder of calibration images other than --data-dir")
    if os.path.realpath(args.calib_dir) == os.path.realpath(args.data_dir):
        raise IntsimError("--calib-dir is --data-dir: calibrate on other images than the ones scored")
    if getattr(args, "tflite_model", None):
        return _tflite_float_and_data(args, device, test_limit)
    if args.model != "resnet18":
        raise IntsimError("on ImageNet the model is resnet18 (--model resnet18), or a .tflite file (--tflite-model)")
    if args.weights is None:
        raise IntsimError("ImageNet resnet18 needs --weights: a torchvision ResNet18 state_dict file, "
                          f"IMAGENET1K_V1 to download torchvision's, or {RANDOM_WEIGHTS}")
    info = dataset_info("imagenet")
    cfg = ModelConfig("resnet18", info.in_channels, info.image_size, info.num_classes)
    model = build_model(cfg)                      # torchvision's initialisation, seeded by --seed
    if args.weights != RANDOM_WEIGHTS:
        load_imagenet_weights(model, args.weights)
    calib = load_imagenet_folder(args.calib_dir)
    test = load_imagenet_folder(args.data_dir, test_limit)
    return model.to(device), cfg, {"weights": args.weights}, calib, test


def _tflite_float_and_data(args, device, test_limit):
    """--tflite-model: the file's network dequantized into float (tflite_io.import_tflite_float),
    fed the reals S_in (q - Z_in) of the bytes TFLite's evaluation makes (data.load_imagenet_bytes).
    Labels move up by one where the model has a background class at 0 (1001 outputs). The
    results name the network by its file (args.model)."""
    from tflite_io import import_tflite_float
    if not os.path.isfile(args.tflite_model):
        raise IntsimError(f"--tflite-model {args.tflite_model} not found (real models: ../shared/models)")
    model, info = import_tflite_float(args.tflite_model)
    size, s_in, z_in = info["input_shape"][1], info["input"].scale, info["input"].zero_point

    def images(folder, limit=None):
        q, labels = load_imagenet_bytes(folder, size, limit=limit)
        return s_in * (q.float() - z_in.float()), labels

    calib, test = images(args.calib_dir), images(args.data_dir, test_limit)
    with torch.no_grad():
        outputs = model(test[0][:1]).shape[1]
    background = outputs - dataset_info("imagenet").num_classes
    if background not in (0, 1):
        raise IntsimError(f"{args.tflite_model} has {outputs} outputs: not an ImageNet classifier (1000 or 1001)")
    args.model = os.path.splitext(os.path.basename(args.tflite_model))[0]
    cfg = ModelConfig(args.model, 3, size, outputs)
    return (model.to(device), cfg, {"tflite_model": args.tflite_model}, (calib[0], calib[1] + background),
            (test[0], test[1] + background))


def device_from(arg):
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if arg.startswith("cuda") and not torch.cuda.is_available():
        raise IntsimError("--device cuda asked for, but no CUDA device is available")
    return torch.device(arg)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def command_line(argv):
    """The command that reproduces a run (without where its result was saved)."""
    args, skip = [], False
    for a in argv[1:]:
        if skip or a.startswith("--result-json"):
            skip = a == "--result-json"
            continue
        args.append(shlex.quote(a))
    return " ".join(["python", os.path.basename(argv[0])] + args)


def emit_result(result, path=None, qconfig=None):
    """Print the one `RESULT {json}` line (with the command that produced it, and the whole
    QConfig when there is one) and optionally save the same JSON."""
    result = {**(asdict(qconfig) if qconfig is not None else {}), **result, "command": command_line(sys.argv)}
    line = json.dumps(result, sort_keys=True)
    if path:
        write_json(path, result)
    print("RESULT " + line, flush=True)


def run(main):
    """Run a script's main(); a user error becomes one line on stderr and exit status 2."""
    try:
        main()
    except IntsimError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
