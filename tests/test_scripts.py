"""End-to-end runs of the real scripts (the `slow` tests): the checkpoints they write and read,
a tiny CIFAR-10 written here in torchvision's format, the tables, and bad input."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from conftest import FMNIST_CNN_BN, ROOT

pytestmark = pytest.mark.slow


def test_train_dry_run_saves_a_checkpoint_ptq_can_use(data_dir, tmp_path, run, result_of):
    r = result_of(run("train.py", "--model", "cnn_bn", "--dry-run", "--data-dir", data_dir, "--ckpt-dir", tmp_path,
                      "--resume-dir", tmp_path))
    ckpt = tmp_path / "fashion-mnist_cnn_bn.pt"
    assert r["script"] == "train" and os.path.isfile(ckpt) and 0 <= r["fp32_acc"] <= 100
    r = result_of(run("PTQ.py", "--model", "cnn_bn", "--ckpt", ckpt, "--dry-run", "--data-dir", data_dir))
    assert r["test_images"] == 1000 and r["int_fq_same_class"] > 95


def test_train_with_2_bit_compressed_activations_dry_run(data_dir, tmp_path, run, result_of):
    """train.py --ca-bits 2 (ActNN): its own checkpoint name, the setting in the RESULT, and a
    checkpoint the plain network loads (the compressed layers keep the state_dict keys)."""
    r = result_of(run("train.py", "--model", "cnn_bn", "--dry-run", "--ca-bits", 2, "--data-dir", data_dir,
                      "--ckpt-dir", tmp_path, "--resume-dir", tmp_path))
    assert (r["ca_bits"], r["ca_group_size"], r["ca_per_group"]) == (2, 256, True)
    ckpt = tmp_path / "fashion-mnist_cnn_bn_ca2.pt"
    r = result_of(run("PTQ.py", "--model", "cnn_bn", "--ckpt", ckpt, "--dry-run", "--data-dir", data_dir))
    assert r["test_images"] == 1000


def test_qat_dry_run_with_2_bit_saved_activations_freezes_an_integer_model(data_dir, tmp_path, run, result_of):
    save = tmp_path / "qat_ca2.pt"
    r = result_of(run("QAT.py", "--model", "cnn_bn", "--w-bits", 4, "--a-bits", 4, "--per-channel", "--ca-bits", 2,
                      "--ca-initial-bits", 8, "--ca-per-layer", "--ca-use-gradient", "--save", save, "--dry-run",
                      "--device", "cpu", "--data-dir", data_dir))
    assert (r["ca_bits"], r["ca_initial_bits"], r["ca_per_layer"], r["ca_use_gradient"]) == (2, 8, True, True)
    assert save.exists() and r["int_acc"] > 30         # 2 batches of QAT from the float checkpoint
    # BN on batch statistics (QAT's start): the two-pass fold's tensors are compressed too
    assert r["saved_bytes_per_image_fp32"] > 20 * r["saved_bytes_per_image"]


def test_qat_dry_run_with_lsq_step_sizes_from_the_calibrated_range(data_dir, tmp_path, run, result_of):
    r = result_of(run("QAT.py", "--model", "cnn", "--w-bits", 4, "--a-bits", 4, "--per-channel", "--first-last-bits", 8,
                      "--learn-scales", "--lsq-init", "range", "--save", tmp_path / "lsq.pt", "--dry-run",
                      "--device", "cpu", "--data-dir", data_dir))
    assert (r["learn_scales"], r["lsq_init"], r["first_last_bits"]) == (True, "range", 8)
    assert r["int_acc"] > 80 and abs(r["int_acc"] - r["fakequant_acc"]) < 2    # the learned S frozen into integers


def test_memory_dry_run_measures_saved_bytes_time_and_variance(data_dir, run, result_of):
    r = result_of(run("memory.py", "--model", "cnn_bn", "--ca-bits", 2, "--dry-run", "--device", "cpu",
                      "--data-dir", data_dir))
    b = r["saved_bytes_per_image"]
    assert b["compressed"] < b["float32"] / 10 and r["memory_ratio"] == round(b["float32"] / b["compressed"], 2)
    assert r["overall_var"] > 0 and r["sample_var"] > 0 and r["step_time_ratio"] > 0
    assert r["peak_memory_bytes"] is None                   # CPU: PyTorch does not track a peak there


def test_saved_frozen_model_runs_in_a_fresh_process_without_the_float_network(data_dir, tmp_path, run, result_of):
    """PTQ.py --save, then a new Python process loads the file with the float network's
    builders disabled and runs its integer path: the same output integers as PTQ.py's."""
    r = result_of(run("PTQ.py", "--model", "resnet18", "--per-channel", "--dry-run", "--test-limit", 50,
                      "--save", tmp_path / "q.pt", "--data-dir", data_dir))
    code = f"""
import model, module
def refuse(*a, **k): raise SystemExit("the float network was built")
model.build_model = model.convert = model.resnet18 = refuse
module.QLayer.__init__ = refuse
from checkpoint import load_frozen
from data import load_test
from engine import fingerprint
from frozen import output_integers, set_mode
frozen, ckpt = load_frozen({str(tmp_path / "q.pt")!r})
x, _ = load_test("fashion-mnist", {data_dir!r}, limit=50)
set_mode(frozen, "int")
print(fingerprint(output_integers(frozen, frozen(x))), ckpt["int_acc"])
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [r["int_outputs_sha"], str(r["int_acc"])]


def test_bench_and_tables(data_dir, tmp_path, run, result_of):
    r = result_of(run("bench.py", "--model", "cnn_bn", "--dry-run", "--data-dir", data_dir,
                      "--result-json", tmp_path / "results" / "bench.json"))
    assert r["float32_s"] > 0 and r["int_ratio"] > 0
    readme = tmp_path / "R.md"
    readme.write_text("x\n<!-- table:bench -->\nold\n<!-- /table:bench -->\n")
    tables = [sys.executable, os.path.join(ROOT, "make_tables.py"), "--results", tmp_path / "results",
              "--files", readme]
    assert subprocess.run(tables + ["--check"], cwd=ROOT).returncode == 1
    assert subprocess.run(tables, cwd=ROOT).returncode == 0
    text = readme.read_text()
    assert "| cnn_bn | W8A8 | 2000 |" in text and f"{r['int_ratio']:.2f}x" in text
    assert subprocess.run(tables + ["--check"], cwd=ROOT).returncode == 0
    # a misspelt results folder is an error, and leaves the tables as they are
    proc = subprocess.run(tables[:2] + ["--results", tmp_path / "nope", "--files", readme], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "no results" in proc.stderr and readme.read_text() == text


@pytest.mark.parametrize("flag,value,words", [("--w-bits", 17, ["weight bits", "2 to 16"]),
                                              ("--a-bits", 1, ["activation bits", "2 to 16"])])
def test_bits_out_of_range(data_dir, flag, value, words, run, one_line_error):
    one_line_error(run("PTQ.py", flag, value, "--data-dir", data_dir), *words)


def test_missing_checkpoint(data_dir, tmp_path, run, one_line_error):
    one_line_error(run("PTQ.py", "--ckpt", tmp_path / "nope.pt", "--data-dir", data_dir),
                          "not found", "train.py")


def test_checkpoint_of_another_model(data_dir, run, one_line_error):
    one_line_error(run("PTQ.py", "--model", "cnn", "--ckpt", FMNIST_CNN_BN, "--data-dir", data_dir),
                          "cnn_bn", "--model")


def test_file_that_is_not_a_checkpoint(data_dir, tmp_path, run, one_line_error):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    one_line_error(run("PTQ.py", "--ckpt", bad, "--data-dir", data_dir), "not a readable checkpoint")


def test_missing_dataset(tmp_path, run, one_line_error):
    one_line_error(run("PTQ.py", "--model", "cnn_bn", "--data-dir", tmp_path), "Fashion-MNIST not found")
    one_line_error(run("train.py", "--dataset", "cifar10", "--data-dir", tmp_path), "CIFAR-10 not found")


def write_tiny_cifar10(root, per_batch=24, seed=0):
    """CIFAR-10's python layout (cifar-10-batches-py/ with pickled dicts), filled with noise."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": name, "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, per_batch).tolist(), "filenames": [f"{i}.png" for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch}, f)


def test_cifar10_path_end_to_end(tmp_path, run, result_of):
    write_tiny_cifar10(tmp_path)
    r = result_of(run("train.py", "--dataset", "cifar10", "--model", "cnn_bn", "--dry-run", "--batch-size", 16,
                      "--data-dir", tmp_path, "--ckpt-dir", tmp_path, "--resume-dir", tmp_path))
    assert r["dataset"] == "cifar10"
    r = result_of(run("PTQ.py", "--dataset", "cifar10", "--model", "cnn_bn", "--ckpt", tmp_path / "cifar10_cnn_bn.pt",
                      "--w-bits", 4, "--per-channel", "--data-dir", tmp_path, "--dry-run"))
    assert r["dataset"] == "cifar10" and r["test_images"] == 24 and r["w_bits"] == 4


def test_targets_table_marks_met_and_missed():
    from dataclasses import asdict
    import targets
    from config import QConfig
    from make_tables import render
    w8, w6 = asdict(QConfig()), asdict(QConfig(w_bits=6, a_bits=6))
    common = {"dataset": "fashion-mnist", "model": "cnn", "command": "python x.py"}
    results = [
        {**common, "script": "train", "fp32_acc": 90.5, "epochs": 1, "minutes": 1.0},
        {**common, **w8, "script": "PTQ", "fp32_acc": 92.0, "fakequant_acc": 91.9,
         "int_acc": 91.8, "int_fq_same_class": 99.95, "int_fq_max_diff": 1},
        {**common, **w6, "script": "PTQ", "fp32_acc": 92.0, "fakequant_acc": 90.0,
         "int_acc": 90.9, "int_fq_same_class": 99.0, "int_fq_max_diff": 2},
        {**common, **w8, "script": "bench", "int_ratio": 3.2, "qat_train_ratio": 2.0},
        {**common, **w8, "model": "resnet18", "script": "PTQ", "fp32_acc": 93.0,
         "fakequant_acc": 93.0, "int_acc": 93.1, "int_fq_same_class": 99.5, "int_fq_max_diff": 2},
        {**common, **w8, "model": "resnet18", "dataset": "imagenet", "script": "PTQ", "per_channel": True,
         "fp32_acc": 0.0, "fakequant_acc": 0.0, "int_acc": 0.0, "int_fq_same_class": 98.0,
         "int_fq_max_diff": 2, "test_images": 10, "calib_images": 10, "weights": "random"},
    ]
    rows = {(t, m): ok for t, _, m, ok in targets.check_targets(results)}
    assert rows[("float32 >= 91.0%", "90.50")] is False
    assert rows[("PTQ W8A8 integer within 0.3 of float32", "-0.20")] is True
    assert rows[("PTQ W6A6 integer within 1.0 of float32", "-1.10")] is False
    assert rows[("integer vs fake-quant: same class >= 99.9%, max output diff <= 1", "99.95%, 1")] is True
    # ResNet18 is held to issue 6's 99% bar, not the small CNNs' 99.9%; ImageNet runs are pooled apart
    assert rows[("integer vs fake-quant: same class >= 99% (issue 6's ImageNet bar)", "99.50%, max diff 2")] is True
    assert [m for t, run, m, _ in targets.check_targets(results) if "99.9%" in t] == ["99.95%, 1"]
    assert rows[("ImageNet ResNet18: integer and fake-quant predict the same class for >= 99% of the images",
                 "98.00%")] is False
    assert "resnet18" not in render("bias", results) + render("ptq", [results[-1]])
    assert rows[("integer inference <= 3x float32", "3.20x")] is False
    assert rows[("QAT training step <= 2.5x float32 step", "2.00x")] is True
    assert "**no**" in targets.render_targets(results)


@pytest.mark.parametrize("args,words", [
    (["--w-observer", "ema"], ["unknown weight observer 'ema'", "minmax, lp, sqnr"]),
    (["--a-observer", "mse"], ["unknown activation observer 'mse'"]),
    (["--w-observer", "lp", "--lp-p", 0], ["p > 0"]),
    (["--w-rounding", "up"], ["unknown rounding 'up'", "stochastic"]),
    (["--quantize-layers", "first"], ["needs float activations"]),
    (["--quantize-layers", "last"], ["unknown layer choice 'last'"]),
    (["--unfold-bn"], ["--a-bits 32"]),
    (["--bias-bits", 24], ["bias bits"]),
    (["--a-bits", 24], ["activation bits", "32"]),
])
def test_bad_range_and_rounding_options(data_dir, args, words, run, one_line_error):
    one_line_error(run("PTQ.py", "--model", "cnn_bn", *args, "--data-dir", data_dir), *words)


def test_train_resume_continues_from_the_saved_epoch(data_dir, tmp_path, run, result_of, one_line_error):
    first, second = tmp_path / "a", tmp_path / "b"
    common = ["--model", "cnn", "--dry-run", "--data-dir", data_dir, "--resume-dir", tmp_path / "resume"]
    result_of(run("train.py", *common, "--ckpt-dir", first))
    assert (tmp_path / "resume" / "fashion-mnist_cnn.resume.pt").exists()
    proc = run("train.py", *common, "--ckpt-dir", second, "--resume")
    result_of(proc)
    assert "resuming after epoch 1" in proc.stdout
    import torch
    a = torch.load(first / "fashion-mnist_cnn.pt", weights_only=True)["state_dict"]
    b = torch.load(second / "fashion-mnist_cnn.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    one_line_error(run("train.py", "--model", "cnn_bn", "--dry-run", "--data-dir", data_dir,
                              "--resume-dir", tmp_path / "none", "--resume"), "not found")


def test_resnet18_checkpoint_is_stored_in_half_precision(tmp_path):
    import torch
    from checkpoint import load_checkpoint, save_checkpoint
    from model import ModelConfig, build_model
    cfg = ModelConfig(arch="resnet18")
    model = build_model(cfg)
    save_checkpoint(tmp_path / "r.pt", model, cfg, "fashion-mnist", half=True)
    assert os.path.getsize(tmp_path / "r.pt") < 25e6
    loaded, _, ckpt = load_checkpoint(str(tmp_path / "r.pt"), "fashion-mnist", "resnet18")
    w = dict(loaded.named_parameters())["conv1.weight"]
    assert ckpt["half"] and w.dtype == torch.float32
    assert torch.equal(w, model.conv1.weight.detach().half().float())


def test_train_init_from_fine_tunes_the_float_checkpoint(data_dir, tmp_path, run, result_of, one_line_error):
    """Two batches at a tiny learning rate from the float checkpoint keep its accuracy (from the
    seeded initialisation they would score near chance); another network's checkpoint is refused."""
    common = ["--model", "cnn_bn", "--dry-run", "--data-dir", data_dir, "--ckpt-dir", tmp_path, "--lr", "1e-7"]
    r = result_of(run("train.py", *common, "--ca-bits", 2, "--init-from", "ckpt/fashion-mnist_cnn_bn.pt"))
    assert r["fp32_acc"] > 85 and r["init_from"] == "ckpt/fashion-mnist_cnn_bn.pt"
    assert (tmp_path / "fashion-mnist_cnn_bn_ca2_finetuned.pt").exists()
    one_line_error(run("train.py", *common, "--init-from", "ckpt/fashion-mnist_cnn.pt"), "cnn", "cnn_bn")
