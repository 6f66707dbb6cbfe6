"""Range observers: they watch values and turn the range they saw into S and Z.

Four ways to pick the range [rmin, rmax] that S and Z are computed from:
  minmax  the observed min and max (nothing is clipped; one outlier stretches the grid)
  ema     a moving average of each batch's min and max (for QAT: the range follows training)
  lp      the clipping range minimising ||x - Q(x)||_p over candidate ranges, as BRECQ does
          (Li et al. 2021; p = 2.4 in its code): the range [f rmin, f rmax] with the smallest
          mean |x - Q(x)|^p, for f = 1.00, 0.99, ..., 0.01 (BRECQ stops at 0.21, which misses the
          best 2-bit range of heavy-tailed values), then refined in steps of 0.0005 around the best
  sqnr    AIMET's "TF-enhanced": the candidate range with the best signal-to-quantization-
          noise ratio, where clipped values count SQNR_GAMMA times (clipping error is
          unbounded, rounding error is at most S/2). Candidates as for lp when the range is
          one-sided or symmetric; otherwise rmin and rmax scale independently (a 25 x 25 grid).
The same search (`search_range`) serves weights and activations.

An observer only proposes a range: the quantizer that owns it (quantizer.py) turns the range
into S and Z and keeps them. Activation observers are modules (their running min/max are
buffers, so they follow `.to(device)` and `state_dict()`); they record only while their
quantizer observes (calibration, QAT training), and `finish()` turns what they saw into the
final range (the searching observers search a random sample of the values seen). Weights
need no state: `WeightObserver` reads the range off the weight tensor it is given.
"""
import math

import torch
from torch import nn

from errors import IntsimError
from function import round_half_away, scale_zero_point, to_grid

EMA_MOMENTUM = 0.01   # moving-average weight of a new batch's min/max (QAT, Jacob et al. 2018, sec. 3.1)
LP_DEFAULT_P = 2.4    # BRECQ's p for the Lp range search
SEARCH_FACTORS = [i / 100 for i in range(100, 0, -1)]      # the range shrunk by 0%, 1%, ..., 99%
REFINE_STEP, REFINE_STEPS = 0.0005, 20                     # then best +- 20 steps of 0.0005
SQNR_GAMMA = 3.0      # AIMET's weight of clipping noise against rounding noise
SQNR_GRID = [i / 25 for i in range(25, 0, -1)]             # two-sided sqnr: 25 x 25 (rmin, rmax) factors
SAMPLES_PER_BATCH = 2 ** 15   # activation values kept per calibration batch for the lp/sqnr search


def range_error(x, lo, hi, grid, method, p=LP_DEFAULT_P):
    """The quantization error of the rows of x (C, N) on `grid` with the ranges [lo, hi] (each
    (C,)): mean |x - Q(x)|^p ('lp'), or the noise of 'sqnr' (mean squared error with clipped
    values weighted SQNR_GAMMA; the signal is fixed, so the lowest noise is the best SQNR). (C,)."""
    qmin, qmax = grid.qmin, grid.qmax
    s, z = scale_zero_point(lo, hi, grid)
    s, z = s.to(x).reshape(-1, 1), z.to(x).reshape(-1, 1)
    q = to_grid(round_half_away(x / s), z, qmin, qmax)
    err = x - (q - z) * s
    if method == "lp":
        return err.abs().pow(p).mean(1)
    clipped = (x < (qmin - z) * s) | (x > (qmax - z) * s)
    return (err.square() * torch.where(clipped, SQNR_GAMMA, 1.0)).mean(1)


@torch.no_grad()
def search_range(x, grid, method, p=LP_DEFAULT_P):
    """The candidate range with the lowest `range_error` for each row of x (C, N): (lo, hi),
    each (C,). Candidates are [f_lo rmin, f_hi rmax]; ties go to the earlier (wider) one."""
    check_p(p)
    x = x.double()
    lo0, hi0 = x.min(1).values, x.max(1).values
    best = torch.full_like(lo0, math.inf)
    best_lo, best_hi = lo0.clone(), hi0.clone()

    def consider(f_lo, f_hi):          # factors: floats or (C,) tensors
        nonlocal best, best_lo, best_hi
        lo, hi = lo0 * f_lo, hi0 * f_hi
        err = range_error(x, lo, hi, grid, method, p)
        better = err < best
        best = torch.where(better, err, best)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)

    if method == "sqnr" and not grid.symmetric and bool(((lo0 < 0) & (hi0 > 0)).any()):
        for f_lo in SQNR_GRID:                                  # two-sided: both ends move
            for f_hi in SQNR_GRID:
                consider(f_lo, f_hi)
        return best_lo.float(), best_hi.float()
    for f in SEARCH_FACTORS:                                    # 1) coarse: one factor for both ends
        consider(f, f)
    ref = torch.where(hi0 != 0, best_hi / hi0, best_lo / lo0.where(lo0 != 0, torch.ones_like(lo0)))
    for k in range(-REFINE_STEPS, REFINE_STEPS + 1):            # 2) fine, around each row's best
        f = (ref + k * REFINE_STEP).clamp(REFINE_STEP, 1.0)
        consider(f, f)
    return best_lo.float(), best_hi.float()


def check_p(p):
    if not (isinstance(p, (int, float)) and math.isfinite(p) and p > 0):
        raise IntsimError(f"the Lp observer needs a finite p > 0, got {p!r}")
    return p


class MinMaxObserver(nn.Module):
    """Per-tensor range of everything observed: min over batches of the batch min, max of max."""

    def __init__(self, grid):
        super().__init__()
        self.grid = grid
        self.register_buffer("min_val", torch.tensor([float("inf")]))
        self.register_buffer("max_val", torch.tensor([float("-inf")]))

    @torch.no_grad()
    def forward(self, x):
        lo, hi = x.detach().min().reshape(1), x.detach().max().reshape(1)
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise IntsimError("NaN or inf in the values observed: check the inputs and the float model's weights")
        self._update(lo.to(self.min_val), hi.to(self.max_val))
        return x

    def _update(self, lo, hi):
        torch.minimum(self.min_val, lo, out=self.min_val)
        torch.maximum(self.max_val, hi, out=self.max_val)

    def finish(self):
        """Calibration is over: nothing to do for min/max (the searching observers search here)."""

    def has_data(self):
        return bool(torch.isfinite(self.min_val).all())

    def range(self):
        """(min, max) of what was observed: float32 tensors of shape (1,)."""
        return self.min_val, self.max_val


class FixedObserver(nn.Module):
    """A range set by the op, not by the data: TFLite fixes the output grid of LOGISTIC
    (S = 1/256, Z = QMIN) and TANH (S = 1/128, Z = QMIN + 128). It observes nothing."""

    def __init__(self, lo, hi):
        super().__init__()
        self.register_buffer("min_val", torch.tensor([float(lo)]))
        self.register_buffer("max_val", torch.tensor([float(hi)]))

    def forward(self, x):
        return x

    def finish(self):
        """Nothing to search: the range is the op's."""

    def has_data(self):
        return True

    def range(self):
        return self.min_val, self.max_val


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of the batch min/max (Jacob et al. 2018, sec. 3.1): the first
    batch sets the range, later batches move it by EMA_MOMENTUM."""

    def __init__(self, grid, momentum=EMA_MOMENTUM):
        super().__init__(grid)
        self.momentum = momentum

    def _update(self, lo, hi):
        if not self.has_data():
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        else:
            self.min_val.lerp_(lo, self.momentum)
            self.max_val.lerp_(hi, self.momentum)


class SearchObserver(MinMaxObserver):
    """'lp' or 'sqnr' for activations: records the min/max and a random sample of
    SAMPLES_PER_BATCH values of every batch (seeded, so calibration is reproducible); `finish()`
    searches the sample (with the observed min and max added) and keeps the best range."""

    def __init__(self, grid, method="lp", p=LP_DEFAULT_P, seed=0):
        super().__init__(grid)
        self.method, self.p = method, check_p(p)
        self.generator = torch.Generator().manual_seed(seed)
        self.samples = []

    @torch.no_grad()
    def forward(self, x):
        super().forward(x)
        flat = x.detach().reshape(-1)
        if flat.numel() > SAMPLES_PER_BATCH:
            flat = flat[torch.randint(flat.numel(), (SAMPLES_PER_BATCH,), generator=self.generator).to(flat.device)]
        self.samples.append(flat.double().cpu())
        return x

    def finish(self):
        if not self.samples:
            return
        x = torch.cat(self.samples + [self.min_val.double().cpu(), self.max_val.double().cpu()])
        lo, hi = search_range(x.reshape(1, -1), self.grid, self.method, self.p)
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        self.samples = []


def make_observer(name, grid, p=LP_DEFAULT_P):
    """An activation observer by name (one of OBSERVERS) for values that go onto `grid`."""
    if name == "minmax":
        return MinMaxObserver(grid)
    if name == "ema":
        return MovingAverageMinMaxObserver(grid)
    if name in ("lp", "sqnr"):
        return SearchObserver(grid, method=name, p=p)
    raise IntsimError(f"unknown activation observer {name!r}; use one of {', '.join(OBSERVERS)}")


def weight_range(w, per_channel, method="minmax", grid=None, p=LP_DEFAULT_P):
    """(min, max) of a weight tensor (C_out, ...), each of shape (C_out,): per output channel,
    or the tensor's range repeated C_out times (per-tensor), so both have one shape. `method`
    is one of WEIGHT_OBSERVERS; the searches need the grid the weights will go onto."""
    flat = w.detach().reshape(w.shape[0], -1)
    if not per_channel:
        flat = flat.reshape(1, -1)
    if method == "minmax":
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    elif method in ("lp", "sqnr"):
        lo, hi = search_range(flat, grid, method, p)
        lo, hi = lo.to(w), hi.to(w)
    else:
        raise IntsimError(f"unknown weight observer {method!r}; use one of {', '.join(WEIGHT_OBSERVERS)}")
    return lo.expand(w.shape[0]), hi.expand(w.shape[0])


class WeightObserver(nn.Module):
    """The range of the weight tensor it was last given (`weight_range`): weights are quantized
    from their current values, so nothing accumulates."""

    def __init__(self, grid, per_channel, method="minmax", p=LP_DEFAULT_P):
        super().__init__()
        self.grid, self.per_channel, self.method, self.p = grid, per_channel, method, p
        self.last = None
        self.searched = None      # the weights the last lp/sqnr search ran on

    @torch.no_grad()
    def forward(self, w):
        # every freeze fits the weights again (AdaRound and BRECQ freeze once per unit): an lp or
        # sqnr search over ResNet18's 11M weights takes minutes, and the same weights give the
        # same range, so it runs again only when they changed
        seen = self.searched
        if seen is not None and seen.shape == w.shape and seen.device == w.device and torch.equal(seen, w):
            return w
        self.last = weight_range(w, self.per_channel, self.method, self.grid, self.p)
        self.searched = w.detach().clone() if self.method != "minmax" else None
        return w

    def finish(self):
        """Nothing to finish: the range is the last tensor's."""

    def has_data(self):
        return self.last is not None

    def range(self):
        return self.last


OBSERVERS = ("minmax", "ema", "lp", "sqnr")     # for activations
WEIGHT_OBSERVERS = ("minmax", "lp", "sqnr")     # for weights (a moving average has nothing to average)
