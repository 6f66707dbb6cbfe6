"""Compressed activations for backward (ActNN, Chen et al. 2021, arXiv 2104.14129, sec. 3-4):
a tensor autograd would keep for the backward pass is stored in b bits per value instead.

Each sample is flattened and cut into groups of `group_size` values (the last padded with the
sample's last value); per group G the minimum m_G and the step s_G = R_G / B (R_G the range,
B = 2^b - 1) are kept in bfloat16 and the codes

    q = floor((x - m_G) / s_G + u),   u ~ U[0, 1)          (stochastic rounding)

are bit-packed into a byte stream (4 per byte at 2 bits). E[m_G + s_G q] = x exactly: the
stored m_G is x's minimum rounded down and s_G the step rounded up to bfloat16 (so the grid
still covers the group), and the codes are computed from those stored values, not from the
float ones. Per-tensor (ActNN's ablation) is one group for the whole tensor. This module holds
the compressed form (Compressed) and its making; allocate.py how many bits, layers.py the layers
that keep their inputs compressed.
"""
from dataclasses import dataclass

import torch

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
