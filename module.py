"""The quantized layer every phase shares (conv or linear, with its BatchNorm folded in), and
the global average pool that remembers its window.

    QLayer.forward(x) = fn(x, w_quantizer(W'), b')      [then BN in float, when left unfolded]

fn is F.conv2d (with the layer's stride, padding, dilation, groups) or F.linear: the single
seam where the function is chosen. W', b' are the weight and bias with BN folded in, as
`bn_stats` says:
  "running"  W' = W gamma / sigma, b' = beta + (b - mu) gamma / sigma, with BN's running mu and
             sigma = sqrt(var + eps): every phase, and QAT once BN is frozen;
  "batch"    QAT training with BN in the graph: the two-pass fold of `conv_bn_batch_stats`.
With qconfig.fold_bn False (weights-only runs) the conv's own weights are quantized and BN runs
after fn in float. The activation (ReLU, ReLU6), max-pool and the activation quantizer are the
graph's own nodes after the layer (model.convert), and ops.conv.freeze_layer turns the layer into
an IntConv.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from compress.layers import CompressedConvBNFold, CompressedLinearConv, channel_dims
from errors import IntsimError
from function import Grid, fake_quantize, scale_zero_point


def along(t, x, dim):
    """A per-channel (C,) tensor shaped to broadcast along dimension `dim` of x: (C, 1, ..., 1)
    with one 1 for each dimension after `dim` (the dimensions before it broadcast implicitly)."""
    return t.reshape((-1,) + (1,) * (x.dim() - dim - 1))


def fold_bn(weight, bias, bn):
    """Fold an eval-mode BatchNorm into the conv or linear layer before it (per output channel c):
    W' = W * gamma / std, b' = beta + (b - mean) * gamma / std, std = sqrt(var + eps)."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    factor = gamma / std                                               # (C_out,)
    weight = weight * along(factor, weight, 0)
    bias = torch.zeros_like(std) if bias is None else bias
    return weight, beta + (bias - bn.running_mean) * factor


def round_bias(b, bits):
    """The bias-precision ablation: the real bias rounded to a `bits`-bit symmetric grid of its
    own (per tensor, S = max|b| / QMAX) before it becomes int32 (TFLite keeps 32 bits: unchanged)."""
    if bits == 32:
        return b
    grid = Grid(bits, signed=True, narrow_range=True, symmetric=True)
    amax = b.detach().abs().max().reshape(1)
    s, z = scale_zero_point(-amax, amax, grid)
    return fake_quantize(b, s.to(b), z.to(b.device), grid.qmin, grid.qmax)


class QLayer(nn.Module):
    """A conv or linear layer with its weight quantizer (None: the layer stays float) and the
    BatchNorm that follows it (None, folded, or left unfolded). One implementation for both."""

    def __init__(self, layer, w_quantizer, bn=None, fold_bn=True, bias_bits=32, single_rounding=False,
                 legacy_kernels=False):
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise IntsimError(f"QLayer wraps nn.Conv2d or nn.Linear, not {type(layer).__name__}")
        self.layer, self.w_quantizer, self.bn = layer, w_quantizer, bn
        self.is_conv = isinstance(layer, nn.Conv2d)
        self.fn_kwargs = (dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                               groups=layer.groups) if self.is_conv else {})
        self.unfolded = bn is not None and not fold_bn and w_quantizer is not None
        self.bias_bits, self.single_rounding, self.legacy_kernels = bias_bits, single_rounding, legacy_kernels
        self.bn_stats = "running"        # or "batch": QAT training with BN in the graph
        self.ca = None                   # compress.Site: training keeps fn's input compressed (ActNN)

    def extra_repr(self):
        parts = ["float" if self.w_quantizer is None else "quantized weights"]
        if self.bn is not None:
            parts.append("BN unfolded" if self.unfolded else f"BN folded ({self.bn_stats} statistics)")
        return ", ".join(parts)

    def fn(self, x, w, b=None):
        if self.ca is not None and self.training and torch.is_grad_enabled():
            return CompressedLinearConv.apply(x, w, b, self.fn_kwargs, self.ca)
        return (F.conv2d if self.is_conv else F.linear)(x, w, b, **self.fn_kwargs)

    def folded_weight_bias(self):
        """The weight and bias of the layer followed by its (eval-mode) BN, as one layer."""
        w, b = self.layer.weight, self.layer.bias
        if self.bn is not None:
            return fold_bn(w, b, self.bn)
        return w, (torch.zeros(w.shape[0], device=w.device) if b is None else b)

    def weight_bias(self):
        """What gets quantized: the BN-folded weight and bias, or the layer's own when BN is unfolded."""
        if not self.unfolded:
            return self.folded_weight_bias()
        w, b = self.layer.weight, self.layer.bias
        return w, (torch.zeros(w.shape[0], device=w.device) if b is None else b)

    def forward(self, x):
        if self.bn_stats == "batch" and self.training and self.bn is not None:
            return self.conv_bn_batch_stats(x)
        w, b = self.weight_bias()
        y = self.fn(x, w if self.w_quantizer is None else self.w_quantizer(w), b)
        return self.bn(y) if self.unfolded else y

    def conv_bn_batch_stats(self, x):
        """Conv + BN while training with BN in the graph (Krishnamoorthi 2018, sec. 3.2.2;
        Jacob et al. 2018, sec. 3.2 and fig. C.8). Two passes over the same input:

          1. y = conv(x, W) + b in float, only to measure this batch's mean mu_B and standard
             deviation sigma_B per channel (and to move BN's running statistics, as BN would);
          2. the conv that is quantized. Its weight is folded with the *running* sigma,
             W' = W gamma / sigma, which is the form integer inference will use, so the weights
             seen in training are the ones that get frozen. The output is then corrected by
             c = sigma / sigma_B and given the batch-statistics bias, so that the layer computes
             what BN with batch statistics computes:
                conv(x, Q(W')) sigma / sigma_B + beta + (b - mu_B) gamma / sigma_B
                  = gamma (conv(x, W) + b - mu_B) / sigma_B + beta      when Q is the identity.
        Gradients flow through both passes (mu_B and sigma_B depend on W, as in BN). With
        compressed activations (self.ca) both passes are one compress.CompressedConvBNFold, which
        keeps x and the normalised pass-1 output compressed, where autograd would keep x and both
        passes' outputs in float32."""
        bn, w = self.bn, self.layer.weight
        b = self.layer.bias if self.layer.bias is not None else torch.zeros_like(bn.running_mean)
        sigma = torch.sqrt(bn.running_var + bn.eps)                             # before this batch
        w_fold = w * along(bn.weight / sigma, w, 0)
        quantize = self.w_quantizer if self.w_quantizer is not None else (lambda t: t)
        if self.ca is not None and torch.is_grad_enabled():
            y, mean, var = CompressedConvBNFold.apply(x, w, b, quantize(w_fold), bn.weight, bn.bias, sigma, bn.eps,
                                                      self.fn_kwargs, (self.ca, self.ca.second()))
        else:
            y_float = self.fn(x, w, b)                                          # pass 1
            dims = channel_dims(y_float)
            mean, var = y_float.mean(dims), y_float.var(dims, unbiased=False)
            sigma_b = torch.sqrt(var + bn.eps)
            y = self.fn(x, quantize(w_fold)) * along(sigma / sigma_b, y_float, 1)   # pass 2
            y = y + along(bn.bias + (b - mean) * bn.weight / sigma_b, y_float, 1)
        with torch.no_grad():                                                   # BN's own update
            n = y.numel() / y.shape[1]
            bn.num_batches_tracked += 1
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.lerp_(mean, momentum)
            bn.running_var.lerp_(var * n / (n - 1), momentum)                   # unbiased, as BN keeps it
        return y


class QMean(nn.Module):
    """A mean over `dims` (global average pooling: (2, 3), H and W of NCHW), which remembers how
    many values it averaged (the frozen IntMean folds 1 / N into its multiplier)."""

    def __init__(self, keepdim=True, dims=(2, 3)):
        super().__init__()
        self.keepdim, self.dims = keepdim, tuple(dims)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def extra_repr(self):
        return f"keepdim={self.keepdim}" + ("" if self.dims == (2, 3) else f", dims={self.dims}")

    def forward(self, x):
        dims = mean_dims(self.dims, x.dim())
        self.count.fill_(math.prod(x.shape[d] for d in dims))
        return x.mean(dims, keepdim=self.keepdim)


def mean_dims(dims, rank):
    """`dims` of a mean as non-negative dims of a rank-`rank` tensor; the batch dim is refused."""
    out = tuple(sorted(d % rank for d in dims))
    if 0 in out:
        raise IntsimError(f"a mean over dims {tuple(dims)} of a {rank}-d tensor averages over the batch: intsim "
                          f"converts means over the other dims (each image on its own)")
    return out


class QAdaptiveAvgPool(nn.Module):
    """nn.AdaptiveAvgPool2d to a size other than 1, which remembers the input size it was run
    with: where the windows are uniform there (7x7 -> 7x7, 14x14 -> 7x7) it freezes to an
    average pool of kernel = stride = input / output."""

    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size
        self.register_buffer("input_size", torch.zeros(2, dtype=torch.int64))

    def extra_repr(self):
        return f"output_size={self.output_size}"

    def forward(self, x):
        self.input_size.copy_(torch.tensor(x.shape[-2:]))
        return F.adaptive_avg_pool2d(x, self.output_size)
