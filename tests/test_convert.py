"""The one conversion and the phases: a converted model computes the float function, its
frozen integer path agrees with its frozen fake-quant, and what it cannot convert it refuses
in one line; tried on networks this project did not write."""
import re

import torch
import torch.nn.functional as F
import torchvision
import pytest
from torch import nn

from config import QConfig
from errors import IntsimError
from frozen import output_integers, set_mode
from model import activation_quantizers, calibrate, convert, qlayers, set_phase
from freezing import freeze


def integers(frozen, x, mode):
    """Output integers of the frozen model: integer path, or the fake-quant in float64."""
    set_mode(frozen, mode)
    if mode == "int":
        return output_integers(frozen, frozen(x))
    q = output_integers(frozen, frozen.double()(x.double()))
    frozen.float()
    return q


def test_converted_model_in_float_phase_equals_float_model(trained_like):
    model = trained_like("cnn_bn")
    qmodel = convert(model, QConfig())
    x = torch.randn(8, 1, 28, 28)
    assert torch.allclose(qmodel(x), model(x), atol=1e-5)
    assert [type(m).__name__ for m in qmodel.modules() if isinstance(m, nn.BatchNorm2d)] == ["BatchNorm2d"] * 2
    assert [n for n, _ in qlayers(qmodel)] == ["features.0", "features.4", "classifier"]
    # one quantizer per activation tensor, behind each ReLU and max-pool: input, 2 convs, logits
    assert [q.name for q in activation_quantizers(qmodel)] == ["quant_in", "features.0.out", "features.4.out",
                                                               "classifier.out"]


@pytest.mark.parametrize("w_bits", range(2, 9))
@pytest.mark.parametrize("a_bits", [2, 4, 8])
def test_every_bit_width_runs(w_bits, a_bits, trained_like, quantize):
    x = torch.randn(16, 1, 28, 28)
    _, frozen = quantize(trained_like("cnn_bn"), QConfig(w_bits=w_bits, a_bits=a_bits, per_channel=w_bits % 2 == 0), x)
    q = integers(frozen, x, "int")
    assert q.min() >= 0 and q.max() <= 2 ** a_bits - 1
    for name in ("features.0", "features.4", "classifier"):
        w_q = frozen.get_submodule(name).w_q
        assert w_q.min() >= -(2 ** (w_bits - 1) - 1) and w_q.max() <= 2 ** (w_bits - 1) - 1


@pytest.mark.parametrize("arch,per_channel,a_signed", [("cnn", False, False), ("cnn_bn", True, False),
                                                       ("cnn_bn", True, True)])
def test_single_rounding_integer_path_equals_float64_fake_quant_exactly(arch, per_channel, a_signed, trained_like,
                                                                        quantize):
    """With one rounding the integer path computes round(acc * M) exactly as the float64
    simulation does (up to M0's 2^-31 relative error): every output integer is equal. Also with
    TFLite's int8 activations ([-128, 127] with a zero point)."""
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    qconfig = QConfig(per_channel=per_channel, single_rounding=True, a_signed=a_signed)
    _, frozen = quantize(trained_like(arch), qconfig, x)
    q = integers(frozen, x, "int")
    assert torch.equal(q, integers(frozen, x, "reals"))
    assert (q.min() < 0) == a_signed


def test_double_rounding_differs_from_fake_quant_by_at_most_one_and_rarely(trained_like, quantize):
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    _, frozen = quantize(trained_like("cnn_bn"), QConfig(), x)
    diff = (integers(frozen, x, "int") - integers(frozen, x, "reals")).abs()
    assert diff.max() == 1 and 0 < (diff > 0).float().mean() < 0.25   # it does differ, by 1 at most


def test_freeze_needs_calibration_and_int_mode_needs_integer_activations(trained_like):
    qmodel = convert(trained_like("cnn"), QConfig())
    with pytest.raises(IntsimError, match="calibrate"):
        freeze(qmodel)
    with pytest.raises(IntsimError, match="unknown phase 'int'"):
        set_phase(qmodel, "int")
    weights_only = freeze(convert(trained_like("cnn"), QConfig(a_bits=32)))
    with pytest.raises(IntsimError, match="integer activations"):
        set_mode(weights_only, "int")
    with pytest.raises(IntsimError, match="up to 8 bits"):
        x = torch.randn(4, 1, 28, 28)
        q16 = convert(trained_like("cnn"), QConfig(w_bits=16, a_bits=16))
        calibrate(q16, [(x, None)], "cpu", 1)
        set_mode(freeze(q16), "int")


def test_each_phase_refuses_a_model_of_another_phase(trained_like):
    """Fake-quant before calibration (it would round with S = 1, Z = 0: all-zero logits), a
    frozen model given to calibrate / set_phase / freeze, a converted one to set_mode: one line each."""
    x = torch.randn(4, 1, 28, 28)
    qmodel = convert(trained_like("cnn"), QConfig())
    set_phase(qmodel, "fakequant")
    with pytest.raises(IntsimError, match="quant_in has no range yet: calibrate"):
        qmodel(x)
    set_phase(qmodel, "qat").eval()
    with pytest.raises(IntsimError, match="has no range yet"):
        qmodel(x)
    with pytest.raises(IntsimError, match="this one is converted, not frozen: frozen = freeze"):
        set_mode(qmodel, "int")
    with pytest.raises(IntsimError, match="set_mode takes a frozen model"):
        set_mode(qmodel, "reals")
    calibrate(qmodel, [(x, None)], "cpu", 1)
    frozen = freeze(qmodel)
    for step in (lambda: calibrate(frozen, [(x, None)], "cpu", 1), lambda: set_phase(frozen, "float"),
                 lambda: freeze(frozen)):
        with pytest.raises(IntsimError, match="takes a model made by convert.*frozen already"):
            step()
    with pytest.raises(IntsimError, match="this is a SmallCNN: convert it first"):
        calibrate(trained_like("cnn"), [(x, None)], "cpu", 1)
    assert set_phase(qmodel, "fakequant")(x).abs().sum() > 0       # calibrated: it runs


@pytest.mark.parametrize("qconfig,words", [
    (QConfig(w_bits=9), "features.0 (IntConv) has 9-bit weights"),
    (QConfig(a_bits=9), "quant_in (Quantize) has 9-bit activations"),
    (QConfig(w_bits=4, a_bits=10, first_last_bits=8), "has 10-bit activations")])
def test_no_integer_path_says_which_op_is_too_wide(qconfig, words, trained_like, quantize, capsys):
    from engine import print_frozen_report
    _, frozen = quantize(trained_like("cnn"), qconfig, torch.randn(4, 1, 28, 28))
    with pytest.raises(IntsimError, match=f"up to 8 bits .*{re.escape(words)}"):
        set_mode(frozen, "int")
    print_frozen_report(90.0, {"fakequant_acc": 80.0}, frozen)          # what the scripts print instead
    assert words in capsys.readouterr().out


def test_a_max_pool_on_the_input_and_nn_flatten_run_in_integers(quantize):
    """The input is quantized before a max-pool or ReLU on it (they commute with quantization),
    and nn.Flatten moves integers: the frozen model has its integer path, equal to the float64
    fake-quant with one rounding, and within 1 of the calibrated model's fake-quant (which has the
    pool before the input's quantizer, float biases and exact multipliers)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 5 * 5, 3)).eval()
    x = torch.randn(32, 1, 10, 10)
    qmodel, frozen = quantize(net, QConfig(single_rounding=True), x)
    kinds = [type(m).__name__ for m in frozen.children()]
    assert kinds[:3] == ["Quantize", "IntMaxPool", "IntClamp"] and "Flatten" not in kinds
    q = integers(frozen, x, "int")
    assert torch.equal(q, integers(frozen, x, "reals"))
    fq = set_phase(qmodel, "fakequant")(x).double()
    assert (output_integers(frozen, fq) - q).abs().max() <= 1


def test_dead_layer_with_zero_range_quantizes_without_nan(trained_like, quantize):
    model = trained_like("cnn")
    model.features[0].bias.data.fill_(-100.0)          # ReLU output is 0 everywhere: a zero range
    x = torch.randn(8, 1, 28, 28)
    qmodel, frozen = quantize(model, QConfig(), x)
    out = set_mode(frozen, "int")(x)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, set_phase(qmodel, "float")(x), atol=0.1)    # the output is just the (quantized) bias


def test_output_bits_apply_to_the_logits_only(trained_like, quantize):
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    _, frozen = quantize(trained_like("cnn_bn"), QConfig(w_bits=4, a_bits=4, per_channel=True, out_bits=8,
                                                         single_rounding=True), x)
    set_mode(frozen, "int")
    hidden = frozen.get_submodule("features.0")(frozen.quant_in(x))
    q = integers(frozen, x, "int")
    assert hidden.max() <= 15 and q.max() <= 255 and len(torch.unique(q)) > 16
    assert torch.equal(q, integers(frozen, x, "reals"))          # still exact
    with pytest.raises(IntsimError, match="output bits"):
        QConfig(out_bits=17)


class ConvFlatten(nn.Module):
    """Logits out of a flatten after a conv (no linear layer)."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 28)

    def forward(self, x):
        return torch.flatten(self.conv(x), 1)


class PoolLogits(nn.Module):
    """Logits out of the global average pool."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(F.relu(self.conv(x))).flatten(1)


@pytest.mark.parametrize("net", [ConvFlatten, PoolLogits])
def test_output_bits_reach_logits_behind_flatten_and_pooling(net, quantize):
    torch.manual_seed(0)
    x = torch.randn(64, 1, 28, 28)
    _, frozen = quantize(net().eval(), QConfig(a_bits=4, out_bits=8, single_rounding=True), x)
    q = integers(frozen, x, "int")
    assert q.max() > 15 and len(torch.unique(q)) > 16             # 8-bit logits, not 4
    assert torch.equal(q, integers(frozen, x, "reals"))


class Twice(nn.Module):
    """One conv called twice: `c(relu(c(x)))`."""
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.c(F.relu(self.c(x))).mean((2, 3))


def test_a_module_called_twice_gets_its_own_quantizers_at_each_call(quantize):
    torch.manual_seed(0)
    model = Twice().eval()
    x = torch.randn(32, 3, 8, 8)
    qmodel, frozen = quantize(model, QConfig(per_channel=True, single_rounding=True), x)
    assert [n for n, _ in qlayers(qmodel)] == ["c", "c_call2"]
    assert qlayers(qmodel)[0][1].layer is qlayers(qmodel)[1][1].layer          # the float weights are shared
    assert torch.allclose(set_phase(qmodel, "float")(x), model(x), atol=1e-5)
    # each call site has its own input scale: the integers agree with the fake-quant everywhere
    assert float(frozen.c.in_scale) != float(frozen.c_call2.in_scale)
    assert torch.equal(integers(frozen, x, "int"), integers(frozen, x, "reals"))


class Spellings(nn.Module):
    """The same ops spelt the other ways: x.add(y), torch.relu_, Dropout2d, x.view(x.shape[0], -1),
    a ReLU after a max-pool, a pre-ReLU value used twice, ReLU6, Linear -> BatchNorm1d."""
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.drop, self.pool = nn.Dropout2d(0.3), nn.MaxPool2d(2)
        self.fc, self.bn = nn.Linear(64, 8), nn.BatchNorm1d(8)
        self.act6 = nn.ReLU6()

    def forward(self, x):
        y = self.a(x)
        z = torch.relu_(self.pool(self.b(F.relu(y))))      # conv -> max-pool -> ReLU
        y = self.pool(y).add(z)                              # y used before its ReLU and here
        y = self.drop(self.act6(y))
        return F.relu(self.bn(self.fc(y.view(y.shape[0], -1))))


def test_spellings_of_supported_ops_convert_and_stay_exact(quantize, random_bn):
    torch.manual_seed(0)
    model = Spellings()
    model.bn = random_bn(8, torch.Generator().manual_seed(1), dims=1)
    model.eval()
    x = torch.randn(32, 2, 8, 8)
    qmodel, frozen = quantize(model, QConfig(single_rounding=True), x)
    assert torch.allclose(set_phase(qmodel, "float")(x), model(x), atol=1e-5)
    assert qlayers(qmodel)[-1][1].bn is not None                         # BatchNorm1d folded into fc
    assert torch.equal(integers(frozen, x, "int"), integers(frozen, x, "reals"))


class WithParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.p = nn.Conv2d(1, 2, 3), nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.c(x) + self.p


class FunctionalNorm(nn.Module):
    """ConvNeXt's LayerNorm2d: F.layer_norm on a permuted tensor with the module's parameters."""
    def __init__(self):
        super().__init__()
        self.c, self.weight, self.bias = nn.Conv2d(1, 2, 3), nn.Parameter(torch.ones(2)), nn.Parameter(torch.zeros(2))

    def forward(self, x):
        y = F.layer_norm(self.c(x).permute(0, 2, 3, 1), (2,), self.weight, self.bias)
        return y.permute(0, 3, 1, 2)


class Tuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return self.c(x), x


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return self.c(x) if x.sum() > 0 else x


class DropoutAlways(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return F.dropout(self.c(x), 0.5)


class FunctionalLayers(nn.Module):
    """Layers written as F.conv2d / F.linear on the module's own parameters (timm's Conv2dSame,
    every EfficientNet port), a BatchNorm after the conv."""
    def __init__(self, weight_as_buffer=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w = torch.randn(4, 1, 3, 3, generator=g) * 0.3
        if weight_as_buffer:
            self.register_buffer("w", w)
        else:
            self.w = nn.Parameter(w)
        self.b = nn.Parameter(torch.randn(4, generator=g) * 0.1)
        self.bn = nn.BatchNorm2d(4).eval()
        self.bn.running_mean.uniform_(-0.2, 0.2, generator=g)
        self.fc_w = nn.Parameter(torch.randn(3, 4 * 4 * 4, generator=g) * 0.1)

    def forward(self, x):
        y = torch.relu(self.bn(F.conv2d(x, self.w, self.b, stride=2, padding=1)))
        return F.linear(torch.flatten(y, 1), self.fc_w)


def test_functional_layers_on_parameters_convert_to_qlayers(quantize):
    net = FunctionalLayers().eval()
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    qmodel, frozen = quantize(net, QConfig(per_channel=True, single_rounding=True), x)
    assert [name for name, _ in qlayers(qmodel)] == ["fn", "fn_call2"]           # the bn folded into the first
    assert qlayers(qmodel)[0][1].bn is not None and qlayers(qmodel)[0][1].layer.weight is qmodel.w   # shared, trained
    assert torch.allclose(set_phase(qmodel, "float")(x), net(x), atol=1e-6)
    assert torch.equal(integers(frozen, x, "int"), integers(frozen, x, "reals"))
    with pytest.raises(IntsimError, match="is a buffer, not a parameter"):
        convert(FunctionalLayers(weight_as_buffer=True), QConfig())


class AdaptiveFunctional(nn.Module):
    def forward(self, x):
        return F.adaptive_avg_pool2d(x, 2)


class MeanOver(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.c, self.dims = nn.Conv2d(1, 2, 3), dims

    def forward(self, x):
        y = self.c(x)
        return y.mean() if self.dims is None else y.mean(self.dims)


def conv_then(*layers):
    return nn.Sequential(nn.Conv2d(1, 2, 3), *layers)


@pytest.mark.parametrize("model,words", [
    (conv_then(nn.GELU()), ["GELU", "supported are"]),
    (WithParameter(), ["parameter or buffer used as a tensor", "by function add"]),
    (FunctionalNorm(), ["cannot convert function layer_norm", "takes the parameter weight", "supported are"]),
    (conv_then(nn.LayerNorm([2, 26, 26])), ["(LayerNorm) to integers", "supported are"]),
    (Tuple(), ["several values"]),
    (conv_then(nn.BatchNorm2d(2, track_running_stats=False)), ["track_running_stats=False"]),
    (DropoutAlways(), ["training=True", "nn.Dropout"]),
    (Branchy(), ["cannot trace", "control flow"]),
    (AdaptiveFunctional(), ["F.adaptive_avg_pool2d converts to output size 1 only", "nn.AdaptiveAvgPool2d"]),
    (MeanOver(None), ["call_method mean", "a mean over all dims averages over the batch", "x.mean(1)"]),
    (MeanOver((0, 2)), ["a mean over dims (0, 2) averages over the batch (dim 0)"]),
    (nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.BatchNorm1d(3)), ["BatchNorm1d is folded into the linear layer"]),
])
def test_what_cannot_be_converted_is_refused_in_one_line_at_convert(model, words):
    with pytest.raises(IntsimError) as e:
        convert(model.eval(), QConfig())
    assert len(str(e.value).splitlines()) == 1
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("name,size", [("mobilenet_v2", 32), ("resnet34", 32), ("vgg11_bn", 32)])
def test_torchvision_networks_convert_and_run_exactly_in_integers(name, size, quantize):
    """Networks nobody here wrote: ReLU6 and depthwise convs (MobileNetV2), residual adds
    without a ReLU after them, dropout and flatten before the classifier, VGG's ReLU ->
    max-pool chains. VGG's 7x7 adaptive pool of a 1x1 map is refused at freeze; the rest converts and, with one
    rounding, the integer path equals the float64 fake-quant."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    if name == "vgg11_bn":                                    # its 7x7 pool of a 1x1 map: unequal windows
        x = torch.randn(2, 3, size, size)
        with pytest.raises(IntsimError, match="avgpool: an adaptive average pool from 1x1 to 7x7 has windows"):
            quantize(model, QConfig(), x)
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier[0] = nn.Linear(512, 4096)
    for m in model.modules():                                 # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(8, 3, size, size)
    qmodel, frozen = quantize(model, QConfig(per_channel=True, single_rounding=True), x)
    assert torch.allclose(set_phase(qmodel, "float")(x), model(x), rtol=1e-3, atol=1e-4)
    assert torch.equal(integers(frozen, x, "int"), integers(frozen, x, "reals"))


def test_max_pool_run_on_the_accumulator_gives_the_same_integers(trained_like, quantize):
    """A max-pool right after a conv runs on its accumulator, before the rescale (4x fewer values
    rescaled); the graph keeps both ops, and switching the shortcut off changes no integer."""
    from ops.conv import IntConv
    from ops.pool import IntMaxPool
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    _, frozen = quantize(trained_like("cnn_bn"), QConfig(w_bits=4, a_bits=4, per_channel=True), x)
    pools = [m for m in frozen.modules() if isinstance(m, IntMaxPool)]
    convs = [m for m in frozen.modules() if isinstance(m, IntConv) and m.pool_first]
    assert len(pools) == len(convs) == 2 and all(p.run_by_producer for p in pools)
    fast = {mode: integers(frozen, x, mode) for mode in ("int", "reals")}
    for p, c in zip(pools, convs):
        p.run_by_producer, c.pool_first = False, None
    assert all(torch.equal(fast[mode], integers(frozen, x, mode)) for mode in ("int", "reals"))


class Dense(nn.Module):
    """DenseNet's growth: each concatenation feeds the next, and a BatchNorm with no conv before it."""
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1), nn.Conv2d(6, 3, 1)
        self.bn = nn.BatchNorm2d(6).eval()

    def forward(self, x):
        y = torch.cat([x, torch.relu(self.a(x))], 1)
        y = torch.cat([y, torch.relu(self.b(y))], 1)
        return self.c(torch.relu(self.bn(y)))


def test_concatenations_put_their_inputs_on_one_grid(quantize):
    """TFLite's int8 CONCATENATION copies (every input on the output's S and Z): the quantizers
    behind a concatenation's inputs, and behind those of the concatenations it feeds, are one."""
    torch.manual_seed(0)
    net, x = Dense(), torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    qmodel, frozen = quantize(net, QConfig(single_rounding=True), x)
    quant_targets = {n.target for n in qmodel.graph.nodes if n.op == "call_module" and type(qmodel.get_submodule(n.target)).__name__ == "Quantizer"}
    assert len(quant_targets) == 3                # one shared by x, a's and b's outputs; the bn's conv; c's
    shared = qmodel.get_submodule("quant_in")
    lo, hi = shared.observer.range()
    assert lo <= x.min() and hi >= x.max()        # the union of what it observed
    assert torch.equal(integers(frozen, x, "int"), integers(frozen, x, "reals"))
    assert torch.allclose(set_phase(qmodel, "float")(x), net(x), atol=1e-6)
