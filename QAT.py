"""Quantization-aware training: fine-tune a float checkpoint with fake-quantized weights and
activations (straight-through gradient), then freeze it into the same integer ops as PTQ.

    python QAT.py --model cnn_bn --w-bits 4 --a-bits 4 --per-channel
    python QAT.py --model cnn_bn --w-bits 4 --a-bits 4 --per-channel --eval runs/qat/...pt

The optimizer updates the float "shadow" weights; the quantized copy is recomputed from them
on every forward and never written back. Activation ranges follow a moving average of the
batch min/max (Jacob et al. 2018, sec. 3.1); BN runs with batch statistics, corrected so the
quantized weights are the running-statistics fold (Krishnamoorthi 2018, sec. 3.2.2), for
--bn-batch-stats-epochs, after which it uses its running statistics.
"""
import copy
import dataclasses
import os
import time

import torch

import cli
import loading
from checkpoint import load_frozen, made_by, save_frozen
from compress.layers import compress_activations, saved_bytes
from config import QConfig
from data import Batches, dataset_info, load_test
from engine import accuracy, evaluate, evaluate_frozen, predict, print_frozen_report, train_one_epoch
from errors import IntsimError
from model import LSQ_INITS, bn_use_running_stats, calibrate, convert, fix_ranges, learn_scales, set_phase
from freezing import freeze

EPOCHS = 3
LR = {"sgd": 1e-3, "adam": 1e-4}   # peak learning rate per optimizer (cosine decay to 0)
MOMENTUM = 0.9                     # SGD momentum
BN_BATCH_STATS_EPOCHS = 2          # BN uses batch statistics for this many epochs, then its running ones
MOVING_RANGE_EPOCHS = 2            # activation ranges follow the batches for this many epochs, then stay
NUM_CALIB_BATCHES = 8              # batches that set the initial activation ranges
BATCH_SIZE = 128
DRY_RUN_BATCHES = 2                # --dry-run: training batches per epoch ...
DRY_RUN_TEST = 1000                # ... and test images


def default_save_path(args, qconfig):
    granularity = "pc" if qconfig.per_channel else "pt"
    out = f"_out{qconfig.out_bits}" if qconfig.out_bits else ""
    edges = f"_fl{qconfig.first_last_bits}" if qconfig.first_last_bits else ""
    lsq = "_lsq" if getattr(args, "learn_scales", False) else ""
    lsq += "_range" if lsq and getattr(args, "lsq_init", "mean") == "range" else ""
    ca = cli.compression_from(args) if hasattr(args, "ca_bits") else None
    tag = "" if ca is None else f"_{ca.tag()}"
    name = f"{args.dataset}_{args.model}_W{qconfig.w_bits}A{qconfig.a_bits}{out}{edges}_{granularity}{lsq}{tag}.pt"
    return cli.trial_path(args, os.path.join("runs", "qat", name))


def evaluate_saved(args, device):
    """--eval: score a frozen QAT model saved earlier (with the rescale kernel the flags ask for)."""
    x_test, y_test = load_test(args.dataset, args.data_dir, args.download, cli.test_limit(args, DRY_RUN_TEST))
    test = Batches(x_test, y_test, dataset_info(args.dataset).eval_batch)
    frozen, ckpt = load_frozen(args.eval, args.dataset, args.model, args.single_rounding)
    qconfig = dataclasses.replace(QConfig(**ckpt["qconfig"]), single_rounding=args.single_rounding)
    for name in args.given & set(args.qconfig_fields) - {"single_rounding"}:
        if getattr(args, name) != ckpt["qconfig"][name]:
            raise IntsimError(f"--eval {args.eval} is a {qconfig.name()} model with {cli.flag_name(name)} "
                              f"{ckpt['qconfig'][name]}, not {getattr(args, name)}: leave the quantization "
                              f"flags out, they come from the model")
    report = evaluate_frozen(frozen.to(device), test, device)
    script = made_by(ckpt)
    print(f"{args.model} on {args.dataset}, {qconfig.name()}, {script} model from {args.eval}, {len(y_test)} test images")
    print_frozen_report(ckpt.get("fp32_acc", float("nan")), report, frozen)
    report.update(cli.export_if_asked(args, frozen, x_test, device))
    # what the saved model says of how it was made (a PTQ or AdaRound model has no QAT schedule)
    keep = ("epochs", "lr", "optimizer", "fp32_acc", "qat_fakequant_acc", "rounding")
    # another script's model is scored, not a QAT result: no QAT table counts it ("script": "eval")
    cli.emit_result({"script": "QAT" if script == "QAT" else "eval", "dataset": args.dataset, "model": args.model,
                     "test_images": len(y_test), **{k: ckpt[k] for k in keep if k in ckpt},
                     "learn_scales": ckpt.get("learn_scales", False), **({} if script == "QAT" else {"made_by": script}),
                     "evaluated_from": args.eval, **report}, args.result_json, qconfig, device)


def saved_per_image(qmodel, x):
    """Bytes autograd keeps for backward per image of x, at QAT's start (BN on batch statistics),
    counted on a copy with the random state put back: a training forward moves BN's statistics
    and the activation ranges, and compressing draws random numbers."""
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        return round(saved_bytes(copy.deepcopy(qmodel).train(), x) / len(x))


def main():
    p = cli.parser(__doc__.split("\n")[0])
    cli.add_common(p)
    cli.add_checkpoint(p)
    cli.add_qconfig(p, a_observer="ema")
    cli.add_export(p)
    p.set_defaults(batch_size=BATCH_SIZE)
    p.add_argument("--epochs", type=int, default=EPOCHS, help="QAT epochs")
    p.add_argument("--optimizer", default="sgd", choices=sorted(LR), help="optimizer")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 sgd, 1e-4 adam)")
    p.add_argument("--bn-batch-stats-epochs", type=int, default=BN_BATCH_STATS_EPOCHS,
                   help="epochs with BN batch statistics; BN uses its running statistics after them")
    p.add_argument("--moving-range-epochs", type=int, default=MOVING_RANGE_EPOCHS,
                   help="epochs with moving activation ranges; they stay fixed after them")
    p.add_argument("--calib-batches", type=int, default=NUM_CALIB_BATCHES,
                   help="training batches that set the initial activation ranges")
    p.add_argument("--test-limit", type=int, default=None, help="score only the first N test images")
    p.add_argument("--save", default=None, help="where to save the frozen QAT model "
                   "(default: runs/qat/<dataset>_<model>_W<w>A<a>_<pt|pc>.pt)")
    p.add_argument("--learn-scales", action="store_true",
                   help="LSQ: learn every weight and activation step size with the weights (Esser et al. 2019)")
    p.add_argument("--lsq-init", choices=LSQ_INITS, default="mean",
                   help="--learn-scales' first step sizes: LSQ's 2 mean|v| / sqrt(Q_P), or the S of the calibrated "
                        "ranges (at 8 bits LSQ's is several times coarser)")
    cli.add_compression(p)
    p.add_argument("--eval", default=None, metavar="PATH",
                   help="only evaluate a frozen QAT model saved earlier (no training)")
    args, device = cli.start(p)
    if args.eval:
        return evaluate_saved(args, device)
    qconfig = cli.qconfig_from(args)
    cli.require_integer_activations(qconfig, "QAT.py")
    lr = args.lr if args.lr is not None else LR[args.optimizer]
    model, cfg, _, (x_train, y_train), (x_test, y_test) = loading.load_float_and_data(
        args, device, cli.test_limit(args, DRY_RUN_TEST))
    test = Batches(x_test, y_test, dataset_info(args.dataset).eval_batch)
    fp32_acc = accuracy(predict(model, test, device), y_test)
    max_batches = DRY_RUN_BATCHES if args.dry_run else None
    epochs = 1 if args.dry_run else args.epochs

    # 1) convert and set the first activation ranges: the first batches of the shuffled training
    #    set (data.calibration_set's images); training continues with the next passes
    train = Batches(x_train, y_train, args.batch_size, shuffle=True, seed=args.seed)
    qmodel = convert(model, qconfig).to(device)
    calibrate(qmodel, train, device, 1 if args.dry_run else args.calib_batches)
    set_phase(qmodel, "qat")
    if args.learn_scales:                  # LSQ: S from --lsq-init, then trained
        learn_scales(qmodel, train, device, 1 if args.dry_run else args.calib_batches, args.lsq_init)
    ca = cli.compression_from(args)
    saved = {}
    if ca is not None:                     # the same QAT; what backward needs is kept in ca.bits
        batch = x_train[:args.batch_size].to(device)
        saved["saved_bytes_per_image_fp32"] = saved_per_image(qmodel, batch)
        compress_activations(qmodel, ca, batch_index=lambda: train.last_index)
        saved["saved_bytes_per_image"] = saved_per_image(qmodel, batch)
        print(f"saved for backward on a batch of {len(batch)}: {saved['saved_bytes_per_image']:,} bytes per image "
              f"({saved['saved_bytes_per_image_fp32']:,} in float32)")
    print(f"{args.model} on {args.dataset}, {qconfig.name()}, QAT{' with LSQ step sizes' if args.learn_scales else ''} "
          f"for {epochs} epochs ({args.optimizer}, lr {lr:g}"
          f"{'' if ca is None else f'; saved activations in {ca.bits} bits, {ca.describe()}'}); "
          f"float32 {fp32_acc:.2f}%, before QAT (fake-quant) {evaluate(qmodel, test, device):.2f}%")

    # 2) fine-tune the float shadow weights through the fake quantizers
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(qmodel.parameters(), lr=lr, momentum=MOMENTUM)
    else:
        optimizer = torch.optim.Adam(qmodel.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * (max_batches or len(train)))
    start = time.time()
    for epoch in range(1, epochs + 1):
        if epoch > args.bn_batch_stats_epochs:
            bn_use_running_stats(qmodel)
        if epoch > args.moving_range_epochs:
            fix_ranges(qmodel)
        loss, speed = train_one_epoch(qmodel, train, optimizer, device, epoch, scheduler, max_batches)
        qat_fq_acc = evaluate(qmodel, test, device)
        print(f"epoch {epoch}: train loss {loss:.4f}, fake-quant test accuracy {qat_fq_acc:.2f}%, "
              f"{speed:.0f} images/s")
    minutes = (time.time() - start) / 60

    # 3) freeze into integers (the same ops PTQ produces) and score both paths
    frozen = freeze(qmodel, kernel=cli.export_kernel(args))
    report = evaluate_frozen(frozen, test, device)
    print_frozen_report(fp32_acc, report, frozen)
    save = args.save or default_save_path(args, qconfig)
    save_frozen(save, frozen, qconfig, cfg, args.dataset, "QAT", fp32_acc=round(fp32_acc, 2), epochs=epochs,
                lr=lr,
                optimizer=args.optimizer, qat_fakequant_acc=round(qat_fq_acc, 2), learn_scales=args.learn_scales)
    print(f"saved the frozen QAT model to {save} (evaluate again: python QAT.py ... --eval {save})")
    report.update(cli.export_if_asked(args, frozen, x_test, device))
    cli.emit_result({"script": "QAT", "dataset": args.dataset, "model": args.model, "test_images": len(y_test),
                     "epochs": epochs, "lr": lr, "optimizer": args.optimizer, "learn_scales": args.learn_scales,
                     **({"lsq_init": args.lsq_init} if args.learn_scales else {}),
                     "fp32_acc": round(fp32_acc, 2), **cli.compression_fields(ca), **saved,
                     "qat_fakequant_acc": round(qat_fq_acc, 2), "minutes": round(minutes, 2), "seed": args.seed,
                     **report}, args.result_json, qconfig, device)


if __name__ == "__main__":
    cli.run(main)
