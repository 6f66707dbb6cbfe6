"""Quantizers: one small module per quantized tensor (a layer's weights, each activation),
owning its grid, its S and Z, and the observer that sets them.

    q = Quantizer(grid, observer)        S, Z: buffers (parameters once learned)
    q.observe = "always" | "training"    the observer records (calibration; QAT's moving ranges)
    q.enabled = True                     forward fake-quantizes: S (clamp(round(x/S) + Z) - Z)
    q.finish()                           calibration is over: S, Z from the observed range

The phases of a converted model (model.PHASES) only switch these two flags. AdaRound's
learned rounding is a quantizer too (AdaRoundQuantizer): swapped in for a layer's weight
quantizer, so the layer's own forward is the one that gets reconstructed.
"""
import math

import torch
from torch import nn

from compress.layers import fake_quantize_compressed
from errors import IntsimError
from function import FLOAT32_TINY, fake_quantize, quantize, round_half_away, scale_zero_point, to_grid
from observer import WeightObserver

OBSERVE = ("never", "always", "training")
ZETA, GAMMA = 1.1, -0.1       # AdaRound's stretch of the rectified sigmoid (paper sec. 3.2, after eq. 22)


class Quantizer(nn.Module):
    """S and Z of one tensor on `grid`. `channels` > 1 (weights: C_out entries, the per-tensor
    value repeated when per-tensor) broadcast along the tensor's first dimension."""

    def __init__(self, grid, observer, channels=1, name="tensor"):
        super().__init__()
        self.grid, self.observer, self.name = grid, observer, name
        self.per_channel_dim = channels > 1
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("zero_point", torch.zeros(channels, dtype=torch.int64))
        self.register_buffer("has_qparams", torch.tensor(False))
        self.enabled = False          # fake-quantize in forward
        self.observe = "never"        # when the observer records: one of OBSERVE
        self.rounding = "nearest"     # how `integers` rounds (weights at freeze; function.ROUNDINGS)
        self.ca = None                # compress.Site: training keeps what backward needs compressed

    def extra_repr(self):
        g = self.grid
        kind = "signed" if g.signed else "unsigned"
        return (f"{g.bits}-bit {kind} [{g.qmin}, {g.qmax}]{', symmetric' if g.symmetric else ''}, "
                f"enabled={self.enabled}, observe={self.observe}")

    def _shaped(self, t, x):
        """(C,) -> broadcastable over x (C along x's first dimension), or (1,) as it is."""
        return t.reshape((-1,) + (1,) * (x.dim() - 1)) if self.per_channel_dim else t

    @property
    def learned(self):
        return isinstance(self.scale, nn.Parameter)

    # the grid travels with S and Z in state_dict(), so that a W8 state is not loaded into a W4 model
    def get_extra_state(self):
        return {"bits": self.grid.bits, "signed": self.grid.signed, "symmetric": self.grid.symmetric}

    def set_extra_state(self, state):
        mine = self.get_extra_state()
        if state != mine:
            raise IntsimError(f"{self.name}: the state_dict is of a {state['bits']}-bit grid, this quantizer's is "
                              f"{mine['bits']}-bit (signed {mine['signed']}, symmetric {mine['symmetric']}): "
                              f"load it into a model converted with the same QConfig")

    def forward(self, x):
        if not self.learned and (self.observe == "always" or (self.observe == "training" and self.training)):
            try:
                self.observer(x)
            except IntsimError as e:
                raise IntsimError(f"{self.name}: {e}") from None
            if self.enabled:
                self.update()         # while fake-quantizing, the range follows the tensor (QAT, weights)
        if not self.enabled:
            return x
        if not bool(self.has_qparams):        # S = 1, Z = 0 would quietly round everything to a few levels
            raise IntsimError(f"{self.name} has no range yet: calibrate(qmodel, batches, ...) before fake-quantizing "
                              f"(set_phase 'fakequant' or 'qat' in eval mode)")
        scale = self._learned_scale() if self.learned else self.scale
        args = (x, self._shaped(scale, x), self._shaped(self.zero_point, x), self.grid.qmin, self.grid.qmax)
        if self.ca is not None and self.training and torch.is_grad_enabled():   # compressed for backward
            return fake_quantize_compressed(*args, self.ca)
        return fake_quantize(*args)

    @torch.no_grad()
    def update(self):
        """S, Z from the observer's range."""
        if not self.observer.has_data():
            raise IntsimError(f"{self.name} has no observed range: calibrate the model before quantizing it")
        try:
            s, z = scale_zero_point(*self.observer.range(), self.grid)
        except IntsimError as e:
            raise IntsimError(f"{self.name}: {e}") from None
        self.scale.copy_(s)
        self.zero_point.copy_(z)
        self.has_qparams.fill_(True)

    def finish(self):
        """Calibration is over: the searching observers search, then S and Z are set."""
        self.observer.finish()
        if self.observer.has_data():
            self.update()

    @torch.no_grad()
    def fit(self, x):
        """S, Z from the range of x itself (weights at freeze: from their final values). A
        learned scale stays as learned."""
        if not self.learned:
            self.observer(x)
            self.update()

    def qparams(self):
        """(S, Z), shape (C,) or (1,)."""
        if not bool(self.has_qparams):
            raise IntsimError(f"{self.name} has no observed range: calibrate the model before freezing it")
        s = self._learned_scale() if self.learned else self.scale
        return s.detach().expand_as(self.zero_point).clone(), self.zero_point

    def integers(self, x, generator=None):
        """x on the grid, rounded by self.rounding (stochastic: drawn from `generator`), int32."""
        s, z = self.qparams()
        return quantize(x, self._shaped(s, x), self._shaped(z, x), self.grid.qmin, self.grid.qmax,
                        self.rounding, generator)

    def learn_scale(self, init=None, grad_scale=1.0):
        """From now on S is a parameter, trained by gradient descent (LSQ's gradient, see
        function.fake_quantize, times `grad_scale`); the observer no longer moves it. `init`:
        its first value (LSQ's 2 mean|v| / sqrt(Q_P), see lsq_init), else the current S. The
        zero point is the one of the observed range (as calibration sets it) and then kept: the
        new S scales the representable range [S (QMIN - Z), S (QMAX - Z)] about real zero in the
        observed range's proportions. (Placing Z so that the observed minimum stays representable
        would, for an S smaller than the range needs, push Z to QMAX on a tensor of both signs,
        a conv's output before a residual add, and clip away everything above zero.)"""
        s = self.scale if init is None else torch.as_tensor(init, dtype=torch.float32).reshape(-1)
        s = s.detach().clone().to(self.scale.device)             # (C,) or (1,): one S per tensor
        if not self.grid.symmetric and self.observer.has_data():
            _, z = scale_zero_point(*self.observer.range(), self.grid)
            self.zero_point.copy_(z.to(self.zero_point.device).expand_as(self.zero_point))
        elif self.grid.symmetric:
            self.zero_point.zero_()
        del self._buffers["scale"]
        self.scale = nn.Parameter(s)
        self.grad_scale = grad_scale
        self.has_qparams.fill_(True)
        self.observe = "never"

    def _learned_scale(self):
        """|S| (a step pushed through 0 by the optimizer stays a step, and can come back), with
        its gradient multiplied by grad_scale (LSQ sec. 2.2): the same value forward."""
        g = getattr(self, "grad_scale", 1.0)
        s = self.scale.abs().clamp(min=FLOAT32_TINY)
        return s if g == 1.0 else s * g + (s - s * g).detach()


def weight_quantizer(qconfig, grid, channels, name):
    """A layer's weight quantizer as the QConfig asks (its observer, granularity and rounding)."""
    q = Quantizer(grid, WeightObserver(grid, qconfig.per_channel, qconfig.w_observer, qconfig.lp_p),
                  channels=channels, name=name)
    q.rounding = qconfig.w_rounding
    return q


def lsq_step(mean_abs, grid):
    """LSQ's first step size (Esser et al. 2019, sec. 2.1): S = 2 mean|v| / sqrt(Q_P), Q_P the
    grid's largest positive level."""
    return 2 * mean_abs / math.sqrt(grid.qmax)


def lsq_init(values, grid):
    """lsq_step of a tensor's values (the weights, or an activation's observed values)."""
    return lsq_step(values.detach().abs().mean(), grid)


def lsq_grad_scale(elements, grid):
    """LSQ's gradient scale g = 1 / sqrt(N Q_P) (sec. 2.2), N the elements one step size
    quantizes (a layer's weights, per channel: one channel's; an activation's features per image)."""
    return 1.0 / math.sqrt(elements * grid.qmax)


def rectified_sigmoid(v):
    """h(V) = clamp(sigmoid(V) (ZETA - GAMMA) + GAMMA, 0, 1) (AdaRound, eq. 23)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def inverse_rectified_sigmoid(h):
    """V with h(V) = h for h in [0, 1) (the inverse of the sigmoid part: a logit)."""
    p = (h - GAMMA) / (ZETA - GAMMA)
    return torch.log(p / (1 - p))


class AdaRoundQuantizer(nn.Module):
    """Learned up-or-down rounding of one weight tensor w (Nagel et al. 2020, arXiv 2004.10568)
    on the grid and the S, Z of the weight quantizer it replaces:

        W~ = S (clamp(floor(W / S) + h(V) + Z, QMIN, QMAX) - Z),   V learned,

    V initialised so that h(V) = W/S - floor(W/S), i.e. W~ = W at the start. `mode`:
    "soft" (h(V), while learning), "hard" (up where h(V) >= 0.5: what gets frozen) or
    "nearest" (rounding to nearest, the baseline)."""

    def __init__(self, base, w):
        super().__init__()
        self.grid, self.name = base.grid, base.name
        base.fit(w)
        s, z = base.qparams()
        self.register_buffer("scale", base._shaped(s, w).to(w))
        self.register_buffer("zero_point", base._shaped(z, w).to(w))   # float: it is added to floats
        x = w.detach() / self.scale
        self.register_buffer("w_floor", torch.floor(x))
        self.register_buffer("nearest", to_grid(round_half_away(x), self.zero_point, self.grid.qmin, self.grid.qmax))
        self.v = nn.Parameter(inverse_rectified_sigmoid(x - self.w_floor))
        self.mode = "soft"
        self.enabled = True

    def h(self):
        return rectified_sigmoid(self.v)

    def integers(self, w=None, generator=None):
        """The integers of the current mode (floats; as int32 by `frozen_integers`)."""
        if self.mode == "nearest":
            return self.nearest
        up = (self.h() >= 0.5).to(self.w_floor) if self.mode == "hard" else self.h()
        return to_grid(self.w_floor + up, self.zero_point, self.grid.qmin, self.grid.qmax)

    def forward(self, w):
        if not self.enabled:          # the float phase: the float weights
            return w
        # w is the tensor this quantizer was built for; its rounding is what V learns
        return self.scale * (self.integers() - self.zero_point)

    def regulariser(self, beta):
        """sum(1 - |2 h(V) - 1|^beta): pushes every h(V) to 0 or 1 (eq. 24)."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def fit(self, w):
        """S and Z are the replaced quantizer's: nothing to fit."""

    def qparams(self):
        return self.scale.flatten(), self.zero_point.flatten().long()
