"""BRECQ: units found from the converted graph (residual blocks, single layers, groups), the
Fisher-diagonal weights against a hand-computed KL gradient, block reconstruction with learned
activation step sizes frozen into an integer model that matches its fake-quant, and BRECQ.py's
--dry-run end to end."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from AdaRound import beta_at
from config import QConfig
from frozen import output_integers, set_mode
from function import FLOAT_BITS
from model import activation_quantizers, calibrate, convert, qlayers, set_phase
from freezing import freeze
from reconstruct import find_units, fisher_weights, reconstruct_unit, unit_quantizers


def test_resnet18_is_stem_eight_basic_blocks_and_fc(small_resnet18):
    qmodel = convert(small_resnet18(), QConfig(w_bits=4, a_bits=FLOAT_BITS))
    units = find_units(qmodel)
    assert [u.kind for u in units] == ["layer"] + ["block"] * 8 + ["layer"]
    assert [u.name for u in units] == ["conv1"] + [f"layer{i}.{j}" for i in (1, 2, 3, 4) for j in (0, 1)] + ["fc"]
    downsampling = {"layer2.0", "layer3.0", "layer4.0"}
    for u in units[1:-1]:
        convs = ["conv1", "conv2"] + (["downsample.0"] if u.name in downsampling else [])
        assert [name for name, _ in u.layers] == [f"{u.name}.{c}" for c in convs]
        assert u.end.name.startswith("layer") and u.end.name.endswith("relu_1")    # the ReLU after the add
    # every quantized layer is in exactly one unit
    assert sorted(n for u in units for n, _ in u.layers) == sorted(n for n, _ in qlayers(qmodel))


def test_blocks_end_at_their_output_quantizer_when_asked(small_resnet18):
    qmodel = convert(small_resnet18(), QConfig(w_bits=4, a_bits=8))
    units = find_units(qmodel, to_quantizer=True)
    assert len(units) == 10
    for u, nxt in zip(units, units[1:]):
        if nxt.kind == "block":
            assert nxt.start is u.end                        # a block reads the previous unit's quantized output
    block = units[3]                                          # layer2.0: conv1, conv2, downsample, add
    names = [q.name for q in unit_quantizers(qmodel, block)]
    assert names == ["layer2.0.conv1.out", "layer2.0.conv2.out", "layer2.0.downsample.0.out", "add_2_out"]


def test_bottleneck_blocks_of_resnet50_are_found():
    import torchvision
    qmodel = convert(torchvision.models.resnet50(num_classes=10).eval(), QConfig(w_bits=4, a_bits=FLOAT_BITS))
    units = find_units(qmodel)
    blocks = [u for u in units if u.kind == "block"]
    assert len(blocks) == 16 and len(units) == 18
    assert sum(len(u.layers) == 4 for u in blocks) == 4      # conv1-3 and the downsample conv


def test_cnn_bn_has_no_blocks_and_groups_consecutive_layers(trained_like):
    qmodel = convert(trained_like("cnn_bn"), QConfig(w_bits=2, a_bits=8))
    assert [(u.kind, u.name) for u in find_units(qmodel)] == [
        ("layer", "features.0"), ("layer", "features.4"), ("layer", "classifier")]
    grouped = find_units(qmodel, layers_per_group=2)
    assert [(u.kind, [n for n, _ in u.layers]) for u in grouped] == [
        ("group", ["features.0", "features.4"]), ("layer", ["classifier"])]
    assert [(u.kind, len(u.layers)) for u in find_units(qmodel, layers_per_group=3)] == [("group", 3)]


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 4)
        for p in self.parameters():
            p.data.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_fisher_weights_are_the_kl_gradient_plus_one():
    model = TwoLayers().eval()
    qmodel = convert(model, QConfig(w_bits=3, a_bits=FLOAT_BITS))
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp = model(x)
    u = find_units(qmodel)[0]                                  # fc1 and its ReLU
    weights = fisher_weights(qmodel, u, x, fp, "cpu", batch_size=4)
    # by hand: z = relu(x Wq^T + b) with fc1's 3-bit weights, the rest float; KL(p || softmax(out))
    # averaged over a batch of B = 4 has d/d out = (softmax(out) - p) / B, and d/dz = that W2
    set_phase(qmodel, "fakequant")
    layer = qlayers(qmodel)[0][1]
    wq = layer.w_quantizer(model.fc1.weight.detach())
    assert not torch.equal(wq, model.fc1.weight)              # fc1 really is quantized here
    z = torch.relu(x @ wq.T + model.fc1.bias)
    out = z @ model.fc2.weight.T + model.fc2.bias
    grad = (torch.softmax(out, 1) - torch.softmax(fp, 1)) / 4 @ model.fc2.weight
    assert torch.allclose(weights, grad.abs() + 1, atol=1e-6)


class Residual(nn.Module):
    """x -> conv -> [conv, relu, conv] + x -> relu -> pool -> fc: one block between two layers."""
    def __init__(self, c=4):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.b(torch.relu(self.a(x))) + x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def int_vs_fakequant(qmodel, images):
    """(largest difference, share identical) of the frozen integer model's output integers
    against the fake-quant model's on `images`."""
    set_phase(qmodel, "fakequant")
    with torch.no_grad():
        fq = qmodel(images)
    frozen = set_mode(freeze(qmodel), "int")
    s, z = activation_quantizers(qmodel)[-1].qparams()
    diff = (output_integers(frozen, frozen(images)).double() - (torch.round(fq / s) + z)).abs()
    return float(diff.max()), float((diff == 0).double().mean())


def test_block_reconstruction_learns_step_sizes_that_freeze_exactly():
    torch.manual_seed(0)
    model = Residual().eval()
    images = torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    qmodel = convert(model, QConfig(w_bits=2, a_bits=4, per_channel=True, single_rounding=True))
    calibrate(qmodel, [(images, None)], "cpu", 1)
    units = find_units(qmodel, to_quantizer=True)
    assert [u.kind for u in units] == ["layer", "block", "layer"]
    block = units[1]
    quantizers = unit_quantizers(qmodel, block)
    assert len(quantizers) == 3                                # after a, after b, after the add
    started = [float(q.scale) for q in quantizers]
    before = int_vs_fakequant(qmodel, images)
    with torch.no_grad():
        fp = model(images)
    stats = reconstruct_unit(qmodel, block, images, "cpu", 200, 32, 1e-2, 0.01, torch.Generator().manual_seed(0),
                             beta_at, fp_logits=fp, scale_lr=1e-3)
    assert stats["layers"] == ["a", "b"] and stats["step_sizes"] == 3
    assert stats["loss_after"] < stats["loss_nearest"]
    assert all(q.learned for q in quantizers) and all(float(q.qparams()[0]) != s for q, s in zip(quantizers, started))
    # the learned (S, Z) are the frozen model's: each is the output of one frozen op
    frozen = freeze(qmodel)
    frozen_qparams = [(float(m.out_scale), int(m.out_zero_point)) for m in frozen.modules() if hasattr(m, "out_scale")]
    for q in quantizers:
        s, z = q.qparams()
        assert (float(s), int(z)) in frozen_qparams, q.name
    # and the integer path agrees with the fake-quant model as well as before (this toy net's
    # TFLite add and mean already differ from float rounding by up to 2 steps at 4 bits)
    after = int_vs_fakequant(qmodel, images)
    assert after[0] <= max(before[0], 1) and after[1] >= before[1] - 0.03, (before, after)


@pytest.mark.slow
def test_brecq_dry_run(run, result_of, tmp_path, data_dir):
    r = result_of(run("BRECQ.py", "--model", "cnn", "--w-bits", "4", "--a-bits", "4", "--per-channel",
                      "--first-last-bits", "8",
                      "--layers-per-group", "2", "--dry-run", "--save", tmp_path / "b.pt", "--plot", tmp_path / "h.png"))
    assert r["method"] == "brecq" and r["script"] == "BRECQ" and r["loss"] == "fisher" and r["scale_lr"] > 0
    assert [(u["kind"], u["layers"], u["step_sizes"]) for u in r["units"]] == [
        ("group", ["features.0", "features.3"], 2), ("layer", ["classifier"], 1)]
    assert r["first_last_bits"] == 8 and r["int_fq_same_class"] >= 98 and r["int_acc"] > 85
    assert (tmp_path / "b.pt").is_file() and (tmp_path / "h.png").is_file()
