"""Command-line helpers shared by the scripts: common flags, the quantization flags (made from
QConfig's fields), start-up (flags, seed, device; the model and data: loading.py), errors, the
RESULT line."""
import argparse
import hashlib
import json
import math
import os
import platform
import random
import shlex
import sys
import tempfile
from dataclasses import MISSING, asdict, fields

import numpy as np
import torch

from checkpoint import write_json
from config import QConfig
from data import DATASETS
from errors import IntsimError
from model import ARCHS

DEFAULT_DATA_DIR = "data"


ROOT = os.path.dirname(os.path.realpath(__file__))
COMMITTED_DIRS = ("ckpt", "results")      # what the project ships: trial runs never write there
DRY_RUN_DIR = os.path.join("runs", "dry-run")   # where --dry-run writes what it would write elsewhere
EXIT_USER_ERROR, EXIT_INTERRUPTED = 2, 130


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (`error: argument --x: ...`), like every other
    user error, instead of the usage text and a message."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help of flags that take a value; not for on/off switches (a store_false
    switch such as --unfold-bn would read "(default: True)") or where the help names its own."""

    def _get_help_string(self, action):
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser(description):
    return Parser(description=description, formatter_class=HelpFormatter)


# ----------------------------------------------------------------------------- flag checks
# The one table of what each flag may hold, for every script (a script's flags are checked
# when it calls start(), before any work): dest -> check(value) -> None or what is wrong.

def at_least(low):
    return lambda v: None if v >= low else f"must be at least {low}"


def positive(v):
    return None if math.isfinite(v) and v > 0 else "must be a finite number above 0"


def non_negative(v):
    return None if math.isfinite(v) and v >= 0 else "must be a finite number, 0 or more"


def share(v):
    return None if math.isfinite(v) and 0 <= v < 1 else "is a share: a number in [0, 1)"


SEED_MAX = 2 ** 32 - 1      # numpy's seeds are 32-bit

FLAG_CHECKS = {
    "batch_size": at_least(1), "epochs": at_least(1), "calib_batches": at_least(1), "test_limit": at_least(1),
    "per_layer": at_least(0), "export_check": at_least(1), "num_calib": at_least(1), "iters": at_least(1),
    "plot_layer": at_least(0), "draws": at_least(2), "hessian_images": at_least(1), "repeats": at_least(1),
    "threads": at_least(1), "train_batches": at_least(0), "limit": at_least(1), "parts": at_least(1),
    "calib_images": at_least(1), "checked_images": at_least(1),
    "bn_batch_stats_epochs": at_least(0), "moving_range_epochs": at_least(0),
    "seed": lambda v: None if 0 <= v <= SEED_MAX else f"must be in 0..{SEED_MAX}",
    "layers_per_group": at_least(1), "passes": at_least(2), "batches": at_least(2),
    "lr": positive, "weight_decay": non_negative, "reg_weight": non_negative, "beta_start": positive,
    "beta_end": positive, "warm_start": share, "scale_lr": non_negative,
}
OUTPUT_FILES = ("result_json", "save", "plot", "export")      # files a script writes
OUTPUT_DIRS = ("ckpt_dir", "resume_dir", "dst", "export_dir")  # folders it writes into
INPUT_FILES = ("ckpt", "eval", "tflite_model", "model_path", "init_from", "results")   # files it reads
INPUT_DIRS = ("data_dir", "calib_dir", "src", "images")       # folders it reads


# positional arguments, named in messages as --help names them
POSITIONALS = {"src": "SRC", "dst": "DST", "results": "RESULTS", "model_path": "MODEL.tflite"}


def flag_name(dest):
    return POSITIONALS.get(dest) or "--" + dest.replace("_", "-")


def unwritable(path, folder=False):
    """Why `path` cannot be written (None if it can): checked before a run, not after it. A
    folder that does not exist yet is fine where its nearest existing parent is a writable folder."""
    path = os.path.abspath(path)
    if os.path.isdir(path) and not folder:
        return "is a folder: name a file"
    if os.path.exists(path) and folder and not os.path.isdir(path):
        return "is a file, not a folder"
    parent = path if folder else os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be created: {parent} is a file"
    try:                                          # the real test (os.access says yes to root)
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".intsim-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return f"cannot be written: {parent} is not writable ({e.strerror})"
    if os.path.exists(path) and not folder and not os.access(path, os.W_OK):
        return "is read-only"
    return None


def committed(path):
    """Whether `path` lies in one of the project's committed folders (ckpt/, results/)."""
    path = os.path.realpath(path)
    return any(os.path.commonpath([path, os.path.join(ROOT, d)]) == os.path.join(ROOT, d) for d in COMMITTED_DIRS)


def trial_path(args, path):
    """Where a script writes `path`, a default output: under runs/dry-run/ with --dry-run, so
    that a trial never replaces a committed checkpoint, figure or model."""
    if not getattr(args, "dry_run", False):
        return path
    under_runs = os.path.relpath(path, "runs")
    return os.path.join(DRY_RUN_DIR, path if under_runs.startswith("..") else under_runs)


def check_flags(args):
    """Every flag against FLAG_CHECKS, output paths writable, input paths files; with --dry-run
    no explicit output inside ckpt/ or results/. One IntsimError naming the flag and the value."""
    for dest, value in vars(args).items():
        if value is None:
            continue
        flag = flag_name(dest)
        problem = FLAG_CHECKS[dest](value) if dest in FLAG_CHECKS and isinstance(value, (int, float)) else None
        if dest in OUTPUT_FILES or dest in OUTPUT_DIRS:
            problem = unwritable(value, folder=dest in OUTPUT_DIRS)
            if problem is None and getattr(args, "dry_run", False) and committed(value):
                problem = (f"is in the project's committed {'/'.join(COMMITTED_DIRS)} folders, which --dry-run "
                           f"never writes: leave it out (a trial writes under {DRY_RUN_DIR}/) or name another path")
        for path in (value if isinstance(value, list) else [value]) if dest in INPUT_FILES + INPUT_DIRS else []:
            problem = problem or _unreadable(path, folder=dest in INPUT_DIRS)
            if problem:
                value = path
        if problem:
            raise IntsimError(f"{flag} {value}: {problem}")


def _unreadable(path, folder):
    """Why an input path named on the command line is the wrong kind (None if it is right or
    missing: a missing file is the reader's to explain, with what would make it)."""
    if folder and os.path.isfile(path):
        return "is a file, not a folder: name the folder that holds the data"
    if not folder and os.path.isdir(path):
        return "is a folder: name the file in it"
    return None


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
    add_threads(p)


def add_threads(p):
    """--threads (float results can depend on it: the RESULT records it) and --compile (no
    integer depends on it)."""
    add_compile(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, one per core); the RESULT records the count")


def add_compile(p):
    """--compile: whether the integer kernels' elementwise passes (the conv epilogue, ADD's and MUL's
    lookup, MEAN, the input QUANTIZE) run compiled by torch.compile (ops/compiled.py)."""
    from ops.compiled import COMPILE_ENV, COMPILE_MODES
    p.add_argument("--compile", default=None, choices=COMPILE_MODES,
                   help=f"run the integer kernels' elementwise passes compiled by torch.compile: auto (on CPU), on, off "
                        f"(default: ${COMPILE_ENV}, else auto); the integers are the same either way")


def cpu_flags():
    """A short hash of the CPU's feature flags: two CPUs torch calls "AVX512" still pick different
    oneDNN kernels (AMX, VNNI, ...), and their float results differ in the last bits."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1] for line in f if line.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    return hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:12]


def machine(device=None):
    """What a result's float arithmetic can depend on besides the code: torch's CPU threads, its
    version, the CPU's vector unit as torch dispatches to it and its feature flags (the same code
    trains to other float roundings on other CPUs), and the device."""
    from ops.compiled import describe
    return {"threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": torch.backends.cpu.get_cpu_capability(), "cpu_flags": cpu_flags(),
            **({"device": str(device), "epilogue": describe()} if device is not None else {})}


def add_compression(p):
    """Flags of compressed activations for backward (compress.py, ActNN's --cabits/--pergroup)."""
    from compress.pack import GROUP_SIZE
    p.add_argument("--ca-bits", type=int, default=None,
                   help="store the activations saved for backward in this many bits (1..8; ActNN); "
                        "default: float32, as PyTorch does")
    p.add_argument("--ca-group-size", type=int, default=GROUP_SIZE, help="values per range group of a sample")
    p.add_argument("--ca-per-tensor", action="store_true", help="one range per saved tensor instead of per group")
    p.add_argument("--ca-initial-bits", type=int, default=None,
                   help="ActNN's --ibits: each sample of a saved tensor gets its own width, allocated "
                        "greedily from this many bits down to an average of --ca-bits (default: --ca-bits, "
                        "every sample alike)")
    p.add_argument("--ca-per-layer", action="store_true",
                   help="ActNN's --perlayer: share the average of --ca-bits among the layers too (from "
                        "the previous step's ranges)")
    p.add_argument("--ca-use-gradient", action="store_true",
                   help="ActNN's --usegradient: weight the allocation by each sample's output-gradient norm")


def compression_from(args):
    """The CompressConfig the flags ask for, or None (no compression)."""
    if args.ca_bits is None:
        return None
    from compress.allocate import CompressConfig
    return CompressConfig(bits=args.ca_bits, group_size=args.ca_group_size, per_group=not args.ca_per_tensor,
                          initial_bits=args.ca_initial_bits, per_layer=args.ca_per_layer,
                          use_gradient=args.ca_use_gradient)


def compression_fields(ca):
    """The RESULT fields of a compression setting (none for float32 saved activations, so that
    plain runs keep the RESULT they always had)."""
    if ca is None:
        return {}
    fields = {"ca_bits": ca.bits, "ca_group_size": ca.group_size, "ca_per_group": ca.per_group}
    if ca.mixed:        # the mixed-precision fields only where they are used (earlier RESULTs stay alike)
        fields.update(ca_initial_bits=ca.initial_bits, ca_per_layer=ca.per_layer, ca_use_gradient=ca.use_gradient)
    return fields


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
                        "integer arithmetic, not accuracy); efficientnet_lite0: a state_dict file (default: the "
                        "pretrained weights its pip package ships)")
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


def export_kernel(args):
    """The LiteRT kernel model.freeze follows: the one that will run the exported file (a
    uint8 file's derives M from the float32 product, an int8 file's from the double)."""
    return "uint8" if getattr(args, "export", None) and args.tflite_scheme == "uint8" else "int8"


def export_if_asked(args, frozen, x_test, device):
    """--export: write the .tflite file and compare it with intsim on the first --export-check
    test images; the comparison goes into the RESULT ({} without --export)."""
    if not getattr(args, "export", None):
        return {}
    from tflite_io.run import export_and_check
    from frozen import why_not_integer
    why = why_not_integer(frozen)
    if why:
        raise IntsimError(f"--export needs an integer model; {why}")
    r = export_and_check(frozen, args.export, args.tflite_scheme, x_test[:args.export_check], device)
    for name, key in (("intsim's integer path", "tflite_vs_intsim"), ("that file read back into intsim", "tflite_vs_reimported")):
        a = r[key]
        print(f"{args.export} in LiteRT (reference kernels) vs {name}: {a['images_identical']} of "
              f"{r['tflite_images']} images identical (largest difference {a['max_diff']})")
    if any(getattr(m, "single_rounding", False) for m in frozen.modules()):
        print("note: --single-rounding is the kernel of a TFLite built with TFLITE_SINGLE_ROUNDING; LiteRT's pip "
              "build rounds twice, so its integers differ from intsim's by design (the file is the same either way)")
    return r


# flags that need the integer path (what each does with it), refused up front where the bits leave none
INTEGER_FLAGS = {"export": "writes the integer model as a .tflite file",
                 "per_layer": "compares the integer path with the fake-quant one, layer by layer"}


def require_integer_path(args, qconfig):
    """A flag of INTEGER_FLAGS typed with bits that give no integer path (float activations, more
    than 8 bits) would do nothing or fail after the run: refuse it now."""
    for dest, what in INTEGER_FLAGS.items():
        if not getattr(args, dest, None) or qconfig.integer_capable:    # (layers left float need --a-bits 32)
            continue
        why = ("--a-bits 32 leaves the activations float" if qconfig.float_activations else
               f"{qconfig.name()} has tensors wider than 8 bits (TFLite's kernels are 8-bit)")
        raise IntsimError(f"{flag_name(dest)} {what}, and {why}: there is no integer model; use at most 8 bits "
                          f"everywhere with integer activations, or leave {flag_name(dest)} out")


def require_integer_activations(qconfig, script):
    if qconfig.float_activations:
        raise IntsimError(f"{script} builds integer models: --a-bits 32 (float activations) "
                          f"is for PTQ.py and AdaRound.py")


def given_flags(p, argv=None):
    """The dests of the flags typed on the command line (not left at their defaults)."""
    argv = sys.argv[1:] if argv is None else argv
    return {a.dest for a in p._actions for opt in a.option_strings
            if any(t == opt or t.startswith(opt + "=") for t in argv)}


# flags that act only with another one: typed without it they would be ignored in silence
IMAGENET = ("--dataset imagenet", lambda a: a.dataset == "imagenet")
COMPRESSED = ("--ca-bits", lambda a: a.ca_bits is not None)
EXPORTED = ("--export", lambda a: a.export)
NEEDS = {"lsq_init": ("--learn-scales", lambda a: a.learn_scales), "export_check": EXPORTED,
         "tflite_scheme": EXPORTED, "weights": IMAGENET, "calib_dir": IMAGENET, "tflite_model": IMAGENET,
         **{dest: COMPRESSED for dest in ("ca_group_size", "ca_per_tensor", "ca_initial_bits", "ca_per_layer",
                                          "ca_use_gradient")}}


def check_needs(args):
    for dest in sorted(args.given & set(NEEDS)):
        needed, present = NEEDS[dest]
        if not present(args):
            raise IntsimError(f"{flag_name(dest)} does nothing without {needed}: add {needed}, or leave "
                              f"{flag_name(dest)} out")


def parse(p):
    """The flags, checked (check_flags, check_needs), with `given`: the dests typed on the command line."""
    args = p.parse_args()
    check_flags(args)
    args.given = given_flags(p)
    check_needs(args)
    return args


def start(p):
    """The start of every script's main(): parse and check the flags, seed everything, pick the device."""
    args = parse(p)
    if hasattr(args, "qconfig_fields"):
        require_integer_path(args, qconfig_from(args))    # a bad combination of bits and options: say so now
    if getattr(args, "export", None):
        from tflite_io.schema import litert
        litert()                     # ai-edge-litert missing: say so now, not after the run
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if hasattr(args, "compile"):
        from ops.compiled import set_compile
        set_compile(args.compile)
    seed_everything(args.seed)
    return args, device_from(args.device)


def cap_for_dry_run(args, **caps):
    """--dry-run: each named size (iterations, images, draws) capped at its dry-run value; a
    smaller one typed on the command line is kept, as --test-limit is."""
    if args.dry_run:
        for name, cap in caps.items():
            setattr(args, name, min(cap, getattr(args, name)))


def test_limit(args, dry_run_images):
    """How many test images to score: --test-limit, capped at `dry_run_images` with --dry-run."""
    if args.dry_run:
        return min(dry_run_images, args.test_limit or dry_run_images)
    return args.test_limit


def device_from(arg):
    """--device: auto, cpu, cuda or cuda:N (checked against what this machine has)."""
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(arg)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise IntsimError(f"--device {arg!r}: use cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise IntsimError(f"--device {arg}: no CUDA device is available here; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise IntsimError(f"--device {arg}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


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


def figure_path(args, name):
    """Where a script's figure goes: --plot, else beside --result-json (results/figures/ for a
    row of the tables), else runs/figures/. A quick look with other settings than a stored row's
    never writes over the row's figure."""
    if getattr(args, "plot", None):
        return args.plot
    folder = os.path.dirname(args.result_json) if getattr(args, "result_json", None) else "runs"
    return trial_path(args, os.path.join(folder, "figures", name))


def emit_result(result, path=None, qconfig=None, device=None):
    """Print the one `RESULT {json}` line (with the command that produced it, the whole QConfig
    when there is one, and the machine its float arithmetic ran on: `machine`) and optionally
    save the same JSON (saying which stored row it replaces, if it replaces one of the project's)."""
    result = {**(asdict(qconfig) if qconfig is not None else {}), **machine(device), **result,
              "command": command_line(sys.argv)}
    line = json.dumps(result, sort_keys=True)
    if path:
        if os.path.isfile(path) and committed(path):
            try:
                with open(path) as f:
                    before = json.load(f).get("command", "?")
            except (OSError, ValueError, AttributeError):
                before = "an unreadable result"
            print(f"replacing {path} (it held the result of `{before}`)", flush=True)
        write_json(path, result)
    print("RESULT " + line, flush=True)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what is left and how to go on where that depends on the run (its flags,
    how far it got): raise it from the KeyboardInterrupt, `run` prints it."""


def run(main, interrupted="nothing half-written was left: every file is written whole or not at all"):
    """Run a script's main(); a user error becomes one line on stderr and exit status 2, Ctrl-C
    one line (`interrupted`, or an Interrupted's own message: what is left and how to go on)
    and status 130."""
    try:
        main()
    except IntsimError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt as e:
        print(f"interrupted: {e if isinstance(e, Interrupted) else interrupted}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
