"""Compressed activations for backward (ActNN): memory.py's measurements, training with them, QAT with them."""
from config import QCONFIG_FIELDS

from .common import bits, cmd, find, granularity, pct


def train_baseline(results, t):
    """The float32-activation run of the same schedule as training run t (the same start, epochs
    and learning rate): the float recipe's run, or the fine-tune from the same checkpoint."""
    rows = [r for r in results if r["script"] == "train" and "ca_bits" not in r and r["model"] == t["model"]
            and r["dataset"] == t["dataset"] and r.get("init_from") == t.get("init_from")
            and r["epochs"] == t["epochs"] and r["lr"] == t["lr"]]
    return rows[0] if rows else None


def schedule(t):
    return (f"fine-tuned {t['epochs']} epoch(s) at lr {t['lr']:g} from {t['init_from']}" if t.get("init_from")
            else f"from scratch, {t['epochs']} epochs at lr {t['lr']:g}")


def ca_tag(r):
    """The CompressConfig.tag of a run's compression fields (ca2, ca2pt, ca2ib8plg, ...)."""
    from compress.allocate import CompressConfig
    return CompressConfig(bits=r["ca_bits"], group_size=r["ca_group_size"], per_group=r["ca_per_group"],
                          initial_bits=r.get("ca_initial_bits"), per_layer=r.get("ca_per_layer", False),
                          use_gradient=r.get("ca_use_gradient", False)).tag()


# ActNN's CIFAR-10 rows (Chen et al. 2021, preact ResNet-56, 200 epochs): config, intsim's flags,
# the paper's Overall Var and top-1 (full precision 92.78)
ACTNN_ROWS = [("4-bit, per-tensor", "ca4pt", "--ca-bits 4 --ca-per-tensor", (0.0118, 93.10)),
              ("2-bit, per-tensor", "ca2pt", "--ca-bits 2 --ca-per-tensor", (0.2969, 91.58)),
              ("2-bit, per-group", "ca2", "--ca-bits 2", (0.0314, 93.07)),
              ("2-bit, ibits 8, per-group", "ca2ib8g", "--ca-bits 2 --ca-initial-bits 8 --ca-use-gradient",
               (0.0061, 92.87)),
              ("2-bit, ibits 8, per-group, no gradient", "ca2ib8", "--ca-bits 2 --ca-initial-bits 8", (0.0335, 92.67)),
              ("2-bit, ibits 8, per-group, per-layer", "ca2ib8plg",
               "--ca-bits 2 --ca-initial-bits 8 --ca-per-layer --ca-use-gradient", (0.0026, 92.91)),
              ("2-bit, ibits 8, per-group, per-layer, no gradient", "ca2ib8pl",
               "--ca-bits 2 --ca-initial-bits 8 --ca-per-layer", (0.0198, 93.24)),
              ("1-bit, per-group", "ca1", "--ca-bits 1", None)]


ACTNN_FULL_PRECISION = 92.78


def compressed_run(results, script, model, tag):
    """The run of one (script, network, config); memory.py: the one with the most passes."""
    rows = [r for r in results if r["script"] == script and r["model"] == model and r["dataset"] == "fashion-mnist"
            and "ca_bits" in r and ca_tag(r) == tag]
    return max(rows, key=lambda r: r.get("passes", 0), default=None)


def plain_qat(results, r):
    """The QAT run that a compressed-activation QAT run r repeats with float32 saved activations
    (the same QConfig, LSQ or not, epochs), or None."""
    rows = [p for p in results if p["script"] == "QAT" and "ca_bits" not in p and "tflite" not in p
            and "evaluated_from" not in p and p["model"] == r["model"] and p["dataset"] == r["dataset"]
            and p["epochs"] == r["epochs"] and all(p.get(k) == r.get(k) for k in QCONFIG_FIELDS)
            and bool(p.get("learn_scales")) == bool(r.get("learn_scales"))]
    return rows[0] if rows else None


def render_compressed(results):
    """Per network, ActNN's rows: memory.py's gradient variance, bias, bytes and step time (one
    batch of the float checkpoint), and, where the network was trained with the config, its
    test accuracy against the float run of the same recipe."""
    out = []
    for model in ("cnn_bn", "resnet18"):
        mem = [compressed_run(results, "memory", model, tag) for _, tag, _, _ in ACTNN_ROWS]
        trained = [compressed_run(results, "train", model, tag) for _, tag, _, _ in ACTNN_ROWS]
        if not any(mem + trained):
            continue
        first = next((m for m in mem if m), None)
        some = next((t for t in trained if t), None)
        base = train_baseline(results, some) if some else None
        scratch = find(results, script="train", model=model, dataset="fashion-mnist", ca_bits=None, init_from=None)
        base = base or (scratch[0] if scratch else None)
        setup = (f"memory.py: batch {first['batch_size']}, {first['passes']} compressed passes, {first['batches']} "
                 f"batches for the sampling variance, {first['threads']} thread(s), {first['device']}" if first else "")
        setup += ("; " if setup and base else "") + (f"training: {schedule(base)}" if base else "")
        lines = [f"**{model}** ({setup})", "",
                 "| config | flags | Overall Var | minibatch var | bias % (noise floor %) | test acc. | - full precision "
                 "| saved bytes / image | vs float32 | step time | training min | ActNN Var / top-1 |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        fp_bytes = f"{first['saved_bytes_per_image']['float32']:,.0f}" if first else "-"
        sample_var = f"{first['sample_var']:.4g}" if first else "-"
        acc, minutes = (pct(base["fp32_acc"]), f"{base['minutes']:.1f}") if base else ("-", "-")
        lines.append(f"| full precision | | 0 | {sample_var} | 0 | {acc} | | {fp_bytes} | 1.00x | 1.00x | {minutes} | "
                     f"- / {ACTNN_FULL_PRECISION:.2f} |")
        for (label, tag, flags, paper), m, t in zip(ACTNN_ROWS, mem, trained):
            b = train_baseline(results, t) if t else None
            acc = ((pct(t["fp32_acc"]), f"{t['fp32_acc'] - b['fp32_acc']:+.2f}" if b else "-", f"{t['minutes']:.1f}")
                   if t else ("-",) * 3)
            stats = ((f"{m['overall_var']:.4g}", f"{m['sample_var']:.4g}",
                      f"{100 * m['bias_rel']:.2f} ({100 * m['noise_floor_rel']:.2f})",
                      f"{m['saved_bytes_per_image']['compressed']:,.0f}", f"{m['memory_ratio']:.2f}x",
                      f"{m['step_time_ratio']:.2f}x") if m else ("-",) * 6)
            ref = f"{paper[0]:.4f} / {paper[1]:.2f}" if paper else "-"
            lines.append(f"| {label} | `{flags}` | {stats[0]} | {stats[1]} | {stats[2]} | {acc[0]} | {acc[1]} | "
                         f"{stats[3]} | {stats[4]} | {stats[5]} | {acc[2]} | {ref} |")
        out.append("\n".join(lines))
    qat = [r for r in results if r["script"] == "QAT" and r["dataset"] == "fashion-mnist" and "ca_bits" in r]
    if qat:
        lines = ["**QAT with compressed activations** (the same QAT run, its saved activations compressed)", "",
                 "| model | W/A bits | saved activations | saved bytes / image (float32) | QAT fake-quant | integer | "
                 "- plain QAT | minutes | command |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(qat, key=lambda r: (r["model"], r["command"])):
            p = plain_qat(results, r)
            base = f"{r['int_acc'] - p['int_acc']:+.2f} (plain {pct(p['int_acc'])})" if p else "-"
            held = (f"{r['saved_bytes_per_image']:,} ({r['saved_bytes_per_image_fp32']:,}, "
                    f"{r['saved_bytes_per_image_fp32'] / r['saved_bytes_per_image']:.1f}x)"
                    if "saved_bytes_per_image" in r else "-")
            lines.append(f"| {r['model']} | {bits(r)} {granularity(r)} | {ca_tag(r)} | {held} | {pct(r['qat_fakequant_acc'])} | "
                         f"{pct(r['int_acc'])} | {base} | {r['minutes']:.1f} | {cmd(r)} |")
        out.append("\n".join(lines))
    return "\n\n".join(out) if out else "_(no results yet)_"
