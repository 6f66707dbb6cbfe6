"""Layers that keep what backward needs compressed (ActNN's QModule): each forward is the
ordinary one; what autograd keeps is packed (save_for_backward on the packed tensors, so that
saved_tensors_hooks see the bytes really held). Backward decompresses and applies the layer's
own gradient formulas. `compress_activations(model)` swaps them into any network."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from errors import IntsimError
from function import check_scale, fake_quant_backward, fake_quant_forward

from .allocate import BitAllocator, CompressConfig, Site
from .pack import load_compressed, pack, save_compressed, unpack


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


class CompressedFakeQuantize(torch.autograd.Function):
    """function.fake_quantize keeping what backward needs compressed: the mask in 1 bit per value
    and d y / d S in the site's bits (stochastic rounding keeps the step-size gradient, linear in
    it, unbiased)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, site):
        y, inside, dyds = fake_quant_forward(x, scale, zero_point, qmin, qmax, ctx.needs_input_grad[1])
        ctx.scale_shape, ctx.shape, ctx.has_dyds = scale.shape, x.shape, dyds is not None
        mask = pack(inside.flatten(), 1)
        if dyds is None:
            ctx.save_for_backward(mask)
        else:
            save_compressed(ctx, site.compress(dyds), mask)
        return y

    @staticmethod
    def backward(ctx, grad):
        dyds, (mask,) = load_compressed(ctx) if ctx.has_dyds else (None, ctx.saved_tensors)
        inside = unpack(mask, 1, ctx.shape.numel()).reshape(ctx.shape).bool()
        return *fake_quant_backward(grad, inside, dyds, ctx.scale_shape), None, None, None, None


def fake_quantize_compressed(x, scale, zero_point, qmin, qmax, site):
    """fake_quantize of a layer that trains with compressed activations (compress.Site `site`)."""
    check_scale(scale.detach() if isinstance(scale, torch.Tensor) else scale)
    return CompressedFakeQuantize.apply(x, scale, zero_point, qmin, qmax, site)


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
