"""Train a float network and save the checkpoint the quantization scripts start from.

    python train.py --dataset fashion-mnist --model cnn_bn

Saves ckpt/<dataset>_<model>.pt: the weights, the ModelConfig to rebuild the network, the
data set, the test accuracy and the arguments (resnet18's weights in float16, to stay small).
After every epoch it also saves runs/train/<dataset>_<model>.resume.pt (model, optimizer,
schedule, data order); `--resume` continues an interrupted run from there. An existing
checkpoint is replaced only with --overwrite; --dry-run writes under runs/dry-run/.
"""
import os
import time

import torch

import cli
import loading
from checkpoint import load_checkpoint, save_checkpoint, torch_save
from compress.layers import compress_activations
from data import Batches, dataset_info, load_split, random_crop_flip
from engine import evaluate, fingerprint, train_one_epoch
from errors import IntsimError
from model import ModelConfig, build_model

# defaults (each is a flag)
EPOCHS = 15
LR = 2e-3               # AdamW peak learning rate, with one-cycle warm-up and cosine decay
WEIGHT_DECAY = 5e-4
BATCH_SIZE = 128
DRY_RUN_BATCHES = 2     # --dry-run: train on this many batches ...
DRY_RUN_TEST = 1000     # ... and test on this many images
HALF_PRECISION_ARCHS = ("resnet18",)   # checkpoints stored in float16 (ResNet18: 22 MB, not 45)
RESUME_DIR = os.path.join("runs", "train")


def existing_checkpoint(path, overwrite):
    """A checkpoint already at `path` is replaced only with --overwrite; returns its test
    accuracy (None where there is none), so the replacement can say what it replaced."""
    if not os.path.exists(path):
        return None
    try:
        acc = torch.load(path, map_location="cpu", weights_only=True).get("test_acc")
    except Exception:
        acc = None
    what = f"{path} exists (test accuracy {acc:.2f}%)" if acc is not None else f"{path} exists"
    if not overwrite:
        raise IntsimError(f"{what}: pass --overwrite to replace it, or --ckpt-dir to save elsewhere")
    print(f"{what}: --overwrite, it will be replaced at the end of training")
    return acc if acc is not None else float("nan")


def read_resume(path, device, flags):
    """The state train.py saved after its last completed epoch, if it belongs to a run with
    these flags (another schedule or batch size would not continue the same run)."""
    if not os.path.isfile(path):
        raise IntsimError(f"--resume: {path} not found; start without --resume")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        saved = state.get("flags", {"epochs": state["epochs"]})
    except Exception as e:
        raise IntsimError(f"--resume: {path} is not a readable resume file ({type(e).__name__}); "
                          f"start without --resume") from None
    for key, value in saved.items():
        if flags.get(key) != value:
            raise IntsimError(f"--resume: {path} is a run with {cli.flag_name(key)} {value}, not "
                              f"{flags.get(key)}: pass the same flags, or start without --resume")
    return state


def interrupted_message(resume_path, done):
    """What Ctrl-C leaves: the resume state of the last completed epoch (and the flags that
    continue from it), or nothing to resume from."""
    if done == 0:
        return "the checkpoint was not written and no epoch was completed: nothing to resume; start again"
    folder = os.path.dirname(resume_path)
    where = "" if folder == RESUME_DIR else f" --resume-dir {folder}"
    return (f"the checkpoint was not written; {resume_path} holds the state after epoch {done} "
            f"(continue with the same flags and --resume{where})")


def main():
    p = cli.parser(__doc__.split("\n")[0])
    cli.add_common(p)
    p.set_defaults(batch_size=BATCH_SIZE)
    p.add_argument("--epochs", type=int, default=EPOCHS, help="training epochs")
    p.add_argument("--lr", type=float, default=LR, help="peak learning rate (AdamW, one-cycle)")
    p.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY, help="AdamW weight decay")
    p.add_argument("--ckpt-dir", default=None, help=f"where to save the checkpoint (default: {loading.DEFAULT_CKPT_DIR}; "
                                                    f"with --dry-run {cli.DRY_RUN_DIR}/{loading.DEFAULT_CKPT_DIR})")
    p.add_argument("--resume-dir", default=None, help=f"where the per-epoch resume state is kept (default: "
                                                      f"{RESUME_DIR}; with --dry-run under {cli.DRY_RUN_DIR})")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from this float checkpoint's weights (a fine-tune; default: the seeded "
                        "initialisation); its checkpoint is saved as <dataset>_<model>[_ca...]_finetuned.pt")
    p.add_argument("--resume", action="store_true",
                   help="continue from <resume-dir>/<dataset>_<model>.resume.pt (same flags)")
    cli.add_compression(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint at <ckpt-dir>/<dataset>_<model>.pt (it says which, with "
                        "both test accuracies)")
    args, device = cli.start(p)
    # --dry-run writes under runs/dry-run/, never over ckpt/ (the checkpoint every script starts from)
    ckpt_dir = args.ckpt_dir or cli.trial_path(args, loading.DEFAULT_CKPT_DIR)
    resume_dir = args.resume_dir or cli.trial_path(args, RESUME_DIR)
    ca = cli.compression_from(args)
    # a run with compressed activations is a different run: its own checkpoint and resume file
    stem = (f"{args.dataset}_{args.model}" + ("" if ca is None else f"_{ca.tag()}")
            + ("_finetuned" if args.init_from else ""))
    path = os.path.join(ckpt_dir, f"{stem}.pt")
    resume_path = os.path.join(resume_dir, f"{stem}.resume.pt")
    replaced = existing_checkpoint(path, args.overwrite or (args.dry_run and args.ckpt_dir is None))

    info = dataset_info(args.dataset)
    x_train, y_train = load_split(args.dataset, args.data_dir, train=True, download=args.download)
    x_test, y_test = load_split(args.dataset, args.data_dir, train=False, download=args.download)
    max_batches = DRY_RUN_BATCHES if args.dry_run else None
    epochs = 1 if args.dry_run else args.epochs
    if args.dry_run:
        x_test, y_test = x_test[:DRY_RUN_TEST], y_test[:DRY_RUN_TEST]
    augment = random_crop_flip if args.dataset == "cifar10" else None
    train_batches = Batches(x_train, y_train, args.batch_size, shuffle=True, seed=args.seed, augment=augment)
    test_batches = Batches(x_test, y_test, 1000)

    cfg = ModelConfig(arch=args.model, in_channels=info.in_channels, image_size=info.image_size,
                      num_classes=info.num_classes)
    model = build_model(cfg).to(device)
    if args.init_from:          # the float network a fine-tune starts from (same data set and network)
        model.load_state_dict(load_checkpoint(args.init_from, args.dataset, args.model, "--init-from")[0].state_dict())
    if ca is not None:              # the same network; training keeps its saved activations packed
        compress_activations(model, ca, batch_index=lambda: train_batches.last_index)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = epochs * (max_batches or len(train_batches))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps)
    print(f"{args.model} on {args.dataset}: {sum(p.numel() for p in model.parameters())} parameters, "
          f"{len(x_train)} training images, device {device}"
          + ("" if ca is None else f"; activations saved for backward in {ca.bits} bits "
                                   f"({ca.describe()})"))

    first_epoch, earlier_minutes = 1, 0.0
    run_flags = {"epochs": epochs, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
                 **cli.compression_fields(ca), **({"init_from": args.init_from} if args.init_from else {})}
    if args.resume:
        state = read_resume(resume_path, device, run_flags)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        train_batches.generator.set_state(state["data_order"])
        first_epoch, earlier_minutes = state["epoch"] + 1, state["minutes"]
        print(f"resuming after epoch {state['epoch']} ({earlier_minutes:.1f} min so far)")

    start = time.time()
    acc, done = None, first_epoch - 1
    try:
        for epoch in range(first_epoch, epochs + 1):
            loss, speed = train_one_epoch(model, train_batches, optimizer, device, epoch, scheduler, max_batches)
            acc = evaluate(model, test_batches, device)
            torch_save(resume_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                     "scheduler": scheduler.state_dict(),
                                     "data_order": train_batches.generator.get_state(),
                                     "epoch": epoch, "epochs": epochs, "flags": run_flags,
                                     "minutes": earlier_minutes + (time.time() - start) / 60})
            done = epoch             # what a Ctrl-C from here on can be resumed from; then say so
            print(f"epoch {epoch}: train loss {loss:.4f}, test accuracy {acc:.2f}%, {speed:.0f} images/s", flush=True)
    except KeyboardInterrupt:
        raise cli.Interrupted(interrupted_message(resume_path, done)) from None
    minutes = earlier_minutes + (time.time() - start) / 60
    if acc is None:
        acc = evaluate(model, test_batches, device)

    save_checkpoint(path, model.cpu(), cfg, args.dataset, half=args.model in HALF_PRECISION_ARCHS,
                    test_acc=acc, args={k: v for k, v in vars(args).items() if k != "given"})
    before = f", replacing one of test accuracy {replaced:.2f}%" if replaced is not None else ""
    print(f"saved {path} (test accuracy {acc:.2f}%{before}, {minutes:.1f} min)")
    cli.emit_result({"script": "train", "dataset": args.dataset, "model": args.model, "epochs": epochs,
                     "lr": args.lr, "fp32_acc": round(acc, 2), "minutes": round(minutes, 2),
                     "ckpt": path, "seed": args.seed, **cli.compression_fields(ca),
                     **({"init_from": args.init_from} if args.init_from else {}),
                     "weights_sha": fingerprint(torch.cat([v.flatten().float() for v in model.state_dict().values()]))}, args.result_json, device=device)


if __name__ == "__main__":
    cli.run(main)
