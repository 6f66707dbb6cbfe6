"""Training and evaluation loops shared by every script."""
import sys
import time

import torch
import torch.nn.functional as F

from function import integers_of
from model import output_integers, runs_in_integers, set_mode
from module import QLayer, QuantStub

PRINT_EVERY = 100   # batches between progress lines while training


@torch.no_grad()
def predict(model, batches, device, dtype=torch.float32):
    """Logits of the model (in whatever mode it is in) for every batch: (N, num_classes) on CPU."""
    model.eval()
    return torch.cat([model(x.to(device, dtype)).float().cpu() for x, _ in batches])


def accuracy(logits, labels):
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def evaluate(model, batches, device):
    """Top-1 accuracy in percent over all batches."""
    labels = torch.cat([y for _, y in batches])
    return accuracy(predict(model, batches, device), labels)


def evaluate_frozen(qmodel, batches, device):
    """Fake-quant and integer accuracy of a frozen model, and how closely the integer path
    follows the fake-quant float simulation of it (class agreement, output-integer difference)."""
    labels = torch.cat([y for _, y in batches])
    set_mode(qmodel, "fakequant")
    if not runs_in_integers(qmodel):     # float activations or layers left float: fake-quant only
        return {"fakequant_acc": round(accuracy(predict(qmodel, batches, device), labels), 2)}
    # In float64 the fake-quant simulation rounds like exact arithmetic; in float32 its rounding
    # error flips a few of the ~10^4 hidden activations per image that lie near a tie, and the
    # flips propagate. float64 leaves only M0's 31-bit approximation and TFLite's double rounding.
    fq = predict(qmodel.double(), batches, device, torch.float64)
    qmodel.float()
    set_mode(qmodel, "int")
    it = predict(qmodel, batches, device)
    q_int = output_integers(qmodel, it)
    diff = (q_int - output_integers(qmodel, fq)).abs()
    # images whose largest output integer is shared by two classes: argmax then takes the first
    tied = ((q_int == q_int.max(1, keepdim=True).values).sum(1) > 1).float().mean().item()
    return {"fakequant_acc": round(accuracy(fq, labels), 2), "int_acc": round(accuracy(it, labels), 2),
            "int_top_tie_share": round(100.0 * tied, 3),
            "int_fq_same_class": round(100.0 * (it.argmax(1) == fq.argmax(1)).float().mean().item(), 3),
            "int_classes_predicted": len(it.argmax(1).unique()),   # an agreement on one class says little
            "int_fq_max_diff": int(diff.max()),
            "int_fq_diff_share": round(100.0 * (diff > 0).float().mean().item(), 4)}


@torch.no_grad()
def layer_agreement(qmodel, x, device):
    """Where the integer path and the float64 fake-quant part ways: [layer, share in %] of its
    output integers that differ, on the same images, for each layer that produces integers, in
    graph order (a list, so that the RESULT JSON keeps the order)."""
    producers = [(node.target, qmodel.get_submodule(node.target)) for node in qmodel.graph.nodes
                 if node.op == "call_module" and isinstance(qmodel.get_submodule(node.target), (QuantStub, QLayer))]
    outputs = {n: [] for n, _ in producers}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: outputs[n].append(out)) for n, m in producers]
    try:
        set_mode(qmodel, "int")
        qmodel(x.to(device))
        set_mode(qmodel, "fakequant")
        qmodel.double()(x.to(device, torch.float64))
    finally:
        qmodel.float()
        for h in hooks:
            h.remove()
    share = []
    for name, module in producers:
        q_int, y_fq = outputs[name]
        q_fq = integers_of(y_fq, *module.output_qparams())
        share.append([name, round(100.0 * (q_fq != q_int.long()).float().mean().item(), 4)])
    return share


def print_frozen_report(fp32_acc, r):
    print(f"float32     {fp32_acc:6.2f}%")
    print(f"fake-quant  {r['fakequant_acc']:6.2f}%")
    if "int_acc" not in r:
        print("integer     -        (no integer path: activations float or layers left float)")
        return
    print(f"integer     {r['int_acc']:6.2f}%   (same class as fake-quant: {r['int_fq_same_class']:.2f}%, "
          f"largest output-integer difference {r['int_fq_max_diff']})")


def train_one_epoch(model, batches, optimizer, device, epoch, scheduler=None, max_batches=None, verbose=True):
    """One pass of cross-entropy training; prints progress; returns (mean loss, images/s)."""
    model.train()
    total, count, start = 0.0, 0, time.time()
    for i, (x, y) in enumerate(batches):
        if max_batches is not None and i == max_batches:
            break
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.item() * len(x)
        count += len(x)
        if verbose and i % PRINT_EVERY == 0:
            print(f"epoch {epoch} [{i}/{len(batches)}] loss {loss.item():.4f}", file=sys.stderr, flush=True)
    return total / max(count, 1), count / (time.time() - start)
