"""SOFTMAX, LOG_SOFTMAX, TANH and QUANTIZE between 8-bit types (a requantize): each kernel
against a plain-Python transcription of TFLite's reference (tests/reference.py) and, as a
one-op .tflite file, against LiteRT's reference kernels, on random integers over the whole
8-bit range, int8 and uint8, odd row lengths, random input scales."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fixedpoint as fp
from config import QConfig
from frozen import output_integers, set_mode
from reference import (ref_exp_on_negative_values, ref_log_softmax_row, ref_log_x_ge_1, ref_one_over_one_plus_x,
                       ref_requantize, ref_softmax_row)
from tflite_io.read import import_tflite
from tflite_io.run import run_litert_integers

RANGES = {"INT8": (-128, 127), "UINT8": (0, 255)}
# the fixed output grids: (S, Z) by op and type
OUTPUT_GRID = {("SOFTMAX", "INT8"): (1 / 256, -128), ("SOFTMAX", "UINT8"): (1 / 256, 0),
               ("LOG_SOFTMAX", "INT8"): (16 / 256, 127), ("LOG_SOFTMAX", "UINT8"): (16 / 256, 255),
               ("TANH", "INT8"): (1 / 128, 0), ("TANH", "UINT8"): (1 / 128, 128)}


def test_fixed_point_functions_equal_the_transcription():
    """exp, 1 / (1 + x) and log in fixedpoint.py (vectorised) against the scalar ports, on
    values spread over each function's input range (and its edges)."""
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.integers(-(2 ** 31), 1, 3000), [0, -1, -(2 ** 31), -(2 ** 26)]])
    for bits in (0, 5, 12):
        ours = fp.exp_on_negative_values(torch.tensor(a), bits).tolist()
        assert ours == [ref_exp_on_negative_values(int(v), bits) for v in a]
    b = np.concatenate([rng.integers(0, 2 ** 31, 3000), [0, 2 ** 31 - 1]])
    assert fp.one_over_one_plus_x_for_x_in_0_1(torch.tensor(b)).tolist() == [ref_one_over_one_plus_x(int(v)) for v in b]
    c = np.concatenate([rng.integers(2 ** 19, 2 ** 31, 3000), [2 ** 19, 2 ** 31 - 1]])        # x >= 1 in Q12.19
    assert fp.log_x_for_x_greater_than_or_equal_to_1(torch.tensor(c), 12, 5).tolist() == \
        [ref_log_x_ge_1(int(v), 12, 5) for v in c]
    real = fp.log_x_for_x_greater_than_or_equal_to_1(torch.tensor(c), 12, 5).double() / 2 ** 26
    assert (real - torch.log(torch.tensor(c / 2 ** 19))).abs().max() < 1e-6        # and it is the logarithm


def one_op_file(tmp_path, kind, in_type, out_type, length, s_in, z_in, s_out, z_out, rank=2):
    """A .tflite file of one op on a [1, length] (or [1, 3, 5, length]) tensor."""
    from tflite_io.schema import Writer
    w = Writer("int8")
    shape = [1, length] if rank == 2 else [1, 3, 5, length]
    x = w.tensor("x", shape, in_type, [s_in], [z_in])
    y = w.tensor("y", shape, out_type, [s_out], [z_out])
    if kind == "SOFTMAX":
        o = w.s.SoftmaxOptionsT()
        o.beta = 1.0
        w.op(kind, [x], [y], o, "SoftmaxOptions")
    elif kind == "LOG_SOFTMAX":
        w.op(kind, [x], [y], w.s.LogSoftmaxOptionsT(), "LogSoftmaxOptions")
    else:
        w.op(kind, [x], [y])
    w.graph.inputs, w.graph.outputs = [x], [y]
    path = tmp_path / f"{kind}.tflite"
    path.write_bytes(w.pack())
    return str(path)


def run_both(path, q, info):
    """intsim's integers (imported file, int mode) and LiteRT's, for input integers q (N, ...)."""
    frozen, info = import_tflite(path)
    reals = info["input"].scale.double() * (torch.from_numpy(q).double() - info["input"].zero_point)
    x = reals.permute(0, 3, 1, 2) if q.ndim == 4 else reals               # intsim's NCHW
    ours = output_integers(set_mode(frozen, "int"), frozen(x)).numpy()
    ours = ours.transpose(0, 2, 3, 1) if q.ndim == 4 else ours
    theirs = run_litert_integers(path, q, info["compare_tensor"], batch_size=1)
    return ours, theirs


@pytest.mark.parametrize("kind", ["SOFTMAX", "LOG_SOFTMAX"])
@pytest.mark.parametrize("kind_type", ["INT8", "UINT8"])
@pytest.mark.parametrize("length,s_in", [(7, 0.0731), (10, 0.41), (1001, 0.0517), (33, 0.0049)])
def test_softmax_kernels_equal_litert_and_the_transcription(kind, kind_type, length, s_in, tmp_path):
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install -r requirements-tflite.txt)")
    lo, hi = RANGES[kind_type]
    s_out, z_out = OUTPUT_GRID[(kind, kind_type)]
    z_in = int(np.random.default_rng(length).integers(lo, hi + 1))
    path = one_op_file(tmp_path, kind, kind_type, kind_type, length, s_in, z_in, s_out, z_out)
    rng = np.random.default_rng(length + 1)
    dtype = np.int8 if kind_type == "INT8" else np.uint8
    q = rng.integers(lo, hi + 1, (24, length)).astype(dtype)
    q[0] = lo                                     # a row with one large value; a constant row (TFLite's kernel
    q[0, length // 2] = hi                        # stops where 2^8 values or more are near the maximum)
    if length < 2 ** 8:
        q[1] = lo
    ours, theirs = run_both(path, q, None)
    assert np.array_equal(ours, theirs)
    ref = ref_log_softmax_row if kind == "LOG_SOFTMAX" else ref_softmax_row
    s32 = float(np.float32(s_in))
    assert [ref([int(v) for v in row], s32, lo, hi) for row in q[:8]] == theirs[:8].tolist()
    assert len(np.unique(theirs)) > 5             # not saturated: the fixed-point path is exercised


def test_a_row_near_its_maximum_everywhere_is_refused_as_tflite_stops():
    """1001 equal logits: the sum of exponentials is 1001 times the largest; TFLite's kernel
    checks its output shift and LiteRT aborts the process; intsim says why in one line."""
    from ops.base import QParams
    from ops.softmax import IntSoftmax
    from function import Grid
    grid = Grid(8, signed=True)
    op = IntSoftmax(QParams(torch.tensor([0.0172]), torch.tensor([5]), grid),
                    QParams(torch.tensor([1 / 256]), torch.tensor([-128]), grid))
    from errors import IntsimError
    with pytest.raises(IntsimError, match=r"sum to 2\^8 times its largest .* LiteRT aborts"):
        op(torch.full((1, 1001), -128, dtype=torch.int32))
    assert op(torch.full((1, 255), -128, dtype=torch.int32)).unique().tolist() == [-127]    # 1/255: 256/255 rounds to 1


@pytest.mark.parametrize("kind_type", ["INT8", "UINT8"])
def test_softmax_over_the_channels_of_a_4d_tensor(kind_type, tmp_path):
    """SOFTMAX on NHWC [1, 3, 5, C] (over C): intsim's import runs it over NCHW's dimension 1."""
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install -r requirements-tflite.txt)")
    lo, hi = RANGES[kind_type]
    s_out, z_out = OUTPUT_GRID[("SOFTMAX", kind_type)]
    path = one_op_file(tmp_path, "SOFTMAX", kind_type, kind_type, 9, 0.093, lo + 100, s_out, z_out, rank=4)
    q = np.random.default_rng(4).integers(lo, hi + 1, (6, 3, 5, 9)).astype(np.int8 if lo < 0 else np.uint8)
    ours, theirs = run_both(path, q, None)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("kind_type", ["INT8", "UINT8"])
@pytest.mark.parametrize("s_in", [0.0113, 0.0417, 0.09])
def test_tanh_table_equals_litert(kind_type, s_in, tmp_path):
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install -r requirements-tflite.txt)")
    lo, hi = RANGES[kind_type]
    s_out, z_out = OUTPUT_GRID[("TANH", kind_type)]
    path = one_op_file(tmp_path, "TANH", kind_type, kind_type, 256, s_in, lo + 117, s_out, z_out)
    q = np.arange(lo, hi + 1).reshape(1, 256).astype(np.int8 if lo < 0 else np.uint8)    # every input integer
    ours, theirs = run_both(path, q, None)
    assert np.array_equal(ours, theirs) and len(np.unique(theirs)) > 20


@pytest.mark.parametrize("in_type,out_type", [("UINT8", "INT8"), ("INT8", "UINT8"), ("INT8", "INT8"), ("UINT8", "UINT8")])
@pytest.mark.parametrize("same_scale", [True, False])
def test_requantize_equals_litert_and_the_transcription(in_type, out_type, same_scale, tmp_path):
    """QUANTIZE between 8-bit types: the converter's uint8 <-> int8 shift by 128 (same S) and a
    rescale to another (S, Z)."""
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install -r requirements-tflite.txt)")
    (lo, hi), (olo, ohi) = RANGES[in_type], RANGES[out_type]
    s_in, z_in = 0.0371, lo + 131
    s_out, z_out = (s_in, z_in - lo + olo) if same_scale else (0.0529, olo + 97)
    path = one_op_file(tmp_path, "QUANTIZE", in_type, out_type, 256, s_in, z_in, s_out, z_out)
    q = np.arange(lo, hi + 1).reshape(1, 256).astype(np.int8 if lo < 0 else np.uint8)
    ours, theirs = run_both(path, q, None)
    assert np.array_equal(ours, theirs)
    assert theirs[0].tolist() == ref_requantize([int(v) for v in q[0]], z_in, np.float32(s_in), z_out,
                                                np.float32(s_out), olo, ohi)


class Classifier(nn.Module):
    """pytorch/examples' MNIST net's shape: conv, relu, linear, log_softmax as the last op."""
    def __init__(self, last):
        super().__init__()
        self.conv, self.fc, self.last = nn.Conv2d(1, 4, 3, 2), nn.Linear(4 * 6 * 6, 10), last
        self.log_softmax = nn.LogSoftmax(dim=1)

    def forward(self, x):
        y = self.fc(torch.flatten(torch.relu(self.conv(x)), 1))
        if self.last == "log_softmax":
            return F.log_softmax(y, dim=1)
        if self.last == "softmax":
            return y.softmax(-1)
        if self.last == "module":
            return self.log_softmax(y)
        return torch.tanh(y)


@pytest.mark.parametrize("last", ["log_softmax", "softmax", "module", "tanh"])
@pytest.mark.parametrize("scheme", ["int8", "uint8"])
def test_a_network_ending_in_softmax_converts_and_exports_bit_exact(last, scheme, tmp_path):
    """Every spelling converts; fake-quant's output lies on the op's fixed grid; the frozen
    integers are within 1 of the float64 reference on the same inputs; the exported file equals
    intsim's integers in LiteRT (and read back)."""
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install -r requirements-tflite.txt)")
    from model import calibrate, convert, set_phase
    from freezing import freeze
    from tflite_io.write import export_tflite
    torch.manual_seed(0)
    model = Classifier(last).eval()
    x = torch.randn(32, 1, 13, 13) * 3
    qmodel = convert(model, QConfig(w_bits=8, a_bits=8, per_channel=scheme == "int8", a_signed=scheme == "int8"))
    calibrate(qmodel, [(x, None)], "cpu", 1)
    set_phase(qmodel, "fakequant")
    fq = qmodel(x)
    step = {"tanh": 1 / 128, "softmax": 1 / 256}.get(last, 1 / 16)
    assert torch.allclose(fq / step, (fq / step).round(), atol=1e-4)      # on the fixed grid
    frozen = freeze(qmodel, kernel=scheme)
    data, tensor, offset = export_tflite(frozen, scheme, x[:1])
    ours = output_integers(set_mode(frozen, "int"), frozen(x)).numpy() + offset
    theirs = run_litert_integers(data, x.permute(0, 2, 3, 1).numpy(), tensor)
    assert np.array_equal(ours, theirs)
