"""Quantization-aware training: fine-tune a float checkpoint with fake-quantized weights and
activations (straight-through gradient), then freeze it into the same integer layers as PTQ.

    python QAT.py --model cnn_bn --w-bits 4 --a-bits 4 --per-channel
    python QAT.py --model cnn_bn --w-bits 4 --a-bits 4 --per-channel --eval runs/qat/...pt

The optimizer updates the float "shadow" weights; the quantized copy is recomputed from them
on every forward and never written back. Activation ranges follow a moving average of the
batch min/max (Jacob et al. 2018, sec. 3.1); BN runs with batch statistics, corrected so the
quantized weights are the running-statistics fold (Krishnamoorthi 2018, sec. 3.2.2), until
--freeze-bn-epoch, after which it uses its running statistics.
"""
import os
import time

import torch

import cli
from data import Batches, dataset_info
from engine import accuracy, evaluate, evaluate_frozen, predict, print_frozen_report, train_one_epoch
from model import (calibrate, convert, freeze, freeze_bn, freeze_observers, load_quantized, save_quantized,
                   set_mode)

EPOCHS = 3
LR = {"sgd": 1e-3, "adam": 1e-4}   # peak learning rate per optimizer (cosine decay to 0)
MOMENTUM = 0.9                     # SGD momentum
FREEZE_BN_EPOCH = 2                # BN uses running statistics after this many epochs
FREEZE_OBSERVER_EPOCH = 2          # activation ranges stop moving after this many epochs
NUM_CALIB_BATCHES = 8              # batches that set the initial activation ranges
BATCH_SIZE = 128
DRY_RUN_BATCHES = 2                # --dry-run: training batches per epoch ...
DRY_RUN_TEST = 1000                # ... and test images


def default_save_path(args):
    granularity = "pc" if args.per_channel else "pt"
    out = f"_out{args.out_bits}" if args.out_bits else ""
    return os.path.join("runs", "qat", f"{args.dataset}_{args.model}_W{args.w_bits}A{args.a_bits}{out}_{granularity}.pt")


def result_keys(args, qconfig, test_images):
    """The RESULT keys a training run and an --eval run share."""
    return {"script": "QAT", "dataset": args.dataset, "model": args.model, "w_bits": args.w_bits,
            "a_bits": args.a_bits, "per_channel": args.per_channel, "single_rounding": qconfig.single_rounding,
            "out_bits": qconfig.out_bits or qconfig.a_bits, "test_images": test_images}


def main():
    p = cli.parser(__doc__.split("\n")[0])
    cli.add_common(p)
    cli.add_quant(p)
    p.set_defaults(batch_size=BATCH_SIZE)
    p.add_argument("--epochs", type=int, default=EPOCHS, help="QAT epochs")
    p.add_argument("--optimizer", default="sgd", choices=sorted(LR), help="optimizer")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 sgd, 1e-4 adam)")
    p.add_argument("--freeze-bn-epoch", type=int, default=FREEZE_BN_EPOCH,
                   help="epochs with BN batch statistics; BN is frozen after them")
    p.add_argument("--freeze-observer-epoch", type=int, default=FREEZE_OBSERVER_EPOCH,
                   help="epochs with moving activation ranges; they are frozen after them")
    p.add_argument("--calib-batches", type=int, default=NUM_CALIB_BATCHES,
                   help="training batches that set the initial activation ranges")
    p.add_argument("--test-limit", type=int, default=None, help="score only the first N test images")
    p.add_argument("--save", default=None, help="where to save the frozen QAT model "
                   "(default: runs/qat/<dataset>_<model>_W<w>A<a>_<pt|pc>.pt)")
    p.add_argument("--eval", default=None, metavar="PATH",
                   help="only evaluate a frozen QAT model saved earlier (no training)")
    args = p.parse_args()
    cli.require_integer_activations(args, "QAT.py")
    qconfig = cli.qconfig_from(args, a_observer="ema")
    lr = args.lr if args.lr is not None else LR[args.optimizer]
    cli.seed_everything(args.seed)
    device = cli.device_from(args.device)
    limit = cli.test_limit(args, DRY_RUN_TEST)
    name = f"W{args.w_bits}A{args.a_bits} {'per-channel' if args.per_channel else 'per-tensor'}"

    if args.eval:
        x_test, y_test = cli.load_test(args, limit)
        test = Batches(x_test, y_test, dataset_info(args.dataset).eval_batch)
        qmodel, qconfig, ckpt = load_quantized(args.eval, args.dataset, args.model, args.single_rounding)
        qmodel.to(device)
        report = evaluate_frozen(qmodel, test, device)
        print(f"{args.model} on {args.dataset}, {name}, QAT model from {args.eval}, {len(y_test)} test images")
        print_frozen_report(ckpt["fp32_acc"], report)
        cli.emit_result({**result_keys(args, qconfig, len(y_test)), "epochs": ckpt["epochs"], "lr": ckpt["lr"],
                         "optimizer": ckpt.get("optimizer"), "fp32_acc": ckpt["fp32_acc"],
                         "qat_fakequant_acc": ckpt["qat_fakequant_acc"], "evaluated_from": args.eval, **report},
                        args.result_json)
        return

    model, cfg, _, (x_train, y_train), (x_test, y_test) = cli.load_float_and_data(args, device, limit)
    test = Batches(x_test, y_test, dataset_info(args.dataset).eval_batch)
    fp32_acc = accuracy(predict(model, test, device), y_test)
    train = Batches(x_train, y_train, args.batch_size, shuffle=True, seed=args.seed)
    max_batches = DRY_RUN_BATCHES if args.dry_run else None
    epochs = 1 if args.dry_run else args.epochs

    # 1) convert and set the first activation ranges from a few training batches
    qmodel = convert(model, qconfig).to(device)
    calibrate(qmodel, train, device, 1 if args.dry_run else args.calib_batches)
    set_mode(qmodel, "qat")
    print(f"{args.model} on {args.dataset}, {name}, QAT for {epochs} epochs ({args.optimizer}, lr {lr:g}); "
          f"float32 {fp32_acc:.2f}%, before QAT (fake-quant) {evaluate(qmodel, test, device):.2f}%")

    # 2) fine-tune the float shadow weights through the fake quantizers
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(qmodel.parameters(), lr=lr, momentum=MOMENTUM)
    else:
        optimizer = torch.optim.Adam(qmodel.parameters(), lr=lr)
    steps = epochs * (max_batches or len(train))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    start = time.time()
    for epoch in range(1, epochs + 1):
        if epoch > args.freeze_bn_epoch:
            freeze_bn(qmodel)
        if epoch > args.freeze_observer_epoch:
            freeze_observers(qmodel)
        loss, speed = train_one_epoch(qmodel, train, optimizer, device, epoch, scheduler, max_batches)
        qat_fq_acc = evaluate(qmodel, test, device)
        print(f"epoch {epoch}: train loss {loss:.4f}, fake-quant test accuracy {qat_fq_acc:.2f}%, "
              f"{speed:.0f} images/s")
    minutes = (time.time() - start) / 60

    # 3) freeze into integers (the same layers PTQ produces) and score both paths
    freeze(qmodel)
    report = evaluate_frozen(qmodel, test, device)
    print_frozen_report(fp32_acc, report)
    save = args.save or default_save_path(args)
    save_quantized(save, qmodel, qconfig, cfg, args.dataset, fp32_acc=round(fp32_acc, 2), epochs=epochs, lr=lr,
                   optimizer=args.optimizer, qat_fakequant_acc=round(qat_fq_acc, 2))
    print(f"saved the frozen QAT model to {save} (evaluate again: python QAT.py ... --eval {save})")
    cli.emit_result({**result_keys(args, qconfig, len(y_test)), "epochs": epochs, "lr": lr,
                     "optimizer": args.optimizer, "fp32_acc": round(fp32_acc, 2),
                     "qat_fakequant_acc": round(qat_fq_acc, 2), "minutes": round(minutes, 2), "seed": args.seed,
                     **report}, args.result_json)


if __name__ == "__main__":
    cli.run(main)
