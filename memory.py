"""What compressed activations (ActNN; compress.py) save and cost, measured on one network and
one batch against the same network keeping float32 activations, in one run:

    python memory.py --model cnn_bn --ca-bits 2
    python memory.py --model resnet18 --ca-bits 2 --ca-per-tensor

1. bytes saved for backward per image: every tensor autograd keeps after the forward pass
   (saved_tensors_hooks, once per storage, parameters left out), float32 and compressed;
   on CUDA also the peak memory of a training step (max_memory_allocated);
2. the training step's time (forward, loss, backward), the fastest of --repeats, as a ratio;
3. ActNN's "Overall Var": the variance of the conv/linear weight gradients over --passes
   compressed backward passes of one batch, summed over all weights; beside it, for scale,
   the exact gradient's variance over --batches different batches (minibatch sampling noise)
   and the bias: |mean compressed gradient - exact gradient| / |exact gradient|, beside the
   noise floor sqrt(Var / passes) / |exact gradient| it reaches when the gradient is unbiased.
The network is the float checkpoint (ckpt/<dataset>_<model>.pt) or, with --init random, its
seeded initialisation; BatchNorm uses batch statistics (training mode) throughout.
"""
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import cli
import loading
from compress.layers import compress_activations, saved_bytes
from data import dataset_info, load_split
from errors import IntsimError
from model import ModelConfig, build_model

BATCH_SIZE = 128            # train.py's batch
PASSES = 20                 # compressed backward passes of the one batch (Overall Var)
BATCHES = 20                # batches for the exact gradient's sampling variance
REPEATS = 5                 # timed training steps per path; the fastest counts
WARMUP_PASSES = 2           # mixed precision: passes before measuring (per-layer and gradient state)
DRY_RUN = dict(batch_size=16, passes=3, batches=3, repeats=1)


def backward_pass(model, x, y):
    """One training step's forward, cross-entropy loss and backward (no optimizer step)."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def weight_grads(model, x, y):
    """The conv/linear weight gradients of the cross-entropy loss on (x, y), flattened into one vector."""
    backward_pass(model, x, y)
    return torch.cat([m.weight.grad.flatten() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])


def step_time(model, x, y, repeats):
    """Fastest forward + loss + backward, in seconds (synchronised on CUDA)."""
    best = float("inf")
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        backward_pass(model, x, y)
        if x.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def peak_memory(model, x, y):
    """CUDA: the peak bytes allocated during one training step above what was allocated before
    it; None on CPU (PyTorch does not track it there: the saved bytes are the measurement)."""
    if not x.is_cuda:
        return None
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    backward_pass(model, x, y)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main():
    p = cli.parser(__doc__.split("\n")[0])
    cli.add_common(p)
    p.set_defaults(batch_size=BATCH_SIZE)
    p.add_argument("--ckpt", default=None, help="float checkpoint (default: ckpt/<dataset>_<model>.pt)")
    p.add_argument("--init", choices=["checkpoint", "random"], default="checkpoint",
                   help="the float checkpoint's weights, or the network's seeded initialisation")
    cli.add_compression(p)
    p.add_argument("--passes", type=int, default=PASSES, help="compressed backward passes of one batch (variance)")
    p.add_argument("--batches", type=int, default=BATCHES, help="batches for the exact gradient's sampling variance")
    p.add_argument("--repeats", type=int, default=REPEATS, help="timed steps per path (the fastest counts)")
    args, device = cli.start(p)
    ca = cli.compression_from(args)
    if ca is None:
        raise IntsimError("memory.py compares compressed activations with float32 ones: pass --ca-bits (1..8)")
    cli.cap_for_dry_run(args, **DRY_RUN)
    if args.init == "random":
        info = dataset_info(args.dataset)
        torch.manual_seed(args.seed)
        model = build_model(ModelConfig(args.model, info.in_channels, info.image_size, info.num_classes)).to(device)
        x_train, y_train = load_split(args.dataset, args.data_dir, train=True, download=args.download)
    else:
        model, _, _, (x_train, y_train), _ = loading.load_float_and_data(args, device, test_limit=1)
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed))
    batches = [order[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.batches)]
    xb, yb = x_train[batches[0]].to(device), y_train[batches[0]].to(device)

    exact = copy.deepcopy(model).train()
    packed = compress_activations(copy.deepcopy(model), ca, batch_index=lambda: batches[0]).train()
    print(f"{args.model} on {args.dataset}, batch {args.batch_size}: {ca.bits}-bit{' (average)' if ca.mixed else ''} "
          f"saved activations ({ca.describe()}) vs float32", flush=True)
    if ca.mixed:        # the allocation uses the last pass's ranges (and gradients): measure it settled
        for _ in range(WARMUP_PASSES):
            backward_pass(packed, xb, yb)

    # 1. memory
    float_bytes, ca_bytes = saved_bytes(exact, xb), saved_bytes(packed, xb)
    peaks = {"float32": peak_memory(exact, xb, yb), "compressed": peak_memory(packed, xb, yb)}
    # 2. time
    t_float, t_ca = step_time(exact, xb, yb, args.repeats), step_time(packed, xb, yb, args.repeats)
    # 3. variance and bias (the gradients' noise, not the training's: the weights do not move)
    torch.manual_seed(args.seed)
    g_exact = weight_grads(exact, xb, yb)
    draws = torch.stack([weight_grads(packed, xb, yb) for _ in range(args.passes)])
    overall_var = draws.var(dim=0).sum().item()
    # |mean - exact|^2 = bias^2 + Var / K in expectation: an unbiased gradient sits at the noise floor
    bias = ((draws.mean(0) - g_exact).norm() / g_exact.norm()).item()
    noise_floor = (overall_var / args.passes) ** 0.5 / g_exact.norm().item()
    sampling = torch.stack([weight_grads(exact, x_train[i].to(device), y_train[i].to(device)) for i in batches])
    sample_var = sampling.var(dim=0).sum().item()

    n = args.batch_size
    print(f"saved for backward: {float_bytes / n:,.0f} bytes per image in float32, {ca_bytes / n:,.0f} compressed "
          f"({float_bytes / ca_bytes:.2f}x less)")
    if peaks["float32"] is not None:
        print(f"peak memory of a step (CUDA): {peaks['float32'] / 2**20:.1f} MiB float32, "
              f"{peaks['compressed'] / 2**20:.1f} MiB compressed")
    print(f"training step: {t_float * 1e3:.1f} ms float32, {t_ca * 1e3:.1f} ms compressed ({t_ca / t_float:.2f}x)")
    print(f"Overall Var {overall_var:.4g} over {args.passes} passes (minibatch sampling variance {sample_var:.4g} "
          f"over {args.batches} batches); |mean - exact| {100 * bias:.2f}% of |gradient| (noise floor of "
          f"{args.passes} passes: {100 * noise_floor:.2f}%)")
    cli.emit_result({"script": "memory", "dataset": args.dataset, "model": args.model, "init": args.init,
                     "batch_size": n, **cli.compression_fields(ca), "device": str(device),
                     "saved_bytes_per_image": {"float32": round(float_bytes / n, 1), "compressed": round(ca_bytes / n, 1)},
                     "memory_ratio": round(float_bytes / ca_bytes, 2),
                     "peak_memory_bytes": peaks if peaks["float32"] is not None else None,
                     "step_ms": {"float32": round(t_float * 1e3, 2), "compressed": round(t_ca * 1e3, 2)},
                     "step_time_ratio": round(t_ca / t_float, 2), 
                     "overall_var": float(f"{overall_var:.4g}"), "sample_var": float(f"{sample_var:.4g}"),
                     "bias_rel": round(bias, 5), "noise_floor_rel": round(noise_floor, 5), "passes": args.passes,
                     "batches": args.batches, "seed": args.seed}, args.result_json)


if __name__ == "__main__":
    cli.run(main)
