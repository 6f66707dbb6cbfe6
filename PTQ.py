"""Post-training quantization: calibrate on training images, freeze, run in integers.

    python PTQ.py --model cnn_bn --w-bits 8 --a-bits 8 --per-channel

Prints the float32, fake-quant and integer accuracies on the full test set, how often the
integer and fake-quant paths agree, and ends with one `RESULT {json}` line.
"""
import torch

import cli
from data import Batches, load_split
from engine import accuracy, predict
from model import calibrate, convert, freeze, load_checkpoint, output_integers, qlayers, set_mode
from module import QConfig

NUM_CALIB_BATCHES = 8       # x --batch-size training images observed for the activation ranges
TEST_BATCH_SIZE = 1000
DRY_RUN_CALIB = 1           # --dry-run: calibration batches ...
DRY_RUN_TEST = 1000         # ... and test images


def compare_paths(qmodel, int_logits, fq_logits):
    """How closely integer inference follows the fake-quant float simulation of it."""
    diff = (output_integers(qmodel, int_logits) - output_integers(qmodel, fq_logits)).abs()
    return {"int_fq_same_class": round(100.0 * (int_logits.argmax(1) == fq_logits.argmax(1)).float().mean().item(), 3),
            "int_fq_max_diff": int(diff.max()),
            "int_fq_diff_share": round(100.0 * (diff > 0).float().mean().item(), 4)}


def main():
    p = cli.parser(__doc__.split("\n")[0])
    cli.add_common(p)
    cli.add_quant(p)
    p.add_argument("--calib-batches", type=int, default=NUM_CALIB_BATCHES,
                   help="training batches used to calibrate activation ranges")
    p.add_argument("--test-limit", type=int, default=None, help="score only the first N test images")
    p.add_argument("--save", default=None, help="save the frozen quantized model's state_dict here")
    args = p.parse_args()
    qconfig = QConfig(args.w_bits, args.a_bits, args.per_channel, not args.w_asymmetric)
    cli.seed_everything(args.seed)
    device = cli.device_from(args.device)
    model, cfg, ckpt = load_checkpoint(cli.default_ckpt(args), args.dataset, args.model)
    model.to(device)

    # Calibration images come from the training set (shuffled with the seed), never the test set.
    x_train, y_train = load_split(args.dataset, args.data_dir, train=True, download=args.download)
    x_test, y_test = load_split(args.dataset, args.data_dir, train=False, download=args.download)
    calib_batches = DRY_RUN_CALIB if args.dry_run else args.calib_batches
    limit = DRY_RUN_TEST if args.dry_run else args.test_limit
    x_test, y_test = x_test[:limit], y_test[:limit]
    test = Batches(x_test, y_test, TEST_BATCH_SIZE)

    fp32_acc = accuracy(predict(model, test, device), y_test)
    qmodel = convert(model, qconfig).to(device)
    n = calibrate(qmodel, Batches(x_train, y_train, args.batch_size, shuffle=True, seed=args.seed),
                  device, calib_batches)
    freeze(qmodel)
    set_mode(qmodel, "fakequant")
    fq_logits = predict(qmodel, test, device)
    set_mode(qmodel, "int")
    int_logits = predict(qmodel, test, device)
    fq_acc, int_acc = accuracy(fq_logits, y_test), accuracy(int_logits, y_test)
    agreement = compare_paths(qmodel, int_logits, fq_logits)

    name = f"W{args.w_bits}A{args.a_bits} {'per-channel' if args.per_channel else 'per-tensor'}"
    print(f"{args.model} on {args.dataset}, {name}, calibrated on {n * args.batch_size} training images, "
          f"scored on {len(y_test)} test images")
    for lname, layer in qlayers(qmodel):
        print(f"  {lname:12s} accumulates in {str(layer.acc_dtype(device)).replace('torch.', '')} "
              f"(worst-case |acc| {float(layer.acc_bound):.3g})")
    print(f"float32     {fp32_acc:6.2f}%")
    print(f"fake-quant  {fq_acc:6.2f}%")
    print(f"integer     {int_acc:6.2f}%   (same class as fake-quant: {agreement['int_fq_same_class']:.2f}%, "
          f"largest output-integer difference {agreement['int_fq_max_diff']})")
    if args.save:
        torch.save({"qconfig": vars(qconfig), "model_config": ckpt["model_config"],
                    "dataset": args.dataset, "state_dict": qmodel.state_dict()}, args.save)
        print(f"saved the frozen model to {args.save}")
    cli.emit_result({"script": "PTQ", "dataset": args.dataset, "model": args.model,
                     "w_bits": args.w_bits, "a_bits": args.a_bits, "per_channel": args.per_channel,
                     "w_symmetric": qconfig.w_symmetric, "calib_images": n * args.batch_size,
                     "test_images": len(y_test), "fp32_acc": round(fp32_acc, 2),
                     "fakequant_acc": round(fq_acc, 2), "int_acc": round(int_acc, 2),
                     "seed": args.seed, **agreement}, args.result_json)


if __name__ == "__main__":
    cli.run(main)
