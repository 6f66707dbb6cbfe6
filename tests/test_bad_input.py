"""Bad input, as a user types it: every case must end in one line naming the problem, a
non-zero exit status, no traceback, and every file that existed before byte for byte as it
was (checkpoints, results, figures, tables, data).

Most cases run a script's real main() in this process (cli.run, as `python script.py` does:
the same parser, checks and error handling, without a second interpreter's start-up); a few
run it as a subprocess where the process itself matters (Ctrl-C).
"""
import gzip
import hashlib
import importlib
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import cli
from checkpoint import _atomic_write, save_frozen, write_json
from config import QConfig
from errors import IntsimError
from model import ModelConfig, build_model, calibrate, convert
from freezing import freeze

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CNN = os.path.join(ROOT, "ckpt", "fashion-mnist_cnn.pt")
# runs/dry-run is the scratch folder of every --dry-run (tests on other pytest-xdist workers write there)
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", "imagenet-1300", "dry-run"}


def snapshot():
    """{path: fingerprint} of every file in the project: the contents of the small ones (what the
    project ships and the tables), size, mtime and inode of the rest (a rewrite changes them)."""
    out = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            path = os.path.join(folder, name)
            st = os.stat(path)
            if st.st_size < 2_000_000:
                with open(path, "rb") as f:
                    out[path] = hashlib.sha256(f.read()).hexdigest()
            else:
                out[path] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


@pytest.fixture
def untouched():
    """Fails the test if any file that existed before it changed or vanished."""
    before = snapshot()
    yield
    after = snapshot()
    changed = [p for p, v in before.items() if after.get(p) != v]
    assert not changed, f"changed or removed: {changed[:5]}"


def script(name, *args):
    """(exit status, stdout, stderr) of `python <name>.py args`, run in this process."""
    module = importlib.import_module(name)
    argv, sys.argv, cwd = sys.argv, [f"{name}.py", *map(str, args)], os.getcwd()
    os.chdir(ROOT)                          # the scripts' defaults (ckpt/, data/) are relative to it
    code = 0
    try:
        cli.run(module.main)
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
        os.chdir(cwd)
    return code


def one_line(capsys, code, *words, after_progress=False):
    """The case failed as it should: status 2, one `error:` line on stderr holding `words` (the
    only line; `after_progress`: the last one, after the run's progress lines)."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert "Traceback" not in err and sum(l.startswith("error:") for l in lines) == 1, err
    assert lines[-1].startswith("error:") and (after_progress or len(lines) == 1), err
    err = lines[-1]
    for w in words:
        assert w in err, err
    return err


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("name,args,words", [
    ("PTQ", ["--batch-size", -1], ["--batch-size -1", "at least 1"]),
    ("PTQ", ["--batch-size", "abc"], ["--batch-size", "'abc'"]),
    ("PTQ", ["--calib-batches", 0], ["--calib-batches 0"]),
    ("PTQ", ["--test-limit", -5], ["--test-limit -5"]),
    ("PTQ", ["--per-layer", -5], ["--per-layer -5"]),
    ("PTQ", ["--seed", -1], ["--seed -1"]),
    ("PTQ", ["--seed", 2 ** 32], ["--seed"]),
    ("PTQ", ["--lp-p", "nan"], ["p > 0"]),
    ("PTQ", ["--export-check", 0], ["--export-check 0"]),
    ("train", ["--epochs", 0], ["--epochs 0"]),
    ("train", ["--lr", "nan"], ["--lr nan", "finite"]),
    ("train", ["--lr", -1], ["--lr -1.0"]),
    ("train", ["--weight-decay", "inf"], ["--weight-decay inf"]),
    ("QAT", ["--epochs", -1], ["--epochs -1"]),
    ("QAT", ["--lr", 0], ["--lr 0.0"]),
    ("AdaRound", ["--beta-start", "nan"], ["--beta-start nan"]),
    ("AdaRound", ["--warm-start", 1.5], ["--warm-start 1.5", "[0, 1)"]),
    ("AdaRound", ["--iters", 0], ["--iters 0"]),
    ("AdaRound", ["--num-calib", -3], ["--num-calib -3"]),
    ("AdaRound", ["--reg-weight=-inf"], ["--reg-weight -inf"]),
    ("table1", ["--draws", 1], ["--draws 1", "at least 2"]),
    ("bench", ["--threads", 0], ["--threads 0"]),
    ("bench", ["--repeats", 0], ["--repeats 0"]),
    ("PTQ", ["--device", "foo"], ["--device 'foo'", "cpu, cuda"]),
    ("PTQ", ["--device", "mps"], ["--device 'mps'"]),
    ("PTQ", ["--device", ""], ["--device ''"]),
    ("PTQ", ["--w-bits", 1], ["weight bits", "2 to 16"]),
])
def test_flag_out_of_range(name, args, words, untouched, capsys):
    one_line(capsys, script(name, *args), *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_without_one(untouched, capsys):
    one_line(capsys, script("PTQ", "--device", "cuda"), "no CUDA device")


def test_unwritable_outputs_are_refused_before_the_run(tmp_path, untouched, capsys):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    one_line(capsys, script("PTQ", "--result-json", tmp_path), "--result-json", "is a folder")
    one_line(capsys, script("PTQ", "--save", a_file / "q.pt"), "--save", f"{a_file} is a file")
    one_line(capsys, script("AdaRound", "--plot", tmp_path), "--plot", "is a folder")
    one_line(capsys, script("PTQ", "--export", tmp_path), "--export", "is a folder")
    one_line(capsys, script("train", "--ckpt-dir", a_file), "--ckpt-dir", "is a file, not a folder")
    one_line(capsys, script("train", "--resume-dir", a_file / "deeper"), "--resume-dir", "is a file")
    one_line(capsys, script("split_images", tmp_path, tmp_path / "out", "--result-json", a_file / "r.json"),
             "--result-json")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(tmp_path, untouched, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    one_line(capsys, script("PTQ", "--result-json", ro / "r.json"), "not writable")


def test_dry_run_never_writes_the_committed_folders(untouched, capsys):
    for flag, path in (("--result-json", "results/x.json"), ("--save", "ckpt/x.pt")):
        one_line(capsys, script("PTQ", "--dry-run", flag, path), flag, "--dry-run never writes")
    one_line(capsys, script("train", "--dry-run", "--ckpt-dir", "ckpt"), "--ckpt-dir", "--dry-run never writes")


def test_dry_run_defaults_go_under_runs():
    import QAT
    args = cli.parser("x").parse_args([])
    args.dry_run, args.dataset, args.model = True, "fashion-mnist", "cnn"
    assert cli.trial_path(args, "results/figures/a.png") == os.path.join(cli.DRY_RUN_DIR, "results/figures/a.png")
    assert cli.trial_path(args, "ckpt") == os.path.join(cli.DRY_RUN_DIR, "ckpt")
    assert QAT.default_save_path(args, QConfig()).startswith(os.path.join(cli.DRY_RUN_DIR, "qat") + os.sep)
    args.dry_run = False
    assert cli.trial_path(args, "ckpt") == "ckpt"


# ----------------------------------------------------------------------------- checkpoints

def frozen_cnn(tmp_path, qconfig):
    """A frozen cnn (the committed float weights) saved as QAT.py saves one."""
    from checkpoint import load_checkpoint
    model, cfg, _ = load_checkpoint(CNN, "fashion-mnist", "cnn")
    qmodel = convert(model, qconfig)
    g = torch.Generator().manual_seed(0)
    calibrate(qmodel, [(torch.randn(16, 1, 28, 28, generator=g), None)], "cpu", 1)
    path = tmp_path / "frozen.pt"
    save_frozen(str(path), freeze(qmodel), qconfig, cfg, "fashion-mnist", "QAT", fp32_acc=92.4, epochs=1, lr=1e-3,
                optimizer="sgd", qat_fakequant_acc=90.0)
    return path


def test_bad_checkpoints(data_dir, tmp_path, untouched, capsys):
    truncated, noise, partial, nan = (tmp_path / n for n in ("t.pt", "n.pt", "p.pt", "nan.pt"))
    with open(CNN, "rb") as f:
        truncated.write_bytes(f.read()[:4000])
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    torch.save({"intsim": 1, "model_config": {"arch": "cnn"}}, partial)
    ckpt = torch.load(CNN, weights_only=True)
    ckpt["state_dict"] = {k: v.float() * float("nan") if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, nan)
    one_line(capsys, script("PTQ", "--ckpt", tmp_path), "is a folder")
    one_line(capsys, script("PTQ", "--ckpt", truncated, "--data-dir", data_dir), "not a readable checkpoint")
    one_line(capsys, script("PTQ", "--ckpt", noise, "--data-dir", data_dir), "not a readable checkpoint")
    one_line(capsys, script("PTQ", "--ckpt", partial, "--data-dir", data_dir), "lacks dataset, state_dict")
    one_line(capsys, script("PTQ", "--ckpt", nan, "--data-dir", data_dir), "NaN or inf", "--lr")
    one_line(capsys, script("QAT", "--eval", CNN, "--data-dir", data_dir), "not a frozen quantized model")
    one_line(capsys, script("QAT", "--eval", truncated, "--data-dir", data_dir), "not a readable checkpoint")
    one_line(capsys, script("AdaRound", "--ckpt", os.path.join(ROOT, "ckpt", "fashion-mnist_cnn_bn.pt"),
                            "--data-dir", data_dir), "'cnn_bn'", "--model")


def test_eval_takes_the_bits_from_the_model_or_refuses(data_dir, tmp_path, untouched, capsys):
    import json
    path = frozen_cnn(tmp_path, QConfig(w_bits=4, a_bits=4))
    one_line(capsys, script("PTQ", "--ckpt", path, "--data-dir", data_dir), "frozen quantized model", "QAT.py --eval")
    one_line(capsys, script("QAT", "--eval", path, "--w-bits", 8, "--data-dir", data_dir), "W4A4", "--w-bits 4, not 8")
    one_line(capsys, script("QAT", "--eval", path, "--per-channel", "--data-dir", data_dir), "--per-channel False")
    assert script("QAT", "--eval", path, "--dry-run", "--data-dir", data_dir) == 0
    out = capsys.readouterr().out.splitlines()[-1]
    r = json.loads(out[len("RESULT "):])
    assert (r["w_bits"], r["a_bits"]) == (4, 4)          # the model's, not the flags' defaults (W8A8)


def test_a_state_dict_of_other_bits_is_refused():
    m = build_model(ModelConfig("cnn", 1, 28, 10))
    w8, w4 = convert(m, QConfig(w_bits=8)), convert(m, QConfig(w_bits=4))
    with pytest.raises(IntsimError, match="8-bit grid, this quantizer's is 4-bit"):
        w4.load_state_dict(w8.state_dict())
    convert(m, QConfig(w_bits=8)).load_state_dict(w8.state_dict())     # the same QConfig loads


def test_resume_files(data_dir, tmp_path, untouched, capsys):
    resume = tmp_path / "fashion-mnist_cnn.resume.pt"
    common = ("--dry-run", "--data-dir", data_dir, "--ckpt-dir", tmp_path / "c", "--resume-dir", tmp_path, "--resume")
    torch.save({"epochs": 1, "flags": {"epochs": 1, "batch_size": 128, "lr": 2e-3, "weight_decay": 5e-4}}, resume)
    one_line(capsys, script("train", *common, "--lr", 1e-3), "--lr 0.002, not 0.001", "same flags")
    one_line(capsys, script("train", *common, "--batch-size", 64), "--batch-size 128, not 64")
    resume.write_bytes(b"\x80\x02 truncated")
    one_line(capsys, script("train", *common), "not a readable resume file")


# ----------------------------------------------------------------------------- files never lost

def test_train_does_not_replace_a_checkpoint_without_overwrite(data_dir, tmp_path, untouched, capsys):
    import shutil
    one_line(capsys, script("train"), "ckpt/fashion-mnist_cnn.pt exists (test accuracy 92.40%)", "--overwrite")
    shutil.copy(CNN, tmp_path / "fashion-mnist_cnn.pt")
    args = ("--dry-run", "--data-dir", data_dir, "--ckpt-dir", tmp_path, "--resume-dir", tmp_path / "r")
    one_line(capsys, script("train", *args), "exists (test accuracy 92.40%)")
    assert script("train", *args, "--overwrite") == 0
    out = capsys.readouterr().out
    assert "replacing one of test accuracy 92.40%" in out
    assert torch.load(tmp_path / "fashion-mnist_cnn.pt", weights_only=True)["test_acc"] < 90   # 2 batches


def test_a_diverging_run_stops_and_saves_nothing(data_dir, tmp_path, untouched, capsys):
    code = script("train", "--dry-run", "--lr", 1e30, "--data-dir", data_dir, "--ckpt-dir", tmp_path,
                  "--resume-dir", tmp_path)
    one_line(capsys, code, "training loss is nan", "nothing saved", "--lr", after_progress=True)
    assert os.listdir(tmp_path) == []


def test_an_interrupted_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"a": 1})

    def half_then_ctrl_c(f):
        f.write(b'{"a": ')
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _atomic_write(str(path), half_then_ctrl_c)
    assert path.read_text() == '{"a": 1}\n' and os.listdir(tmp_path) == ["r.json"]


def small_fashion_mnist(data_dir, folder, n):
    """A Fashion-MNIST of the first n training and test images of the real one, in its own idx
    files under folder/FashionMNIST/raw (an epoch takes a second)."""
    src, raw = os.path.join(data_dir, "FashionMNIST", "raw"), folder / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        for kind, magic, shape in (("images", 0x803, (n, 28, 28)), ("labels", 0x801, (n,))):
            name = f"{split}-{kind}-idx{len(shape)}-ubyte"
            with open(os.path.join(src, name), "rb") as f:
                data = f.read()[4 + 4 * len(shape):][:int(np.prod(shape))]
            header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)
            (raw / name).write_bytes(header + data)
    return folder


def interrupt_train(args, after):
    """Ctrl-C to `python train.py args` once a line of its output holds `after`; (status, stderr)."""
    # SIGINT back to its default in the child: a shell's background job (pytest ... &) ignores it, the
    # child would inherit that, Python would install no KeyboardInterrupt handler, and the run would not stop
    proc = subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, "train.py"), *map(str, args)], cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if after in line:
            break
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("train.py still ran 120 s after Ctrl-C")
    return proc.returncode, [l for l in "".join(seen + [out]).splitlines() if l.startswith(("interrupted", "error", "Trace"))]


def test_ctrl_c_is_one_line(data_dir, tmp_path, untouched):
    # a full run, not --dry-run: its two batches could end before the signal lands on a loaded machine
    code, lines = interrupt_train(["--data-dir", data_dir, "--ckpt-dir", tmp_path, "--resume-dir", tmp_path], "[0/")
    assert code == cli.EXIT_INTERRUPTED and len(lines) == 1, lines
    assert lines[0].startswith("interrupted:") and "no epoch was completed: nothing to resume" in lines[0], lines
    assert not (tmp_path / "fashion-mnist_cnn.pt").exists()


def test_ctrl_c_after_an_epoch_names_the_resume_folder_it_used(data_dir, tmp_path, untouched):
    data = small_fashion_mnist(data_dir, tmp_path / "data", 512)
    resume = tmp_path / "elsewhere"
    code, lines = interrupt_train(["--data-dir", data, "--epochs", 50, "--batch-size", 64, "--ckpt-dir", tmp_path,
                                   "--resume-dir", resume], "epoch 1:")
    assert code == cli.EXIT_INTERRUPTED and len(lines) == 1, lines
    assert f"{resume}/fashion-mnist_cnn.resume.pt holds the state after epoch" in lines[0], lines
    assert f"--resume --resume-dir {resume}" in lines[0], lines
    assert not (tmp_path / "fashion-mnist_cnn.pt").exists()
    from train import RESUME_DIR, interrupted_message       # the default folder goes without saying
    assert "--resume-dir" not in interrupted_message(os.path.join(RESUME_DIR, "x.resume.pt"), 3)


def test_figures_are_written_whole(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from checkpoint import save_figure
    fig = plt.figure()
    save_figure(str(tmp_path / "f.png"), fig)
    plt.close(fig)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.listdir(tmp_path) == ["f.png"]


def test_make_tables_refuses_bad_results(tmp_path, untouched):
    tables = [sys.executable, os.path.join(ROOT, "make_tables.py"), "--check", "--results"]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.json").write_text('{"script": "PTQ", ')
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.json").write_text("[1, 2]")
    for folder, words in ((tmp_path / "nope", "no results"), (tmp_path / "a", "not a readable RESULT"),
                          (tmp_path / "b", "not a RESULT file")):
        proc = subprocess.run([*tables, folder], cwd=ROOT, capture_output=True, text=True)
        err = proc.stderr.strip()
        assert proc.returncode != 0 and len(err.splitlines()) == 1 and words in err, err


# ----------------------------------------------------------------------------- data files

def fashion_copy(data_dir, tmp_path):
    import shutil
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in os.listdir(os.path.join(data_dir, "FashionMNIST", "raw")):
        if not name.endswith(".gz"):
            shutil.copy(os.path.join(data_dir, "FashionMNIST", "raw", name), raw / name)
    return raw


def test_truncated_and_mismatched_fashion_mnist(data_dir, tmp_path, untouched, capsys):
    raw = fashion_copy(data_dir, tmp_path)
    images = raw / "t10k-images-idx3-ubyte"
    whole = images.read_bytes()
    images.write_bytes(whole[:len(whole) // 2])
    one_line(capsys, script("PTQ", "--data-dir", tmp_path), "t10k-images-idx3-ubyte is truncated")
    images.write_bytes(whole)
    labels = raw / "t10k-labels-idx1-ubyte"
    b = bytearray(labels.read_bytes())
    b[4:8] = (9000).to_bytes(4, "big")
    labels.write_bytes(bytes(b[:8 + 9000]))
    one_line(capsys, script("PTQ", "--data-dir", tmp_path), "10000 images but 9000 labels")


def test_corrupt_archive(data_dir, tmp_path, untouched, capsys):
    raw = fashion_copy(data_dir, tmp_path)
    (raw / "t10k-images-idx3-ubyte").unlink()
    blob = gzip.compress(b"\0" * 100000)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(blob[:len(blob) // 2])
    one_line(capsys, script("PTQ", "--data-dir", tmp_path), "t10k-images-idx3-ubyte.gz is corrupt")
    assert not (raw / "t10k-images-idx3-ubyte").exists()      # no half-extracted file left to pass for data


def test_corrupt_cifar_batch(tmp_path, untouched, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    good = {"data": np.zeros((4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        with open(folder / name, "wb") as f:
            pickle.dump(good, f)
    (folder / "test_batch").write_bytes(pickle.dumps(good)[:50])
    one_line(capsys, script("train", "--dataset", "cifar10", "--data-dir", tmp_path, "--ckpt-dir", tmp_path / "c"),
             "test_batch is not a CIFAR-10 batch")


def test_unreadable_image(tmp_path, untouched, capsys):
    for part in ("calib", "test"):
        (tmp_path / part / "n01440764").mkdir(parents=True)
        (tmp_path / part / "n01440764" / "a.JPEG").write_bytes(b"not a jpeg")
    one_line(capsys, script("PTQ", "--dataset", "imagenet", "--model", "resnet18", "--weights", "random",
                            "--calib-dir", tmp_path / "calib", "--data-dir", tmp_path / "test"),
             "a.JPEG is not a readable image")


# ----------------------------------------------------------------------------- numbers where they enter

def test_nan_input_and_zero_range_calibration(capsys):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        net[0].weight.fill_(-1.0)                     # after ReLU: 0 for every positive input
        net[0].bias.zero_()
    qmodel = convert(net, QConfig())
    calibrate(qmodel, [(torch.rand(4, 1, 4, 4), None)], "cpu", 1)
    warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "was 0 on every calibration image" in warnings[0], warnings
    frozen = freeze(qmodel)
    x = torch.rand(2, 1, 4, 4)
    x[0, 0, 1, 1] = float("nan")
    with pytest.raises(IntsimError, match="1 NaN or inf values"):
        frozen(x)
    with pytest.raises(IntsimError, match="NaN or inf in the values observed"):
        calibrate(convert(net, QConfig()), [(x, None)], "cpu", 1)


def test_weights_too_small_for_a_float32_scale():
    net = nn.Sequential(nn.Conv2d(1, 2, 3))
    with torch.no_grad():
        net[0].weight.fill_(1e-44)
    with pytest.raises(IntsimError, match="too small for a float32 scale"):
        freeze(convert(net, QConfig(a_bits=32)))


def test_the_math_rejects_what_tflite_rejects():
    from function import (activation_grid, dequantize, fake_quantize, multiply_by_quantized_multiplier,
                          multiply_by_quantized_multiplier_single_rounding, quantize, requantize,
                          rounding_divide_by_pot, saturating_rounding_doubling_high_mul, scale_zero_point)
    x, one, zero = torch.ones(3), torch.tensor([1.0]), torch.tensor([0])
    acc = torch.tensor([5, -7], dtype=torch.int64)
    cases = [
        (lambda: quantize(x, torch.tensor([0.0]), zero, 0, 255), "scale must be finite and above 0"),
        (lambda: fake_quantize(x, torch.tensor([-1.0]), zero, 0, 255), "scale must be finite and above 0"),
        (lambda: dequantize(acc, torch.tensor([float("nan")]), zero), "scale must be finite and above 0"),
        (lambda: quantize(torch.tensor([float("nan")]), one, zero, 0, 255), "NaN or inf"),
        (lambda: scale_zero_point(torch.tensor([2.0]), torch.tensor([1.0]), activation_grid(8)), "inverted range"),
        (lambda: multiply_by_quantized_multiplier(acc, torch.tensor(2 ** 31), torch.tensor(0)), "M0 lies in"),
        (lambda: multiply_by_quantized_multiplier(acc, torch.tensor(-1), torch.tensor(0)), "M0 lies in"),
        (lambda: multiply_by_quantized_multiplier(acc, torch.tensor(2 ** 30), torch.tensor(31)), "shift lies in"),
        (lambda: multiply_by_quantized_multiplier_single_rounding(acc, torch.tensor(2 ** 30), torch.tensor(-32)),
         "shift lies in"),
        (lambda: rounding_divide_by_pot(acc, -1), "exponent lies in"),
        (lambda: rounding_divide_by_pot(acc, 32), "exponent lies in"),
        (lambda: saturating_rounding_doubling_high_mul(acc.int(), acc.int()), "int64 tensors"),
        (lambda: rounding_divide_by_pot(acc.int(), 1), "int64 tensors"),
        (lambda: requantize(torch.tensor([2 ** 31]), torch.tensor(2 ** 30), torch.tensor(0), 0, 0, 255),
         "int32 accumulator overflow"),
    ]
    for fn, words in cases:
        with pytest.raises(IntsimError, match=words):
            fn()
    # and the edges TFLite allows still work
    assert multiply_by_quantized_multiplier(acc, torch.tensor(2 ** 31 - 1), torch.tensor(-31)).tolist() == [0, 0]
    assert rounding_divide_by_pot(acc, 31).tolist() == [0, 0]


def test_convert_takes_a_module_and_a_qconfig():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x
    with pytest.raises(IntsimError, match="takes a QConfig"):
        convert(nn.Conv2d(1, 2, 3), None)
    with pytest.raises(IntsimError, match="takes a torch.nn.Module"):
        convert("cnn", QConfig())
    with pytest.raises(IntsimError, match="data-dependent control flow"):
        convert(Branchy(), QConfig())


def test_errors_name_the_layer():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with torch.no_grad():
        net[0].weight.fill_(1e-6)                 # S_w ~ 8e-9: a bias of 1000 is ~1e13 steps of S_in S_w
        net[0].bias.fill_(1000.0)
    # symmetric weights get a larger scale instead (ops.conv.adjust_weight_scale); asymmetric ones cannot
    qmodel = convert(net, QConfig(w_symmetric=False))
    calibrate(qmodel, [(torch.rand(4, 1, 5, 5), None)], "cpu", 1)
    name = next(n for n, m in qmodel.named_modules() if type(m).__name__ == "QLayer")
    with pytest.raises(IntsimError, match=f"^{name}: the bias does not fit int32"):
        freeze(qmodel)


# ----------------------------------------------------------------------------- folders, other scripts' files

def image_folder(folder, n):
    """An ImageNet-style folder of n small random JPEGs in one class (n01440764)."""
    from PIL import Image
    (folder / "n01440764").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / "n01440764" / f"{i}.JPEG")
    return folder


@pytest.fixture
def read_only_copy(tmp_path):
    """read_only_copy(files) -> a folder holding copies of {relative path: source path} that nobody,
    root included, can write into: a read-only tmpfs where one can be mounted, else (not root)
    chmod 555; skips where neither is possible."""
    import shutil
    mounted = []

    def make(files):
        folder = tmp_path / "ro"
        folder.mkdir()
        if os.geteuid() == 0:
            if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)],
                              capture_output=True).returncode != 0:
                pytest.skip("root cannot mount a read-only folder here")
            mounted.append(folder)
        for rel, src in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, folder / rel)
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        else:
            for d, _, _ in os.walk(folder):
                os.chmod(d, 0o555)
        return folder
    yield make
    for folder in mounted:
        subprocess.run(["umount", str(folder)])
    for d, _, _ in os.walk(tmp_path):
        os.chmod(d, 0o755)


def test_qat_eval_scores_a_model_any_script_saved(data_dir, tmp_path, untouched, capsys):
    import json
    path = tmp_path / "ptq.pt"
    assert script("PTQ", "--dry-run", "--save", path, "--data-dir", data_dir) == 0
    capsys.readouterr()
    assert script("QAT", "--eval", path, "--dry-run", "--data-dir", data_dir) == 0
    out = capsys.readouterr().out
    r = json.loads(out.splitlines()[-1][len("RESULT "):])
    assert "PTQ model from" in out and r["made_by"] == "PTQ" and r["script"] == "eval" and "epochs" not in r
    assert r["int_acc"] > 80


def test_split_images_refuses_what_would_spoil_a_folder(tmp_path, untouched, capsys):
    src, out = image_folder(tmp_path / "src", 3), tmp_path / "out"
    a_file = tmp_path / "f"
    a_file.write_text("x")
    one_line(capsys, script("split_images", src, src), f"DST {src} is SRC")
    one_line(capsys, script("split_images", src, src / "parts"), "lies inside SRC")
    one_line(capsys, script("split_images", src / "n01440764", tmp_path), "holds SRC")
    one_line(capsys, script("split_images", src, out, "--parts", 4), "holds 3 image(s), fewer than --parts 4")
    one_line(capsys, script("split_images", src, a_file), f"DST {a_file}: is a file, not a folder")
    one_line(capsys, script("split_images", src / "n01440764" / "0.JPEG", out), "SRC", "is a file, not a folder")
    (out / "part1").mkdir(parents=True)
    (out / "part1" / "n01440764").write_text("x")
    one_line(capsys, script("split_images", src, out), "part1/n01440764 exists and is not a folder")
    assert os.listdir(out) == ["part1"] and sorted(os.listdir(src)) == ["n01440764"]     # nothing was made
    assert len(os.listdir(src / "n01440764")) == 3
    (out / "part1" / "n01440764").unlink()
    assert script("split_images", src, out, "--parts", 3) == 0                 # and the right run still works
    assert [len(os.listdir(out / f"part{k}" / "n01440764")) for k in range(3)] == [1, 1, 1]


def test_split_images_into_a_read_only_folder(tmp_path, read_only_copy, untouched, capsys):
    src, ro = image_folder(tmp_path / "src", 2), read_only_copy({})
    one_line(capsys, script("split_images", src, ro / "parts"), "DST", "not writable")


def test_an_intact_archive_in_a_read_only_folder_is_not_called_corrupt(data_dir, read_only_copy, untouched, capsys):
    name = "FashionMNIST/raw/t10k-labels-idx1-ubyte.gz"
    ro = read_only_copy({name: os.path.join(data_dir, name)})
    err = one_line(capsys, script("PTQ", "--data-dir", ro), "cannot extract", "copy the folder somewhere writable")
    assert "corrupt" not in err


def test_an_archive_that_cannot_be_extracted_names_the_folder(data_dir, tmp_path, untouched, capsys):
    import shutil
    raw = tmp_path / "FashionMNIST" / "raw"
    (raw / "t10k-labels-idx1-ubyte").mkdir(parents=True)     # a folder where the extracted file goes
    shutil.copy(os.path.join(data_dir, "FashionMNIST", "raw", "t10k-labels-idx1-ubyte.gz"), raw)
    err = one_line(capsys, script("PTQ", "--data-dir", tmp_path), "cannot extract", "Is a directory")
    assert "corrupt" not in err


def test_rerun_refuses_what_is_not_a_result(tmp_path, untouched, capsys):
    (tmp_path / "array.json").write_text("[1, 2]")
    (tmp_path / "other.json").write_text('{"a": 1}')
    (tmp_path / "cut.json").write_text('{"script": "PTQ", ')
    one_line(capsys, script("rerun", tmp_path / "nope.json"), "nope.json not found")
    one_line(capsys, script("rerun", tmp_path / "array.json"), "array.json is not a RESULT file")
    one_line(capsys, script("rerun", tmp_path / "other.json"), "other.json is not a RESULT file")
    one_line(capsys, script("rerun", tmp_path / "cut.json"), "cut.json is not a readable RESULT file")
    one_line(capsys, script("rerun", tmp_path), "RESULTS", "is a folder")


def test_tflite_run_refuses_a_model_the_images_do_not_fit(data_dir, tmp_path, untouched, capsys):
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed")
    model = tmp_path / "fashion.tflite"
    assert script("PTQ", "--dry-run", "--export", model, "--export-check", 2, "--data-dir", data_dir) == 0
    capsys.readouterr()
    images = image_folder(tmp_path / "images", 2)
    one_line(capsys, script("tflite_run", model, "--data-dir", images), "[1, 28, 28, 1]", "square RGB input")
    one_line(capsys, script("tflite_run", model, "--data-dir", images / "n01440764" / "0.JPEG"),
             "--data-dir", "is a file, not a folder")


def test_a_quick_table1_keeps_the_stored_figure(data_dir, tmp_path, untouched, capsys):
    # settings that are not the stored row's; the `untouched` fixture checks results/figures/
    assert script("table1", "--model", "cnn_bn", "--draws", 2, "--hessian-images", 1, "--test-limit", 100,
                  "--data-dir", data_dir, "--result-json", tmp_path / "r.json") == 0
    assert (tmp_path / "figures" / "table1_fashion-mnist_cnn_bn.png").is_file()      # beside --result-json
    args = cli.parser("x").parse_args([])
    args.plot = args.result_json = None
    assert cli.figure_path(args, "f.png") == os.path.join("runs", "figures", "f.png")    # else under runs/
    args.result_json = os.path.join("results", "r.json")                             # a row of the tables
    assert cli.figure_path(args, "f.png") == os.path.join("results", "figures", "f.png")


def test_replacing_a_stored_result_says_which(tmp_path, monkeypatch, capsys):
    path = tmp_path / "row.json"
    write_json(path, {"script": "PTQ", "command": "python PTQ.py --w-bits 4"})
    monkeypatch.setattr(cli, "committed", lambda p: True)
    monkeypatch.setattr(sys, "argv", ["PTQ.py", "--w-bits", "2"])
    cli.emit_result({"script": "PTQ"}, str(path))
    assert f"replacing {path} (it held the result of `python PTQ.py --w-bits 4`)" in capsys.readouterr().out


@pytest.mark.parametrize("name,args,words", [
    ("PTQ", ["--a-bits", 32, "--per-layer", 100], ["--per-layer", "--a-bits 32 leaves the activations float"]),
    ("PTQ", ["--w-bits", 9, "--export", "x.tflite"], ["--export", "wider than 8 bits"]),
    ("AdaRound", ["--export", "x.tflite"], ["--export", "--a-bits 32"]),           # AdaRound's default A32
    ("BRECQ", ["--scale-lr", "nan"], ["--scale-lr nan", "finite"]),
    ("BRECQ", ["--scale-lr", -1], ["--scale-lr -1.0"]),
    ("BRECQ", ["--scale-lr", 1e-3], ["--scale-lr learns the activation step sizes", "--a-bits 32"]),
    ("BRECQ", ["--layers-per-group", 0], ["--layers-per-group 0"]),
    ("memory", ["--passes", 1], ["--passes 1", "at least 2"]),
    ("PTQ", ["--data-dir", CNN], ["--data-dir", "is a file, not a folder"]),
    ("PTQ", ["--tflite-model", "m.tflite"], ["--tflite-model does nothing without --dataset imagenet"]),
    ("PTQ", ["--export-check", 5], ["--export-check does nothing without --export"]),
    ("QAT", ["--lsq-init", "range"], ["--lsq-init does nothing without --learn-scales"]),
    ("train", ["--ca-group-size", 64], ["--ca-group-size does nothing without --ca-bits"]),
])
def test_flags_that_would_do_nothing_or_break_later(name, args, words, untouched, capsys):
    one_line(capsys, script(name, *args), *words)
