"""How saved activations are compressed (CompressConfig) and, with ActNN's mixed precision
(sec. 4.2), how many bits each sample and layer gets: the greedy allocation, its shared state
(BitAllocator) and one layer's handle on both (Site)."""
from dataclasses import dataclass

import torch

from errors import IntsimError

from .pack import BITS, GROUP_SIZE, check_settings, compress, group_ranges


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
