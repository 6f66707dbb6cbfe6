"""Residual add and global average pooling in integers, against plain-Python transcriptions of
TFLite's reference ADD kernel and of the quantized mean; and a ResNet18 through the generic
conversion."""
import random

import pytest
import torch
import torchvision
from torch import nn

from function import IntsimError, qrange
from model import calibrate, convert, freeze, output_integers, qlayers, set_mode
from module import QAdd, QAvgPool, QConfig
from test_function import ref_mbqm, ref_quantize_multiplier


def ref_tflite_add(q1, z1, s1, q2, z2, s2, z_out, s_out, qmin, qmax, relu):
    """reference_ops::Add for uint8 as TFLite prepares it (QuantizeMultiplierSmallerThanOneExp
    for every multiplier, left_shift 20), one element at a time in Python integers."""
    left_shift = 20
    twice_max = 2 * max(s1, s2)
    m1, sh1 = ref_quantize_multiplier(s1 / twice_max)
    m2, sh2 = ref_quantize_multiplier(s2 / twice_max)
    mo, sho = ref_quantize_multiplier(twice_max / ((1 << left_shift) * s_out))
    a1 = ref_mbqm((q1 - z1) * (1 << left_shift), m1, sh1)
    a2 = ref_mbqm((q2 - z2) * (1 << left_shift), m2, sh2)
    out = ref_mbqm(a1 + a2, mo, sho) + z_out
    lo = z_out if relu else qmin
    return min(max(out, lo), qmax)


def frozen_add(s1, z1, s2, z2, s_out, z_out, relu, bits=8):
    add = QAdd(QConfig(a_bits=bits), relu=relu)
    add.act.min_val.fill_(-s_out * z_out)                  # a range whose (S, Z) is (s_out, z_out)
    add.act.max_val.fill_(s_out * (2 ** bits - 1 - z_out))
    f32 = lambda v: torch.tensor([v], dtype=torch.float32)
    add.freeze((f32(s1), torch.tensor([z1])), (f32(s2), torch.tensor([z2])))
    s, z = add.output_qparams()
    return add, float(s), int(z)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_integer_add_equals_tflite_reference_bit_for_bit(relu, bits):
    rnd = random.Random(bits + relu)
    qmin, qmax = qrange(bits, symmetric=False)
    for trial in range(20):
        s1, s2 = rnd.uniform(0.001, 0.1), rnd.uniform(0.001, 0.1)
        z1, z2 = rnd.randint(qmin, qmax), rnd.randint(qmin, qmax)
        # trial 0..4: a narrow output range, so that many sums saturate at QMIN/QMAX
        s_out = rnd.uniform(0.001, 0.01) if trial < 5 else rnd.uniform(0.01, 0.2)
        add, s_out, z_out = frozen_add(s1, z1, s2, z2, s_out, rnd.randint(qmin, qmax), relu, bits)
        s1_, s2_ = float(add.in_scale1), float(add.in_scale2)        # as stored (float32)
        q1 = torch.randint(qmin, qmax + 1, (400,), dtype=torch.int32)
        q2 = torch.randint(qmin, qmax + 1, (400,), dtype=torch.int32)
        add.set_mode("int")
        got = add(q1, q2).tolist()
        want = [ref_tflite_add(a, z1, s1_, b, z2, s2_, z_out, s_out, qmin, qmax, relu)
                for a, b in zip(q1.tolist(), q2.tolist())]
        assert got == want
        if trial < 5:
            assert qmin in got or qmax in got or (relu and z_out in got)   # saturation exercised


def test_integer_add_follows_the_real_sum():
    add, s_out, z_out = frozen_add(0.05, 3, 0.02, 200, 0.06, 100, relu=False)
    q1, q2 = torch.arange(256, dtype=torch.int32), torch.arange(255, -1, -1, dtype=torch.int32)
    add.set_mode("int")
    got = add(q1, q2).double()
    real = 0.05 * (q1.double() - 3) + float(add.in_scale2) * (q2.double() - 200)
    exact = torch.clamp(torch.round(real / s_out) + z_out, 0, 255)
    assert (got - exact).abs().max() <= 1


def ref_mean(q, z_in, s_in, s_out, z_out, qmin, qmax):
    """Global average pooling of a list of integers: int32 sum, then the fixed-point rescale."""
    m0, shift = ref_quantize_multiplier(s_in / (len(q) * s_out))
    return min(max(ref_mbqm(sum(v - z_in for v in q), m0, shift) + z_out, qmin), qmax)


def test_integer_average_pool_equals_reference():
    g = torch.Generator().manual_seed(0)
    pool = QAvgPool(QConfig())
    x = torch.rand(4, 6, 7, 7, generator=g) * 3
    pool.set_mode("calibrate")
    pool(x)
    pool.set_mode("float")
    s_in, z_in = torch.tensor([3 / 255]), torch.tensor([5])
    pool.freeze(s_in, z_in)
    s_out, z_out = (float(v) for v in pool.output_qparams())
    q = torch.randint(0, 256, (4, 6, 7, 7), generator=g, dtype=torch.int32)
    pool.set_mode("int")
    got = pool(q)
    assert got.shape == (4, 6, 1, 1)
    want = [ref_mean(q[b, c].flatten().tolist(), 5, float(s_in), s_out, int(z_out), 0, 255)
            for b in range(4) for c in range(6)]
    assert got.flatten().tolist() == want
    with pytest.raises(Exception, match="frozen for 49 positions"):
        pool(q[:, :, :5, :5])


def small_resnet18(seed=0):
    """torchvision's ResNet18 with a 3x3 stem for 28x28 inputs, random weights and BN statistics."""
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


def test_resnet18_goes_through_the_generic_conversion_and_runs_in_integers():
    model = small_resnet18()
    x = torch.randn(16, 1, 28, 28)
    qmodel = convert(model, QConfig(per_channel=True, single_rounding=True))
    assert torch.allclose(qmodel(x), model(x), atol=1e-4)                # BN folded, ReLUs fused
    names = [type(m).__name__ for m in qmodel.modules()]
    assert names.count("QLayer") == 21 and names.count("QAdd") == 8 and names.count("QAvgPool") == 1
    assert all(m.relu for m in qmodel.modules() if isinstance(m, QAdd))  # the ReLU after each add
    downsample = [n for n, _ in qlayers(qmodel) if "downsample" in n]
    assert len(downsample) == 3 and all(qmodel.get_submodule(n).bn is not None for n in downsample)
    calibrate(qmodel, [(x, None)], "cpu", 1)
    freeze(qmodel)
    set_mode(qmodel, "fakequant")
    fq = qmodel.double()(x.double())
    qmodel.float()
    set_mode(qmodel, "int")
    it = qmodel(x)
    # with single rounding every layer, add and pool equals the float64 fake-quant exactly here
    assert torch.equal(output_integers(qmodel, it), output_integers(qmodel, fq))


@pytest.mark.parametrize("per_channel", [False, True])
def test_resnet18_fake_quant_at_16_bits_matches_the_float_model(per_channel):
    """Folding BN (downsample convs too), fusing the ReLUs and the adds preserved the function:
    at W16A16 the fake-quant logits are the float model's up to 16-bit rounding; at W8A8 they
    are not (so the tolerance is tight enough to notice a quantizer that does nothing)."""
    model = small_resnet18()
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    calib = x                                   # calibrated on the scored images: nothing clipped
    want = model(x)
    err = {}
    for bits in (16, 8):
        qmodel = convert(model, QConfig(bits, bits, per_channel=per_channel))
        calibrate(qmodel, [(calib, None)], "cpu", 1)
        freeze(qmodel)
        set_mode(qmodel, "fakequant")
        with torch.no_grad():
            err[bits] = float((qmodel(x) - want).abs().max() / want.abs().max())
    assert err[16] < 1e-3, err
    assert err[8] > 20 * err[16], err
    with pytest.raises(IntsimError, match="up to 8 bits"):                  # no 16-bit integer kernels
        qmodel_16 = convert(model, QConfig(16, 16))
        calibrate(qmodel_16, [(calib, None)], "cpu", 1)
        freeze(qmodel_16)
        set_mode(qmodel_16, "int")


def test_imagenet_subset_is_labelled_from_the_full_wnid_list():
    import os
    from conftest import ROOT
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
    from function import IntsimError
    with pytest.raises(IntsimError, match="ImageNet folder .* not found"):
        load_imagenet_folder(str(tmp_path / "nope"))


def test_imagenet_bad_input_gives_one_line_errors(tmp_path):
    from test_scripts import FMNIST_CNN_BN, assert_one_line_error, run
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


def test_split_then_ptq_on_imagenet_folders_with_random_weights(tmp_path):
    """split_images.py makes disjoint parts (every image once); PTQ.py calibrates on one part and
    scores the other, end to end through the integer ResNet18 at 224x224."""
    from PIL import Image
    from test_scripts import result_of, run
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


def test_every_script_runs_resnet18_on_fashion_mnist(data_dir, tmp_path):
    """train.py -> PTQ.py, QAT.py, AdaRound.py and rounding.py (Table 1) on a ResNet18, with
    --dry-run sizes: the same generic conversion, no ResNet-specific code in any script."""
    from test_scripts import result_of, run
    common = ["--model", "resnet18", "--dry-run", "--data-dir", data_dir]
    r = result_of(run("train.py", *common, "--ckpt-dir", tmp_path, "--resume-dir", tmp_path))
    ckpt = tmp_path / "fashion-mnist_resnet18.pt"
    assert r["model"] == "resnet18" and ckpt.stat().st_size < 25e6           # float16 storage
    common += ["--ckpt", ckpt, "--test-limit", 200]              # --dry-run's 1000, fewer
    r = result_of(run("PTQ.py", *common, "--per-channel"))
    assert r["model"] == "resnet18" and r["test_images"] == 200 and "int_acc" in r
    r = result_of(run("QAT.py", *common, "--epochs", 1, "--save", tmp_path / "qat.pt"))
    assert r["model"] == "resnet18" and "int_acc" in r
    r = result_of(run("AdaRound.py", *common, "--a-bits", 8, "--save", tmp_path / "ada.pt",
                      "--plot", tmp_path / "h.png"))
    assert len(r["layers"]) == 21 and "int_acc" in r                        # every conv and the fc
    r = result_of(run("rounding.py", *common, "--plot", tmp_path / "t1.png"))
    assert r["model"] == "resnet18" and r["draws"] == 3 and (tmp_path / "t1.png").exists()
