"""Time float32, fake-quant and integer inference of one model on the same test images, and
float vs QAT training steps on the same training batches, in one run, and print their ratios
(speed goals are checked here, never by a timed test).

    python bench.py --model cnn_bn --w-bits 8 --a-bits 8
"""
import copy
import dataclasses
import time

import torch

import cli
import loading
from data import Batches, calibration_set, dataset_info
from engine import predict, train_one_epoch
from frozen import set_mode
from model import calibrate, convert, set_phase
from freezing import freeze

NUM_CALIB_BATCHES = 8
CALIB_BATCH = 256
BATCH_SIZE = 1000           # test images per forward
REPEATS = 3                 # timed passes over the test set per path; the fastest counts
DRY_RUN_TEST = 2000
TRAIN_BATCHES = 100         # training steps timed per path (float vs QAT), batch 128 as in train.py
TRAIN_BATCH_SIZE = 128


def best_time(fn, repeats):
    """Fastest of `repeats` runs, in seconds (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def layer_times(frozen, batches, device):
    """[name, kind (a conv/linear's chosen accumulation), share of the integer forward's time in %]
    for every frozen op, from one more pass over `batches` with a clock around each op."""
    spent, start = {}, {}

    def before(name):
        return lambda m, a: start.__setitem__(name, time.perf_counter())

    def after(name):
        return lambda m, a, y: spent.__setitem__(name, spent.get(name, 0.0) + time.perf_counter() - start[name])
    called = {n.target: frozen.get_submodule(n.target) for n in frozen.graph.nodes if n.op == "call_module"}
    hooks = []
    for name, m in called.items():
        hooks += [m.register_forward_pre_hook(before(name)), m.register_forward_hook(after(name))]
    total = time.perf_counter()
    predict(frozen, batches, device)
    total = time.perf_counter() - total
    for h in hooks:
        h.remove()
    kind = {name: "/".join(m.chosen_accumulations(device)) if hasattr(m, "chosen_accumulations") else type(m).__name__
            for name, m in called.items()}
    return [[name, kind[name], round(100.0 * t / total, 2)] for name, t in spent.items()]


def main():
    p = cli.parser(__doc__.split("\n")[0])
    cli.add_common(p)
    cli.add_checkpoint(p)
    cli.add_qconfig(p)
    p.add_argument("--repeats", type=int, default=REPEATS, help="timed passes per path (fastest counts)")
    p.add_argument("--test-limit", type=int, default=None, help="time only the first N test images")
    p.add_argument("--train-batches", type=int, default=TRAIN_BATCHES,
                   help="training steps timed for float vs QAT (0: skip)")
    args, device = cli.start(p)
    qconfig = cli.qconfig_from(args)
    cli.require_integer_activations(qconfig, "bench.py")
    model, _, _, (x_train, y_train), (x_test, y_test) = loading.load_float_and_data(
        args, device, cli.test_limit(args, DRY_RUN_TEST))
    test = Batches(x_test, y_test, min(BATCH_SIZE, dataset_info(args.dataset).eval_batch))
    calib = Batches(*calibration_set(x_train, y_train, NUM_CALIB_BATCHES * CALIB_BATCH, args.seed), CALIB_BATCH)

    qmodel = convert(model, qconfig).to(device)
    calibrate(qmodel, calib, device, NUM_CALIB_BATCHES)
    frozen = freeze(qmodel)
    cli.cap_for_dry_run(args, repeats=1, train_batches=2)
    repeats = args.repeats

    def timed(mode):
        net = model if mode == "float32" else set_mode(frozen, "reals" if mode == "fakequant" else "int")
        predict(net, test, device)                   # warm-up (allocations, kernel selection)
        return best_time(lambda: predict(net, test, device), repeats)

    seconds = {mode: timed(mode) for mode in ("float32", "fakequant", "int")}
    layers = layer_times(set_mode(frozen, "int"), test, device)
    n = len(y_test)
    print(f"{args.model} on {args.dataset}, {qconfig.name()}, {n} test images, "
          f"{torch.get_num_threads()} threads, device {device}, best of {repeats}")
    for mode, s in seconds.items():
        print(f"{mode:10s} {s:7.3f} s   {n / s:8.0f} images/s   {s / seconds['float32']:.2f}x float32")

    print("integer path by layer (conv/linear: the accumulation measured fastest):")
    for name, kernel, share in layers:
        print(f"  {name:24s} {kernel:14s} {share:6.2f}% of the integer time")
    train = {}
    steps = args.train_batches
    if steps:
        # The same batches, the same optimizer, from the same float weights: float vs QAT steps.
        qat = convert(model, dataclasses.replace(qconfig, a_observer="ema")).to(device)
        calibrate(qat, calib, device, 1)
        set_phase(qat, "qat")
        for label, net in (("float32", copy.deepcopy(model)), ("qat", qat)):
            batches = Batches(x_train, y_train, TRAIN_BATCH_SIZE, shuffle=True, seed=args.seed)
            optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
            train[label] = best_time(lambda: train_one_epoch(net, batches, optimizer, device, 0,
                                                             max_batches=steps, verbose=False), repeats)
        print(f"training, {steps} steps of {TRAIN_BATCH_SIZE}: float32 {train['float32']:.2f} s, "
              f"QAT {train['qat']:.2f} s, {train['qat'] / train['float32']:.2f}x float32")
    cli.emit_result({"script": "bench", "dataset": args.dataset, "model": args.model, "test_images": n,
                     **{f"{m}_s": round(s, 4) for m, s in seconds.items()},
                     "fakequant_ratio": round(seconds["fakequant"] / seconds["float32"], 3),
                     "int_ratio": round(seconds["int"] / seconds["float32"], 3), "int_layers": layers,
                     **({"train_steps": steps, "train_float32_s": round(train["float32"], 4),
                         "train_qat_s": round(train["qat"], 4),
                         "qat_train_ratio": round(train["qat"] / train["float32"], 3)} if train else {})},
                    args.result_json, qconfig, device)


if __name__ == "__main__":
    cli.run(main)
