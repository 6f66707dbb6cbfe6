"""Golden results: small, fast runs of every script whose RESULT is stored in tests/golden/ and
compared by tests/test_golden.py, so that any change of behaviour fails the suite until the
golden files (and the RESULTS.md rows the change affects) are regenerated on purpose:

    INTSIM_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py            # every golden file
    INTSIM_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py -k qat     # only these

Run times, paths and the command line are not compared (`measured`). Floating-point training
and calibration are deterministic on one kind of CPU and torch build, not across them: each
golden file records both, and where they differ from the machine running the test only the
accuracies are compared, within a tolerance (see test_golden.py).
"""
import json
import os
import subprocess
import sys

import torch

from cli import cpu_flags
from rerun import measured   # what a result measured: run times, paths and the command left out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DIR = os.path.join(ROOT, "tests", "golden")
REGENERATE = os.environ.get("INTSIM_REGEN_GOLDEN") == "1"

# name -> (script, arguments); {tmp} is a fresh folder per run (shared by the runs of one name
# prefix, so an --eval run finds the model its training run saved), {data} the data folder.
RUNS = {
    "train_cnn": ("train.py", "--model cnn --dry-run --ckpt-dir {tmp} --resume-dir {tmp}"),
    "ptq_cnn_bn_w8a8": ("PTQ.py", "--model cnn_bn --per-channel --calib-batches 2 --test-limit 1000 --per-layer 200"),
    "ptq_cnn_w4a4_asym_single": ("PTQ.py", "--model cnn --w-bits 4 --a-bits 4 --w-asymmetric --single-rounding "
                                           "--dry-run"),
    "ptq_cnn_bn_w4a32_lp_stochastic": ("PTQ.py", "--model cnn_bn --w-bits 4 --a-bits 32 --w-observer lp --lp-p 2.0 "
                                                 "--w-rounding stochastic --per-channel --unfold-bn --test-limit 1000"),
    "ptq_cnn_bn_w8a4_sqnr_bias4": ("PTQ.py", "--model cnn_bn --w-bits 8 --a-bits 4 --a-observer sqnr --bias-bits 4 "
                                             "--dry-run"),
    "ptq_cnn_bn_w4a4_out8": ("PTQ.py", "--model cnn_bn --w-bits 4 --a-bits 4 --per-channel --out-bits 8 --dry-run"),
    "ptq_resnet18_w8a8": ("PTQ.py", "--model resnet18 --per-channel --dry-run --test-limit 100"),
    "qat_cnn_bn_w4a4": ("QAT.py", "--model cnn_bn --w-bits 4 --a-bits 4 --per-channel --single-rounding --dry-run "
                                  "--save {tmp}/qat.pt"),
    "qat_cnn_bn_w4a4_eval": ("QAT.py", "--model cnn_bn --w-bits 4 --a-bits 4 --per-channel --dry-run "
                                       "--eval {tmp}/qat.pt"),
    "qat_cnn_w8a8": ("QAT.py", "--model cnn --dry-run --save {tmp}/qat8.pt"),
    "adaround_cnn_bn_w4a8": ("AdaRound.py", "--model cnn_bn --w-bits 4 --a-bits 8 --per-channel --dry-run "
                                            "--save {tmp}/ada.pt --plot {tmp}/h.png"),
    "adaround_cnn_w3a32": ("AdaRound.py", "--model cnn --w-bits 3 --dry-run --save {tmp}/ada.pt --plot {tmp}/h.png"),
    "brecq_cnn_bn_w2a8": ("BRECQ.py", "--model cnn_bn --w-bits 2 --a-bits 8 --per-channel --dry-run "
                                      "--save {tmp}/brecq.pt --plot {tmp}/h.png"),
    "table1_cnn_bn": ("table1.py", "--model cnn_bn --dry-run --plot {tmp}/t1.png"),
}


def machine():
    """What floating-point results depend on besides the code: the torch build and the CPU's
    vector instructions (they pick the float kernels, whose rounding differs)."""
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(), "cpu_flags": cpu_flags(),
            "threads": int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))}


SAME_MACHINE_KEYS = ("torch", "cpu", "cpu_flags", "threads")     # threads: 1, set by conftest.py


def same_machine(recorded):
    """Whether a golden file was written on a machine whose float results are this one's."""
    here = machine()
    return all(recorded.get(k) == here[k] for k in SAME_MACHINE_KEYS)


def group(name):
    """Runs whose names share everything before a trailing _eval use one {tmp} folder."""
    return name[:-len("_eval")] if name.endswith("_eval") else name


def run(name, tmp_root, data_dir, root=ROOT):
    """Run one golden configuration with the code in `root`; returns its RESULT dict."""
    script, args = RUNS[name]
    tmp = os.path.join(tmp_root, group(name))
    os.makedirs(tmp, exist_ok=True)
    argv = [sys.executable, os.path.join(root, script), *args.format(tmp=tmp, data=data_dir).split(),
            "--data-dir", data_dir]
    proc = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def golden_path(name):
    return os.path.join(GOLDEN_DIR, f"{name}.json")


def write_golden(name, result):
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    with open(golden_path(name), "w") as f:
        json.dump({"machine": machine(), "result": measured(result)}, f, indent=1, sort_keys=True)
        f.write("\n")
