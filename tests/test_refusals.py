"""Every refusal of the importer, the converter, freeze and the exporter, one test each: a
tiny file or network that breaks exactly one rule, and the one line that names the problem (the
op and where it is) and what would work. The refusals tested with their own feature live beside
it (test_tflite, test_convert, test_pytorch_files, test_bad_input)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from config import QConfig
from errors import IntsimError
from freezing import freeze
from model import calibrate, convert

S, Z = 0.02, 0


# ----------------------------------------------------------------------------- .tflite files

def _file(tmp_path, build):
    """A .tflite file made by `build(w)` -> (inputs, outputs), with LiteRT's schema API."""
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install -r requirements-tflite.txt)")
    from tflite_io.schema import Writer
    w = Writer("int8")
    w.graph.inputs, w.graph.outputs = build(w)
    path = tmp_path / "refused.tflite"
    path.write_bytes(w.pack())
    return str(path)


def _act(w, name, shape, s=S, z=Z, kind="INT8"):
    return w.tensor(name, shape, kind, [s], [z])


def _const(w, name, values, kind="INT32", shape=None):
    values = np.asarray(values, dtype={"INT32": np.int32, "INT8": np.int8}[kind])
    return w.tensor(name, list(values.shape) if shape is None else shape, kind, data=values)


def _unary(kind, options_type=None, in_shape=(1, 4, 4, 3), out_shape=None, out_s=S, extra=(),
           edit=None):
    """x -> `kind` -> y, with constant inputs `extra` ((name, values) pairs); `edit(w, op_options)` first."""
    def build(w):
        x = _act(w, "x", list(in_shape))
        y = _act(w, "y", list(out_shape or in_shape), s=out_s)
        consts = [_const(w, n, v) for n, v in extra]
        o = getattr(w.s, f"{options_type}T")() if options_type else None
        if edit is not None:
            edit(w, o)
        w.op(kind, [x, *consts], [y], o, options_type)
        return [x], [y]
    return build


def _pool(w, o):
    o.padding, o.strideW, o.strideH, o.filterWidth, o.filterHeight = w.s.Padding.VALID, 2, 2, 2, 2


def _relu(w, o):
    o.fusedActivationFunction = w.s.ActivationFunctionType.RELU


def _tanh(w, o):
    o.fusedActivationFunction = w.s.ActivationFunctionType.TANH


def _two_inputs(w):
    a, b, y = _act(w, "a", [1, 4]), _act(w, "b", [1, 4]), _act(w, "y", [1, 4])
    w.op("ADD", [a, b], [y], w.s.AddOptionsT(), "AddOptions")
    return [a, b], [y]


def _unproduced(w):
    x, ghost, y = _act(w, "x", [1, 4]), _act(w, "ghost", [1, 4]), _act(w, "y", [1, 4])
    w.op("ADD", [x, ghost], [y], w.s.AddOptionsT(), "AddOptions")
    return [x], [y]


def _flatten_into_softmax(w):
    x, f, y = _act(w, "x", [1, 2, 2, 3]), _act(w, "flat", [1, 12]), _act(w, "y", [1, 12], s=1 / 256, z=-128)
    w.op("RESHAPE", [x, _const(w, "shape", [1, 12])], [f])
    o = w.s.SoftmaxOptionsT()
    o.beta = 1.0
    w.op("SOFTMAX", [f], [y], o, "SoftmaxOptions")
    return [x], [y]


def _unquantized(w):
    x, y = w.tensor("x", [1, 4], "INT8"), _act(w, "y", [1, 4])
    w.op("ADD", [x, x], [y], w.s.AddOptionsT(), "AddOptions")
    return [x], [y]


def _add_of_a_constant_tensor(w):
    x, y = _act(w, "x", [1, 3]), _act(w, "y", [1, 3])
    c = w.tensor("c", [3], "INT8", [S], [Z], data=np.array([1, 2, 3], dtype=np.int8))
    w.op("ADD", [x, c], [y], w.s.AddOptionsT(), "AddOptions")
    return [x], [y]


def _concat_with_relu(w):
    x, y = _act(w, "x", [1, 2, 2, 3]), _act(w, "y", [1, 2, 2, 6])
    o = w.s.ConcatenationOptionsT()
    o.axis, o.fusedActivationFunction = 3, w.s.ActivationFunctionType.RELU
    w.op("CONCATENATION", [x, x], [y], o, "ConcatenationOptions")
    return [x], [y]


def _add_with_tanh(w):
    x, y = _act(w, "x", [1, 4]), _act(w, "y", [1, 4])
    o = w.s.AddOptionsT()
    _tanh(w, o)
    w.op("ADD", [x, x], [y], o, "AddOptions")
    return [x], [y]


def _two_subgraphs(model, schema):
    model.subgraphs.append(schema.SubGraphT())


IMPORT_REFUSALS = [
    ("two inputs", _two_inputs, r"intsim imports models with one input and one output"),
    ("a tensor nothing produces", _unproduced, r"op 0 \(ADD\) reads tensor 1, which no imported op produced"),
    ("a flatten into SOFTMAX", _flatten_into_softmax, r"a flatten of NHWC data feeds SOFTMAX, not a FULLY_CONNECTED"),
    ("an unquantized tensor", _unquantized, r"tensor 'x' is not quantized \(a float model\?\)"),
    ("a fused TANH", _add_with_tanh,
     r"ADD has fused activation TANH; intsim supports"),
    ("ADD of a constant tensor", _add_of_a_constant_tensor,
     r"op 0 ADD with a constant tensor of 3 values: intsim imports ADD of two tensors, or of a tensor and one constant"),
    ("CONCATENATION with RELU", _concat_with_relu, r"op 0 CONCATENATION with a fused activation is not imported"),
    ("PAD of the channels", _unary("PAD", "PadOptions", out_shape=(1, 4, 4, 5), extra=[("p", [[0, 0], [0, 0], [0, 0], [1, 1]])]),
     r"PAD other than of height and width on one grid is not imported"),
    ("MAX_POOL_2D with RELU", _unary("MAX_POOL_2D", "Pool2DOptions", out_shape=(1, 2, 2, 3),
                                     edit=lambda w, o: (_pool(w, o), _relu(w, o))),
     r"MAX_POOL_2D with uneven SAME padding or a fused activation is not imported"),
    ("AVERAGE_POOL_2D onto another grid", _unary("AVERAGE_POOL_2D", "Pool2DOptions", out_shape=(1, 2, 2, 3), out_s=0.03,
                                                 edit=_pool),
     r"AVERAGE_POOL_2D with different input and output quantization"),
    ("a RESHAPE that is no flatten", _unary("RESHAPE", out_shape=(1, 4, 12), extra=[("shape", [1, 4, 12])]),
     r"RESHAPE \[1, 4, 4, 3\] -> \[1, 4, 12\] is not a flatten of NHWC data, the only reshape intsim imports"),
    ("a GATHER of rows", _unary("GATHER", "GatherOptions", out_shape=(1, 2, 4, 3), extra=[("i", [0, 2])],
                                edit=lambda w, o: setattr(o, "axis", 1)),
     r"op 0 GATHER other than of channels by constant indices is not imported"),
    ("a SOFTMAX of a 3-D tensor", _unary("SOFTMAX", "SoftmaxOptions", in_shape=(1, 4, 3), out_s=1 / 256,
                                          edit=lambda w, o: setattr(o, "beta", 1.0)),
     r"op 0 SOFTMAX on a 3-D tensor: intsim imports it on 2-D"),
    ("a MEAN over the batch", _unary("MEAN", "ReducerOptions", out_shape=(4, 4, 3), extra=[("axis", [0])]),
     r"op 0 MEAN over axes \[0\] averages over the batch"),
]


@pytest.mark.parametrize("what,build,message", IMPORT_REFUSALS, ids=[c[0] for c in IMPORT_REFUSALS])
def test_an_import_refusal_names_the_op_and_what_works(what, build, message, tmp_path):
    from tflite_io.read import import_tflite
    with pytest.raises(IntsimError, match=message) as e:
        import_tflite(_file(tmp_path, build))
    assert len(str(e.value).splitlines()) == 1 and str(tmp_path) in str(e.value)


def test_a_split_of_rows_is_refused_at_import(tmp_path):
    def build(w):
        x, a, b = _act(w, "x", [1, 4, 4, 3]), _act(w, "a", [1, 2, 4, 3]), _act(w, "b", [1, 2, 4, 3])
        o = w.s.SplitOptionsT()
        o.numSplits = 2
        w.op("SPLIT", [_const(w, "axis", [1], shape=[]), x], [a, b], o, "SplitOptions")
        return [x], [a]
    from tflite_io.read import import_tflite
    with pytest.raises(IntsimError, match=r"op 0 SPLIT other than along the channels is not imported"):
        import_tflite(_file(tmp_path, build))


def test_a_model_of_two_subgraphs_is_refused(tmp_path):
    from tflite_io.read import import_tflite
    from test_tflite import _rewritten
    path = _file(tmp_path, _unary("ADD", "AddOptions", in_shape=(1, 4)))
    with pytest.raises(IntsimError, match=r"has 2 subgraphs; intsim imports single-graph models"):
        import_tflite(_rewritten(path, tmp_path, _two_subgraphs))


def test_an_average_pool_that_is_not_global_has_no_float_rebuild(tmp_path):
    from tflite_io.read import import_tflite, import_tflite_float
    path = _file(tmp_path, _unary("AVERAGE_POOL_2D", "Pool2DOptions", out_shape=(1, 2, 2, 3), edit=_pool))
    import_tflite(path)                                           # the integer import takes it
    with pytest.raises(IntsimError, match=r"an AVERAGE_POOL_2D that is not a global average pool has no float"):
        import_tflite_float(path)


def test_a_file_that_is_no_imagenet_classifier_is_refused_before_any_image():
    from tflite_io.run import imagenet_classifier, model_input
    with pytest.raises(IntsimError, match=r"m.tflite has 10 outputs: not an ImageNet classifier \(1000 or 1001\)"):
        imagenet_classifier("m.tflite", {"input_shape": [1, 32, 32, 3], "output_shape": [1, 10]})
    with pytest.raises(IntsimError, match=r"the model's input is INT16: intsim feeds images to UINT8, INT8 or FLOAT32"):
        model_input(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), "INT16")


# ----------------------------------------------------------------------------- convert, freeze, export

def _frozen(net, x, qconfig=None, kernel="int8"):
    qmodel = convert(net.eval(), qconfig or QConfig())
    calibrate(qmodel, [(x, None)], "cpu", 1)
    return freeze(qmodel, kernel=kernel)


class Lambda(nn.Module):
    """A conv, then `fn` of its output (the op under test)."""
    def __init__(self, fn, channels=2):
        super().__init__()
        self.conv, self.fn = nn.Conv2d(3, channels, 3, padding=1), fn

    def forward(self, x):
        return self.fn(self.conv(x))


class LoneBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3, track_running_stats=False)

    def forward(self, x):
        return self.bn(torch.relu(x))


class Conv1dWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.w)


CONVERT_REFUSALS = [
    ("a lone BatchNorm without statistics", LoneBN(), r"cannot convert bn: a BatchNorm without running statistics"),
    ("F.conv2d with a 3-d weight", Conv1dWeight(), r"cannot convert conv2d: F.conv2d with a 3-d weight"),
    ("reflection padding", nn.Sequential(nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect")),
     r"cannot convert 0: only zero padding is supported, not 'reflect'"),
]


@pytest.mark.parametrize("what,net,message", CONVERT_REFUSALS, ids=[c[0] for c in CONVERT_REFUSALS])
def test_a_convert_refusal_names_the_layer(what, net, message):
    with pytest.raises(IntsimError, match=message):
        convert(net.eval(), QConfig())


X = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))

EXPORT_REFUSALS = [
    ("a linear layer on a 4-D tensor", lambda: nn.Sequential(nn.Conv2d(3, 2, 1), nn.Linear(6, 4)),
     r"cannot export _1: a linear layer on a 4-D tensor"),
    ("a dilated max-pool", lambda: Lambda(lambda y: F.max_pool2d(torch.relu(y), 2, dilation=2)),
     r"TFLite's MAX_POOL_2D has no dilation"),
    ("a padded max-pool of negative values", lambda: Lambda(lambda y: F.max_pool2d(y, 3, 1, 1)),
     r"a padded \(or ceil_mode\) max-pool whose input can be negative \(TFLite pads with the zero point"),
    ("an average pool padded neither VALID nor SAME", lambda: Lambda(lambda y: F.avg_pool2d(y, 2, 2, 1, count_include_pad=False)),
     r"average pool padding \(1, 1, 1, 1\) is neither VALID nor SAME"),
    ("a reshape to 3-D", lambda: Lambda(lambda y: y.reshape(y.shape[0], 2, 36)),
     r"cannot export reshape: a reshape \[1, 2, 6, 6\] -> \[1, 2, 36\], which has no TFLite form in intsim's exporter"),
    ("a transpose of H and W", lambda: Lambda(lambda y: y.transpose(2, 3).flatten(2).reshape(y.shape[0], 2, 6, 6)),
     r"its reshapes and transposes move values other than whole channels"),
    ("a transpose of a square map", lambda: Lambda(lambda y: y.transpose(2, 3)),
     r"cannot export transpose: its reshapes and transposes move values other than whole channels"),
    ("a split of rows", lambda: Lambda(lambda y: torch.chunk(y, 2, 2)[0]), r"a split along dimension 2"),
    ("unequal pieces", lambda: Lambda(lambda y: torch.split(y, [1, 3], 1)[0], channels=4), r"pieces of unequal size \[1, 3\]"),
    ("a softmax over the rows of a map", lambda: Lambda(lambda y: torch.softmax(y, 2)),
     r"a softmax over dimension 2 of an NCHW tensor; TFLite's SOFTMAX is over the last axis of NHWC"),
]


@pytest.mark.parametrize("what,make,message", EXPORT_REFUSALS, ids=[c[0] for c in EXPORT_REFUSALS])
def test_an_export_refusal_names_the_node_and_what_works(what, make, message):
    """Each network built from seed 0 here (its weights decide, e.g., whether a conv's output can be negative)."""
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install -r requirements-tflite.txt)")
    from tflite_io.write import export_tflite
    torch.manual_seed(0)
    frozen = _frozen(make(), X)
    with pytest.raises(IntsimError, match=message) as e:
        export_tflite(frozen, "int8", X[:1])
    assert len(str(e.value).splitlines()) == 1


def test_an_average_pool_with_ceil_mode_is_refused_at_freeze():
    with pytest.raises(IntsimError, match=r"an average pool with ceil_mode or divisor_override has no TFLite"):
        _frozen(Lambda(lambda y: F.avg_pool2d(y, 2, ceil_mode=True)), X)


def test_a_mean_over_the_batch_written_with_a_negative_dim_is_refused_when_run():
    with pytest.raises(IntsimError, match=r"a mean over dims \(-4,\) of a 4-d tensor averages over the batch"):
        _frozen(Lambda(lambda y: y.mean(-4)), X)


def test_an_unknown_scheme_or_kernel_is_refused():
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install -r requirements-tflite.txt)")
    from tflite_io.write import export_tflite
    torch.manual_seed(0)
    frozen = _frozen(Lambda(torch.relu), X)
    with pytest.raises(IntsimError, match=r"unknown TFLite scheme 'int4'; use one of"):
        export_tflite(frozen, "int4", X[:1])
    qmodel = convert(Lambda(torch.relu).eval(), QConfig())
    calibrate(qmodel, [(X, None)], "cpu", 1)
    with pytest.raises(IntsimError, match=r"unknown kernel 'int4' for freeze; use one of \('int8', 'uint8'\)"):
        freeze(qmodel, kernel="int4")


def test_a_model_frozen_for_the_uint8_kernel_is_not_exported_as_int8():
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install -r requirements-tflite.txt)")
    from tflite_io.write import export_tflite
    torch.manual_seed(0)
    frozen = _frozen(Lambda(torch.relu), X, kernel="uint8")
    with pytest.raises(IntsimError, match=r"is frozen for TFLite's uint8 kernel"):
        export_tflite(frozen, "int8", X[:1])


def test_a_linear_layer_on_a_4d_tensor_runs_in_integers_before_export_refuses_it():
    """nn.Linear on (N, C, H, W) acts on W: convert takes it, and its integer path is the fake-quant
    one (the output channels are its last dim); the exporter refuses it."""
    from frozen import output_integers, set_mode
    torch.manual_seed(0)
    frozen = _frozen(nn.Sequential(nn.Conv2d(3, 2, 1), nn.Linear(6, 4)), X, QConfig(single_rounding=True))
    ints = output_integers(set_mode(frozen, "int"), frozen(X))
    reals = output_integers(set_mode(frozen, "reals"), frozen.double()(X.double()))
    assert ints.shape == (4, 2, 6, 4) and torch.equal(ints.long(), reals.long())


def test_the_kernels_guard_their_own_arguments():
    from function import Grid
    from ops.conv import IntConv
    from ops.mean import IntMean
    from ops.base import QParams
    w = torch.ones(2, 3, 1, 1, dtype=torch.int32)
    with pytest.raises(IntsimError, match=r"unknown scale product 'half'; use one of"):
        IntConv(w, torch.ones(2), torch.zeros(2), torch.zeros(2), Grid(8), scale_product="half")
    weights_only = IntConv(w, torch.ones(2), torch.zeros(2), torch.zeros(2), Grid(8))
    with pytest.raises(IntsimError, match=r"integer inference needs integer activations: with --a-bits 32"):
        weights_only.int_forward(torch.zeros(1, 3, 2, 2))
    qp = QParams(torch.tensor([S]), torch.tensor([0]), Grid(8, signed=True))
    with pytest.raises(IntsimError, match=r"average pooling saw no input: calibrate the model before freezing it"):
        IntMean(0, qp, qp)


def test_a_softmax_on_a_grid_too_fine_for_tflites_kernel_is_refused():
    from function import Grid
    from ops.base import QParams
    from ops.softmax import IntSoftmax
    tiny = QParams(torch.tensor([1e-9]), torch.tensor([0]), Grid(8, signed=True))
    out = QParams(torch.tensor([1 / 256]), torch.tensor([-128]), Grid(8, signed=True))
    with pytest.raises(IntsimError, match=r"softmax input scale 1e-09 is too small for TFLite's kernel"):
        IntSoftmax(tiny, out)
