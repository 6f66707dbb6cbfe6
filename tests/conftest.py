"""Shared fixtures: the real Fashion-MNIST, running the project's scripts, and small models
with non-trivial weights and BatchNorm statistics."""
import json
import os
import shutil
import subprocess
import sys

# Every test and every script a test starts runs torch on one thread, set before torch is imported:
# float sums then come out the same on any number of cores (the golden results compare them
# exactly), and pytest-xdist's workers, one per core (`-n auto`), do not oversubscribe the CPU.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
# The integer epilogue runs step by step in tests and the scripts they start (compiling it costs
# seconds a process); tests/test_epilogue.py compiles it and compares the integers.
os.environ["INTSIM_COMPILE"] = "off"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_FMNIST = os.path.join(ROOT, "..", "shared", "data", "FashionMNIST")
FMNIST_CNN_BN = os.path.join(ROOT, "ckpt", "fashion-mnist_cnn_bn.pt")


@pytest.fixture(scope="session")
def data_dir():
    """The project's data/ folder with the real Fashion-MNIST (copied from ../shared/data if absent)."""
    path = os.path.join(ROOT, "data")
    raw = os.path.join(path, "FashionMNIST", "raw")
    if not os.path.isdir(raw):
        if not os.path.isdir(SHARED_FMNIST):
            pytest.fail("Fashion-MNIST is missing: copy it to data/FashionMNIST/raw (see README)")
        shutil.copytree(SHARED_FMNIST, os.path.join(path, "FashionMNIST"))
    return path


def _run(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


def _result_of(proc):
    """The RESULT dict of a finished script run (it must be the last line)."""
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert len(lines) == 1 and proc.stdout.rstrip().splitlines()[-1] == lines[0]
    return json.loads(lines[0][len("RESULT "):])


def _one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error:"), err
    for w in words:
        assert w in err, err


@pytest.fixture
def run():
    """run(script, *args) -> the finished process of `python script args` in the project root."""
    return _run


@pytest.fixture
def result_of():
    return _result_of


@pytest.fixture
def one_line_error():
    """one_line_error(proc, *words): exit status 2, one line `error: ...` naming `words`."""
    return _one_line_error


def _random_bn(c, g, dims=2):
    bn = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(c)
    bn.running_mean.copy_(torch.randn(c, generator=g))
    bn.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
    bn.weight.data.copy_(torch.randn(c, generator=g))
    bn.bias.data.copy_(torch.randn(c, generator=g))
    return bn.eval()


@pytest.fixture
def random_bn():
    """random_bn(c, generator, dims=2): an eval-mode BatchNorm with random statistics."""
    return _random_bn


@pytest.fixture
def trained_like():
    """trained_like(arch, seed=0): a narrow project network with random weights and BN statistics."""
    from model import ModelConfig, build_model

    def make(arch, seed=0):
        torch.manual_seed(seed)
        model = build_model(ModelConfig(arch=arch, width=8))
        g = torch.Generator().manual_seed(seed)
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                model.features[int(name.split(".")[1])] = _random_bn(m.num_features, g)
        return model.eval()
    return make


@pytest.fixture
def small_resnet18():
    """small_resnet18(seed=0): torchvision's ResNet18 with a 3x3 stem for 28x28 inputs, random
    weights and BN statistics."""
    import torchvision

    def make(seed=0):
        torch.manual_seed(seed)
        m = torchvision.models.resnet18(num_classes=10)
        m.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2)
                mod.weight.data.uniform_(0.5, 1.5)
                mod.bias.data.uniform_(-0.2, 0.2)
        return m.eval()
    return make


@pytest.fixture
def quantize():
    """quantize(model, qconfig, x) -> (qmodel, frozen): converted, calibrated on x, frozen."""
    from model import calibrate, convert
    from freezing import freeze

    def make(model, qconfig, x):
        qmodel = convert(model, qconfig)
        if not qconfig.float_activations:
            calibrate(qmodel, [(x, None)], "cpu", 1)
        return qmodel, freeze(qmodel)
    return make
