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
from dataclasses import dataclass

import torch
import torch._dynamo  # noqa: F401  (Adam's first step imports it, ~3 s; here, so it/s measure the optimisation)

import cli
import loading
from config import QCONFIG_FIELDS
from checkpoint import save_figure, save_frozen
from data import Batches, calibration_set, dataset_info
from engine import accuracy, evaluate_frozen, predict, print_frozen_report
from errors import IntsimError
from frozen import runs_in_integers
from model import calibrate, convert
from freezing import freeze
from reconstruct import CACHE_BATCH, find_units, layer_units, layers_to_reconstruct, reconstruct_unit

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


def adaround_layer(qmodel, u, images, device, iters, batch_size, lr, reg_weight, generator, schedule,
                   snapshot_layer=None, snapshots=None):
    """AdaRound one layer unit (earlier ones done); leaves its AdaRoundQuantizer in hard mode."""
    s = reconstruct_unit(qmodel, u, images, device, iters, batch_size, lr, reg_weight, generator, schedule,
                         snapshot_layer=snapshot_layer, snapshots=snapshots)
    return {"layer": u.name, "weights": s["weights"], "loss_nearest": s["loss_nearest"], "loss_adaround": s["loss_after"],
            "changed_from_nearest_pct": s["changed_from_nearest_pct"], "iters_per_s": s["iters_per_s"]}


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


def run_name(args, qconfig, method):
    """File stem of a run's model and h(V) plot: data set, model, bits, and every setting a sweep
    varies that is not the default, so that two runs of a sweep do not write the same file."""
    parts = [args.dataset, args.model, f"W{qconfig.w_bits}A{qconfig.a_bits}"]
    if qconfig.first_last_bits:
        parts.append(f"fl{qconfig.first_last_bits}")
    parts.append("pc" if qconfig.per_channel else "pt")
    if qconfig.w_observer != "minmax":
        parts.append(qconfig.w_observer + (f"{qconfig.lp_p:g}" if qconfig.w_observer == "lp" else ""))
    if not qconfig.fold_bn:
        parts.append("unfold")
    if args.iters != method.iters:
        parts.append(f"it{args.iters}")
    if args.lr != LR:
        parts.append(f"lr{args.lr:g}")
    if method.blocks:
        if args.layers_per_group != 1:
            parts.append(f"g{args.layers_per_group}")
        if args.loss != method.loss:
            parts.append(args.loss)
        if args.scale_lr != method.scale_lr:
            parts.append(f"slr{args.scale_lr:g}")
    return "_".join(parts)


@dataclass(frozen=True)
class Method:
    """What a reconstruction script reconstructs: AdaRound one layer at a time; BRECQ.py the
    units found in the graph (residual blocks), with its loss and learned step sizes."""
    name: str = "adaround"        # the result's "method", in file names
    label: str = "AdaRound"
    iters: int = ITERS            # default iterations per unit
    blocks: bool = False          # units: reconstruct.find_units (blocks), else reconstruct.layer_units
    loss: str = "mse"             # default --loss: "mse" or "fisher" (BRECQ's Fisher-diagonal weighting)
    scale_lr: float = 0.0         # default --scale-lr: Adam lr of activation step sizes (0: not learned)


ADAROUND = Method()
LOSSES = ("mse", "fisher")


def main(method=ADAROUND, doc=__doc__):
    p = cli.parser(doc.split("\n")[0])
    cli.add_common(p)
    cli.add_checkpoint(p)
    cli.add_qconfig(p, only=[f for f in QCONFIG_FIELDS if f != "w_rounding"], a_bits=32, w_bits=4)  # it learns the rounding
    cli.add_export(p)
    p.set_defaults(batch_size=BATCH_SIZE)
    p.add_argument("--num-calib", type=int, default=NUM_CALIB, help="unlabelled training images to reconstruct on")
    p.add_argument("--iters", type=int, default=method.iters, help="Adam iterations per layer" + (
        " or block" if method.blocks else ""))
    p.add_argument("--lr", type=float, default=LR, help="Adam learning rate")
    p.add_argument("--reg-weight", type=float, default=REG_WEIGHT, help="lambda of the rounding regulariser")
    p.add_argument("--beta-start", type=float, default=BETA_START, help="beta after the warm start")
    p.add_argument("--beta-end", type=float, default=BETA_END, help="beta at the last iteration")
    p.add_argument("--warm-start", type=float, default=WARM_START, help="share of iterations without the regulariser")
    p.add_argument("--test-limit", type=int, default=None, help="score only the first N test images")
    if method.blocks:
        p.add_argument("--loss", default=method.loss, choices=LOSSES,
                       help="block output error: plain MSE or weighted by the Fisher diagonal")
        p.add_argument("--layers-per-group", type=int, default=1,
                       help="consecutive layers outside residual blocks reconstructed together")
        p.add_argument("--scale-lr", type=float, default=method.scale_lr,
                       help="Adam learning rate of the activation step sizes (cosine to 0; 0: keep the calibrated ones)")
    p.add_argument("--save", default=None, help=f"where to save the model (default: runs/{method.name}/...)")
    p.add_argument("--plot", default=None, help=f"histogram of h(V) (default: figures/{method.name}_h_<...>.png beside "
                                                f"--result-json, else under runs/)")
    p.add_argument("--plot-layer", type=int, default=1, help="which quantized layer (0-based) to plot h(V) for")
    args, device = cli.start(p)
    cli.cap_for_dry_run(args, num_calib=DRY_RUN_CALIB, iters=DRY_RUN_ITERS)
    schedule = functools.partial(beta_at, warm_start=args.warm_start, beta_start=args.beta_start,
                                 beta_end=args.beta_end)
    qconfig = cli.qconfig_from(args)
    if method.blocks and "scale_lr" in args.given and qconfig.float_activations:
        raise IntsimError("--scale-lr learns the activation step sizes, and with --a-bits 32 there are none: "
                          "quantize the activations (--a-bits 8) or leave --scale-lr out")
    model, cfg, source, (x_train, y_train), (x_test, y_test) = loading.load_float_and_data(
        args, device, cli.test_limit(args, DRY_RUN_TEST))
    test = Batches(x_test, y_test, dataset_info(args.dataset).eval_batch)
    fp32_acc = accuracy(predict(model, test, device), y_test)
    images, _ = calibration_set(x_train, y_train, args.num_calib, args.seed)    # labels unused
    print(f"{args.model} on {args.dataset}, {qconfig.name()}, {qconfig.w_observer} weight range: {method.label} "
          f"{args.iters} iterations per {'unit' if method.blocks else 'layer'} on {len(images)} training images; "
          f"float32 {fp32_acc:.2f}%", flush=True)

    qmodel = convert(model, qconfig).to(device)
    if not qconfig.float_activations:
        calibrate(qmodel, [(xb, None) for xb in images.split(CACHE_BATCH)], device, len(images))
    print(f"scoring rounding to nearest on {len(y_test)} test images first", flush=True)
    nearest = evaluate_frozen(freeze(qmodel, kernel=cli.export_kernel(args)), test, device)
    layers = layers_to_reconstruct(qmodel)
    if args.plot_layer >= len(layers):
        raise IntsimError(f"--plot-layer {args.plot_layer}: {args.model} has {len(layers)} quantized layers "
                          f"(0..{len(layers) - 1})")
    snapshot_layer = layers[args.plot_layer][0]
    generator, stats, snapshots = torch.Generator().manual_seed(args.seed), [], {}
    start = time.time()
    if method.blocks:
        scale_lr = args.scale_lr if args.scale_lr > 0 and not qconfig.float_activations else None
        fp_logits = float_logits(model, images, device) if args.loss == "fisher" else None
        units = find_units(qmodel, args.layers_per_group, to_quantizer=scale_lr is not None)
        print(f"{len(units)} units: {', '.join(u.name for u in units)}", flush=True)
        for u in units:
            stats.append(reconstruct_unit(qmodel, u, images, device, args.iters, args.batch_size, args.lr,
                                          args.reg_weight, generator, schedule, fp_logits, scale_lr, snapshot_layer,
                                          snapshots, method.label))
    else:
        for u in layer_units(qmodel):
            stats.append(adaround_layer(qmodel, u, images, device, args.iters, args.batch_size, args.lr,
                                        args.reg_weight, generator, schedule, snapshot_layer, snapshots))
    minutes = (time.time() - start) / 60
    frozen = freeze(qmodel, kernel=cli.export_kernel(args))
    report = evaluate_frozen(frozen, test, device)
    key = "int_acc" if runs_in_integers(frozen) else "fakequant_acc"
    print(f"{method.label} took {minutes:.1f} min")
    print(f"nearest rounding {nearest[key]:6.2f}%  ({key.replace('_acc', '')})")
    print_frozen_report(fp32_acc, report, frozen)

    stem = run_name(args, qconfig, method)
    save = args.save or cli.trial_path(args, os.path.join("runs", method.name, f"{stem}.pt"))
    save_frozen(save, frozen, qconfig, cfg, args.dataset, method.label, rounding=method.name, fp32_acc=round(fp32_acc, 2), **report)
    print(f"saved the {method.label} model to {save}")
    report.update(cli.export_if_asked(args, frozen, x_test, device))
    plot = cli.figure_path(args, f"{method.name}_h_{stem}.png")
    plot_h(plot, snapshots, snapshot_layer, args.iters)
    print(f"saved the h(V) histograms of {snapshot_layer} to {plot}")
    blocks = {"loss": args.loss, "layers_per_group": args.layers_per_group,
              "scale_lr": scale_lr or 0.0, "units": stats} if method.blocks else {"layers": stats}
    cli.emit_result({"script": method.label if method.blocks else "AdaRound", "dataset": args.dataset,
                     "model": args.model, "method": method.name,
                     **(source if args.dataset == "imagenet" else {}),
                     "iters": args.iters, "num_calib": len(images), "batch_size": args.batch_size, "lr": args.lr,
                     "reg_weight": args.reg_weight, "test_images": len(y_test), "fp32_acc": round(fp32_acc, 2),
                     "nearest_acc": nearest[key], "nearest": nearest, **blocks,
                     "iters_per_s": round(sum(s["iters_per_s"] for s in stats) / len(stats), 1),
                     "minutes": round(minutes, 2), "seed": args.seed, "plot": plot,
                     **report}, args.result_json, qconfig, device)


@torch.no_grad()
def float_logits(model, images, device):
    """The float model's logits on the reconstruction images (BRECQ's Fisher weights use them)."""
    model.eval()
    return torch.cat([model(xb.to(device)) for xb in images.split(CACHE_BATCH)])


if __name__ == "__main__":
    cli.run(main)
