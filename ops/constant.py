"""A real constant as the second operand of ADD or MUL (Hardsigmoid's x + 3 and x * 1/6): one
integer on a grid of its own that holds it exactly, and its one-value tensor in a .tflite file."""
import numpy as np
import torch

from function import Grid

from .base import QParams


def constant_qparams(value, grid):
    """A real constant on `grid` exactly: S = |c| / QMAX, Z = 0 where the grid allows zero points
    of 0 (signed), else the range [0, c] or [c, 0] (unsigned); returns (QParams, its integer)."""
    c = float(value)
    if c == 0:
        return QParams(torch.tensor([1.0]), torch.tensor([grid.qmin if not grid.signed else 0]), grid), \
            (grid.qmin if not grid.signed else 0)
    if grid.signed:
        s = abs(c) / grid.qmax
        return QParams(torch.tensor([s], dtype=torch.float32), torch.tensor([0]), grid), int(np.sign(c)) * grid.qmax
    s = abs(c) / (grid.qmax - grid.qmin)
    z = grid.qmin if c > 0 else grid.qmax
    return QParams(torch.tensor([s], dtype=torch.float32), torch.tensor([z]), grid), (grid.qmax if c > 0 else grid.qmin)


def constant_tensor(ex, node, op):
    """The .tflite tensor of op's constant second operand, on the scheme's 8-bit type (as the
    activations are: on the input's grid, moved by the same offset)."""
    offset = ex.offset_of(QParams(op.in_scale2, op.in_zero_point2, Grid(op.out_bits, signed=op.out_signed)), node.name)
    value = np.array([op.constant + offset], dtype=np.int8 if ex.scheme == "int8" else np.uint8)
    return ex.w.tensor(f"{node.name}.constant", [1], ex.scheme.upper(), op.in_scale2.numpy(),
                       (op.in_zero_point2 + offset).numpy(), value)
