"""Training and evaluation loops shared by every script."""
import sys
import time

import torch
import torch.nn.functional as F

from model import output_integers, set_mode

PRINT_EVERY = 100   # batches between progress lines while training


@torch.no_grad()
def predict(model, batches, device):
    """Logits of the model (in whatever mode it is in) for every batch: (N, num_classes) on CPU."""
    model.eval()
    return torch.cat([model(x.to(device)).float().cpu() for x, _ in batches])


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
    logits = {}
    for mode in ("fakequant", "int"):
        set_mode(qmodel, mode)
        logits[mode] = predict(qmodel, batches, device)
    fq, it = logits["fakequant"], logits["int"]
    diff = (output_integers(qmodel, it) - output_integers(qmodel, fq)).abs()
    return {"fakequant_acc": round(accuracy(fq, labels), 2), "int_acc": round(accuracy(it, labels), 2),
            "int_fq_same_class": round(100.0 * (it.argmax(1) == fq.argmax(1)).float().mean().item(), 3),
            "int_fq_max_diff": int(diff.max()),
            "int_fq_diff_share": round(100.0 * (diff > 0).float().mean().item(), 4)}


def print_frozen_report(fp32_acc, r):
    print(f"float32     {fp32_acc:6.2f}%")
    print(f"fake-quant  {r['fakequant_acc']:6.2f}%")
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
