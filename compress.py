"""Compressed activations for backward (ActNN, Chen et al. 2021, arXiv 2104.14129, sec. 3-4):
a tensor autograd would keep for the backward pass is stored in b bits per value instead.

Each sample is flattened and cut into groups of `group_size` values (the last padded with the
sample's last value); per group G the minimum m_G and the step s_G = R_G / B (R_G the range,
B = 2^b - 1) are kept in bfloat16 and the codes

    q = floor((x - m_G) / s_G + u),   u ~ U[0, 1)          (stochastic rounding)

are bit-packed into a byte stream (4 per byte at 2 bits). E[m_G + s_G q] = x exactly: the
stored m_G is x's minimum rounded down and s_G the step rounded up to bfloat16 (so the grid
still covers the group), and the codes are computed from those stored values, not from the
float ones. Per-tensor
(ActNN's ablation) is one group for the whole tensor.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from errors import IntsimError

BITS = tuple(range(1, 9))       # code widths (1, 2, 4, 8 fill bytes whole; the others straddle them)
GROUP_SIZE = 256                # ActNN's default (quantize/conf.py: group_size)
PARAM_DTYPE = torch.bfloat16    # m_G and s_G, as ActNN keeps them
LOW_HALF = 0xFFFF               # the float32 bits bfloat16 drops
TINY_RANGE = 2.0 ** -100        # a constant group still gets a positive step


def _bf16_toward(x, up):
    """x (float32) rounded to a bfloat16 value toward +inf (up) or -inf, returned as float32:
    bfloat16 is float32's upper 16 bits, so truncating them rounds toward zero, and one unit
    more in the last place moves away from zero."""
    bits = x.contiguous().view(torch.int32)
    truncated = bits & ~LOW_HALF
    inexact = (bits & LOW_HALF) != 0
    away = inexact & ((x > 0) if up else (x < 0))       # truncation went the wrong way here
    return torch.where(away, truncated + (LOW_HALF + 1), truncated).view(torch.float32)


def pack(codes, bits):
    """Codes (uint8, each < 2^bits) -> a uint8 bit stream: code i's bit j is stream bit
    i * bits + j, 8 stream bits per byte, lowest first (whole codes per byte at 1, 2, 4, 8 bits;
    codes straddle bytes at 3, 5, 6, 7, as ActNN's per-layer allocation needs)."""
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes.reshape(-1, 1).to(torch.uint8) >> shifts) & 1).flatten()          # (n * bits,)
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)]).reshape(-1, 8)
    return (stream << torch.arange(8, dtype=torch.uint8, device=codes.device)).sum(1, dtype=torch.uint8)


def unpack(packed, bits, n=None):
    """The inverse of pack: the first n codes (default: all the stream holds) as uint8."""
    stream = ((packed.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1).flatten()
    n = stream.numel() // bits if n is None else n
    weights = (1 << torch.arange(bits, device=packed.device)).to(torch.uint8)
    return (stream[:n * bits].reshape(n, bits) * weights).sum(1, dtype=torch.uint8)


@dataclass
class Compressed:
    """A tensor held in `bits` per value: packed codes, per-group minimum and step (bfloat16)."""
    packed: torch.Tensor        # uint8, (ceil(N * groups * group_size * bits / 8),)
    minimum: torch.Tensor       # bfloat16, (N, groups, 1)
    step: torch.Tensor          # bfloat16, (N, groups, 1)
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    group_size: int             # values per group (per-tensor: the numel)

    def nbytes(self):
        """The bytes held: codes, minima and steps."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.minimum, self.step))


def _groups(x, group_size, per_group):
    """x (N, ...) -> (N, groups, group_size) float32, padded with each row's last value;
    per-tensor: (1, 1, numel)."""
    rows = x.detach().float().reshape(x.shape[0], -1) if per_group else x.detach().float().reshape(1, -1)
    size = group_size if per_group else rows.shape[1]
    pad = (-rows.shape[1]) % size
    if pad:
        rows = torch.cat([rows, rows[:, -1:].expand(-1, pad)], dim=1)
    return rows.reshape(rows.shape[0], -1, size), size


def check_settings(bits, group_size):
    """The one check of a compression setting (flags and direct calls alike)."""
    if bits not in BITS:
        raise IntsimError(f"--ca-bits {bits}: use one of {BITS[0]}..{BITS[-1]}")
    if group_size < 1:
        raise IntsimError(f"--ca-group-size {group_size}: use a positive number")


def compress(x, bits, group_size=GROUP_SIZE, per_group=True, generator=None):
    """x (N, ...) float -> Compressed at `bits` per value, stochastically rounded (unbiased)."""
    check_settings(bits, group_size)
    if x.dim() == 0 or x.numel() == 0:
        raise IntsimError(f"cannot compress a tensor of shape {tuple(x.shape)}: it needs a batch dimension")
    g, size = _groups(x, group_size, per_group)
    levels = 2 ** bits - 1                                                 # B
    lo, hi = g.amin(dim=2, keepdim=True), g.amax(dim=2, keepdim=True)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise IntsimError("cannot compress activations with inf or NaN in them (the forward pass diverged)")
    minimum = _bf16_toward(lo, up=False)                                   # m_G <= min x
    step = _bf16_toward(((hi - minimum) / levels).clamp_min(TINY_RANGE), up=True)   # m_G + B s_G >= max x
    u = torch.rand(g.shape, generator=generator, device=g.device)        # a generator on x's device
    codes = torch.floor((g - minimum) / step + u).clamp_(0, levels).to(torch.uint8)
    return Compressed(pack(codes, bits), minimum.to(PARAM_DTYPE), step.to(PARAM_DTYPE), x.shape, x.dtype,
                      bits, size)


def decompress(c):
    """Compressed -> the tensor m_G + s_G q, shape and dtype of the original."""
    n_groups = c.minimum.shape[0] * c.minimum.shape[1]
    codes = unpack(c.packed, c.bits, n_groups * c.group_size).reshape(*c.minimum.shape[:2], c.group_size)
    values = c.minimum.float() + c.step.float() * codes.float()
    rows = values.reshape(c.minimum.shape[0], -1)
    per_row = c.shape.numel() // rows.shape[0]
    return rows[:, :per_row].reshape(c.shape).to(c.dtype)


# ----------------------------------------------------------------------------- layers that save compressed inputs
# Each forward is the ordinary one; what autograd keeps for backward is packed (save_for_backward
# on the packed tensors, so that saved_tensors_hooks see the bytes really held). Backward
# decompresses and applies the layer's own gradient formulas.

@dataclass(frozen=True)
class CompressConfig:
    """How saved activations are held: `bits` per value, ranges per group of `group_size`
    values of a sample (ActNN's per-group) or one per tensor."""
    bits: int = 2
    group_size: int = GROUP_SIZE
    per_group: bool = True

    def __post_init__(self):
        check_settings(self.bits, self.group_size)

    def compress(self, x):
        return compress(x, self.bits, self.group_size, self.per_group)


def _save(ctx, c, *others):
    ctx.save_for_backward(c.packed, c.minimum, c.step, *others)
    ctx.meta = (c.shape, c.dtype, c.bits, c.group_size)


def _load(ctx):
    packed, minimum, step, *others = ctx.saved_tensors
    return decompress(Compressed(packed, minimum, step, *ctx.meta)), others


class CompressedLinearConv(torch.autograd.Function):
    """y = conv2d(x, W, b) or linear(x, W, b); keeps x compressed (and W, held anyway).
    dL/dx needs only W; dL/dW is computed from the decompressed x^."""

    @staticmethod
    def forward(ctx, x, weight, bias, kwargs, cfg):
        ctx.kwargs, ctx.has_bias = kwargs, bias is not None
        _save(ctx, cfg.compress(x), weight)
        return (F.conv2d if weight.dim() == 4 else F.linear)(x, weight, bias, **kwargs)

    @staticmethod
    def backward(ctx, g):
        x, (weight,) = _load(ctx)
        gx = gw = gb = None
        if weight.dim() == 4:
            if ctx.needs_input_grad[0]:
                gx = torch.nn.grad.conv2d_input(x.shape, weight, g, **ctx.kwargs)
            if ctx.needs_input_grad[1]:
                gw = torch.nn.grad.conv2d_weight(x, weight.shape, g, **ctx.kwargs)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                gb = g.sum((0, 2, 3))
        else:
            g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])      # (rows, out), (rows, in)
            if ctx.needs_input_grad[0]:
                gx = (g2 @ weight).reshape(x.shape)
            if ctx.needs_input_grad[1]:
                gw = g2.t() @ x2
            if ctx.has_bias and ctx.needs_input_grad[2]:
                gb = g2.sum(0)
        return gx, gw, gb, None, None


def _pack_bool(mask):
    return pack(mask.flatten().to(torch.uint8), 1)


class CompressedReLU(torch.autograd.Function):
    """y = max(x, 0); keeps the 1-bit mask y > 0 (exact: ReLU's gradient needs nothing else)."""

    @staticmethod
    def forward(ctx, x):
        y = x.clamp_min(0)
        ctx.save_for_backward(_pack_bool(y > 0))
        ctx.shape = x.shape
        return y

    @staticmethod
    def backward(ctx, g):
        (packed,) = ctx.saved_tensors
        mask = unpack(packed, 1, ctx.shape.numel()).reshape(ctx.shape)
        return g * mask.to(g.dtype)


def _code_bits(values):
    """The narrowest width for codes 0..values-1 (a 2x2 window: 2 bits; 3x3: 4)."""
    bits = max(1, math.ceil(math.log2(values)))
    if bits > 8:
        raise IntsimError(f"a max-pool window of {values} positions is too large to compress (at most 256)")
    return bits


def _window_starts(out_h, out_w, stride, padding, device):
    """Top-left input position of each max-pool window: rows (OH, 1), columns (1, OW)."""
    (sh, sw), (ph, pw) = stride, padding
    return ((torch.arange(out_h, device=device) * sh - ph).view(-1, 1),
            (torch.arange(out_w, device=device) * sw - pw).view(1, -1))


class CompressedMaxPool2d(torch.autograd.Function):
    """Max-pool; keeps, for each output, which position of its window won (an index of
    ceil(log2(kH kW)) bits, packed) instead of the int64 index into the plane (exact)."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        y, idx = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        (kh, kw), (dh, dw), width = kernel, dilation, x.shape[-1]
        oh, ow = _window_starts(y.shape[-2], y.shape[-1], stride, padding, x.device)
        local = ((idx // width - oh) // dh) * kw + (idx % width - ow) // dw         # 0 .. kh kw - 1
        bits = _code_bits(kh * kw)
        ctx.save_for_backward(pack(local.flatten().to(torch.uint8), bits))
        ctx.geometry = (x.shape, y.shape, kernel, stride, padding, dilation, bits)
        return y

    @staticmethod
    def backward(ctx, g):
        (packed,) = ctx.saved_tensors
        x_shape, y_shape, (kh, kw), stride, padding, (dh, dw), bits = ctx.geometry
        local = unpack(packed, bits, y_shape.numel()).reshape(y_shape).long()
        oh, ow = _window_starts(y_shape[-2], y_shape[-1], stride, padding, g.device)
        idx = (oh + (local // kw) * dh) * x_shape[-1] + ow + (local % kw) * dw     # into the H W plane
        gx = g.new_zeros(*x_shape[:-2], x_shape[-2] * x_shape[-1])
        gx.scatter_add_(-1, idx.flatten(-2), g.flatten(-2))                        # overlapping windows add
        return gx.reshape(x_shape), None, None, None, None, None


class CompressedBatchNorm2d(torch.autograd.Function):
    """BatchNorm with batch statistics; keeps x^ = (x - mu_B) / sigma_B compressed and sigma_B
    (C values). Backward (per channel, means over N, H, W): dL/dgamma = sum g x^,
    dL/dbeta = sum g, dL/dx = (g' - mean(g') - x^ mean(g' x^)) / sigma_B with g' = g gamma."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, cfg):
        y = F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
        mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
        std = torch.sqrt(var + eps)
        ctx.affine = weight is not None
        gamma = weight if weight is not None else torch.ones(x.shape[1], device=x.device, dtype=x.dtype)
        _save(ctx, cfg.compress((x - mean) / std), std, gamma)
        return y

    @staticmethod
    def backward(ctx, g):
        xhat, (std, gamma) = _load(ctx)
        dims = (0, 2, 3)
        gn = g * gamma.view(1, -1, 1, 1)
        gx = (gn - gn.mean(dims, keepdim=True) - xhat * (gn * xhat).mean(dims, keepdim=True)) / std
        gw, gb = ((g * xhat).sum(dims), g.sum(dims)) if ctx.affine else (None, None)
        return gx, gw, gb, None, None, None, None, None


def _training(module):
    return module.training and torch.is_grad_enabled()


class CAConv2d(nn.Conv2d):
    def forward(self, x):
        if not _training(self):
            return super().forward(x)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        elif isinstance(self.padding, str):
            raise IntsimError(f"compressed conv with padding='{self.padding}': give the padding as numbers")
        else:
            padding = self.padding
        kwargs = dict(stride=self.stride, padding=padding, dilation=self.dilation, groups=self.groups)
        return CompressedLinearConv.apply(x, self.weight, self.bias, kwargs, self.ca)


class CALinear(nn.Linear):
    def forward(self, x):
        if not _training(self):
            return super().forward(x)
        return CompressedLinearConv.apply(x, self.weight, self.bias, {}, self.ca)


class CABatchNorm2d(nn.BatchNorm2d):
    def forward(self, x):
        if not _training(self):
            return super().forward(x)
        momentum = 0.0 if self.momentum is None else self.momentum      # nn.BatchNorm2d's own rule
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:                                   # cumulative average
                momentum = 1.0 / float(self.num_batches_tracked)
        return CompressedBatchNorm2d.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                           momentum, self.eps, self.ca)


class CAReLU(nn.ReLU):
    def forward(self, x):
        return CompressedReLU.apply(x) if _training(self) else super().forward(x)


class CAMaxPool2d(nn.MaxPool2d):
    def forward(self, x):
        if not _training(self) or self.return_indices:
            return super().forward(x)
        pair = torch.nn.modules.utils._pair
        return CompressedMaxPool2d.apply(x, pair(self.kernel_size), pair(self.stride or self.kernel_size),
                                         pair(self.padding), pair(self.dilation), self.ceil_mode)


COMPRESSED = {nn.Conv2d: CAConv2d, nn.Linear: CALinear, nn.BatchNorm2d: CABatchNorm2d, nn.ReLU: CAReLU,
              nn.MaxPool2d: CAMaxPool2d}


def compress_activations(model, cfg=None):
    """ActNN's QModule(model) for any network: every nn.Conv2d, nn.Linear, nn.BatchNorm2d,
    nn.ReLU and nn.MaxPool2d, in place, becomes its compressed twin (the same parameters,
    buffers and state_dict keys; the forward is unchanged; training saves compressed inputs).
    Returns the model. Functional calls (F.relu in a forward) are not swapped: they save their
    tensors in full, which saved_bytes shows."""
    cfg = cfg or CompressConfig()
    for m in model.modules():
        twin = COMPRESSED.get(type(m))
        if twin is not None:
            m.__class__ = twin
        if isinstance(m, tuple(COMPRESSED.values())):
            m.ca = cfg
    return model


def saved_bytes(model, x):
    """Bytes autograd holds for the backward pass after model(x): every tensor saved in the
    graph (torch.autograd.graph.saved_tensors_hooks), counted once per storage, parameters left
    out (they are held anyway)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held = {}

    def pack_hook(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            held[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        model(x)
    return sum(held.values())


# ----------------------------------------------------------------------------- bit allocation (ActNN sec. 4.2)

def quantization_variance(sensitivity, bits):
    """The variance stochastic rounding adds at `bits`: C / (2^b - 1)^2, C = sum over the tensor's
    groups of (value count / 4) R_G^2 (times the output gradient's squared norm, ActNN's
    --usegradient): each value's variance is at most s^2 / 4 with s = R_G / (2^b - 1)."""
    return sensitivity / (2 ** bits - 1) ** 2


def allocate_bits(sensitivities, sizes, average_bits, initial_bits=8, min_bits=1):
    """ActNN's greedy allocation: from `initial_bits` everywhere, take one bit at a time from the
    tensor where it adds the least variance per bit of storage saved, until the average over
    all stored values (weighted by `sizes`) is at most `average_bits`. Returns the bits of each."""
    bits = [initial_bits] * len(sizes)
    budget = average_bits * sum(sizes)
    while sum(b * n for b, n in zip(bits, sizes)) > budget:
        cost = [(quantization_variance(c, b - 1) - quantization_variance(c, b)) / n if b > min_bits else math.inf
                for c, b, n in zip(sensitivities, bits, sizes)]
        i = min(range(len(bits)), key=cost.__getitem__)
        if cost[i] == math.inf:
            raise IntsimError(f"an average of {average_bits} bits is below {min_bits} bit per value: raise --ca-bits")
        bits[i] -= 1
    return bits
