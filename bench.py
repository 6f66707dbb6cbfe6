"""Time float32, fake-quant and integer inference of one model on the same test images, in
one run, and print their ratios (speed goals are checked here, never by a timed test).

    python bench.py --model cnn_bn --w-bits 8 --a-bits 8
"""
import time

import torch

import cli
from data import Batches, load_split
from engine import predict
from model import calibrate, convert, freeze, load_checkpoint, set_mode
from module import QConfig

NUM_CALIB_BATCHES = 8
BATCH_SIZE = 1000           # test images per forward
REPEATS = 3                 # timed passes over the test set per path; the fastest counts
DRY_RUN_TEST = 2000


def best_time(fn, repeats):
    """Fastest of `repeats` runs, in seconds (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    p = cli.parser(__doc__.split("\n")[0])
    cli.add_common(p)
    cli.add_quant(p)
    p.add_argument("--repeats", type=int, default=REPEATS, help="timed passes per path (fastest counts)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    qconfig = QConfig(args.w_bits, args.a_bits, args.per_channel, not args.w_asymmetric)
    if args.threads:
        torch.set_num_threads(args.threads)
    cli.seed_everything(args.seed)
    device = cli.device_from(args.device)
    model, _, _ = load_checkpoint(cli.default_ckpt(args), args.dataset, args.model)
    model.to(device)
    x_train, y_train = load_split(args.dataset, args.data_dir, train=True, download=args.download)
    x_test, y_test = load_split(args.dataset, args.data_dir, train=False, download=args.download)
    if args.dry_run:
        x_test, y_test = x_test[:DRY_RUN_TEST], y_test[:DRY_RUN_TEST]
    test = Batches(x_test, y_test, BATCH_SIZE)

    qmodel = convert(model, qconfig).to(device)
    calibrate(qmodel, Batches(x_train, y_train, 256, shuffle=True, seed=args.seed), device, NUM_CALIB_BATCHES)
    freeze(qmodel)
    repeats = 1 if args.dry_run else args.repeats

    def timed(mode):
        net = model if mode == "float32" else qmodel
        if mode != "float32":
            set_mode(qmodel, mode)
        predict(net, test, device)                   # warm-up (allocations, kernel selection)
        return best_time(lambda: predict(net, test, device), repeats)

    seconds = {mode: timed(mode) for mode in ("float32", "fakequant", "int")}
    n = len(y_test)
    print(f"{args.model} on {args.dataset}, W{args.w_bits}A{args.a_bits}, {n} test images, "
          f"{torch.get_num_threads()} threads, device {device}, best of {repeats}")
    for mode, s in seconds.items():
        print(f"{mode:10s} {s:7.3f} s   {n / s:8.0f} images/s   {s / seconds['float32']:.2f}x float32")
    cli.emit_result({"script": "bench", "dataset": args.dataset, "model": args.model,
                     "w_bits": args.w_bits, "a_bits": args.a_bits, "per_channel": args.per_channel,
                     "test_images": n, "threads": torch.get_num_threads(), "device": str(device),
                     **{f"{m}_s": round(s, 4) for m, s in seconds.items()},
                     "fakequant_ratio": round(seconds["fakequant"] / seconds["float32"], 3),
                     "int_ratio": round(seconds["int"] / seconds["float32"], 3)}, args.result_json)


if __name__ == "__main__":
    cli.run(main)
