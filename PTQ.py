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
from data import Batches, dataset_info
from engine import accuracy, evaluate_frozen, layer_agreement, predict, print_frozen_report
from model import calibrate, convert, freeze, qlayers, runs_in_integers, save_quantized

NUM_CALIB_BATCHES = 8       # x --batch-size training images observed for the activation ranges
DRY_RUN_CALIB = 1           # --dry-run: calibration batches ...
DRY_RUN_TEST = 1000         # ... and test images


def main():
    p = cli.parser(__doc__.split("\n")[0])
    cli.add_common(p)
    cli.add_quant(p)
    cli.add_ranges(p)
    p.add_argument("--calib-batches", type=int, default=NUM_CALIB_BATCHES,
                   help="training batches used to calibrate activation ranges")
    p.add_argument("--test-limit", type=int, default=None, help="score only the first N test images")
    p.add_argument("--save", default=None, help="save the frozen quantized model's state_dict here")
    p.add_argument("--per-layer", type=int, default=0, metavar="N",
                   help="also report, layer by layer, the share of output integers where the integer "
                        "path and the float64 fake-quant differ, on the first N test images")
    args = p.parse_args()
    qconfig = cli.qconfig_from(args)
    cli.seed_everything(args.seed)
    device = cli.device_from(args.device)
    limit = cli.test_limit(args, DRY_RUN_TEST)
    model, cfg, _, (x_train, y_train), (x_test, y_test) = cli.load_float_and_data(args, device, limit)
    calib_batches = DRY_RUN_CALIB if args.dry_run else args.calib_batches
    test = Batches(x_test, y_test, dataset_info(args.dataset).eval_batch)

    # Calibration images come from the training set (shuffled with the seed), never the test set.

    fp32_acc = accuracy(predict(model, test, device), y_test)
    qmodel = convert(model, qconfig).to(device)
    n = 0
    if not qconfig.float_activations:
        n = calibrate(qmodel, Batches(x_train, y_train, args.batch_size, shuffle=True, seed=args.seed),
                      device, calib_batches)
    freeze(qmodel, generator=torch.Generator().manual_seed(args.seed))    # seeds --rounding stochastic
    report = evaluate_frozen(qmodel, test, device)

    name = f"W{args.w_bits}A{args.a_bits} {'per-channel' if args.per_channel else 'per-tensor'}"
    print(f"{args.model} on {args.dataset}, {name}, weights {qconfig.w_observer} range, {qconfig.rounding} "
          f"rounding, activations {qconfig.a_observer if n else 'float'}, calibrated on {n} "
          f"training images, scored on {len(y_test)} test images")
    for lname, layer in (qlayers(qmodel) if runs_in_integers(qmodel) else []):
        right = -layer.shift                                  # n, the right shift of M = M0 2^-n
        print(f"  {lname:12s} accumulates in {layer.accumulation(device)} "
              f"(worst-case |acc| {float(layer.acc_bound):.3g}), right shift n {int(right.min())}..{int(right.max())}")
    print_frozen_report(fp32_acc, report)
    if args.per_layer and runs_in_integers(qmodel):
        report["layer_diff_share"] = layer_agreement(qmodel, x_test[:args.per_layer], device)
        print(f"output integers that differ between integer and fake-quant, on {args.per_layer} images:")
        for lname, share in report["layer_diff_share"]:
            print(f"  {lname:12s} {share:8.4f}%")
    if args.save:
        save_quantized(args.save, qmodel, qconfig, cfg, args.dataset, **report)
        print(f"saved the frozen model to {args.save}")
    cli.emit_result({"script": "PTQ", "dataset": args.dataset, "model": args.model,
                     "w_bits": args.w_bits, "a_bits": args.a_bits, "per_channel": args.per_channel,
                     "w_symmetric": qconfig.w_symmetric, "single_rounding": qconfig.single_rounding,
                     "out_bits": qconfig.out_bits or qconfig.a_bits, "w_observer": qconfig.w_observer,
                     "a_observer": qconfig.a_observer if n else None, "lp_p": qconfig.lp_p,
                     "rounding": qconfig.rounding, "fold_bn": qconfig.fold_bn, "bias_bits": qconfig.bias_bits,
                     "layers": qconfig.layers,
                     "calib_images": n, **({"weights": args.weights} if args.dataset == "imagenet" else {}),
                     "test_images": len(y_test), "fp32_acc": round(fp32_acc, 2),
                     "seed": args.seed, **report}, args.result_json)


if __name__ == "__main__":
    cli.run(main)
