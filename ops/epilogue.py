"""The epilogue of the accumulating kernels (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED), in one
pass where it can be:

    acc (int32, or a float tensor of integers) -> max-pool (a fused MAX_POOL_2D) -> + bias (int32)
        -> rescale by (M0, shift) -> + Z_out -> clamp to [act_min, act_max] -> int32

The integers are function.requantize's: `epilogue` calls it, it is not a second copy. Step by
step, each of its ~15 int64 operations is a pass over the whole accumulator (two thirds of the
integer path's time on the MobileNets); torch.compile (inductor) fuses them into one loop
(`python bench.py --model cnn_bn --train-batches 0`: integer / float32 0.73x step by step,
0.35x compiled). Integer arithmetic has nothing to reorder or round, so the compiled and the
step-by-step epilogue give the same integers (tests/test_epilogue.py compares them, and both with
the TFLite port in tests/reference.py).

Compiled by ops/compiled.py where it runs compiled; step by step always: the double rescale of
FULLY_CONNECTED (a float product whose rounding a C++ compiler could contract into a fused
multiply-add) and accumulators whose bound exceeds int32 (their overflow check reads the values).
"""
import torch
import torch.nn.functional as F

from function import check_multiplier, int32_check, requantize, requantize_in_double

from . import compiled


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
    """`epilogue`, compiled where the rescale is the fixed-point one without an overflow check
    (and ops/compiled.py compiles); else step by step."""
    fixed_point = real_multiplier is None and check_int32 is None
    if fixed_point:
        check_multiplier(m0, shift)             # the checks on values, before a compiled call
    return compiled.call(epilogue, acc.device, acc, bias, m0, shift, zero_point, act_min, act_max, pool,
                         single_rounding, real_multiplier, check_int32, compiled=fixed_point)
