"""The integer epilogue (ops/epilogue.py) compiled by torch.compile against the same code step by
step and against the TFLite port in tests/reference.py (Python ints): every accumulator dtype the
kernels hand it (int32 in NHWC order from the int8 GEMM, float32, float64), per-channel
multipliers with left and right shifts and shift 0, ties, int32's ends, a fused max-pool, both
roundings; an IntConv and a whole golden run with the epilogue compiled give the same integers."""
import pytest
import torch

from errors import IntsimError
from function import INT32_MAX, INT32_MIN
from golden_runs import RUNS, measured, run
from ops import epilogue
from reference import ref_mbqm, ref_mbqm_single_rounding

pytestmark = pytest.mark.xdist_group("compile")     # one worker compiles, once per variant
CHANNELS = 6


@pytest.fixture
def compile_on():
    epilogue.set_compile("on")
    epilogue._state["failed"] = None
    yield
    epilogue.set_compile(None)
    epilogue._state["failed"] = None


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
    compiled = epilogue.run(*args, single_rounding=single_rounding)
    assert epilogue._state["failed"] is None, epilogue._state["failed"]
    assert torch.equal(compiled, want)
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


def test_a_failed_compile_warns_once_and_gives_the_same_integers(compile_on, monkeypatch):
    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler here")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setitem(epilogue._state, "compiled", None)
    m0, shift = multipliers(5)
    acc, ch = accumulators(6, (1, CHANNELS, 3, 3)), (-1, 1, 1)
    args = (acc, torch.zeros(CHANNELS, 1, 1, dtype=torch.int64), m0.reshape(ch), shift.reshape(ch),
            torch.tensor([0]), -128, 127)
    with pytest.warns(UserWarning, match="no C.. compiler here.*runs step by step"):
        got = epilogue.run(*args)
    assert torch.equal(got, reference(acc, torch.zeros(CHANNELS), m0, shift, 0, -128, 127, False))
    assert not epilogue.compiles(torch.device("cpu")) and "step by step" in epilogue.describe()


def test_compile_mode_is_checked():
    with pytest.raises(IntsimError, match="one of auto, on, off, got 'yes'"):
        epilogue.set_compile("yes")
    epilogue.set_compile("off")
    assert not epilogue.compiles(torch.device("cpu"))
    epilogue.set_compile("auto")
    assert epilogue.compiles(torch.device("cpu")) and not epilogue.compiles(torch.device("cuda"))
    epilogue.set_compile(None)


def test_a_golden_run_with_the_compiled_epilogue_is_unchanged(data_dir, tmp_path):
    """ResNet18 (int8 GEMMs, a fused max-pool, residual ADDs), its golden run with --compile on
    and off: the same RESULT (accuracies, output fingerprints)."""
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
