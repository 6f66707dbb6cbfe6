""".tflite files as PyTorch's exporter (litert-torch) writes them: an NCHW int8 input, a TRANSPOSE
to NCHW and back around each PAD, a QUANTIZE int8 -> int8 after a PAD, residual sums kept in
float32 (DEQUANTIZE, ADD, QUANTIZE), one float sum feeding the next. Built with LiteRT's schema
API, imported, and run against LiteRT's reference kernels: every output integer, and the float32
sums bit for bit. Each refusal of the importer's rules for such files, one test each."""
import numpy as np
import pytest
import torch

from errors import IntsimError
from frozen import output_integers, set_mode
from tflite_io.read import import_tflite, import_tflite_float

pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install -r requirements-tflite.txt)")

S_IN, Z_IN = 0.0213, -1


def _conv(w, rng, x, s_x, out, name, kernel):
    """A CONV_2D (VALID, stride 1) of the NHWC tensor x onto `out`, per-channel int8 weights."""
    c_in, c_out = int(w.graph.tensors[x].shape[3]), int(w.graph.tensors[out].shape[3])
    s_w = rng.uniform(0.004, 0.02, c_out).astype(np.float32)
    wt = w.tensor(f"{name}_w", [c_out, kernel, kernel, c_in], "INT8", s_w, np.zeros(c_out),
                  rng.integers(-127, 128, (c_out, kernel, kernel, c_in)).astype(np.int8))
    bt = w.tensor(f"{name}_b", [c_out], "INT32", s_x * s_w, np.zeros(c_out),
                  rng.integers(-2000, 2000, c_out).astype(np.int32))
    o = w.s.Conv2DOptionsT()
    o.padding, o.strideH, o.strideW, o.dilationHFactor, o.dilationWFactor = w.s.Padding.VALID, 1, 1, 1, 1
    w.op("CONV_2D", [x, wt, bt], [out], o, "Conv2DOptions")


def _transpose(w, x, out, perm, name):
    p = w.tensor(f"{name}_perm", [4], "INT32", data=np.array(perm, dtype=np.int32))
    w.op("TRANSPOSE", [x, p], [out], w.s.TransposeOptionsT(), "TransposeOptions")


def _add(w, a, b, out, relu=False):
    o = w.s.AddOptionsT()
    if relu:
        o.fusedActivationFunction = w.s.ActivationFunctionType.RELU
    w.op("ADD", [a, b], [out], o, "AddOptions")


def pytorch_style_file(tmp_path, variant="ok"):
    """input [1, 3, 9, 9] int8 NCHW -> PAD (NCHW rows) -> QUANTIZE -> TRANSPOSE to NHWC -> conv1
    3x3 -> conv2 1x1 -> float: f3 = relu(deq(conv1) + deq(conv2)); conv3 1x1 of conv2 -> f5 =
    deq(conv3) + f3 -> QUANTIZE -> TRANSPOSE to NCHW: the output [1, 4, 7, 7]. `variant` breaks
    one rule of what intsim imports (see the refusal tests)."""
    from tflite_io.schema import Writer
    rng = np.random.default_rng(3)
    w = Writer("int8")
    x = w.tensor("input", [1, 3, 9, 9], "INT8", [S_IN], [Z_IN])
    p = w.tensor("padded", [1, 3, 11, 12], "INT8", [S_IN], [Z_IN])
    pads = w.tensor("paddings", [4, 2], "INT32", data=np.array([[0, 0], [0, 0], [1, 1], [2, 1]], dtype=np.int32))
    w.op("PAD", [x, pads], [p], w.s.PadOptionsT(), "PadOptions")
    p2 = w.tensor("padded_q", [1, 3, 11, 12], "INT8", [0.0247], [4])
    w.op("QUANTIZE", [p], [p2])
    t = w.tensor("nhwc", [1, 11, 12, 3], "INT8", [0.0247], [4])
    _transpose(w, p2, t, (0, 2, 3, 1), "to_nhwc")
    c1 = w.tensor("conv1", [1, 9, 10, 4], "INT8", [0.051], [-5])
    _conv(w, rng, t if variant != "nchw into conv" else p2, 0.0247, c1, "conv1", 3)
    c1s = w.tensor("conv1_s", [1, 7, 8, 4], "INT8", [0.051], [-5])        # conv1's centre, by a 3x3 conv
    _conv(w, rng, c1, 0.051, c1s, "conv1s", 3)
    c2 = w.tensor("conv2", [1, 7, 8, 4], "INT8", [0.043], [2])
    _conv(w, rng, c1s, 0.051, c2, "conv2", 1)
    f1, f2, f3 = (w.tensor(n, [1, 7, 8, 4], "FLOAT32") for n in ("f1", "f2", "f3"))
    w.op("DEQUANTIZE", [c1s], [f1])
    w.op("DEQUANTIZE", [c2], [f2])
    _add(w, f1, f2 if variant != "mixed add" else c2, f3, relu=True)
    c3 = w.tensor("conv3", [1, 7, 8, 4], "INT8", [0.037], [7])
    _conv(w, rng, c2, 0.043, c3, "conv3", 1)
    f4, f5 = w.tensor("f4", [1, 7, 8, 4], "FLOAT32"), w.tensor("f5", [1, 7, 8, 4], "FLOAT32")
    w.op("DEQUANTIZE", [c3], [f4])
    _add(w, f4, f3, f5)
    if variant == "float output":
        w.graph.inputs, w.graph.outputs = [x], [f5]
    else:
        q5 = w.tensor("sum", [1, 7, 8, 4], "INT8", [0.061], [-3])
        w.op("QUANTIZE", [f5], [q5])
        if variant == "float into conv":
            q5 = w.tensor("conv4", [1, 7, 8, 4], "INT8", [0.05], [0])
            _conv(w, rng, f5, 0.061, q5, "conv4", 1)
        out = w.tensor("output", [1, 4, 7, 8], "INT8", [0.061], [-3])
        _transpose(w, q5, out, (0, 3, 2, 1) if variant == "moves data" else (0, 3, 1, 2), "to_nchw")
        w.graph.inputs, w.graph.outputs = [x], [out]
    path = tmp_path / f"pytorch_style_{variant.replace(' ', '_')}.tflite"
    path.write_bytes(w.pack())
    return str(path), {"f3": f3, "f5": f5}


def _litert(path, q, tensors):
    """LiteRT's reference kernels on the NCHW int8 inputs q: {tensor: its values} per image, stacked."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    it = Interpreter(model_path=path, experimental_op_resolver_type=OpResolverType.BUILTIN_REF,
                     experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    out = {t: [] for t in tensors}
    for image in q:
        it.set_tensor(it.get_input_details()[0]["index"], image[None].astype(np.int8))
        it.invoke()
        for t in tensors:
            out[t].append(it.get_tensor(t).copy())
    return {t: np.concatenate(v) for t, v in out.items()}


def test_a_pytorch_style_file_imports_and_equals_litert(tmp_path):
    """The layouts are read as what they are (the NCHW input and output, the PAD's rows), the
    float sums are LiteRT's float32 bit for bit, and every output integer is LiteRT's."""
    path, floats = pytorch_style_file(tmp_path)
    frozen, info = import_tflite(path)
    assert info["input_layout"] == info["output_layout"] == "NCHW"
    assert info["input_shape"] == [1, 9, 9, 3] and info["output_shape"] == [1, 7, 8, 4]
    kinds = [type(m).__name__ for _, m in frozen.named_children()]
    assert kinds.count("FloatAdd") == 2 and kinds.count("Dequantize") == 4 and kinds.count("Requantize") == 1
    q = np.random.default_rng(0).integers(-128, 128, (6, 3, 9, 9))
    theirs = _litert(path, q, [info["compare_tensor"], *floats.values()])
    captured = {}
    adds = [m for m in frozen.modules() if type(m).__name__ == "FloatAdd"]
    for name, m in zip(("f3", "f5"), adds):
        m.register_forward_hook(lambda mod, args, y, name=name: captured.__setitem__(name, y))
    reals = info["input"].scale.double() * (torch.from_numpy(q).double() - info["input"].zero_point)
    ours = output_integers(set_mode(frozen, "int"), frozen(reals)).numpy()       # NCHW, as the file's output
    assert ours.shape == theirs[info["compare_tensor"]].shape == (6, 4, 7, 8)
    assert np.array_equal(ours, theirs[info["compare_tensor"]])
    assert len(np.unique(ours)) > 20                                              # not a saturated output
    for name, t in floats.items():
        assert captured[name].dtype == torch.float32
        assert np.array_equal(captured[name].numpy().transpose(0, 2, 3, 1), theirs[t])   # float32 bit for bit
    assert (theirs[floats["f3"]] == 0).any() and (theirs[floats["f5"]] < 0).any()       # the RELU on f3 only
    float_model, _ = import_tflite_float(path)          # the float rebuild: no quantization left
    assert sorted({type(m).__name__ for _, m in float_model.named_children()}) == ["Conv2d", "ReLU", "ZeroPad2d"]
    y = float_model(reals.float())
    assert y.shape == ours.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("variant,message", [
    ("moves data", r"op 13 TRANSPOSE \(perm \[0, 3, 2, 1\], output tensor 'output'\) moves the data itself"),
    ("nchw into conv", r"op 3 \(CONV_2D, output tensor 'conv1'\) reads the tensor 'padded_q', which the file stores as NCHW"),
    ("mixed add", r"op 8 ADD mixes float32 and quantized tensors"),
    ("float into conv", r"op 13 \(CONV_2D, output tensor 'conv4'\) computes on the float32 tensor 'f5'"),
    ("float output", r"the model's output 'f5' is computed in float32"),
])
def test_what_a_pytorch_style_file_may_not_do_is_refused_in_one_line(variant, message, tmp_path):
    path, _ = pytorch_style_file(tmp_path, variant)
    with pytest.raises(IntsimError, match=message):
        import_tflite(path)
