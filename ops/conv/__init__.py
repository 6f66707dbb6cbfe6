"""CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED: one kernel (IntConv) for conv and linear, the
op's home in three files by job: its kernel (kernel.py), how convert recognises and freezes it
(convert.py), its .tflite form and float rebuild (tflite.py); its table entry here.

In the converted graph the op is a QLayer (module.py) at each call site of an nn.Conv2d or
nn.Linear, with the BatchNorm after it folded in; `freeze_layer` turns it into an IntConv.
"""
from torch import nn

from module import QLayer

from ..base import PRODUCER, Op, is_module
from .convert import _convert, _freeze, _is_layer_source, _refuse_bn, adjust_weight_scale, freeze_layer
from .kernel import FLOAT32_EXACT, FloatLayer, IntConv, explicit_padding, rescale_rule
from .tflite import _float, _read_conv, _read_fully_connected, _write

__all__ = ["CONV", "FLOAT32_EXACT", "FloatLayer", "IntConv", "adjust_weight_scale", "explicit_padding",
           "freeze_layer", "rescale_rule"]


CONV = Op("conv/linear", PRODUCER, lambda gm, n: is_module(gm, n, QLayer),
          spelling="conv/linear [+BatchNorm] (nn.Conv2d, nn.Linear, F.conv2d / F.linear on parameters; a BatchNorm2d on its own as a depthwise 1x1 conv)",
          source=_is_layer_source, convert=_convert, freeze=_freeze, float_freeze=True, refuse=_refuse_bn,
          frozen=(IntConv, FloatLayer),
          float_modules={"BatchNorm2d": (nn.BatchNorm2d, ("num_features", "eps", "momentum", "affine")),
                         "BatchNorm1d": (nn.BatchNorm1d, ("num_features", "eps", "momentum", "affine"))},
          tflite_read={"CONV_2D": _read_conv, "DEPTHWISE_CONV_2D": _read_conv,
                       "FULLY_CONNECTED": _read_fully_connected},
          tflite_write={IntConv: _write}, to_float={IntConv: _float})
