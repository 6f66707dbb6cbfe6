"""Training and evaluation loops shared by every script."""
import sys
import time

import torch
import torch.nn.functional as F

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


def train_one_epoch(model, batches, optimizer, device, epoch, scheduler=None, max_batches=None):
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
        if i % PRINT_EVERY == 0:
            print(f"epoch {epoch} [{i}/{len(batches)}] loss {loss.item():.4f}", file=sys.stderr, flush=True)
    return total / max(count, 1), count / (time.time() - start)
