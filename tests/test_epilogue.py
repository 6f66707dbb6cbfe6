"""The integer kernels compiled by torch.compile (ops/compiled.py) against the same code step by
step and against the TFLite ports in tests/reference.py (Python ints). The epilogue
(ops/epilogue.py): every accumulator dtype the kernels hand it (int32 in NHWC order from the int8
GEMM, float32, float64), per-channel multipliers with left and right shifts and shift 0, ties,
int32's ends, a fused max-pool, both roundings. ADD's table lookup (two tensors, broadcasting,
and a tensor and a constant) and MEAN. A whole golden run with the kernels compiled gives the
same integers."""
import math

import numpy as np
import pytest
import torch

from errors import IntsimError
from function import INT32_MAX, INT32_MIN, quantize_unchecked
from golden_runs import RUNS, measured, run
from ops import binary, compiled, epilogue
from ops.add import IntAdd
from ops.mean import IntMean
from ops.quant import Quantize
from reference import ref_mbqm, ref_mbqm_single_rounding, ref_mean, ref_tflite_add
from test_frozen import activation_grid, frozen_add, qp

pytestmark = pytest.mark.xdist_group("compile")     # one worker compiles, once per variant
CHANNELS = 6


@pytest.fixture
def compile_on():
    compiled.set_compile("on")
    compiled._state["failed"] = None
    yield
    compiled.set_compile(None)
    compiled._state["failed"] = None


def multipliers(seed):
    """Per-channel (M0, shift): M0 in [2^30, 2^31), shifts -20..2 with 0 among them."""
    g = torch.Generator().manual_seed(seed)
    m0 = torch.randint(2 ** 30, 2 ** 31, (CHANNELS,), generator=g)
    shift = torch.tensor([-20, -9, -5, -1, 0, 2])
    return m0, shift


def accumulators(seed, shape):
    """int32 accumulators with int32's ends, 0, +-1 and exact ties of the rescale among random ones."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.randint(-2 ** 24, 2 ** 24, shape, generator=g, dtype=torch.int64)
    flat = acc.view(-1)
    special = torch.tensor([INT32_MIN + 1000, INT32_MAX - 1000, 0, 1, -1, 2 ** 8, -2 ** 8, 3 * 2 ** 4, -3 * 2 ** 4])
    flat[:len(special)] = special
    return acc


def reference(acc, bias, m0, shift, z, lo, hi, single_rounding):
    """TFLite's epilogue in Python ints, element by element (channels on dim 1)."""
    rescale = ref_mbqm_single_rounding if single_rounding else ref_mbqm
    out = torch.empty_like(acc)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in acc.shape]).tolist():
        c = idx[1]
        v = rescale(int(acc[tuple(idx)]) + int(bias[c]), int(m0[c]), int(shift[c])) + z
        out[tuple(idx)] = min(max(v, lo), hi)
    return out.to(torch.int32)


@pytest.mark.parametrize("single_rounding", [False, True])
@pytest.mark.parametrize("dtype", ["int32_nhwc", "float32", "float64"])
def test_compiled_epilogue_is_tflite(compile_on, dtype, single_rounding):
    m0, shift = multipliers(1)
    acc = accumulators(2, (2, CHANNELS, 5, 4))
    if dtype == "float32":
        acc = acc.clamp(-2 ** 24, 2 ** 24)        # float32 accumulators hold integers up to 2^24 only
    bias = torch.tensor([7, -3, 0, 100, -2 ** 20, 5])
    ch = (-1, 1, 1)
    want = reference(acc, bias, m0, shift, 3, -128, 127, single_rounding)
    if dtype == "int32_nhwc":                     # as the int8 GEMM leaves it: (N, H, W, C) memory, NCHW view
        given = acc.to(torch.int32).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    else:
        given = acc.to(getattr(torch, dtype))
    args = (given, bias.reshape(ch), m0.reshape(ch), shift.reshape(ch), torch.tensor([3]), -128, 127)
    got = epilogue.run(*args, single_rounding=single_rounding)
    assert compiled._state["failed"] is None, compiled._state["failed"]
    assert torch.equal(got, want)
    assert torch.equal(epilogue.epilogue(*args, single_rounding=single_rounding), want)   # step by step


def test_compiled_epilogue_pools_first(compile_on):
    m0, shift = multipliers(3)
    acc = accumulators(4, (2, CHANNELS, 6, 6)).to(torch.int32)
    bias, ch = torch.arange(CHANNELS) * 11 - 30, (-1, 1, 1)
    pool = (2, 2, 0, 1, False)
    want = reference(torch.nn.functional.max_pool2d(acc.double(), *pool).long(), bias, m0, shift, 0, 0, 255, False)
    got = epilogue.run(acc, bias.reshape(ch), m0.reshape(ch), shift.reshape(ch), torch.tensor([0]), 0, 255, pool)
    assert torch.equal(got, want)


def test_overflow_check_runs_step_by_step(compile_on):
    acc = torch.tensor([[INT32_MAX]], dtype=torch.int64).reshape(1, 1, 1, 1)
    one = torch.ones(1, 1, 1, dtype=torch.int64)
    with pytest.raises(IntsimError, match="conv9: int32 accumulator overflow"):
        epilogue.run(acc, one, one * 2 ** 30, one * 0, torch.tensor([0]), 0, 255, check_int32="conv9")


F32 = lambda v: float(torch.tensor(v, dtype=torch.float32))     # a scale as the op stores it


@pytest.mark.parametrize("relu", [False, True])
def test_compiled_add_lookup_is_tflite(compile_on, relu):
    """Two tensors, the second broadcast along H and W (a per-channel residual is not, but the
    lookup's index arithmetic must broadcast as the kernel does), with outputs at both ends."""
    s1, z1, s2, z2, s_out, z_out = 0.031, 12, 0.047, 240, 0.004, 130       # a narrow output: saturation
    add = frozen_add(s1, z1, s2, z2, s_out, z_out, relu)
    g = torch.Generator().manual_seed(7)
    q1 = torch.randint(0, 256, (2, 3, 4, 5), generator=g, dtype=torch.int32)
    q2 = torch.randint(0, 256, (2, 3, 1, 1), generator=g, dtype=torch.int32)
    got = add(q1, q2)
    assert binary.lookup2 in compiled._state["compiled"]
    q2b = q2.expand_as(q1)
    want = [ref_tflite_add(a, z1, F32(s1), b, z2, F32(s2), z_out, F32(s_out), 0, 255, relu)
            for a, b in zip(q1.flatten().tolist(), q2b.flatten().tolist())]
    assert got.shape == q1.shape and got.flatten().tolist() == want
    assert 255 in want and (z_out if relu else 0) in want
    assert torch.equal(add.direct(q1, q2).to(torch.int32), got)                # the kernel itself, untabulated


def test_compiled_add_of_a_constant_is_tflite(compile_on):
    a = activation_grid(8)
    s1, z1, s2, z2, s_out, z_out, c = 0.02, 9, 0.05, 0, 0.03, 4, 60           # x + 3.0 (c = 60 on S2 = 0.05)
    add = IntAdd(qp(s1, z1, a), qp(s2, z2, a), qp(s_out, z_out, a), (-math.inf, math.inf), constant=c)
    q = torch.arange(256, dtype=torch.int32).reshape(4, 64)
    want = [ref_tflite_add(v, z1, F32(s1), c, z2, F32(s2), z_out, F32(s_out), 0, 255, False) for v in q.flatten().tolist()]
    assert add(q).flatten().tolist() == want


def test_compiled_mean_is_tflite(compile_on):
    g = torch.Generator().manual_seed(0)
    a = activation_grid(8)
    s_in, s_out, z_in, z_out = 3 / 255, 2.5 / 255, 5, 7
    mean = IntMean(49, qp(s_in, z_in, a), qp(s_out, z_out, a))
    q = torch.randint(0, 256, (4, 6, 7, 7), generator=g, dtype=torch.int32)
    want = [ref_mean(q[b, c].flatten().tolist(), z_in, F32(s_in), F32(s_out), z_out, 0, 255)
            for b in range(4) for c in range(6)]
    got = mean(q)
    assert got.shape == (4, 6, 1, 1) and got.dtype == torch.int32 and got.flatten().tolist() == want


@pytest.mark.parametrize("scale", [0.0078125, 1 / 255, 0.017352, 2.1e-3])
def test_compiled_input_quantize_is_tflite(compile_on, scale):
    """The input QUANTIZE, q = clamp(round(x / S) + Z), x / S in float32: reals at the ties of
    every integer step and one float32 step either side (a division replaced by a product with
    1/S, or a rounding of ties to even, moves some of them), and random reals; against NumPy."""
    a = activation_grid(8)
    op = Quantize(qp(scale, 128, a))
    s = np.float32(op.out_scale.item())
    ties = ((np.arange(-140, 140, dtype=np.float64) + 0.5) * np.float64(s)).astype(np.float32)
    near = np.concatenate([ties, np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf))])
    x = np.concatenate([near, np.random.default_rng(0).uniform(-1.2, 1.2, 5000).astype(np.float32)])
    quotient = (x / s).astype(np.float64)                       # float32 division, exact in float64 below
    want = np.clip(np.sign(quotient) * np.floor(np.abs(quotient) + 0.5) + 128, 0, 255)
    got = op(torch.from_numpy(x).reshape(1, 1, -1))
    assert quantize_unchecked in compiled._state["compiled"]
    assert got.dtype == torch.int32 and np.array_equal(got.flatten().numpy(), want)


def test_a_failed_compile_warns_once_and_gives_the_same_integers(compile_on, monkeypatch):
    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler here")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setitem(compiled._state, "compiled", {})
    m0, shift = multipliers(5)
    acc, ch = accumulators(6, (1, CHANNELS, 3, 3)), (-1, 1, 1)
    args = (acc, torch.zeros(CHANNELS, 1, 1, dtype=torch.int64), m0.reshape(ch), shift.reshape(ch),
            torch.tensor([0]), -128, 127)
    with pytest.warns(UserWarning, match="no C.. compiler here.*run step by step"):
        got = epilogue.run(*args)
    assert torch.equal(got, reference(acc, torch.zeros(CHANNELS), m0, shift, 0, -128, 127, False))
    assert not compiled.compiles(torch.device("cpu")) and "step by step" in compiled.describe()


def test_compile_mode_is_checked():
    with pytest.raises(IntsimError, match="one of auto, on, off, got 'yes'"):
        compiled.set_compile("yes")
    compiled.set_compile("off")
    assert not compiled.compiles(torch.device("cpu"))
    compiled.set_compile("auto")
    assert compiled.compiles(torch.device("cpu")) and not compiled.compiles(torch.device("cuda"))
    compiled.set_compile(None)


def test_a_golden_run_with_the_compiled_kernels_is_unchanged(data_dir, tmp_path):
    """ResNet18 (int8 GEMMs, a fused max-pool, residual ADDs, MEAN), its golden run with --compile
    on and off: the same RESULT (accuracies, output fingerprints)."""
    script, args = RUNS["ptq_resnet18_w8a8"]
    results = {}
    for mode in ("on", "off"):
        RUNS[f"compile_{mode}"] = (script, f"{args} --compile {mode}")
        try:
            results[mode] = run(f"compile_{mode}", str(tmp_path), data_dir)
        finally:
            del RUNS[f"compile_{mode}"]
    assert results["on"]["epilogue"] == "compiled, step by step"       # the classifier: FC's double rescale
    assert results["off"]["epilogue"] == "step by step"
    assert measured(results["on"]) == measured(results["off"]) and "int_outputs_sha" in results["on"]
