"""Post-training quantization: calibrate on training images, freeze, run in integers.

    python PTQ.py --model cnn_bn --w-bits 8 --a-bits 8 --per-channel
    python PTQ.py --model cnn_bn --w-bits 4 --a-bits 32 --w-observer lp --lp-p 2.4   # weights only

Prints the float32, fake-quant and integer accuracies on the full test set, how often the
integer and fake-quant paths agree, and ends with one `RESULT {json}` line. With float
activations (--a-bits 32) or only some layers quantized there is no integer path: the
fake-quant accuracy is the result.
"""
import torch

import cli
import loading
from checkpoint import save_frozen
from data import Batches, calibration_set, dataset_info
from engine import accuracy, evaluate_frozen, layer_agreement, predict, print_frozen_report, weight_layers
from frozen import runs_in_integers
from model import calibrate, convert
from freezing import freeze

NUM_CALIB_BATCHES = 8       # x --batch-size training images observed for the activation ranges
DRY_RUN_CALIB = 1           # --dry-run: calibration batches ...
DRY_RUN_TEST = 1000         # ... and test images


def print_layers(frozen, device):
    """How each integer conv/linear accumulates, and its right shifts n (M = M0 2^-n)."""
    for name, op in frozen.named_modules():
        if hasattr(op, "accumulation"):          # ops.conv.IntConv
            right = -op.shift
            print(f"  {name:12s} accumulates in {'/'.join(op.chosen_accumulations(device))} (exact: "
                  f"{', '.join(op.exact_accumulations(device))}; worst-case |acc| "
                  f"{float(op.acc_bound):.3g}), right shift n {int(right.min())}..{int(right.max())}")


def main():
    p = cli.parser(__doc__.split("\n")[0])
    cli.add_common(p)
    cli.add_checkpoint(p)
    cli.add_qconfig(p)
    cli.add_export(p)
    p.add_argument("--calib-batches", type=int, default=NUM_CALIB_BATCHES,
                   help="training batches used to calibrate activation ranges")
    p.add_argument("--test-limit", type=int, default=None, help="score only the first N test images")
    p.add_argument("--save", default=None, help="save the frozen quantized model here")
    p.add_argument("--per-layer", type=int, default=0, metavar="N",
                   help="also report, layer by layer, the share of output integers where the integer "
                        "path and the float64 fake-quant differ, on the first N test images")
    p.add_argument("--weight-layers", action="store_true",
                   help="also report, layer by layer, the weight SQNR and the test accuracy with only that "
                        "layer's weights quantized (one more evaluation per layer)")
    args, device = cli.start(p)
    qconfig = cli.qconfig_from(args)
    model, cfg, source, (x_train, y_train), (x_test, y_test) = loading.load_float_and_data(
        args, device, cli.test_limit(args, DRY_RUN_TEST))
    test = Batches(x_test, y_test, dataset_info(args.dataset).eval_batch)
    fp32_acc = accuracy(predict(model, test, device), y_test)

    # calibrate (training images, never test images) -> freeze -> score both paths
    qmodel = convert(model, qconfig).to(device)
    n = 0
    if not qconfig.float_activations:
        cli.cap_for_dry_run(args, calib_batches=DRY_RUN_CALIB)
        calib = calibration_set(x_train, y_train, args.calib_batches * args.batch_size, args.seed)
        n = calibrate(qmodel, Batches(*calib, args.batch_size), device, args.calib_batches)
    frozen = freeze(qmodel, generator=torch.Generator().manual_seed(args.seed), kernel=cli.export_kernel(args))   # seeds stochastic rounding
    report = evaluate_frozen(frozen, test, device)

    print(f"{args.model} on {args.dataset}, {qconfig.name()}, weights {qconfig.w_observer} range, "
          f"{qconfig.w_rounding} rounding, activations {qconfig.a_observer if n else 'float'}, calibrated on "
          f"{n} training images, scored on {len(y_test)} test images")
    integer = runs_in_integers(frozen)
    if integer:
        print_layers(frozen, device)
    print_frozen_report(fp32_acc, report, frozen)
    if args.per_layer and integer:
        report["layer_diff_share"] = layer_agreement(frozen, x_test[:args.per_layer], device)
        print(f"output integers that differ between integer and fake-quant, on {args.per_layer} images:")
        for lname, share in report["layer_diff_share"]:
            print(f"  {lname:12s} {share:8.4f}%")
    if args.weight_layers:
        report["weight_layers"] = weight_layers(qmodel, frozen, test, y_test, device)
        print("each layer's weights alone quantized: SQNR, its worst channel's SQNR, accuracy")
        for lname, kind, db, worst, acc in report["weight_layers"]:
            print(f"  {lname:20s} {kind:9s} {db:6.1f} dB  {worst:6.1f} dB  {acc:6.2f}%")
    if args.save:
        save_frozen(args.save, frozen, qconfig, cfg, args.dataset, "PTQ", fp32_acc=round(fp32_acc, 2), **report)
        print(f"saved the frozen model to {args.save}")
    report.update(cli.export_if_asked(args, frozen, x_test, device))
    cli.emit_result({"script": "PTQ", "dataset": args.dataset, "model": args.model, "calib_images": n,
                     **(source if args.dataset == "imagenet" else {}),
                     "test_images": len(y_test), "fp32_acc": round(fp32_acc, 2), "seed": args.seed, **report},
                    args.result_json, qconfig, device)


if __name__ == "__main__":
    cli.run(main)
