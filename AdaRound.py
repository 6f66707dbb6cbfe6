"""AdaRound: learn, layer by layer, whether each weight rounds down or up (Nagel et al. 2020,
"Up or Down? Adaptive Rounding for Post-Training Quantization", arXiv 2004.10568), then run
the result with the same integer inference as PTQ and QAT.

    python AdaRound.py --model cnn_bn --w-bits 4                 # W4A32: float activations
    python AdaRound.py --model cnn_bn --w-bits 4 --a-bits 8 --per-channel

For each conv/linear layer in order (sec. 4-5 of the paper; AIMET's defaults):
  1. cache its input x~ from the frozen model whose earlier layers are already AdaRounded (and
     whose activations are quantized with --a-bits < 32), and its float target f(W x) from the
     float model, both after the layer's ReLU and max-pool, on --num-calib images;
  2. swap an AdaRoundQuantizer in for the layer's weight quantizer: soft weights
     W~ = S (clamp(floor(W/S) + h(V) + Z, QMIN, QMAX) - Z), h(V) = W/S - floor(W/S) at the start;
  3. minimise ||f(W x) - f(W~ x~)||^2 + lambda sum(1 - |2 h(V) - 1|^beta) with Adam on batches
     of the cache, no regulariser during the warm start, then beta annealed from 20 to 2;
  4. round hard (up where h(V) >= 0.5): the next freeze takes those integers.
"""
import functools
import os
import time

import torch
import torch._dynamo  # noqa: F401  (Adam's first step imports it, ~3 s; here, so it/s measure the optimisation)

import cli
from config import QCONFIG_FIELDS
from checkpoint import save_figure, save_frozen
from data import Batches, calibration_set, dataset_info
from engine import accuracy, evaluate_frozen, predict, print_frozen_report
from errors import IntsimError
from frozen import runs_in_integers, set_mode
from model import calibrate, convert, freeze, set_phase
from quantizer import AdaRoundQuantizer
from reconstruct import (CACHE_BATCH, collect, full_loss, layer_input, layers_to_reconstruct, optimise, unit)

NUM_CALIB = 1024              # unlabelled training images (AIMET: 500-2000; BRECQ: 1024)
ITERS = 10000                 # per layer (AIMET's default; it uses 15000 below 8 bits)
BATCH_SIZE = 32               # images per optimisation step, drawn from the cache
LR = 1e-3                     # Adam's default learning rate (AIMET)
REG_WEIGHT = 0.01             # lambda (paper sec. 5; AIMET and BRECQ)
BETA_START, BETA_END = 20.0, 2.0
WARM_START = 0.2              # share of the iterations without the regulariser
DRY_RUN_CALIB, DRY_RUN_ITERS, DRY_RUN_TEST = 64, 20, 1000


def beta_at(t, iters, warm_start=WARM_START, beta_start=BETA_START, beta_end=BETA_END):
    """The regulariser's beta at iteration t: None during the warm start (no regulariser), then
    linear from beta_start down to beta_end at the last iteration."""
    warm = int(warm_start * iters)
    if t < warm:
        return None
    progress = (t - warm) / max(iters - 1 - warm, 1)
    return beta_start + (beta_end - beta_start) * progress


def adaround_layer(qmodel, name, layer, images, device, iters, batch_size, lr, reg_weight, generator, schedule,
                   snapshots=None):
    """AdaRound one layer (earlier ones done); leaves its AdaRoundQuantizer in hard mode."""
    frozen = set_mode(freeze(qmodel), "reals")                    # earlier layers AdaRounded, this one nearest
    x = collect(frozen, layer_input(frozen, name), images, device)         # x~, quantized model
    module, end = unit(qmodel, name)
    target = collect(set_phase(qmodel, "float"), end, images, device)     # f(W x), float model
    set_phase(qmodel, "fakequant")
    ada = AdaRoundQuantizer(layer.w_quantizer, layer.weight_bias()[0].detach())
    layer.w_quantizer = ada
    ada.mode = "nearest"
    before = full_loss(module, x, target)

    def regulariser(t):
        beta = schedule(t, iters)
        return None if beta is None else reg_weight * ada.regulariser(beta)

    def snapshot(t):
        if snapshots is not None and t in (0, iters // 2, iters):
            snapshots[t] = ada.h().detach().flatten().cpu()

    ada.mode = "soft"
    start = time.time()
    with torch.enable_grad():
        optimise(module, [ada.v], x, target, iters, batch_size, lr, generator, regulariser, snapshot)
    seconds = time.time() - start
    ada.mode = "hard"
    after = full_loss(module, x, target)
    changed = 100.0 * (ada.integers() != ada.nearest).float().mean().item()
    speed = iters / max(seconds, 1e-9)
    print(f"  {name:12s} {ada.v.numel():7d} weights  reconstruction loss nearest {before:.5f} -> "
          f"AdaRound {after:.5f}  ({changed:.1f}% rounded differently, {speed:.0f} it/s)", flush=True)
    return {"layer": name, "weights": ada.v.numel(), "loss_nearest": round(before, 6), "loss_adaround": round(after, 6),
            "changed_from_nearest_pct": round(changed, 2), "iters_per_s": round(speed, 1)}


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
    save_figure(path, fig)
    plt.close(fig)


def run_name(args, qconfig):
    return f"{args.dataset}_{args.model}_W{qconfig.w_bits}A{qconfig.a_bits}_{'pc' if qconfig.per_channel else 'pt'}"


def main():
    p = cli.parser(__doc__.split("\n")[0])
    cli.add_common(p)
    cli.add_checkpoint(p)
    cli.add_qconfig(p, only=[f for f in QCONFIG_FIELDS if f != "w_rounding"], a_bits=32, w_bits=4)  # it learns the rounding
    cli.add_export(p)
    p.set_defaults(batch_size=BATCH_SIZE)
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
    args, device = cli.start(p)
    if args.dry_run:
        args.num_calib, args.iters = DRY_RUN_CALIB, DRY_RUN_ITERS
    schedule = functools.partial(beta_at, warm_start=args.warm_start, beta_start=args.beta_start,
                                 beta_end=args.beta_end)
    qconfig = cli.qconfig_from(args)
    model, cfg, source, (x_train, y_train), (x_test, y_test) = cli.load_float_and_data(
        args, device, cli.test_limit(args, DRY_RUN_TEST))
    test = Batches(x_test, y_test, dataset_info(args.dataset).eval_batch)
    fp32_acc = accuracy(predict(model, test, device), y_test)
    images, _ = calibration_set(x_train, y_train, args.num_calib, args.seed)    # labels unused
    print(f"{args.model} on {args.dataset}, {qconfig.name()}, {qconfig.w_observer} weight range: AdaRound "
          f"{args.iters} iterations per layer on {len(images)} training images; float32 {fp32_acc:.2f}%", flush=True)

    qmodel = convert(model, qconfig).to(device)
    if not qconfig.float_activations:
        calibrate(qmodel, [(xb, None) for xb in images.split(CACHE_BATCH)], device, len(images))
    print(f"scoring rounding to nearest on {len(y_test)} test images first", flush=True)
    nearest = evaluate_frozen(freeze(qmodel), test, device)
    layers = layers_to_reconstruct(qmodel)
    if args.plot_layer >= len(layers):
        raise IntsimError(f"--plot-layer {args.plot_layer}: {args.model} has {len(layers)} quantized layers "
                          f"(0..{len(layers) - 1})")
    snapshot_layer = layers[args.plot_layer][0]
    generator, stats, snapshots = torch.Generator().manual_seed(args.seed), [], {}
    start = time.time()
    for name, layer in layers:
        stats.append(adaround_layer(qmodel, name, layer, images, device, args.iters, args.batch_size, args.lr,
                                    args.reg_weight, generator, schedule,
                                    snapshots if name == snapshot_layer else None))
    minutes = (time.time() - start) / 60
    frozen = freeze(qmodel)
    report = evaluate_frozen(frozen, test, device)
    key = "int_acc" if runs_in_integers(frozen) else "fakequant_acc"
    print(f"AdaRound took {minutes:.1f} min")
    print(f"nearest rounding {nearest[key]:6.2f}%  ({key.replace('_acc', '')})")
    print_frozen_report(fp32_acc, report)

    save = args.save or cli.trial_path(args, os.path.join("runs", "adaround", f"{run_name(args, qconfig)}.pt"))
    save_frozen(save, frozen, qconfig, cfg, args.dataset, rounding="adaround", fp32_acc=round(fp32_acc, 2), **report)
    print(f"saved the AdaRounded model to {save}")
    report.update(cli.export_if_asked(args, frozen, x_test, device))
    plot = args.plot or cli.trial_path(args, os.path.join("results", "figures", f"adaround_h_{run_name(args, qconfig)}.png"))
    plot_h(plot, snapshots, snapshot_layer, args.iters)
    print(f"saved the h(V) histograms of {snapshot_layer} to {plot}")
    cli.emit_result({"script": "AdaRound", "dataset": args.dataset, "model": args.model, "method": "adaround",
                     **(source if args.dataset == "imagenet" else {}),
                     "iters": args.iters, "num_calib": len(images), "batch_size": args.batch_size, "lr": args.lr,
                     "reg_weight": args.reg_weight, "test_images": len(y_test), "fp32_acc": round(fp32_acc, 2),
                     "nearest_acc": nearest[key], "nearest": nearest, "layers": stats,
                     "iters_per_s": round(sum(s["iters_per_s"] for s in stats) / len(stats), 1),
                     "minutes": round(minutes, 2), "seed": args.seed, "plot": plot, **report}, args.result_json, qconfig)


if __name__ == "__main__":
    cli.run(main)
