"""The epilogue of the accumulating kernels (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED), in one
pass where it can be:

    acc (int32, or a float tensor of integers) -> max-pool (a fused MAX_POOL_2D) -> + bias (int32)
        -> rescale by (M0, shift) -> + Z_out -> clamp to [act_min, act_max] -> int32

The integers are function.requantize's: `epilogue` calls it, it is not a second copy. Step by
step, each of its ~15 int64 operations is a pass over the whole accumulator (two thirds of the
integer path's time on the MobileNets); torch.compile (inductor) fuses them into one loop
(`python bench.py --model cnn_bn --train-batches 0`: integer / float32 0.73x step by step,
0.35x compiled). Integer arithmetic has nothing to reorder or
round, so the compiled and the step-by-step epilogue give the same integers (tests/test_epilogue.py
compares them, and both with the TFLite port in tests/reference.py).

When it runs compiled (`set_compile`, the scripts' --compile, or INTSIM_COMPILE):
"auto" (default) on CPU, where inductor needs a C++ compiler; "on" on any device; "off" never.
Where compiling fails (no compiler, an old torch), one warning says so and the epilogue runs step
by step from then on. Step by step always: the double rescale of FULLY_CONNECTED (a float product
whose rounding a C++ compiler could contract into a fused multiply-add) and accumulators whose
bound exceeds int32 (their overflow check reads the values).
"""
import os
import warnings

import torch
import torch.nn.functional as F

from errors import IntsimError
from function import check_multiplier, int32_check, requantize, requantize_in_double

COMPILE_MODES = ("auto", "on", "off")
COMPILE_ENV = "INTSIM_COMPILE"
# the process's choice, its compiled function, why compiling failed, how the epilogues ran
_state = {"mode": None, "compiled": None, "failed": None, "ran": set()}


def set_compile(mode):
    """Whether the epilogue runs compiled: "auto", "on" or "off" (None: $INTSIM_COMPILE, else auto)."""
    mode = mode or os.environ.get(COMPILE_ENV) or "auto"
    if mode not in COMPILE_MODES:
        raise IntsimError(f"--compile / ${COMPILE_ENV} is one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    _state["mode"] = mode


def compiles(device):
    """Whether the epilogue runs compiled on `device` (as set, and where compiling has not failed)."""
    if _state["mode"] is None:
        set_compile(None)
    mode = _state["mode"]
    return _state["failed"] is None and (mode == "on" or (mode == "auto" and device.type == "cpu"))


def describe():
    """How the integer epilogues of this process ran, for a RESULT: "compiled", "step by step",
    both ("compiled, step by step": some layers cannot run compiled) or "none ran"."""
    return ", ".join(sorted(_state["ran"])) or "none ran"


def epilogue(acc, bias, m0, shift, zero_point, act_min, act_max, pool=None, single_rounding=False,
             real_multiplier=None, check_int32=None):
    """The epilogue (module docstring); bias, m0, shift broadcast over acc's channels.
    `real_multiplier`: rescale by one rounding of acc * M in double instead (FULLY_CONNECTED);
    `check_int32` (a layer name): check that acc + bias fits int32 first."""
    if pool is not None:
        acc = F.max_pool2d(acc, *pool)          # max commutes with the monotone rescale: pool first
    acc = acc.to(torch.int64) + bias
    if check_int32 is not None:
        int32_check(acc, check_int32)
    if real_multiplier is not None:
        y = requantize_in_double(acc, real_multiplier, zero_point, act_min, act_max)
    else:
        y = requantize(acc, m0, shift, zero_point, act_min, act_max, single_rounding, check=False)
    return y.to(torch.int32, memory_format=torch.contiguous_format)


def run(acc, bias, m0, shift, zero_point, act_min, act_max, pool=None, single_rounding=False,
        real_multiplier=None, check_int32=None):
    """`epilogue`, compiled where `compiles` and the rescale is the fixed-point one without an
    overflow check; else step by step."""
    args = (acc, bias, m0, shift, zero_point, act_min, act_max, pool, single_rounding)
    if real_multiplier is None and check_int32 is None and compiles(acc.device):
        check_multiplier(m0, shift)             # the checks on values, before the compiled call
        try:
            if _state["compiled"] is None:
                _state["compiled"] = torch.compile(epilogue, dynamic=True)
            out = _state["compiled"](*args)
            _state["ran"].add("compiled")
            return out
        except Exception as e:                  # no C++ compiler, an unsupported torch: say so once, go on
            _state["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"torch.compile could not compile the integer epilogue ({_state['failed'][:200]}); "
                          f"it runs step by step (the same integers, slower). --compile off skips the attempt")
    _state["ran"].add("step by step")
    return epilogue(*args, real_multiplier, check_int32)
