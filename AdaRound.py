"""AdaRound: learn, layer by layer, whether each weight rounds down or up (Nagel et al. 2020,
"Up or Down? Adaptive Rounding for Post-Training Quantization", arXiv 2004.10568), then run
the result with the same integer inference as PTQ and QAT.

    python AdaRound.py --model cnn_bn --w-bits 4                 # W4A32: float activations
    python AdaRound.py --model cnn_bn --w-bits 4 --a-bits 8 --per-channel

For each conv/linear layer in order (sec. 4-5 of the paper; AIMET's defaults):
  1. cache its input x~ from the model whose earlier layers are already AdaRounded (and whose
     activations are quantized with --a-bits < 32), and its float target f(W x) from the float
     model, both after the layer's activation (ReLU, fused max-pool), on --num-calib images;
  2. soft-quantize the weights, W~ = S (clamp(floor(W/S) + h(V) + Z, QMIN, QMAX) - Z), with
     the rectified sigmoid h(V) = clamp(sigmoid(V) (ZETA - GAMMA) + GAMMA, 0, 1) and V
     initialised so that h(V) = W/S - floor(W/S), i.e. W~ = W at the start;
  3. minimise ||f(W x) - f(W~ x~)||^2 + lambda sum(1 - |2 h(V) - 1|^beta) with Adam on batches
     of the cache, no regulariser during the warm start, then beta annealed from 20 to 2;
  4. round hard: up where h(V) >= 0.5, and freeze the layer with those integers.
"""
import functools
import os
import time

import torch
import torch._dynamo  # noqa: F401  (Adam's first step imports it, ~3 s; here, so it/s measure the optimisation)

import cli
from data import Batches, dataset_info
from engine import accuracy, evaluate_frozen, predict, print_frozen_report
from function import FLOAT_BITS, IntsimError, round_half_away
from model import calibrate, convert, freeze, qlayers, runs_in_integers, save_quantized, set_mode

ZETA, GAMMA = 1.1, -0.1       # stretch of the rectified sigmoid (paper sec. 3.2, after eq. 22)
NUM_CALIB = 1024              # unlabelled training images (AIMET: 500-2000; BRECQ: 1024)
ITERS = 10000                 # per layer (AIMET's default; it uses 15000 below 8 bits)
BATCH_SIZE = 32               # images per optimisation step, drawn from the cache
LR = 1e-3                     # Adam's default learning rate (AIMET)
REG_WEIGHT = 0.01             # lambda (paper sec. 5; AIMET and BRECQ)
BETA_START, BETA_END = 20.0, 2.0
WARM_START = 0.2              # share of the iterations without the regulariser
CACHE_BATCH = 256             # images per forward pass while filling the cache
PRINT_EVERY = 2000            # iterations between progress lines
DRY_RUN_CALIB, DRY_RUN_ITERS, DRY_RUN_TEST = 64, 20, 1000


def rectified_sigmoid(v):
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def inverse_rectified_sigmoid(h):
    """V with h(V) = h for h in [0, 1) (the inverse of the sigmoid part: a logit)."""
    p = (h - GAMMA) / (ZETA - GAMMA)
    return torch.log(p / (1 - p))


def beta_at(t, iters, warm_start=WARM_START, beta_start=BETA_START, beta_end=BETA_END):
    """The regulariser's beta at iteration t: None during the warm start (no regulariser), then
    linear from beta_start down to beta_end at the last iteration."""
    warm = int(warm_start * iters)
    if t < warm:
        return None
    progress = (t - warm) / max(iters - 1 - warm, 1)
    return beta_start + (beta_end - beta_start) * progress


class AdaRoundWeights(torch.nn.Module):
    """Learned rounding of one QLayer's weights on the grid its observer picked (S, Z fixed)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        w, b = layer.weight_bias()
        s, z = layer.weight_qparams(w)
        self.w, self.b = w.detach(), b.detach()
        self.scale, self.zero_point = layer._w_channels(s).to(w), layer._w_channels(z).to(w)
        x = self.w / self.scale
        self.w_floor = torch.floor(x)
        self.nearest = torch.clamp(round_half_away(x) + self.zero_point, layer.w_qmin, layer.w_qmax)
        self.v = torch.nn.Parameter(inverse_rectified_sigmoid(x - self.w_floor))

    def h(self):
        return rectified_sigmoid(self.v)

    def integers(self, hard):
        up = (self.h() >= 0.5).to(self.w) if hard else self.h()
        return torch.clamp(self.w_floor + up + self.zero_point, self.layer.w_qmin, self.layer.w_qmax)

    def output(self, x, integers):
        """The layer's output (after its activation) with weights S (integers - Z)."""
        layer = self.layer
        return layer._activate(layer.fn(x, self.scale * (integers - self.zero_point), self.b))

    def regulariser(self, beta):
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


def reconstruction_loss(out, target):
    """Squared error summed over channels, averaged over images and positions (AIMET, BRECQ)."""
    return (out - target).pow(2).sum(1).mean()


@torch.no_grad()
def full_loss(ada, x, target, integers):
    total = sum(float(reconstruction_loss(ada.output(xb, integers), tb)) * len(xb)
                for xb, tb in zip(x.split(CACHE_BATCH), target.split(CACHE_BATCH)))
    return total / len(x)


def optimise(ada, x, target, iters, batch_size, lr, reg_weight, generator, schedule=beta_at, snapshots=()):
    """Adam on V (the only trainable tensor); `schedule(t, iters)` gives beta (None: no
    regulariser). Returns {iteration: h(V)} at `snapshots`."""
    opt = torch.optim.Adam([ada.v], lr=lr)
    seen = {}
    for t in range(iters):
        if t in snapshots:
            seen[t] = ada.h().detach().flatten().cpu()
        idx = torch.randint(len(x), (batch_size,), generator=generator).to(x.device)
        loss = reconstruction_loss(ada.output(x[idx], ada.integers(hard=False)), target[idx])
        beta = schedule(t, iters)
        if beta is not None:
            loss = loss + reg_weight * ada.regulariser(beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (t + 1) % PRINT_EVERY == 0:
            print(f"    iter {t + 1}/{iters} loss {loss.item():.5f}" + (f" beta {beta:.1f}" if beta else ""),
                  flush=True)
    if iters in snapshots:
        seen[iters] = ada.h().detach().flatten().cpu()
    return seen


class _Stop(Exception):
    """Raised by a hook once it has what it came for: the rest of the network is not needed."""


@torch.no_grad()
def capture(qmodel, layer, images, mode, device, what):
    """The input ('input') or output ('output') of `layer` for all `images`, in `mode`."""
    set_mode(qmodel, mode)
    qmodel.eval()
    out = []

    def hook(mod, inp, output=None):
        out.append((inp[0] if what == "input" else output).detach())
        raise _Stop

    handle = (layer.register_forward_pre_hook(hook) if what == "input"
              else layer.register_forward_hook(hook))
    try:
        for xb in images.split(CACHE_BATCH):
            try:
                qmodel(xb.to(device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(out)


def adaround(qmodel, images, device, iters, batch_size, lr, reg_weight, seed, schedule=beta_at,
             snapshot_layer=None):
    """AdaRound every quantized layer of a converted (and, with integer activations, calibrated)
    model in graph order; leaves it frozen with the learned integers. Returns per-layer stats
    and the h(V) snapshots of `snapshot_layer` (a layer name)."""
    learned, stats, snapshots = {}, [], {}
    generator = torch.Generator().manual_seed(seed)
    for name, layer in qlayers(qmodel):
        if not layer.enabled:
            continue
        freeze(qmodel, weight_integers=learned)     # earlier layers AdaRounded, this one nearest
        x = capture(qmodel, layer, images, "fakequant", device, "input")      # x~, quantized model
        target = capture(qmodel, layer, images, "float", device, "output")    # f(W x), float model
        ada = AdaRoundWeights(layer)
        before = full_loss(ada, x, target, ada.nearest)
        start = time.time()
        with torch.enable_grad():
            seen = optimise(ada, x, target, iters, batch_size, lr, reg_weight, generator, schedule,
                            snapshots=(0, iters // 2, iters) if name == snapshot_layer else ())
        seconds = time.time() - start
        hard = ada.integers(hard=True).detach()
        after = full_loss(ada, x, target, hard)
        changed = 100.0 * (hard != ada.nearest).float().mean().item()
        learned[name] = hard
        snapshots.update(seen)
        stats.append({"layer": name, "weights": hard.numel(), "loss_nearest": round(before, 6),
                      "loss_adaround": round(after, 6), "changed_from_nearest_pct": round(changed, 2),
                      "iters_per_s": round(iters / max(seconds, 1e-9), 1)})
        print(f"  {name:12s} {hard.numel():7d} weights  reconstruction loss nearest {before:.5f} -> "
              f"AdaRound {after:.5f}  ({changed:.1f}% rounded differently, {iters / max(seconds, 1e-9):.0f} it/s)",
              flush=True)
    freeze(qmodel, weight_integers=learned)
    return stats, snapshots


def plot_h(path, snapshots, layer_name, iters):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(snapshots), figsize=(4 * len(snapshots), 3), sharey=True)
    for ax, (t, h) in zip(axes, sorted(snapshots.items())):
        ax.hist(h.numpy(), bins=50, range=(0, 1))
        ax.set_title(f"iteration {t} of {iters}")
        ax.set_xlabel("h(V)")
    axes[0].set_ylabel(f"weights of {layer_name}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_save_path(args):
    granularity = "pc" if args.per_channel else "pt"
    return os.path.join("runs", "adaround", f"{args.dataset}_{args.model}_W{args.w_bits}A{args.a_bits}_{granularity}.pt")


def main():
    p = cli.parser(__doc__.split("\n")[0])
    cli.add_common(p)
    cli.add_quant(p)
    p.set_defaults(a_bits=FLOAT_BITS, batch_size=BATCH_SIZE, w_bits=4)
    p.add_argument("--w-observer", default="minmax", help="weight range: minmax, lp, sqnr")
    p.add_argument("--a-observer", default="minmax", help="activation range (with --a-bits < 32)")
    p.add_argument("--num-calib", type=int, default=NUM_CALIB, help="unlabelled training images to reconstruct on")
    p.add_argument("--iters", type=int, default=ITERS, help="Adam iterations per layer")
    p.add_argument("--lr", type=float, default=LR, help="Adam learning rate")
    p.add_argument("--reg-weight", type=float, default=REG_WEIGHT, help="lambda of the rounding regulariser")
    p.add_argument("--beta-start", type=float, default=BETA_START, help="beta after the warm start")
    p.add_argument("--beta-end", type=float, default=BETA_END, help="beta at the last iteration")
    p.add_argument("--warm-start", type=float, default=WARM_START, help="share of iterations without the regulariser")
    p.add_argument("--test-limit", type=int, default=None, help="score only the first N test images")
    p.add_argument("--save", default=None, help="where to save the AdaRounded model (default: runs/adaround/...)")
    p.add_argument("--plot", default=None, help="histogram of h(V) (default: results/figures/adaround_h_<...>.png)")
    p.add_argument("--plot-layer", type=int, default=1, help="which quantized layer (0-based) to plot h(V) for")
    args = p.parse_args()
    if args.dry_run:
        args.num_calib, args.iters = DRY_RUN_CALIB, DRY_RUN_ITERS
    if args.iters < 1 or args.num_calib < 1 or args.batch_size < 1:
        raise IntsimError("--iters, --num-calib and --batch-size must be positive")
    if not 0 <= args.warm_start < 1:
        raise IntsimError(f"--warm-start is a share of the iterations in [0, 1), got {args.warm_start}")
    schedule = functools.partial(beta_at, warm_start=args.warm_start, beta_start=args.beta_start,
                                 beta_end=args.beta_end)
    qconfig = cli.qconfig_from(args)
    cli.seed_everything(args.seed)
    device = cli.device_from(args.device)
    limit = cli.test_limit(args, DRY_RUN_TEST)
    model, cfg, _, (x_train, y_train), (x_test, y_test) = cli.load_float_and_data(args, device, limit)
    test = Batches(x_test, y_test, dataset_info(args.dataset).eval_batch)
    fp32_acc = accuracy(predict(model, test, device), y_test)
    # Calibration images: a seeded random subset of the training set (labels unused), never test images.
    pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed))[:args.num_calib]
    images = x_train[pick]

    print(f"{args.model} on {args.dataset}, W{args.w_bits}A{args.a_bits} "
          f"{'per-channel' if args.per_channel else 'per-tensor'}, {args.w_observer} weight range: AdaRound "
          f"{args.iters} iterations per layer on {len(images)} training images; float32 {fp32_acc:.2f}%", flush=True)
    qmodel = convert(model, qconfig).to(device)
    if not qconfig.float_activations:
        calibrate(qmodel, [(xb, None) for xb in images.split(CACHE_BATCH)], device, len(images))
    freeze(qmodel)
    print(f"scoring rounding to nearest on {len(y_test)} test images first", flush=True)
    nearest = evaluate_frozen(qmodel, test, device)
    names = [n for n, l in qlayers(qmodel) if l.enabled]
    snapshot_layer = names[min(args.plot_layer, len(names) - 1)]
    start = time.time()
    stats, snapshots = adaround(qmodel, images, device, args.iters, args.batch_size, args.lr, args.reg_weight,
                                args.seed, schedule, snapshot_layer)
    minutes = (time.time() - start) / 60
    report = evaluate_frozen(qmodel, test, device)
    key = "int_acc" if runs_in_integers(qmodel) else "fakequant_acc"
    print(f"AdaRound took {minutes:.1f} min")
    print(f"nearest rounding {nearest[key]:6.2f}%  ({key.replace('_acc', '')})")
    print_frozen_report(fp32_acc, report)

    save = args.save or default_save_path(args)
    save_quantized(save, qmodel, qconfig, cfg, args.dataset, rounding="adaround", **report)
    print(f"saved the AdaRounded model to {save}")
    plot = args.plot or os.path.join("results", "figures", f"adaround_h_{args.dataset}_{args.model}_"
                                     f"W{args.w_bits}A{args.a_bits}_{'pc' if args.per_channel else 'pt'}.png")
    plot_h(plot, snapshots, snapshot_layer, args.iters)
    print(f"saved the h(V) histograms of {snapshot_layer} to {plot}")
    cli.emit_result({"script": "AdaRound", "dataset": args.dataset, "model": args.model,
                     "w_bits": args.w_bits, "a_bits": args.a_bits, "per_channel": args.per_channel,
                     "w_symmetric": qconfig.w_symmetric, "single_rounding": qconfig.single_rounding,
                     "w_observer": qconfig.w_observer, "a_observer": None if qconfig.float_activations
                     else qconfig.a_observer, "rounding": "adaround", "iters": args.iters,
                     "num_calib": len(images), "batch_size": args.batch_size, "lr": args.lr,
                     "reg_weight": args.reg_weight, "test_images": len(y_test), "fp32_acc": round(fp32_acc, 2),
                     "nearest_acc": nearest[key], "nearest": nearest, "layers": stats,
                     "iters_per_s": round(sum(s["iters_per_s"] for s in stats) / len(stats), 1),
                     "minutes": round(minutes, 2), "seed": args.seed, "plot": plot, **report}, args.result_json)


if __name__ == "__main__":
    cli.run(main)
