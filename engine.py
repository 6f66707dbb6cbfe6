"""Training and evaluation loops shared by every script."""
import hashlib
import math
import sys
import time

import torch
import torch.nn.functional as F

from errors import IntsimError
from frozen import bias_scale_adjustments, output_integers, runs_in_integers, set_mode, why_not_integer
from function import integers_of
from model import qlayers, set_phase

PRINT_EVERY = 100          # batches between progress lines while training


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


def fingerprint(t):
    """A short hash of a tensor's values: two runs that computed the same numbers agree on it."""
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def evaluate_frozen(frozen, batches, device):
    """Fake-quant and integer accuracy of a frozen model, and how closely the integer path
    follows the fake-quant float simulation of it (class agreement, output-integer difference)."""
    labels = torch.cat([y for _, y in batches])
    set_mode(frozen, "reals")
    adjusted = bias_scale_adjustments(frozen)
    extra = {"bias_scale_adjusted": adjusted} if adjusted else {}     # (rows before the rule: none)
    if not runs_in_integers(frozen):     # fake-quant only (frozen.why_not_integer says why)
        fq = predict(frozen, batches, device)
        return {"fakequant_acc": round(accuracy(fq, labels), 2), "fq_logits_sha": fingerprint(fq), **extra}
    # In float64 the fake-quant simulation rounds like exact arithmetic; in float32 its rounding
    # error flips a few of the ~10^4 hidden activations per image that lie near a tie, and the
    # flips propagate. float64 leaves only M0's 31-bit approximation and TFLite's double rounding.
    fq = predict(frozen.double(), batches, device, torch.float64)
    frozen.float()
    set_mode(frozen, "int")
    it = predict(frozen, batches, device)
    q_int, q_fq = output_integers(frozen, it), output_integers(frozen, fq)
    diff = (q_int - q_fq).abs()
    # images whose largest output integer is shared by two classes: argmax then takes the first
    tied = ((q_int == q_int.max(1, keepdim=True).values).sum(1) > 1).float().mean().item()
    return {"fakequant_acc": round(accuracy(fq, labels), 2), "int_acc": round(accuracy(it, labels), 2),
            "int_top_tie_share": round(100.0 * tied, 3),
            "int_fq_same_class": round(100.0 * (it.argmax(1) == fq.argmax(1)).float().mean().item(), 3),
            "int_classes_predicted": len(it.argmax(1).unique()),   # an agreement on one class says little
            "int_fq_max_diff": int(diff.max()),
            "int_fq_diff_share": round(100.0 * (diff > 0).float().mean().item(), 4),
            "int_outputs_sha": fingerprint(q_int), "fq_outputs_sha": fingerprint(q_fq), **extra}


def _tensor_ends(frozen):
    """[(name, op)] for every op that puts values onto a new grid, with the op whose output is
    that tensor as the next layer sees it (after the max-pools that follow at the same scale)."""
    nodes = {n.target: n for n in frozen.graph.nodes if n.op == "call_module"}
    ends = []
    for name, node in nodes.items():
        op = frozen.get_submodule(name)
        if not getattr(op, "new_grid", False):
            continue
        end = node
        while len(end.users) == 1 and next(iter(end.users)).op == "call_module" and \
                getattr(frozen.get_submodule(next(iter(end.users)).target), "selects", False):
            end = next(iter(end.users))
        ends.append((name, op, frozen.get_submodule(end.target)))
    return ends


@torch.no_grad()
def layer_agreement(frozen, x, device):
    """Where the integer path and the float64 fake-quant part ways: [name, share in %] of the
    output integers that differ, on the same images, for every op that produces a quantized
    tensor (input, conv/linear, add, mean), in graph order (a list: RESULT JSON keeps order)."""
    ends = _tensor_ends(frozen)
    outputs = {name: [] for name, _, _ in ends}
    hooks = [end.register_forward_hook(lambda mod, inp, out, n=name: outputs[n].append(out))
             for name, _, end in ends]
    try:
        set_mode(frozen, "int")
        frozen(x.to(device))
        set_mode(frozen, "reals")
        frozen.double()(x.to(device, torch.float64))
    finally:
        frozen.float()
        for h in hooks:
            h.remove()
    share = []
    for name, op, _ in ends:
        q_int, y_fq = outputs[name]
        q_fq = integers_of(y_fq, *op.out_qparams())
        share.append([name, round(100.0 * (q_fq != q_int.long()).float().mean().item(), 4)])
    return share


def sqnr_db(signal, noise):
    """10 log10(signal / noise) of two sums of squares (inf when nothing was lost)."""
    return 10 * math.log10(float(signal) / float(noise)) if noise > 0 else math.inf


@torch.no_grad()
def weight_layers(qmodel, frozen, batches, labels, device):
    """What each layer's weight quantization costs on its own: [name, kind, SQNR in dB, the worst
    output channel's SQNR, accuracy in % with only this layer's weights fake-quantized (every
    other weight and every activation float)]. SQNR = 10 log10(sum w^2 / sum (S_w (q_w - Z_w) - w)^2),
    w the (BN-folded) float weights; kind "depthwise" (groups = channels), "conv" or "linear".
    `qmodel` is left in its float phase (a list: RESULT JSON keeps order)."""
    layers = [(n, l) for n, l in qlayers(qmodel) if l.w_quantizer is not None]
    set_phase(qmodel, "float")
    out = []
    for name, layer in layers:
        w = layer.weight_bias()[0].double()
        op = frozen.get_submodule(name)
        err = op.real_weight(torch.float64).to(w.device) - w
        kind = "linear" if not op.is_conv else ("depthwise" if op.depthwise else "conv")
        db = sqnr_db((w ** 2).sum(), (err ** 2).sum())
        worst = min(sqnr_db(s, e) for s, e in zip((w ** 2).flatten(1).sum(1), (err ** 2).flatten(1).sum(1)))
        layer.w_quantizer.enabled = True
        acc = accuracy(predict(qmodel, batches, device), labels)
        layer.w_quantizer.enabled = False
        out.append([name, kind, round(db, 2), round(worst, 2), round(acc, 2)])
    return out


def print_frozen_report(fp32_acc, r, frozen):
    print(f"float32     {fp32_acc:6.2f}%")
    print(f"fake-quant  {r['fakequant_acc']:6.2f}%")
    if "int_acc" not in r:
        print(f"integer     -        (no integer path: {why_not_integer(frozen)})")
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
        if not torch.isfinite(loss):          # stop before the step writes NaN into the weights
            raise IntsimError(f"the training loss is {loss.item()} at epoch {epoch}, batch {i}: stopped, "
                              f"nothing saved; lower --lr (or check the inputs for NaN)")
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
