"""Range observers: they watch values and turn the range they saw into S and Z.

Activations use an observer module (its running min/max are buffers, so they follow
`.to(device)` and `state_dict()`); it only records while its owner is in a recording mode
('calibrate' or 'qat'), so calibration ends when the mode changes. Weights need no state:
their range is read off the weight tensor when it is quantized (`weight_range`).
"""
import torch
from torch import nn

from function import IntsimError, scale_zero_point

EMA_MOMENTUM = 0.01   # moving-average weight of a new batch's min/max (QAT, Jacob et al. 2018, sec. 3.1)


class MinMaxObserver(nn.Module):
    """Per-tensor range of everything observed: min over batches of the batch min, max of max."""

    def __init__(self, bits, symmetric=False):
        super().__init__()
        self.bits, self.symmetric = bits, symmetric
        self.register_buffer("min_val", torch.tensor([float("inf")]))
        self.register_buffer("max_val", torch.tensor([float("-inf")]))

    @torch.no_grad()
    def forward(self, x):
        lo, hi = x.detach().min().reshape(1), x.detach().max().reshape(1)
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise IntsimError("observed NaN or inf activations: the float model itself is broken")
        self._update(lo.to(self.min_val), hi.to(self.max_val))
        return x

    def _update(self, lo, hi):
        torch.minimum(self.min_val, lo, out=self.min_val)
        torch.maximum(self.max_val, hi, out=self.max_val)

    def has_data(self):
        return bool(torch.isfinite(self.min_val).all())

    def qparams(self, name="activation"):
        """(S, Z) of the observed range: float32 and int64 tensors of shape (1,)."""
        if not self.has_data():
            raise IntsimError(f"{name} has no observed range: calibrate the model before quantizing it")
        return scale_zero_point(self.min_val, self.max_val, self.bits, self.symmetric)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of the batch min/max (Jacob et al. 2018, sec. 3.1): the first
    batch sets the range, later batches move it by EMA_MOMENTUM."""

    def __init__(self, bits, symmetric=False, momentum=EMA_MOMENTUM):
        super().__init__(bits, symmetric)
        self.momentum = momentum

    def _update(self, lo, hi):
        if not self.has_data():
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        else:
            self.min_val.lerp_(lo, self.momentum)
            self.max_val.lerp_(hi, self.momentum)


def weight_range(w, per_channel):
    """(min, max) of a weight tensor (C_out, ...), each of shape (C_out,): per output channel,
    or the tensor's range repeated C_out times (per-tensor), so both have one shape."""
    flat = w.detach().reshape(w.shape[0], -1)
    if per_channel:
        return flat.min(dim=1).values, flat.max(dim=1).values
    return flat.min().expand(w.shape[0]), flat.max().expand(w.shape[0])


OBSERVERS = {"minmax": MinMaxObserver, "ema": MovingAverageMinMaxObserver}
