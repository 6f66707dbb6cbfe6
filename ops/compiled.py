"""Whether the integer kernels' elementwise passes run compiled by torch.compile, and the one call
that runs a kernel function compiled or step by step.

Step by step, each int64 operation of an integer kernel is a pass over the whole tensor; inductor
fuses a kernel function's passes into one loop. Integer arithmetic has nothing to reorder or
round, so both forms give the same integers (tests/test_epilogue.py compares them, and both with
the TFLite ports in tests/reference.py). The kernel functions compiled here: the epilogue of the
accumulating ops (ops/epilogue.py), the table lookup of ADD and MUL (ops/binary.py), MEAN's
sum and rescale (ops/mean.py) and the input QUANTIZE (ops/quant.py).

When they run compiled (`set_compile`, the scripts' --compile, or INTSIM_COMPILE): "auto"
(default) on CPU, where inductor needs a C++ compiler; "on" on any device; "off" never. Where
compiling fails (no compiler, an old torch), one warning says so and every kernel runs step by
step from then on.
"""
import os
import warnings

import torch

from errors import IntsimError

COMPILE_MODES = ("auto", "on", "off")
COMPILE_ENV = "INTSIM_COMPILE"
# the process's choice, its compiled functions, why compiling failed, how the kernels ran
_state = {"mode": None, "compiled": {}, "failed": None, "ran": set()}


def set_compile(mode):
    """Whether the kernels run compiled: "auto", "on" or "off" (None: $INTSIM_COMPILE, else auto)."""
    mode = mode or os.environ.get(COMPILE_ENV) or "auto"
    if mode not in COMPILE_MODES:
        raise IntsimError(f"--compile / ${COMPILE_ENV} is one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    _state["mode"] = mode


def compiles(device):
    """Whether the kernels run compiled on `device` (as set, and where compiling has not failed)."""
    if _state["mode"] is None:
        set_compile(None)
    mode = _state["mode"]
    return _state["failed"] is None and (mode == "on" or (mode == "auto" and device.type == "cpu"))


def describe():
    """How the integer kernels of this process ran, for a RESULT: "compiled", "step by step",
    both ("compiled, step by step": some kernels cannot run compiled) or "none ran"."""
    return ", ".join(sorted(_state["ran"])) or "none ran"


def call(fn, device, *args, compiled=True):
    """fn(*args), compiled by torch.compile where `compiled` and `compiles(device)`, else step by
    step. `fn` is a kernel function without checks on values (they run before this call)."""
    if compiled and compiles(device):
        try:
            if fn not in _state["compiled"]:
                _state["compiled"][fn] = torch.compile(fn, dynamic=True)
            out = _state["compiled"][fn](*args)
            _state["ran"].add("compiled")
            return out
        except Exception as e:                  # no C++ compiler, an unsupported torch: say so once, go on
            _state["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"torch.compile could not compile the integer kernel {fn.__name__} "
                          f"({_state['failed'][:200]}); the kernels run step by step (the same integers, "
                          f"slower). --compile off skips the attempt")
    _state["ran"].add("step by step")
    return fn(*args)
