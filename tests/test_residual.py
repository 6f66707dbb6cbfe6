"""ResNet18 through the generic conversion (residual adds, global average pooling, BN folded
into the downsample convs), and the ImageNet data path on the real validation images."""
import os

import pytest
import torch
import torchvision

from conftest import FMNIST_CNN_BN, ROOT
from config import QConfig
from errors import IntsimError
from frozen import output_integers, set_mode
from ops.add import IntAdd
from ops.conv import IntConv
from ops.mean import IntMean
from model import calibrate, convert, qlayers
from freezing import freeze


def test_resnet18_goes_through_the_generic_conversion_and_runs_in_integers(small_resnet18):
    model = small_resnet18()
    x = torch.randn(16, 1, 28, 28)
    qmodel = convert(model, QConfig(per_channel=True, single_rounding=True))
    assert torch.allclose(qmodel(x), model(x), atol=1e-4)                # BN folded
    downsample = [n for n, _ in qlayers(qmodel) if "downsample" in n]
    assert len(downsample) == 3 and all(qmodel.get_submodule(n).bn is not None for n in downsample)
    calibrate(qmodel, [(x, None)], "cpu", 1)
    frozen = freeze(qmodel)
    ops = [type(m) for m in frozen.modules()]
    assert ops.count(IntConv) == 21 and ops.count(IntAdd) == 8 and ops.count(IntMean) == 1
    adds = [m for m in frozen.modules() if isinstance(m, IntAdd)]
    assert all(m.act_min == int(m.out_zero_point) for m in adds)         # the ReLU after each add: a clamp
    fq = set_mode(frozen, "reals").double()(x.double())
    frozen.float()
    it = set_mode(frozen, "int")(x)
    # with single rounding every layer, add and pool equals the float64 fake-quant exactly here
    assert torch.equal(output_integers(frozen, it), output_integers(frozen, fq))


@pytest.mark.parametrize("per_channel", [False, True])
def test_resnet18_fake_quant_at_16_bits_matches_the_float_model(per_channel, small_resnet18):
    """Folding BN (downsample convs too), fusing the ReLUs and the adds preserved the function:
    at W16A16 the fake-quant logits are the float model's up to 16-bit rounding; at W8A8 they
    are not (so the tolerance is tight enough to notice a quantizer that does nothing)."""
    model = small_resnet18()
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    calib = x                                   # calibrated on the scored images: nothing clipped
    want = model(x)
    err = {}
    for bits in (16, 8):
        qmodel = convert(model, QConfig(w_bits=bits, a_bits=bits, per_channel=per_channel))
        calibrate(qmodel, [(calib, None)], "cpu", 1)
        with torch.no_grad():
            err[bits] = float((set_mode(freeze(qmodel), "reals")(x) - want).abs().max() / want.abs().max())
    assert err[16] < 1e-3, err
    assert err[8] > 20 * err[16], err


def test_imagenet_subset_is_labelled_from_the_full_wnid_list():
    from data import imagenet_class_index, load_imagenet_folder
    folder = os.path.join(ROOT, "..", "shared", "data", "imagenet-val-1300", "val")
    if not os.path.isdir(folder):
        pytest.skip("the ImageNet subset is not beside the project")
    index = imagenet_class_index()
    assert len(index) == 1000 and index["n01440764"] == 0 and index["n15075141"] == 999
    present = sorted(os.listdir(folder))
    assert len(present) == 725                        # ImageFolder would number these 0..724
    x, y = load_imagenet_folder(folder, limit=40)
    assert x.shape == (40, 3, 224, 224) and abs(float(x.mean())) < 1.0
    first = [w for w in present if os.listdir(os.path.join(folder, w))]
    expected = []
    for w in first:
        expected += [index[w]] * len(os.listdir(os.path.join(folder, w)))
    assert y.tolist() == expected[:40]
    # a class missing from the subset shifts ImageFolder's numbering; ours stays on the wnid list
    assert any(index[w] != i for i, w in enumerate(present))


def test_missing_imagenet_folder_is_a_one_line_error(tmp_path):
    from data import load_imagenet_folder
    with pytest.raises(IntsimError, match="ImageNet folder .* not found"):
        load_imagenet_folder(str(tmp_path / "nope"))


@pytest.mark.slow
def test_imagenet_bad_input_gives_one_line_errors(tmp_path, run, one_line_error):
    assert_one_line_error = one_line_error
    val = tmp_path / "val"
    (val / "n01440764").mkdir(parents=True)
    calib = tmp_path / "calib"
    calib.mkdir()
    common = ["--dataset", "imagenet", "--model", "resnet18", "--data-dir", val]
    assert_one_line_error(run("PTQ.py", *common, "--weights", "x.pt"), "--calib-dir")
    assert_one_line_error(run("PTQ.py", *common, "--calib-dir", val, "--weights", "x.pt"), "calibrate on other images")
    assert_one_line_error(run("PTQ.py", *common, "--calib-dir", calib), "needs --weights")
    # offline, torchvision's download fails: say what to pass instead
    assert_one_line_error(run("PTQ.py", *common, "--calib-dir", calib, "--weights", "IMAGENET1K_V1"), "--weights PATH")
    assert_one_line_error(run("PTQ.py", *common, "--calib-dir", calib, "--weights", FMNIST_CNN_BN),
                          "intsim checkpoint of cnn_bn", "fashion-mnist")
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "other.pt")
    assert_one_line_error(run("PTQ.py", *common, "--calib-dir", calib, "--weights", tmp_path / "other.pt"),
                          "does not hold torchvision ResNet18")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pt")
    from PIL import Image
    (calib / "n01443537").mkdir()
    Image.new("RGB", (8, 8)).save(calib / "n01443537" / "a.JPEG")
    assert_one_line_error(run("PTQ.py", *common[:-1], tmp_path / "missing", "--calib-dir", calib,
                              "--weights", tmp_path / "r18.pt"), "ImageNet folder", "not found")


@pytest.mark.slow
def test_split_then_ptq_on_imagenet_folders_with_random_weights(tmp_path, run, result_of):
    """split_images.py makes disjoint parts (every image once); PTQ.py calibrates on one part and
    scores the other, end to end through the integer ResNet18 at 224x224."""
    from PIL import Image
    src = tmp_path / "val"
    g = torch.Generator().manual_seed(0)
    for k, wnid in enumerate(["n01440764", "n01443537", "n15075141"]):
        (src / wnid).mkdir(parents=True)
        for i in range(2):
            pixels = torch.randint(0, 256, (40, 50, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(src / wnid / f"ILSVRC2012_val_{2 * k + i:08d}.JPEG")
    proc = run("split_images.py", src, tmp_path / "parts", "--parts", 2)
    assert proc.returncode == 0, proc.stderr
    parts = [sorted(p.name for p in (tmp_path / "parts" / f"part{i}").rglob("*.JPEG")) for i in range(2)]
    assert len(parts[0]) == len(parts[1]) == 3 and not set(parts[0]) & set(parts[1])
    assert run("split_images.py", src, tmp_path / "parts").returncode == 0          # rerun: same links
    r = result_of(run("PTQ.py", "--dataset", "imagenet", "--model", "resnet18", "--weights", "random",
                      "--calib-dir", tmp_path / "parts" / "part0", "--data-dir", tmp_path / "parts" / "part1",
                      "--per-channel"))
    assert r["test_images"] == 3 and r["calib_images"] == 3 and r["weights"] == "random"
    assert 0 <= r["int_fq_same_class"] <= 100 and r["int_classes_predicted"] >= 1


@pytest.mark.slow
def test_every_script_runs_resnet18_on_fashion_mnist(data_dir, tmp_path, run, result_of):
    """train.py -> PTQ.py, QAT.py, AdaRound.py and table1.py (Table 1) on a ResNet18, with
    --dry-run sizes cut further (100 test images, 5 AdaRound iterations on 32 images, 2 Table 1 draws):
    the same generic conversion, no ResNet-specific code in any script."""
    common = ["--model", "resnet18", "--dry-run", "--data-dir", data_dir]
    r = result_of(run("train.py", *common, "--ckpt-dir", tmp_path, "--resume-dir", tmp_path))
    ckpt = tmp_path / "fashion-mnist_resnet18.pt"
    assert r["model"] == "resnet18" and ckpt.stat().st_size < 25e6           # float16 storage
    common += ["--ckpt", ckpt, "--test-limit", 100]              # --dry-run's 1000, fewer
    r = result_of(run("PTQ.py", *common, "--per-channel"))
    assert r["model"] == "resnet18" and r["test_images"] == 100 and "int_acc" in r
    r = result_of(run("QAT.py", *common, "--epochs", 1, "--save", tmp_path / "qat.pt"))
    assert r["model"] == "resnet18" and "int_acc" in r
    r = result_of(run("AdaRound.py", *common, "--a-bits", 8, "--iters", 5, "--num-calib", 32,
                      "--save", tmp_path / "ada.pt", "--plot", tmp_path / "h.png"))
    assert len(r["layers"]) == 21 and "int_acc" in r                        # every conv and the fc
    assert (r["iters"], r["num_calib"]) == (5, 32)                          # smaller than --dry-run's: kept
    r = result_of(run("table1.py", *common, "--draws", 2, "--hessian-images", 64, "--plot", tmp_path / "t1.png"))
    assert r["model"] == "resnet18" and r["draws"] == 2 and (tmp_path / "t1.png").exists()
