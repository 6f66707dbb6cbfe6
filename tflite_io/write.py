"""A frozen intsim model written as a .tflite file (`export_tflite`), each op by its entry in
ops.OPS (ops.TFLITE_WRITERS), validated by LiteRT before a byte is returned.

    data, tensor, offset = export_tflite(frozen, "int8", x[:1])    # .tflite bytes

Schemes: uint8, the 2018 paper's (uint8 activations, per-tensor uint8 weights with zero points);
int8, TFLite's current one (int8 activations, int8 weights symmetric per channel, Z_w = 0).
"""
import numpy as np
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

import ops
from errors import IntsimError
from frozen import set_mode
from ops.base import UINT8_TO_INT8
from ops.shape import RESHAPES

from .schema import Writer, fused_activation, litert, same_padding

SCHEMES = ("uint8", "int8")


def _grid_offset(qp, scheme, what):
    """What to add to intsim's integers of a tensor to put them on the scheme's 8-bit type."""
    if qp.grid.bits != 8:
        raise IntsimError(f"{what} has {qp.grid.bits}-bit activations: TFLite's kernels clamp to the full "
                          f"8-bit range, so only 8-bit activations export exactly (use --a-bits 8)")
    want_signed = scheme == "int8"
    return 0 if qp.grid.signed == want_signed else (-UINT8_TO_INT8 if want_signed else UINT8_TO_INT8)


def _holds_tensors(meta):
    """Whether a node's value is a tensor or a tuple of them (chunk), not shape arithmetic."""
    return isinstance(meta, TensorMetadata) or (isinstance(meta, (tuple, list)) and bool(meta)
                                                and all(isinstance(m, TensorMetadata) for m in meta))


class Exporter:
    """Walks a frozen graph and has each op's writer write it as its TFLite op (NHWC). What the
    writers share: the Writer `w`, the scheme, each fx node's tensor (`t`: index, QParams as
    intsim holds them, offset to the scheme's type, NCHW shape), the smallest integer a tensor
    can hold (`lowest`: its producer's act_min), and the last flatten of spatial data."""

    def __init__(self, frozen, scheme, example):
        if scheme not in SCHEMES:
            raise IntsimError(f"unknown TFLite scheme {scheme!r}; use one of {SCHEMES}")
        self.frozen, self.scheme, self.w = frozen, scheme, Writer(scheme)
        kernel = getattr(frozen, "kernel", None)        # model.freeze's (a file read in has none)
        unsigned = any(getattr(m, "out_bits", 0) == 8 and not m.out_signed for m in frozen.modules()
                       if hasattr(m, "out_signed"))
        if kernel is not None and unsigned and kernel != scheme:
            raise IntsimError(f"the model is frozen for TFLite's {kernel} kernel (freeze(..., kernel='{kernel}')), "
                              f"whose per-tensor multipliers and average-pool rounding are not the {scheme} kernel's, "
                              f"so LiteRT would not compute intsim's integers: freeze with kernel='{scheme}' (the "
                              f"scripts do: --tflite-scheme sets it) or export as {kernel}")
        uint8_kernel = [n for n, m in frozen.named_modules() if getattr(m, "scale_product", None) == "float32"
                        and m.out_bits == m.in_bits == 8 and not m.w_zero_point.any()]   # (the rest: refused below)
        if scheme == "int8" and uint8_kernel:
            raise IntsimError(f"{uint8_kernel[0]} is frozen for TFLite's uint8 kernel (freeze(..., kernel='uint8'): M "
                              f"from the float32 product S_in S_w), while an int8 file's kernel derives M in double, so "
                              f"LiteRT would not compute intsim's integers: export it with --tflite-scheme uint8, or "
                              f"freeze with kernel='int8' (the scripts do, unless --tflite-scheme uint8)")
        set_mode(frozen, "int")
        # every node's output shape as TFLite's ops produce it: the max-pool-on-accumulator shortcut
        # (IntMaxPool.run_by_producer) off, so a conv's output is the unpooled tensor
        fused = [(m, m.pool_first) for m in frozen.modules() if hasattr(m, "pool_first")]
        pools = [(m, m.run_by_producer) for m in frozen.modules() if hasattr(m, "run_by_producer")]
        for m, _ in fused:
            m.pool_first = None
        for m, _ in pools:
            m.run_by_producer = False
        try:
            ShapeProp(frozen).propagate(example)
        finally:
            for m, v in fused:
                m.pool_first = v
            for m, v in pools:
                m.run_by_producer = v
        self.lowest = {}
        self.pending, self.split_outputs = {}, {}    # reshape chains not yet written; a split's output tensors
        self.flattened_from = self.flattened_node = None   # the last flatten of spatial data, (C, H, W)
        self.t = {}

    def act_tensor(self, node, qp, name):
        offset = _grid_offset(qp, self.scheme, name)
        shape = list(node.meta["tensor_meta"].shape)
        tflite_shape = [shape[0], *shape[2:], shape[1]] if len(shape) == 4 else shape
        index = self.w.tensor(name, tflite_shape, self.scheme.upper(), qp.scale.numpy(),
                              (qp.zero_point + offset).numpy())
        self.t[node] = (index, qp, offset, shape)
        return index

    def offset_of(self, qp, what):
        """What to add to integers on grid `qp` to put them on the scheme's 8-bit type."""
        return _grid_offset(qp, self.scheme, what)

    def fused_activation(self, op, qp, what):
        return fused_activation(op, qp, what)

    def pad(self, node, x, qp, offset, in_shape, pad):
        """A PAD op (padding with the zero point: real 0) in front of a VALID op: (left, right,
        top, bottom) that TFLite's SAME cannot say (PyTorch's symmetric padding at stride 2)."""
        left, right, top, bottom = pad
        n, c, h, w = in_shape
        paddings = self.paddings(node, pad)
        out = self.w.tensor(f"{node.name}.padded", [n, h + top + bottom, w + left + right, c], self.scheme.upper(),
                            qp.scale.numpy(), (qp.zero_point + offset).numpy())
        self.w.op("PAD", [x, paddings], [out], self.w.s.PadOptionsT(), "PadOptions")
        return out, [n, c, h + top + bottom, w + left + right]

    def paddings(self, node, pad):
        """PAD's constant [[0, 0], [top, bottom], [left, right], [0, 0]] for pad = (left, right, top, bottom)."""
        left, right, top, bottom = pad
        return self.w.tensor(f"{node.name}.paddings", [4, 2], "INT32",
                             data=np.array([[0, 0], [top, bottom], [left, right], [0, 0]], dtype=np.int32))

    def padding_of(self, pad, in_shape, kernel, stride, dilation):
        """TFLite's SAME or VALID for an op's explicit (left, right, top, bottom); None where
        neither says it (an explicit PAD, then VALID)."""
        if tuple(pad) == (0, 0, 0, 0):
            return self.w.s.Padding.VALID
        top, bottom = same_padding(in_shape[2], kernel[0], stride[0], dilation[0])
        left, right = same_padding(in_shape[3], kernel[1], stride[1], dilation[1])
        if tuple(pad) == (left, right, top, bottom):
            return self.w.s.Padding.SAME
        return None

    def no_pending_input(self, node):
        """Refuse a node that reads the middle of a chain of reshapes (ops/shape.py writes a chain
        where it comes back to its first shape: a channel permutation), naming the reshape."""
        for a in node.all_input_nodes:
            if a in self.pending and a not in self.t:         # (a chain's end is written: its GATHER)
                start, shape = list(self.pending[a].meta["tensor_meta"].shape), list(a.meta["tensor_meta"].shape)
                raise IntsimError(f"cannot export {a.name}: a reshape {start} -> {shape}, which has no TFLite form in "
                                  f"intsim's exporter: it writes flattens to [N, C H W] as RESHAPE, and view -> "
                                  f"transpose -> view chains that permute whole channels as GATHER")

    def src(self, node):
        arg = node.args[0]
        if arg not in self.t:
            raise IntsimError(f"cannot export {node.name}: its input {arg} is not a quantized tensor")
        return self.t[arg]

    def export(self):
        modules = sorted(k.__name__ for k in ops.TFLITE_WRITERS if isinstance(k, type))
        functions = sorted(getattr(k, "__name__", k) for k in ops.TFLITE_WRITERS if not isinstance(k, type))
        for node in self.frozen.graph.nodes:
            if node.op == "placeholder":
                shape = list(node.meta["tensor_meta"].shape)
                self.x = self.w.tensor("input", [shape[0], *shape[2:], shape[1]], "FLOAT32")
                self.w.graph.inputs = [self.x]
            elif node.op == "output":
                continue
            elif node.op == "call_module":
                self.no_pending_input(node)
                op = self.frozen.get_submodule(node.target)
                if type(op) not in ops.TFLITE_WRITERS:
                    raise IntsimError(f"cannot export {node.name}: {type(op).__name__} has no TFLite op in intsim's "
                                      f"exporter (it writes {', '.join(modules)} and {', '.join(functions)})")
                ops.TFLITE_WRITERS[type(op)](self, node, op)
            elif not _holds_tensors(node.meta.get("tensor_meta")):
                continue                   # shape arithmetic (x.size(0)): no tensor, nothing in the file
            elif node.op in ("call_function", "call_method") and node.target in ops.TFLITE_WRITERS:
                if node.target not in RESHAPES:          # a reshape may continue a chain
                    self.no_pending_input(node)
                ops.TFLITE_WRITERS[node.target](self, node, node.target)
            else:
                what = getattr(node.target, "__name__", node.target)
                raise IntsimError(f"cannot export {node.name} ({node.op} {what}): the exporter writes the functions "
                                  f"and methods {', '.join(functions)} (flattens as RESHAPE), no other")
        return self.w.pack()


def export_tflite(frozen, scheme, example):
    """A frozen intsim model as .tflite bytes (validated by LiteRT) and the index of the tensor
    whose integers equal intsim's output integers (plus `offset`: 0, or -128 / +128 where the
    scheme's 8-bit type is the other signedness)."""
    ex = Exporter(frozen, scheme, example)
    data = ex.export()
    interpreter, _ = litert()
    try:
        reference = interpreter.OpResolverType.BUILTIN_REF
        interpreter.Interpreter(model_content=data, experimental_op_resolver_type=reference).allocate_tensors()
    except Exception as e:        # LiteRT reports a rejected model as a RuntimeError/ValueError with its log
        why = str(e).strip().splitlines()[-1][:200]
        raise IntsimError(f"LiteRT rejects the exported model ({why}); nothing written") from None
    return data, ex.compare_tensor, ex.offset
