"""Rounding to nearest is not optimal: the AdaRound paper's Table 1 and its explanation
(Nagel et al. 2020, arXiv 2004.10568, section 2), on the models trained here.

    python table1.py --model cnn_bn          # 4-bit per-tensor weights, float activations

1. Only the first layer quantized (BN folded, activations float): rounding by nearest, ceil,
   floor, and --draws seeded stochastic roundings (mean +- std, best).
2. The same with every conv/linear layer quantized.
3. Why (section 2.1): for the weight change dw of each first-layer rounding, the Taylor
   expansion of the task loss L around the float weights w,
       L(w + dw) - L(w) ~ g^T dw + 1/2 dw^T H dw      (g, H: gradient and Hessian w.r.t. w)
   on NUM_HESSIAN_IMAGES training images, with H dw by a Hessian-vector product (H is never
   formed). Across the stochastic draws, how well does each term predict the test accuracy
   and the loss change? The paper: the first-order term is ~0 at a trained minimum, and the
   second-order term, which couples the weights' rounding errors, decides.
Saves a scatter plot of both terms against accuracy and ends with `RESULT {json}`.
"""
import dataclasses

import numpy as np
import torch

import cli
import loading
from checkpoint import save_figure
from data import Batches, calibration_set, dataset_info
from engine import accuracy, predict
from frozen import set_mode
from function import FLOAT_BITS
from model import convert, qlayers
from freezing import freeze
from taylor import LayerLoss

NUM_DRAWS = 100             # stochastic roundings (the paper: 100)
NUM_HESSIAN_IMAGES = 1024   # training images for g and H dw
HESSIAN_BATCH = 256
PRINT_EVERY = 10            # draws between progress lines
DRY_RUN_DRAWS, DRY_RUN_TEST, DRY_RUN_HESSIAN = 3, 1000, 256
FIXED_SCHEMES = ("nearest", "ceil", "floor")


def pearson(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a, b):
    rank = lambda v: np.argsort(np.argsort(v))
    return pearson(rank(np.asarray(a)), rank(np.asarray(b)))


def summary(accs):
    a = np.asarray(accs)
    return {"mean": round(float(a.mean()), 2), "std": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 2),
            "best": round(float(a.max()), 2), "worst": round(float(a.min()), 2)}


def score(qmodel, test, labels, device, rounding, generator=None):
    """Freeze with `rounding`; returns the frozen model and its fake-quant test accuracy."""
    frozen = set_mode(freeze(qmodel, rounding=rounding, generator=generator), "reals")
    return frozen, accuracy(predict(frozen, test, device), labels)


def run_table(qmodel, test, labels, device, draws, seed, on_draw=None):
    """Table 1's row for one converted model: {scheme: accuracy} and the stochastic accuracies.
    Draw i uses a generator seeded with seed + i; `on_draw(frozen, acc)` sees each draw."""
    row = {s: round(score(qmodel, test, labels, device, s)[1], 2) for s in FIXED_SCHEMES}
    accs = []
    for i in range(draws):
        frozen, acc = score(qmodel, test, labels, device, "stochastic", torch.Generator().manual_seed(seed + i))
        accs.append(round(acc, 2))
        if on_draw:
            on_draw(frozen, accs[-1])
        if (i + 1) % PRINT_EVERY == 0 or i + 1 == draws:
            print(f"  {qmodel.qconfig.quantize_layers} layers: {i + 1}/{draws} stochastic draws, "
                  f"mean {np.mean(accs):.2f}%, best {max(accs):.2f}%", flush=True)
    return row, accs


def weight_change(qmodel, frozen, name):
    """dw = S_w (q_w - Z_w) - w of layer `name` (its BN-folded weights)."""
    w, _ = qmodel.get_submodule(name).folded_weight_bias()
    return (frozen.get_submodule(name).real_weight(torch.float32) - w).detach()


def plot(path, draws, nearest, fp32, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, label in ((axes[0], "first", "first-order term  g$^T\\Delta w$"),
                           (axes[1], "second", "second-order term  $\\frac{1}{2}\\Delta w^T H \\Delta w$")):
        ax.scatter(draws[key], draws["acc"], s=14, label="stochastic rounding")
        ax.scatter([nearest[key]], [nearest["acc"]], marker="*", s=160, c="red", label="rounding to nearest")
        ax.set_xlabel(label)
        ax.set_title(f"Pearson r = {pearson(draws[key], draws['acc']):+.2f}")
    axes[0].set_ylabel("test accuracy % (first layer quantized)")
    axes[0].axhline(fp32, color="gray", lw=0.8, ls="--", label="float32")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(path, fig)
    plt.close(fig)


def print_table(args, fp32, first_row, first_accs, all_row, all_accs, corr, nearest, terms):
    print(f"\nTable 1 ({args.model}, W{args.w_bits}, float activations; float32 {fp32:.2f}%)")
    print(f"{'rounding':28s} {'first layer':>14s} {'all layers':>14s}")
    for s in FIXED_SCHEMES:
        print(f"{s:28s} {first_row[s]:14.2f} {all_row[s]:14.2f}")
    fs, as_ = summary(first_accs), summary(all_accs)
    print(f"{'stochastic (mean +- std)':28s} {fs['mean']:8.2f} +- {fs['std']:4.2f} {as_['mean']:8.2f} +- {as_['std']:4.2f}")
    print(f"{'stochastic (best of ' + str(len(first_accs)) + ')':28s} {fs['best']:14.2f} {as_['best']:14.2f}")
    print(f"\nacross the {len(first_accs)} first-layer draws (Pearson r; Spearman in RESULT):")
    for term in ("first", "second"):
        print(f"  {term}-order term vs accuracy {corr[f'pearson_{term}_vs_acc']:+.3f}, "
              f"vs loss change {corr[f'pearson_{term}_vs_dloss']:+.3f}")
    print(f"  first + second vs loss change {corr['pearson_taylor_vs_dloss']:+.3f}")
    print(f"  rounding to nearest: first-order {nearest['first']:+.4f}, second-order {nearest['second']:.4f}, loss "
          f"change {nearest['dloss']:+.4f}; stochastic draws: second-order {np.mean(terms['second']):.4f} on average")


def main():
    p = cli.parser(__doc__.split("\n")[0])
    cli.add_common(p)
    cli.add_checkpoint(p)
    cli.add_qconfig(p, only=("w_bits", "per_channel", "w_observer", "lp_p"), w_bits=4)
    p.add_argument("--draws", type=int, default=NUM_DRAWS, help="stochastic roundings")
    p.add_argument("--hessian-images", type=int, default=NUM_HESSIAN_IMAGES,
                   help="training images for the gradient and Hessian-vector products")
    p.add_argument("--test-limit", type=int, default=None, help="score only the first N test images")
    p.add_argument("--plot", default=None, help="scatter plot PNG (default: figures/table1_<dataset>_<model>.png beside "
                                                "--result-json, else under runs/)")
    args, device = cli.start(p)
    cli.cap_for_dry_run(args, draws=DRY_RUN_DRAWS, hessian_images=DRY_RUN_HESSIAN)
    draws, n_hessian = args.draws, args.hessian_images
    all_config = dataclasses.replace(cli.qconfig_from(args), a_bits=FLOAT_BITS)    # weights only
    model, cfg, _, (x_train, y_train), (x_test, y_test) = loading.load_float_and_data(
        args, device, cli.test_limit(args, DRY_RUN_TEST))
    test = Batches(x_test, y_test, dataset_info(args.dataset).eval_batch)
    fp32 = accuracy(predict(model, test, device), y_test)
    print(f"{args.model} on {args.dataset}: float32 {fp32:.2f}%; {all_config.name()} "
          f"({all_config.w_observer} range), activations float")

    # 1) first layer only, with the Taylor terms of every rounding
    qmodel = convert(model, dataclasses.replace(all_config, quantize_layers="first")).to(device)
    first = qlayers(qmodel)[0][0]
    loss_fn = LayerLoss(qmodel, first, Batches(*calibration_set(x_train, y_train, n_hessian, args.seed),
                                                HESSIAN_BATCH), device)
    terms = {"first": [], "second": [], "dloss": [], "acc": []}

    def record(frozen, acc):
        for k, v in zip(terms, loss_fn.terms(weight_change(qmodel, frozen, first)) + (acc,)):
            terms[k].append(v)

    print(f"Taylor terms on {n_hessian} training images; test accuracy on {len(y_test)} test images")
    first_row, first_accs = run_table(qmodel, test, y_test, device, draws, args.seed, record)
    frozen, _ = score(qmodel, test, y_test, device, "nearest")
    nearest = dict(zip(("first", "second", "dloss"), loss_fn.terms(weight_change(qmodel, frozen, first))),
                   acc=first_row["nearest"])

    # 2) every layer
    all_row, all_accs = run_table(convert(model, all_config).to(device), test, y_test, device, draws, args.seed)

    # 3) how well each term predicts accuracy and the loss change across the draws
    terms["taylor"] = [f + s for f, s in zip(terms["first"], terms["second"])]
    corr = {f"{kind}_{term}_vs_{target}": round(fn(terms[term], terms[target]), 3)
            for kind, fn in (("pearson", pearson), ("spearman", spearman))
            for term in ("first", "second", "taylor") for target in ("acc", "dloss")}
    print_table(args, fp32, first_row, first_accs, all_row, all_accs, corr, nearest, terms)

    path = cli.figure_path(args, f"table1_{args.dataset}_{args.model}.png")
    plot(path, terms, nearest, fp32, f"{args.model}: {draws} stochastic roundings of the first layer "
                                     f"(W{args.w_bits} {'per-channel' if args.per_channel else 'per-tensor'})")
    print(f"saved the scatter plot to {path}")
    r2 = lambda v: [round(x, 6) for x in v]
    cli.emit_result({"script": "Table1", "dataset": args.dataset, "model": args.model,
                     "fp32_acc": round(fp32, 2), "draws": draws, "test_images": len(y_test),
                     "hessian_images": n_hessian, "seed": args.seed, "plot": path,
                     "first_layer": {**first_row, "stochastic": summary(first_accs)},
                     "all_layers": {**all_row, "stochastic": summary(all_accs)},
                     "correlations": corr, "nearest_terms": {k: round(v, 6) for k, v in nearest.items()},
                     "draw_acc": r2(terms["acc"]), "draw_first": r2(terms["first"]),
                     "draw_second": r2(terms["second"]), "draw_dloss": r2(terms["dloss"]),
                     "all_layers_draw_acc": r2(all_accs)}, args.result_json, all_config, device)


if __name__ == "__main__":
    cli.run(main)
