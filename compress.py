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
    i * bits + j, 8 stream bits per byte, lowest first. At 1, 2, 4, 8 bits a byte holds
    8 / bits whole codes, code k of a byte at bit k * bits; at 3, 5, 6, 7 codes straddle bytes
    (the same stream order, built bit by bit)."""
    codes = codes.reshape(-1).to(torch.uint8)
    if 8 % bits == 0:
        per_byte = 8 // bits
        codes = torch.cat([codes, codes.new_zeros((-codes.numel()) % per_byte)]).reshape(-1, per_byte)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        return (codes << shifts).sum(1, dtype=torch.uint8)          # the fields do not overlap: sum = or
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes.reshape(-1, 1) >> shifts) & 1).flatten()                            # (n * bits,)
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)]).reshape(-1, 8)
    return (stream << torch.arange(8, dtype=torch.uint8, device=codes.device)).sum(1, dtype=torch.uint8)


def unpack(packed, bits, n=None):
    """The inverse of pack: the first n codes (default: all the stream holds) as uint8."""
    n = packed.numel() * 8 // bits if n is None else n
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.reshape(-1, 1) >> shifts) & (2 ** bits - 1)).flatten()[:n]
    stream = ((packed.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1).flatten()
    weights = (1 << torch.arange(bits, device=packed.device)).to(torch.uint8)
    return (stream[:n * bits].reshape(n, bits) * weights).sum(1, dtype=torch.uint8)


def _row_bytes(row_bits, values_per_row):
    """Bytes of each row's codes (a row of per-group codes is whole bytes: groups of 8 values
    or more, or the row padded to them) and where each row starts in the stream."""
    nbytes = (row_bits.long() * values_per_row + 7) // 8
    return nbytes, torch.cumsum(nbytes, 0) - nbytes


def pack_rows(codes, row_bits):
    """Codes (N, L) with row i at row_bits[i] bits -> one stream, row after row (each row
    packed by pack at its own width): ActNN's per-sample precision."""
    nbytes, starts = _row_bytes(row_bits, codes.shape[1])
    out = codes.new_zeros(int(nbytes.sum()), dtype=torch.uint8)
    for b in row_bits.unique().tolist():
        rows = (row_bits == b).nonzero().flatten()
        block = pack(codes[rows], b).reshape(len(rows), -1)                      # (rows, bytes per row)
        where = starts[rows].view(-1, 1) + torch.arange(block.shape[1], device=codes.device)
        out[where.flatten()] = block.flatten()
    return out


def unpack_rows(packed, row_bits, values_per_row):
    """The inverse of pack_rows: (N, values_per_row) uint8."""
    nbytes, starts = _row_bytes(row_bits, values_per_row)
    codes = packed.new_zeros(len(row_bits), values_per_row)
    for b in row_bits.unique().tolist():
        rows = (row_bits == b).nonzero().flatten()
        where = starts[rows].view(-1, 1) + torch.arange(int(nbytes[rows[0]]), device=packed.device)
        codes[rows] = unpack(packed[where.flatten()], b).reshape(len(rows), -1)[:, :values_per_row]
    return codes


@dataclass
class Compressed:
    """A tensor held in `bits` per value: packed codes, per-group minimum and step (bfloat16)."""
    packed: torch.Tensor        # uint8, (ceil(N * groups * group_size * bits / 8),)
    minimum: torch.Tensor       # bfloat16, (N, groups, 1)
    step: torch.Tensor          # bfloat16, (N, groups, 1)
    shape: torch.Size
    dtype: torch.dtype
    bits: int                   # the width of every code, or the largest of row_bits
    group_size: int             # values per group (per-tensor: the numel)
    row_bits: torch.Tensor = None   # uint8 (N,): each sample's own width (mixed precision), or None

    def tensors(self):
        """What is held: codes, minima, steps (and the per-sample widths)."""
        return [self.packed, self.minimum, self.step] + ([] if self.row_bits is None else [self.row_bits])

    def with_tensors(self, tensors):
        """The same description holding `tensors` (as tensors() lists them)."""
        packed, minimum, step, *rest = tensors
        return Compressed(packed, minimum, step, self.shape, self.dtype, self.bits, self.group_size,
                          rest[0] if rest else None)

    def nbytes(self):
        """The bytes held: codes, minima and steps (and the per-sample widths)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


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
    if torch.is_tensor(bits):
        if bits.numel() and (int(bits.min()) < BITS[0] or int(bits.max()) > BITS[-1]):
            raise IntsimError(f"per-sample bits must lie in {BITS[0]}..{BITS[-1]}")
    elif bits not in BITS:
        raise IntsimError(f"--ca-bits {bits}: use one of {BITS[0]}..{BITS[-1]}")
    if group_size < 1:
        raise IntsimError(f"--ca-group-size {group_size}: use a positive number")


def group_ranges(x, group_size=GROUP_SIZE, per_group=True):
    """x (N, ...) -> (groups (N, G, size) float32, size, min (N, G, 1), max (N, G, 1)): what
    compress encodes, and what ActNN's bit allocation reads (computed once for both)."""
    if x.dim() == 0 or x.numel() == 0:
        raise IntsimError(f"cannot compress a tensor of shape {tuple(x.shape)}: it needs a batch dimension")
    g, size = _groups(x, group_size, per_group)
    lo, hi = g.amin(dim=2, keepdim=True), g.amax(dim=2, keepdim=True)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise IntsimError("cannot compress activations with inf or NaN in them (the forward pass diverged)")
    return g, size, lo, hi


def compress(x, bits, group_size=GROUP_SIZE, per_group=True, generator=None, ranges=None):
    """x (N, ...) float -> Compressed at `bits` per value, stochastically rounded (unbiased).
    `bits` may be a tensor (N,) of per-sample widths (per-group only): ActNN's mixed precision.
    `ranges`: group_ranges(x, group_size, per_group) when the caller already has them."""
    check_settings(bits, group_size)
    g, size, lo, hi = ranges if ranges is not None else group_ranges(x, group_size, per_group)
    row_bits = None
    if torch.is_tensor(bits):
        if not per_group or bits.shape != (x.shape[0],):
            raise IntsimError(f"per-sample bits need per-group ranges and one width per sample "
                              f"({x.shape[0]}), not {tuple(bits.shape)}")
        row_bits = bits.to(device=x.device, dtype=torch.uint8)
    widths = torch.full((1,), float(bits), device=g.device) if row_bits is None else row_bits.float()
    levels = (2 ** widths - 1).view(-1, 1, 1)                             # B (per sample, or one for all)
    minimum = _bf16_toward(lo, up=False)                                   # m_G <= min x
    step = _bf16_toward(((hi - minimum) / levels).clamp_min(TINY_RANGE), up=True)   # m_G + B s_G >= max x
    u = torch.rand(g.shape, generator=generator, device=g.device)        # a generator on x's device
    # (x - m_G) / s_G + u >= 0 (m_G <= x), so the cast to uint8, which truncates, is the floor
    codes = torch.minimum(torch.addcmul(u, g - minimum, 1 / step), levels).to(torch.uint8)
    packed = pack(codes, bits) if row_bits is None else pack_rows(codes.reshape(len(codes), -1), row_bits)
    return Compressed(packed, minimum.to(PARAM_DTYPE), step.to(PARAM_DTYPE), x.shape, x.dtype,
                      bits if row_bits is None else int(row_bits.max()), size, row_bits)


def decompress(c):
    """Compressed -> the tensor m_G + s_G q, shape and dtype of the original."""
    n_groups = c.minimum.shape[0] * c.minimum.shape[1]
    if c.row_bits is None:
        codes = unpack(c.packed, c.bits, n_groups * c.group_size)
    else:
        codes = unpack_rows(c.packed, c.row_bits, c.minimum.shape[1] * c.group_size)
    codes = codes.reshape(*c.minimum.shape[:2], c.group_size)
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
    """How saved activations are held: `bits` per value (the average, with mixed precision),
    ranges per group of `group_size` values of a sample (ActNN's per-group) or one per tensor.

    Mixed precision, as ActNN's pre-release (GACT-ICML quantize/qscheme.py) does it:
    initial_bits (its --ibits) > bits gives every sample of a saved tensor its own width, from
    initial_bits down, allocated greedily so the tensor averages `bits`; per_layer (--perlayer)
    first shares the average among the layers (and samples) by the same greedy rule, from the
    previous step's ranges; use_gradient (--usegradient) weights each sample's sensitivity by
    its output gradient's squared norm, remembered per training sample from the last time it
    was seen (the default weight, without it, is 1)."""
    bits: int = 2
    group_size: int = GROUP_SIZE
    per_group: bool = True
    initial_bits: int = None        # default: bits (every sample at `bits`)
    per_layer: bool = False
    use_gradient: bool = False

    def __post_init__(self):
        check_settings(self.bits, self.group_size)
        if self.initial_bits is None:
            object.__setattr__(self, "initial_bits", self.bits)
        if self.initial_bits not in BITS or self.initial_bits < self.bits:
            raise IntsimError(f"--ca-initial-bits {self.initial_bits}: use {self.bits}..{BITS[-1]} "
                              f"(at least --ca-bits {self.bits})")
        if self.initial_bits > self.bits and not self.per_group:
            raise IntsimError("--ca-initial-bits gives each sample its own width within its groups: "
                              "drop --ca-per-tensor")
        if self.use_gradient and not self.mixed:
            raise IntsimError("--ca-use-gradient weights the bit allocation: use it with --ca-initial-bits "
                              "above --ca-bits or with --ca-per-layer")

    @property
    def mixed(self):
        """Whether widths are allocated (per sample or per layer) rather than all `bits`."""
        return self.initial_bits > self.bits or self.per_layer

    def tag(self):
        """A short name for file stems: ca2, ca2pt, ca2ib8, ca2ib8pl, ca2ib8plg, ..."""
        return (f"ca{self.bits}" + ("" if self.per_group else "pt")
                + (f"ib{self.initial_bits}" if self.initial_bits > self.bits else "")
                + ("pl" if self.per_layer else "") + ("g" if self.use_gradient else "")
                + ("" if self.group_size == GROUP_SIZE else f"gs{self.group_size}"))

    def describe(self):
        """In words, for a script's first line."""
        return ", ".join([f"groups of {self.group_size}" if self.per_group else "per tensor"]
                         + ([f"per-sample widths from {self.initial_bits} bits"] if self.initial_bits > self.bits else [])
                         + (["shared among the layers"] if self.per_layer else [])
                         + (["gradient-weighted"] if self.use_gradient else []))

    def ranges(self, x):
        return group_ranges(x, self.group_size, self.per_group)

    def compress(self, x, bits=None, ranges=None):
        return compress(x, self.bits if bits is None else bits, self.group_size, self.per_group, ranges=ranges)


def sample_sensitivity(ranges, n):
    """Each of the n samples' C_i = sum over its groups of (values / 4) R_G^2 (the variance
    stochastic rounding adds at step 1 per range unit; see quantization_variance), from
    group_ranges: (n,) float64 (per-tensor: the one range's, for every sample)."""
    _, size, lo, hi = ranges
    c = (size / 4) * ((hi - lo).double().squeeze(2) ** 2).sum(1)
    return c.expand(n)


class BitAllocator:
    """The shared state of one network's mixed precision (CompressConfig.mixed): what each
    layer saw in its last forward, its allocated average, and the gradient weights."""
    GRADIENT_EMA = 0.5          # ActNN's QScheme.set_scale: scale = 0.5 scale + 0.5 |dL/dy_i|^2

    def __init__(self, cfg, batch_index=None):
        self.cfg = cfg
        self.batch_index = batch_index      # () -> the dataset indices of the batch in training, or None
        self.seen = {}                      # site -> (C (N,), values per sample) of its last forward
        self.layer_bits = {}                # site -> average bits from the last per-layer allocation
        self.scales = {}                    # site -> |dL/dy_i|^2 per dataset sample (or one number)

    def _indices(self):
        idx = None if self.batch_index is None else self.batch_index()
        return None if idx is None else torch.as_tensor(idx, dtype=torch.long).cpu()

    def _weights(self, site, n):
        """The gradient weight of each of the n samples (ones without --ca-use-gradient, or
        before any backward); samples never seen get the mean of those seen (ActNN's get_scale)."""
        s = self.scales.get(site)
        if not self.cfg.use_gradient or s is None:
            return torch.ones(n, dtype=torch.float64)
        idx = self._indices()
        if s.dim() == 0 or idx is None or len(idx) != n:
            return s.expand(n).double()
        w = s[idx.clamp_max(len(s) - 1)] * (idx < len(s))
        seen = w > 0
        fill = w[seen].mean() if seen.any() else torch.tensor(1.0, dtype=torch.float64)
        return torch.where(seen, w, fill + 1e-9).double()

    def bits_for(self, site, x, ranges=None):
        """The width of each sample of x (a tensor (N,)) or of the whole tensor (an int);
        `ranges`: x's group_ranges, when the caller has them."""
        cfg = self.cfg
        if cfg.per_layer and site in self.seen:     # a new forward pass began: share the budget anew
            self.reallocate()
        ranges = ranges if ranges is not None else cfg.ranges(x)
        c = sample_sensitivity(ranges, x.shape[0]) * self._weights(site, x.shape[0])
        self.seen[site] = (c, x[0].numel())
        average = self.layer_bits.get(site, cfg.bits)
        if cfg.initial_bits > cfg.bits:
            return allocate_bits(c, [x[0].numel()] * x.shape[0], average, cfg.initial_bits)
        return int(average)

    def reallocate(self):
        """ActNN's allocate_perlayer: with per-sample widths, one greedy allocation over every
        (layer, sample), each layer then getting its samples' mean; without, one width per layer
        from 8 bits, C summed over the samples."""
        cfg, sites = self.cfg, list(self.seen)
        if cfg.initial_bits > cfg.bits:
            c = torch.cat([self.seen[s][0] for s in sites])
            sizes = torch.cat([torch.full((len(self.seen[s][0]),), float(self.seen[s][1])) for s in sites])
            bits = allocate_bits(c, sizes, cfg.bits, cfg.initial_bits).double()
            counts = [len(self.seen[s][0]) for s in sites]
            self.layer_bits = {s: b.mean().item() for s, b in zip(sites, bits.split(counts))}
        else:
            c = torch.stack([self.seen[s][0].sum() for s in sites])
            sizes = [self.seen[s][1] * len(self.seen[s][0]) for s in sites]
            bits = allocate_bits(c, sizes, cfg.bits, BITS[-1])      # ActNN starts every layer at 8 here
            self.layer_bits = {s: int(b) for s, b in zip(sites, bits)}
        self.seen = {}

    def observe(self, site, g):
        """Backward: remember each sample's |dL/dy_i|^2 for the next allocation."""
        norms = (g.detach().reshape(g.shape[0], -1).double() ** 2).sum(1).cpu()
        idx, a = self._indices(), self.GRADIENT_EMA
        if idx is None or len(idx) != len(norms):       # no sample identity: one number per layer
            old = self.scales.get(site)
            new = norms.mean()
            self.scales[site] = new if old is None or old.dim() else a * old + (1 - a) * new
            return
        s = self.scales.get(site)
        if s is None or s.dim() == 0:
            s = torch.zeros(0, dtype=torch.float64)
        if len(s) <= int(idx.max()):
            s = torch.cat([s, s.new_zeros(int(idx.max()) + 1 - len(s))])
        s[idx] = torch.where(s[idx] > 0, a * s[idx] + (1 - a) * norms, norms)
        self.scales[site] = s


class Site:
    """One layer's compression: the config and, with mixed precision, the network's allocator."""

    def __init__(self, cfg, allocator=None):
        self.cfg, self.allocator = cfg, allocator

    def compress(self, x):
        if self.allocator is None:
            return self.cfg.compress(x)
        ranges = self.cfg.ranges(x)             # one pass over the groups for the widths and the codes
        return self.cfg.compress(x, self.allocator.bits_for(self, x, ranges), ranges)

    def observe(self, g):
        if self.allocator is not None and self.cfg.use_gradient:
            self.allocator.observe(self, g)

    def second(self):
        """The site of a second tensor the same layer saves (its own widths and gradient weights)."""
        if getattr(self, "_second", None) is None:
            self._second = Site(self.cfg, self.allocator)
        return self._second


def save_compressed(ctx, c, *others):
    """save_for_backward of a Compressed (its packed tensors), or of a tuple of them, and of
    `others` as they are."""
    cs = c if isinstance(c, tuple) else (c,)
    held = [one.tensors() for one in cs]
    ctx.save_for_backward(*(t for h in held for t in h), *others)
    # the descriptions, not the data
    ctx.held = ([one.with_tensors([None] * len(h)) for one, h in zip(cs, held)], [len(h) for h in held],
                isinstance(c, tuple))


def load_compressed(ctx):
    """The inverse of save_compressed: (the decompressed tensor, or a tuple of them; [the others])."""
    (skeletons, counts, many), saved = ctx.held, ctx.saved_tensors
    out, k = [], 0
    for skeleton, n in zip(skeletons, counts):
        out.append(decompress(skeleton.with_tensors(saved[k:k + n])))
        k += n
    return (tuple(out) if many else out[0]), saved[k:]


def _layer(x, weight, bias, kwargs):
    """conv2d (a 4-d weight, with kwargs' stride, padding, ...) or linear."""
    return (F.conv2d if weight.dim() == 4 else F.linear)(x, weight, bias, **kwargs)


def _grad_input(x_shape, weight, g, kwargs):
    """dL/dx of y = layer(x, W) given g = dL/dy."""
    if weight.dim() == 4:
        return torch.nn.grad.conv2d_input(x_shape, weight, g, **kwargs)
    return (g.reshape(-1, g.shape[-1]) @ weight).reshape(x_shape)


def _grad_weight(x, w_shape, g, kwargs):
    """dL/dW of y = layer(x, W) given g = dL/dy."""
    if len(w_shape) == 4:
        return torch.nn.grad.conv2d_weight(x, w_shape, g, **kwargs)
    return g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])        # (out, rows) @ (rows, in)


def channel_dims(y):
    """The dimensions a per-channel statistic sums over: (N, H, W) of a conv output, N of a linear one."""
    return (0, 2, 3) if y.dim() == 4 else (0,)


class CompressedLinearConv(torch.autograd.Function):
    """y = conv2d(x, W, b) or linear(x, W, b); keeps x compressed (and W, held anyway).
    dL/dx needs only W; dL/dW is computed from the decompressed x^."""

    @staticmethod
    def forward(ctx, x, weight, bias, kwargs, site):
        ctx.kwargs, ctx.has_bias, ctx.site = kwargs, bias is not None, site
        save_compressed(ctx, site.compress(x), weight)
        return _layer(x, weight, bias, kwargs)

    @staticmethod
    def backward(ctx, g):
        x, (weight,) = load_compressed(ctx)
        ctx.site.observe(g)
        gx = _grad_input(x.shape, weight, g, ctx.kwargs) if ctx.needs_input_grad[0] else None
        gw = _grad_weight(x, weight.shape, g, ctx.kwargs) if ctx.needs_input_grad[1] else None
        gb = g.sum(channel_dims(g)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None


class CompressedConvBNFold(torch.autograd.Function):
    """QAT's conv + BN with batch statistics (module.QLayer.conv_bn_batch_stats, the two-pass
    fold), keeping what backward needs compressed: per output channel,

        y_f = layer(x, W) + b                           pass 1: for mu_B, sigma_B and y^
        sigma_B = sqrt(var_B + eps),  y^ = (y_f - mu_B) / sigma_B
        out = layer(x, W_q) c + beta + (b - mu_B) gamma / sigma_B,      c = sigma / sigma_B

    with W_q = Q(W gamma / sigma) computed outside (autograd takes dL/dW_q back through the
    weight quantizer) and sigma the running one (a constant). Autograd would keep x, y_f and
    layer(x, W_q) in float32; this keeps x and y^, each rounded on its own (as train.py's conv
    and BatchNorm keep their inputs), so dL/dW = grad_W(x^, dL/dy_f(y^)) is a product of two
    independent unbiased estimates: unbiased (up to the sigma_B path: dL/dc below is read from
    x^ as well, a correlation of one value of x^ with a sum over all of them, relative size about
    1 / (values per channel); the tests' 300-pass means do not resolve it). dL/dc needs no
    layer(x, W_q): sum g layer(x, W_q) = sum over W_q of W_q dL/dW_q at c = 1.
    `sites`: (x's, y^'s) compress.Site."""

    @staticmethod
    def forward(ctx, x, weight, bias, w_q, gamma, beta, sigma, eps, kwargs, sites):
        y_f = _layer(x, weight, bias, kwargs)
        dims = channel_dims(y_f)
        mean, var = y_f.mean(dims), y_f.var(dims, unbiased=False)        # as the uncompressed fold: the same out
        sigma_b = torch.sqrt(var + eps)
        shape = (-1,) + (1,) * (x.dim() - 2)                    # broadcast along the output's channels
        y_hat = (y_f - mean.view(shape)) / sigma_b.view(shape)
        del y_f
        out = _layer(x, w_q, None, kwargs)
        out.mul_((sigma / sigma_b).view(shape)).add_((beta + (bias - mean) * gamma / sigma_b).view(shape))
        ctx.kwargs, ctx.sites, ctx.x_shape = kwargs, sites, x.shape
        save_compressed(ctx, (sites[0].compress(x), sites[1].compress(y_hat)), weight, bias, w_q, gamma, sigma,
                        mean, sigma_b)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, g, _g_mean, _g_var):
        (x, y_hat), (weight, bias, w_q, gamma, sigma, mean, sigma_b) = load_compressed(ctx)
        for site in ctx.sites:
            site.observe(g)
        kwargs, dims = ctx.kwargs, channel_dims(g)
        shape = (-1,) + (1,) * (g.dim() - 2)
        c = sigma / sigma_b
        s_g = g.sum(dims)                                                   # dL/dbeta
        g_wq1 = _grad_weight(x, w_q.shape, g, kwargs)                       # dL/dW_q at c = 1
        g_c = (g_wq1 * w_q).flatten(1).sum(1)                               # dL/dc
        g_wq = g_wq1 * c.view((-1,) + (1,) * (w_q.dim() - 1))
        g_gamma = s_g * (bias - mean) / sigma_b
        g_mean = -s_g * gamma / sigma_b
        g_sigma_b = -g_c * sigma / sigma_b ** 2 - s_g * (bias - mean) * gamma / sigma_b ** 2
        g_var = g_sigma_b / (2 * sigma_b)
        m = g.numel() // g.shape[1]                                         # values per channel
        # dL/dy_f through mu_B and var_B = mean((y_f - mu_B)^2), with y_f - mu_B = sigma_B y^
        g_yf = (g_mean / m).view(shape) + (2 * g_var * sigma_b / m).view(shape) * y_hat
        g_x = _grad_input(ctx.x_shape, w_q, g * c.view(shape), kwargs) + _grad_input(ctx.x_shape, weight, g_yf, kwargs)
        g_w = _grad_weight(x, weight.shape, g_yf, kwargs)
        g_b = s_g * gamma / sigma_b + g_mean            # through the output's bias and mu_B: zero, BN removes b
        return g_x, g_w, g_b, g_wq, g_gamma, s_g, None, None, None, None


def _pack_bool(mask):
    return pack(mask.flatten().to(torch.uint8), 1)


class CompressedClamp(torch.autograd.Function):
    """y = clamp(x, lo, hi): ReLU (hi None), ReLU6 and Hardtanh; keeps the 1-bit mask
    lo < x < hi (exact: the gradient passes there and nowhere else, 0 on the bounds as in
    autograd's own threshold_backward and hardtanh_backward)."""

    @staticmethod
    def forward(ctx, x, lo, hi):
        y = x.clamp_min(lo) if hi is None else x.clamp(lo, hi)
        ctx.save_for_backward(_pack_bool(y > lo if hi is None else (x > lo) & (x < hi)))
        ctx.shape = x.shape
        return y

    @staticmethod
    def backward(ctx, g):
        (packed,) = ctx.saved_tensors
        mask = unpack(packed, 1, ctx.shape.numel()).reshape(ctx.shape)
        return g * mask.to(g.dtype), None, None


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
        row = idx // width
        dy, dx = row - oh, idx - row * width - ow                                   # offsets in the window
        local = (dy if dh == 1 else dy // dh) * kw + (dx if dw == 1 else dx // dw)  # 0 .. kh kw - 1
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
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, site):
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False, keepdim=True)     # one pass for both
        std = torch.sqrt(var + eps)
        xhat = (x - mean) / std
        ctx.affine = weight is not None
        gamma = weight if weight is not None else torch.ones(x.shape[1], device=x.device, dtype=x.dtype)
        y = torch.addcmul(bias.view(1, -1, 1, 1), xhat, gamma.view(1, -1, 1, 1)) if ctx.affine else xhat.clone()
        if running_mean is not None:        # nn.BatchNorm2d's update: the variance unbiased, over N H W values
            n = x.numel() // x.shape[1]
            running_mean.mul_(1 - momentum).add_(mean.flatten(), alpha=momentum)
            running_var.mul_(1 - momentum).add_(var.flatten() * (n / max(n - 1, 1)), alpha=momentum)
        ctx.site = site
        save_compressed(ctx, site.compress(xhat), std, gamma)
        return y

    @staticmethod
    def backward(ctx, g):
        xhat, (std, gamma) = load_compressed(ctx)
        ctx.site.observe(g)
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
        return CompressedClamp.apply(x, 0.0, None) if _training(self) else super().forward(x)


class CAHardtanh(nn.Hardtanh):
    def forward(self, x):
        return CompressedClamp.apply(x, self.min_val, self.max_val) if _training(self) else super().forward(x)


class CAReLU6(nn.ReLU6):                # nn.ReLU6 is a Hardtanh(0, 6) (MobileNetV2's activation)
    forward = CAHardtanh.forward


class CAMaxPool2d(nn.MaxPool2d):
    def forward(self, x):
        if not _training(self) or self.return_indices:
            return super().forward(x)
        pair = torch.nn.modules.utils._pair
        return CompressedMaxPool2d.apply(x, pair(self.kernel_size), pair(self.stride or self.kernel_size),
                                         pair(self.padding), pair(self.dilation), self.ceil_mode)


COMPRESSED = {nn.Conv2d: CAConv2d, nn.Linear: CALinear, nn.BatchNorm2d: CABatchNorm2d, nn.ReLU: CAReLU,
              nn.Hardtanh: CAHardtanh, nn.ReLU6: CAReLU6, nn.MaxPool2d: CAMaxPool2d}


def compress_activations(model, cfg=None, batch_index=None):
    """ActNN's QModule(model) for any network: every nn.Conv2d, nn.Linear, nn.BatchNorm2d,
    nn.ReLU, nn.ReLU6, nn.Hardtanh and nn.MaxPool2d, in place, becomes its compressed twin (the
    same parameters, buffers and state_dict keys; the forward is unchanged; training saves
    compressed inputs). Smooth activations (SiLU, GELU, Sigmoid) are left in float32: their
    gradient is not linear in the saved tensor, so a stochastically rounded one would bias it.
    Returns the model. A converted network (model.convert: QAT) works the same: its QLayers keep
    their inputs compressed and its activation quantizers their masks (1 bit) and LSQ step-size
    gradients. Functional calls (F.relu in a forward) are not swapped: they save their tensors
    in full, which saved_bytes shows. With cfg.use_gradient, `batch_index()` returns the
    dataset indices of the batch being trained (data.Batches.last_index), so that each sample's
    gradient weight follows it across epochs; without it the weight is one number per layer."""
    cfg = cfg or CompressConfig()
    allocator = BitAllocator(cfg, batch_index) if cfg.mixed else None
    # intsim's own layers take a Site where they save for backward (module.QLayer's fn, the
    # activation quantizers' fake-quant); weight quantizers save weight-sized masks: left alone
    weights = {id(m.w_quantizer) for m in model.modules() if getattr(m, "w_quantizer", None) is not None}
    for m in model.modules():
        twin = COMPRESSED.get(type(m))
        if twin is not None:
            m.__class__ = twin
        if isinstance(m, tuple(COMPRESSED.values())) or (hasattr(m, "ca") and id(m) not in weights):
            m.ca = Site(cfg, allocator)
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
    """ActNN's greedy allocation (its calc_precision): from `initial_bits` everywhere, take one
    bit at a time from the tensor where it adds the least variance per bit of storage saved,
    until the average over all stored values (weighted by `sizes`) is at most `average_bits`.
    Returns the bits of each, a long tensor.

    A tensor's variance added by its k-th removed bit only grows with k, so the greedy order is
    the sorted order of all (tensor, bit) removal costs: one sort instead of a loop per bit."""
    c = torch.as_tensor(sensitivities, dtype=torch.float64).flatten().cpu()
    n = torch.as_tensor(sizes, dtype=torch.float64).flatten().cpu().expand(len(c))
    steps = initial_bits - min_bits
    excess = (initial_bits - average_bits) * n.sum().item()      # stored bits over the budget
    bits = torch.full((len(c),), initial_bits, dtype=torch.long)
    if excess <= 0 or len(c) == 0:
        return bits
    if steps * n.sum().item() < excess - 1e-9:
        raise IntsimError(f"an average of {average_bits} bits is below {min_bits} bit per value: raise --ca-bits")
    b = torch.arange(initial_bits, min_bits, -1, dtype=torch.float64)          # the width before each removal
    added = 1 / (2 ** (b - 1) - 1) ** 2 - 1 / (2 ** b - 1) ** 2                # variance per unit C, b -> b - 1
    cost = (c.view(-1, 1) * added.view(1, -1) / n.view(-1, 1)).flatten()       # (tensor, removal) item-major
    order = torch.sort(cost, stable=True).indices                               # ties: lower index first
    removed = n.repeat_interleave(steps)[order].cumsum(0)
    k = int(torch.searchsorted(removed, torch.tensor([excess - 1e-9], dtype=torch.float64)).item()) + 1
    return bits - torch.bincount(order[:k] // steps, minlength=len(c))
