"""The op table: every op intsim converts, freezes, runs in integers, reads from and writes to
.tflite, one entry each (see ops/base.py for what an entry holds). Everything that needs to know
an op looks it up here: model.convert and freeze, tflite_io's reader and writer, the checkpoint
loader, the per-layer report. Adding an op is one file of this package and one line below.
"""
from .add import ADD
from .clamp import RELU, RELU_6
from .concat import CONCAT
from .conv import CONV
from .hardswish import HARD_SWISH
from .logistic import LOGISTIC
from .mean import MEAN
from .mul import MUL
from .pad import PAD
from .pool import AVG_POOL, MAX_POOL
from .quant import ACTIVATION_QUANTIZER, INPUT, MODEL_OUTPUT, REQUANTIZE
from .shape import DROPOUT, FLATTEN, SHAPE_OF
from .softmax import SOFTMAX

# in match order: the first entry whose `match` holds is a node's op
OPS = (INPUT, CONV, ADD, MUL, LOGISTIC, HARD_SWISH, SOFTMAX, MEAN, RELU, RELU_6, MAX_POOL, FLATTEN, PAD, CONCAT, SHAPE_OF, ACTIVATION_QUANTIZER,
       MODEL_OUTPUT, AVG_POOL, DROPOUT, REQUANTIZE)

FROZEN_OPS = {cls.__name__: cls for op in OPS for cls in op.frozen}          # saved frozen models name these
TFLITE_READERS = {kind: fn for op in OPS for kind, fn in op.tflite_read.items()}
TFLITE_WRITERS = {key: fn for op in OPS for key, fn in op.tflite_write.items()}
FLOAT_REBUILDS = {cls: fn for op in OPS for cls, fn in op.to_float.items()}
FLOAT_MODULES = {name: spec for op in OPS for name, spec in op.float_modules.items()}
FUNCTIONS = tuple(fn for op in OPS for fn in op.functions)
SUPPORTED = ", ".join(op.spelling for op in OPS if op.spelling)


def op_of(gm, node):
    """The OPS entry of a node of a converted graph, or None."""
    return next((op for op in OPS if op.match(gm, node)), None)


def refusal(gm, node):
    """Why an entry of OPS refuses a near miss of itself (None: no entry knows the node)."""
    return next((why for op in OPS if op.refuse is not None for why in [op.refuse(gm, node)] if why), None)
