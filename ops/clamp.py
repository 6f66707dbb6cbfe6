"""ReLU and ReLU6: a clamp, fused into the op before it (its act_min / act_max), or TFLite's RELU
on its own where nothing before it can take it."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import CLAMP, FrozenOp, Op, arg, is_function, is_method, is_module

RELU6 = (0.0, 6.0)


class IntClamp(FrozenOp):
    """A ReLU or ReLU6 on a quantized tensor (one that could not be fused into the op before it):
    TFLite's RELU with the input's S and Z, a clamp to [act_min, act_max]."""
    CONFIG = ("act_min", "act_max", "out_bits", "out_signed")
    integer = True

    def __init__(self, inp, act_range):
        super().__init__()
        self._set_out(inp, act_range)

    def real_forward(self, x):
        return self._real_out(x)

    def int_forward(self, q):
        return q.clamp(self.act_min, self.act_max)


def _is_relu(gm, node):
    return (is_module(gm, node, nn.ReLU) or is_function(node, (F.relu, torch.relu, torch.relu_))
            or is_method(node, ("relu", "relu_")))


def _is_relu6(gm, node):
    if is_module(gm, node, nn.Hardtanh):                    # nn.ReLU6 is a Hardtanh(0, 6)
        m = gm.get_submodule(node.target)
        return (m.min_val, m.max_val) == RELU6
    hardtanh = is_function(node, (F.hardtanh,)) and (arg(node, 1, "min_val", -1.0), arg(node, 2, "max_val", 1.0)) == RELU6
    return is_function(node, (F.relu6,)) or hardtanh


RELU = Op("ReLU", CLAMP, _is_relu, spelling="ReLU", clamp=(0.0, math.inf),
          freeze=lambda freezer, node, grid: IntClamp(grid, (0.0, math.inf)), frozen=(IntClamp,),
          float_modules={"ReLU": (nn.ReLU, ())}, functions=(torch.relu, torch.relu_, F.relu))
RELU_6 = Op("ReLU6", CLAMP, _is_relu6, spelling="ReLU6 (nn.ReLU6, F.relu6, F.hardtanh(x, 0, 6))", clamp=RELU6,
            freeze=lambda freezer, node, grid: IntClamp(grid, RELU6),
            float_modules={"ReLU6": (nn.ReLU6, ()), "Hardtanh": (nn.Hardtanh, ("min_val", "max_val"))},
            functions=(F.relu6, F.hardtanh))
