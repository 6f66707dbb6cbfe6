"""Command-line helpers shared by the scripts: common flags, device, seeding, errors, RESULT."""
import argparse
import json
import os
import random
import shlex
import sys

import numpy as np
import torch

from data import DATASETS, dataset_info, load_imagenet_folder, load_split
from function import FLOAT_BITS, MAX_BITS, MIN_BITS, ROUNDINGS, IntsimError
from model import ARCHS, ModelConfig, build_model, load_checkpoint
from module import LAYER_CHOICES, QConfig
from observer import LP_DEFAULT_P, OBSERVERS, WEIGHT_OBSERVERS

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


def add_quant(p):
    """Flags of the scripts that quantize."""
    p.add_argument("--ckpt", default=None, help="float checkpoint (default: ckpt/<dataset>_<model>.pt)")
    p.add_argument("--w-bits", type=int, default=8, help=f"weight bits ({MIN_BITS}..{MAX_BITS})")
    p.add_argument("--a-bits", type=int, default=8,
                   help=f"activation bits ({MIN_BITS}..{MAX_BITS}, or {FLOAT_BITS}: float activations)")
    p.add_argument("--per-channel", action="store_true", help="one weight scale per output channel")
    p.add_argument("--w-asymmetric", action="store_true",
                   help="unsigned weights with a zero point (default: signed narrow range, Z_w = 0)")
    p.add_argument("--out-bits", type=int, default=None,
                   help="bits of the model's output, the logits (default: --a-bits)")
    p.add_argument("--single-rounding", action="store_true",
                   help="rescale with one rounding (TFLITE_SINGLE_ROUNDING) instead of TFLite's default two")
    add_imagenet(p)


def add_imagenet(p):
    """Where ImageNet's weights and calibration images come from (--dataset imagenet)."""
    p.add_argument("--weights", default=None,
                   help="ImageNet resnet18: a torchvision state_dict file, 'IMAGENET1K_V1' to download them, "
                        "or 'random' (torchvision's initialisation, seeded: tests the data path and the "
                        "integer arithmetic, not accuracy)")
    p.add_argument("--calib-dir", default=None,
                   help="ImageNet: folder of <wnid>/*.JPEG calibration images, separate from --data-dir")


def add_ranges(p):
    """Flags of post-training quantization: how ranges are picked and weights rounded. (No
    `choices=` on purpose: a wrong value gets intsim's one-line error, which names the options.)"""
    p.add_argument("--w-observer", default="minmax", help=f"weight range: {', '.join(WEIGHT_OBSERVERS)}")
    p.add_argument("--a-observer", default="minmax", help=f"activation range: {', '.join(OBSERVERS)}")
    p.add_argument("--lp-p", type=float, default=LP_DEFAULT_P, help="p of the lp observers (> 0)")
    p.add_argument("--rounding", default="nearest", help=f"weight rounding: {', '.join(ROUNDINGS)}")
    p.add_argument("--quantize-layers", default="all",
                   help=f"which conv/linear layers to quantize: {', '.join(LAYER_CHOICES)} (the rest stay float)")
    p.add_argument("--unfold-bn", action="store_true",
                   help="quantize the conv weights before BN instead of the folded ones (needs --a-bits 32)")
    p.add_argument("--bias-bits", type=int, default=32,
                   help=f"32: int32 bias at S_in*S_w (TFLite); {MIN_BITS}..{MAX_BITS}: bias on its own grid first")


def require_integer_activations(args, script):
    if args.a_bits == FLOAT_BITS:
        raise IntsimError(f"{script} builds integer models: --a-bits {FLOAT_BITS} (float activations) "
                          f"is for PTQ.py and AdaRound.py")


def default_ckpt(args):
    return args.ckpt or os.path.join(DEFAULT_CKPT_DIR, f"{args.dataset}_{args.model}.pt")


def qconfig_from(args, a_observer=None):
    """The QConfig the flags describe (flags a script lacks keep QConfig's defaults)."""
    get = lambda name, default: getattr(args, name, default)
    return QConfig(args.w_bits, args.a_bits, args.per_channel, not args.w_asymmetric,
                   a_observer=a_observer or get("a_observer", "minmax"),
                   single_rounding=args.single_rounding, out_bits=args.out_bits,
                   w_observer=get("w_observer", "minmax"), lp_p=get("lp_p", LP_DEFAULT_P),
                   rounding=get("rounding", "nearest"), fold_bn=not get("unfold_bn", False),
                   bias_bits=get("bias_bits", 32), layers=get("quantize_layers", "all"))


def test_limit(args, dry_run_images):
    """How many test images to score: --test-limit, capped at `dry_run_images` with --dry-run."""
    if args.dry_run:
        return min(dry_run_images, args.test_limit or dry_run_images)
    return args.test_limit


def load_test(args, limit=None):
    """The test split (ImageNet: the --data-dir folder), or its first `limit` images."""
    if args.dataset == "imagenet":
        return load_imagenet_folder(args.data_dir, limit)
    x, y = load_split(args.dataset, args.data_dir, train=False, download=args.download)
    return x[:limit], y[:limit]


def load_imagenet(args, test_limit=None):
    """ImageNet: torchvision's ResNet18 with --weights, the images in --data-dir to score, and
    the calibration images in --calib-dir (never the scored ones)."""
    if args.model != "resnet18":
        raise IntsimError("on ImageNet the model is resnet18 (--model resnet18)")
    if not args.calib_dir:
        raise IntsimError("ImageNet needs --calib-dir: a folder of calibration images other than --data-dir")
    if os.path.realpath(args.calib_dir) == os.path.realpath(args.data_dir):
        raise IntsimError("--calib-dir is --data-dir: calibrate on other images than the ones scored")
    info = dataset_info("imagenet")
    cfg = ModelConfig("resnet18", info.in_channels, info.image_size, info.num_classes)
    model = build_model(cfg)                      # torchvision's initialisation, seeded by --seed
    if args.weights is None:
        raise IntsimError("ImageNet resnet18 needs --weights: a torchvision ResNet18 state_dict file, "
                          f"IMAGENET1K_V1 to download torchvision's, or {RANDOM_WEIGHTS}")
    if args.weights != RANDOM_WEIGHTS:
        try:
            model.load_state_dict(_imagenet_state_dict(args.weights))
        except (RuntimeError, TypeError, AttributeError) as e:
            raise IntsimError(f"{args.weights} does not hold torchvision ResNet18 ImageNet weights "
                              f"({str(e).splitlines()[0][:120]})") from None
    calib = load_imagenet_folder(args.calib_dir)
    test = load_imagenet_folder(args.data_dir, test_limit)
    return model, cfg, {"weights": args.weights}, calib, test


def _imagenet_state_dict(weights):
    if weights == "IMAGENET1K_V1":
        try:
            from torchvision.models import ResNet18_Weights
            return ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as e:
            raise IntsimError(f"could not download torchvision's ResNet18 weights ({type(e).__name__}): "
                              f"pass --weights PATH to a local copy") from None
    if not os.path.isfile(weights):
        raise IntsimError(f"weights file {weights} not found")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise IntsimError(f"{weights} is not a readable state_dict ({type(e).__name__})") from None
    if isinstance(state, dict) and "model_config" in state:
        raise IntsimError(f"{weights} is an intsim checkpoint of {state['model_config']['arch']} on "
                          f"{state.get('dataset')!r}, not ImageNet ResNet18 weights")
    return state


def load_float_and_data(args, device, test_limit=None):
    """What the quantizing scripts start from: the float checkpoint the flags name (on
    `device`), its ModelConfig and checkpoint dict, the training split and the test split.
    (ImageNet: torchvision's weights, the --calib-dir images and the --data-dir images.)"""
    if args.dataset == "imagenet":
        model, cfg, ckpt, train, test = load_imagenet(args, test_limit)
        return model.to(device), cfg, ckpt, train, test
    model, cfg, ckpt = load_checkpoint(default_ckpt(args), args.dataset, args.model)
    train = load_split(args.dataset, args.data_dir, train=True, download=args.download)
    return model.to(device), cfg, ckpt, train, load_test(args, test_limit)


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


def emit_result(result, path=None):
    """Print the one `RESULT {json}` line (with the command that produced it) and optionally
    save the same JSON."""
    line = json.dumps({**result, "command": command_line(sys.argv)}, sort_keys=True)
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write(line + "\n")
    print("RESULT " + line, flush=True)


def run(main):
    """Run a script's main(); a user error becomes one line on stderr and exit status 2."""
    try:
        main()
    except IntsimError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
