"""The ImageNet tables: torchvision's ResNet18 agreement, the MobileNets through intsim's PTQ, their depthwise layers."""
from .common import ada_acc, calibration_half, cmd, delta, find, granularity, pct, plain


def imagenet_runs(results):
    """The ImageNet ResNet18 runs (random weights: the integer-agreement checks)."""
    return [r for r in results if r["script"] == "PTQ" and r["dataset"] == "imagenet" and r["model"] == "resnet18"]


PRETRAINED = ("efficientnet_lite0",)        # pretrained PyTorch ImageNet networks (--model)
PUBLISHED = {"efficientnet_lite0": (75.1, 74.4)}   # Google's float / int8 top-1, 50,000 images (tensorflow/tpu lite README)


def pretrained_runs(results, model):
    return [r for r in results if r["dataset"] == "imagenet" and r["model"] == model and r["script"] in ("PTQ",)]


def render_pretrained(results):
    """Pretrained PyTorch ImageNet networks through intsim's PTQ, each run calibrated on one half
    of the 1,300 images and scored on the other, both ways; the exported file in LiteRT."""
    lines = ["| network | quantization | calibrated on part0: float32 / integer (diff) | calibrated on part1: float32 / "
             "integer (diff) | mean change | LiteRT = intsim (images) | weight scales raised for the bias | "
             "command (part0) |", "|---|---|---|---|---|---|---|---|"]
    for model in PRETRAINED:
        runs = pretrained_runs(results, model)
        for key in sorted({(r["w_bits"], r["a_bits"], r["per_channel"], r["a_signed"]) for r in runs}):
            rows = {calibration_half(r): r for r in runs if (r["w_bits"], r["a_bits"], r["per_channel"], r["a_signed"]) == key}
            cells, drops = [], []
            for fold in ("part0", "part1"):
                r = rows.get(fold)
                acc = None if r is None else r.get("int_acc", r["fakequant_acc"])
                cells.append("-" if r is None else f"{pct(r['fp32_acc'])} / {pct(acc)} ({acc - r['fp32_acc']:+.2f})")
                if r is not None:
                    drops.append(acc - r["fp32_acc"])
            exported = [r for r in rows.values() if "tflite_vs_intsim" in r]
            same = (f"{sum(r['tflite_vs_intsim']['images_identical'] for r in exported)} of "
                    f"{sum(r['tflite_images'] for r in exported)}") if exported else "-"
            raised = " / ".join(str(sum(r.get("bias_scale_adjusted", {}).values())) for r in rows.values())
            first = rows.get("part0", next(iter(rows.values())))
            w, a, pc, signed = key
            label = f"W{w}A{a} {'per-channel' if pc else 'per-tensor'}, {'int8' if signed else 'uint8'} activations"
            lines.append(f"| {model} | {label} | {cells[0]} | {cells[1]} | {sum(drops) / len(drops):+.2f} | {same} | "
                         f"{raised} | {cmd(first)} |")
        theirs = {calibration_half(r): r for r in results if r["script"] == "litert_torch" and r["model"] == model}
        if theirs:         # litert_torch_ptq.py: Google's litert-torch on the same images
            cells = [f"{pct(r['fp32_acc'])} / {pct(r['litert_torch_ref_acc'])} "
                     f"({r['litert_torch_ref_acc'] - r['fp32_acc']:+.2f})" if r else "-"
                     for r in (theirs.get("part0"), theirs.get("part1"))]
            drops = [r["litert_torch_ref_acc"] - r["fp32_acc"] for r in theirs.values()]
            first = theirs.get("part0", next(iter(theirs.values())))
            imported = [r["imported_vs_litert_ref"]["images_identical"] for r in theirs.values() if "imported_vs_litert_ref" in r]
            same = (f"{sum(imported)} of {sum(r['test_images'] for r in theirs.values() if 'imported_vs_litert_ref' in r)} "
                    f"(its file imported into intsim)") if imported else "(not imported)"
            lines.append(f"| {model} | litert-torch {first['litert_torch_version']} PT2E: W8A8 per-channel, int8 "
                         f"activations (histogram); its file in LiteRT's reference kernels | {cells[0]} | {cells[1]} | "
                         f"{sum(drops) / len(drops):+.2f} | {same} | - | {cmd(first)} |")
        if model in PUBLISHED:
            f, q = PUBLISHED[model]
            lines.append(f"| {model} (Google, 50,000 images) | TFLite's post-training int8 | | | {q - f:+.2f} "
                         f"({f:.1f} / {q:.1f}) | | | |")
    return "\n".join(lines) if len(lines) > 2 else "_(no results yet)_"


def imagenet_agreement(results):
    """Every ImageNet PTQ run pooled, weighted by images scored: with the two folds of
    split_images.py, every image once, each by a model calibrated on the other fold."""
    runs = [r for r in imagenet_runs(results) if "int_fq_same_class" in r]
    if not runs:
        return None
    n = sum(r["test_images"] for r in runs)
    same = sum(r["int_fq_same_class"] * r["test_images"] for r in runs) / n
    return {"images": n, "same_class": same, "weights": ", ".join(sorted({r.get("weights", "random") for r in runs}))}


def render_imagenet(results):
    runs = sorted(imagenet_runs(results), key=lambda r: r["command"])
    if not runs:
        return "_(no results yet)_"
    lines = ["| model weights | W/A bits | weight scales | calibrated on | scored | float32 | fake-quant | integer | "
             "same class as fake-quant % | classes predicted | max output-int diff | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r.get('weights', 'random')} | W{r['w_bits']}A{r['a_bits']} | {granularity(r)} | "
                     f"{r['calib_images']} | {r['test_images']} | {pct(r['fp32_acc'])} | {pct(r['fakequant_acc'])} | "
                     f"{pct(r['int_acc'])} | {r['int_fq_same_class']:.2f} | {r.get('int_classes_predicted', '-')} | "
                     f"{r['int_fq_max_diff']} | {cmd(r)} |")
    a = imagenet_agreement(results)
    lines.append(f"| **pooled** | | | | **{a['images']}** | | | | **{a['same_class']:.2f}** | | | |")
    return "\n".join(lines)


def render_resnet18(results):
    """Every Fashion-MNIST ResNet18 result in one table: float32, PTQ, AdaRound, Table 1."""
    fm = [r for r in results if r["model"] == "resnet18" and r["dataset"] == "fashion-mnist"]
    lines = ["| run | W/A bits | weights | accuracy % | - float32 | scored | command |", "|---|---|---|---|---|---|---|"]
    for r in find(fm, script="train"):
        lines.append(f"| float32 ({r['epochs']} epochs, {r['minutes']:.0f} min) | - | - | {pct(r['fp32_acc'])} | | "
                     f"float32, 10000 | {cmd(r)} |")
    for r in sorted((r for r in fm if plain(r)), key=lambda r: (-r["w_bits"], -r["a_bits"], r["per_channel"])):
        lines.append(f"| PTQ (nearest) | W{r['w_bits']}A{r['a_bits']} | {granularity(r)} | {pct(r['int_acc'])} | "
                     f"{delta(r)} | integer, {r['test_images']} | {cmd(r)} |")
    for r in sorted(find(fm, script="AdaRound"), key=lambda r: (-r["w_bits"], -r["a_bits"], r["per_channel"])):
        scored = "integer" if "int_acc" in r else "fake-quant"
        lines.append(f"| AdaRound ({r['iters']} it./layer; nearest {pct(r['nearest_acc'])}) | W{r['w_bits']}A{r['a_bits']} | "
                     f"{granularity(r)} | {pct(ada_acc(r))} | {ada_acc(r) - r['fp32_acc']:+.2f} | "
                     f"{scored}, {r['test_images']} | {cmd(r)} |")
    for r in find(fm, script="Table1"):
        for part in ("first_layer", "all_layers"):
            t = r[part]
            lines.append(f"| Table 1, {part.replace('_', ' ')}: nearest / ceil / floor / stochastic mean +- std "
                         f"(best) of {r['draws']} | W{r['w_bits']}A32 | {granularity(r)} | {pct(t['nearest'])} / "
                         f"{pct(t['ceil'])} / {pct(t['floor'])} / {t['stochastic']['mean']:.2f} +- "
                         f"{t['stochastic']['std']:.2f} ({t['stochastic']['best']:.2f}) | | fake-quant, "
                         f"{r['test_images']} | {cmd(r)} |")
    return "\n".join(lines) if len(lines) > 2 else "_(no results yet)_"


# Published ImageNet top-1 of the shared TFLite models (50,000 validation images): the TF-slim
# MobileNet v1 table (float) and TensorFlow r1.15 contrib/quantize's README (8-bit, fixed point).
PUBLISHED_TOP1 = {"mobilenet_v1_0.25_128_quant.tflite": ("41.5", "39.9"),
                  "mobilenet_v1_0.5_160_quant.tflite": ("59.1", "57.7")}


MOBILENET_ROWS = (("W8A8 per-channel", lambda r: r["script"] == "PTQ" and r["w_bits"] == 8 and r["per_channel"]
                   and r["w_symmetric"]),
                  ("W8A8 per-channel, weights with a zero point", lambda r: r["script"] == "PTQ" and r["w_bits"] == 8
                   and r["per_channel"] and not r["w_symmetric"]),
                  ("W8A8 per-tensor", lambda r: r["script"] == "PTQ" and r["w_bits"] == 8 and not r["per_channel"]
                   and r["w_symmetric"]),
                  ("W8A8 per-tensor, weights with a zero point", lambda r: r["script"] == "PTQ" and r["w_bits"] == 8
                   and not r["per_channel"] and not r["w_symmetric"]),
                  ("W4A8 per-channel, nearest", lambda r: r["script"] == "PTQ" and r["w_bits"] == 4 and r["per_channel"]),
                  ("W4A8 per-channel, AdaRound", lambda r: r["script"] == "AdaRound" and r["w_bits"] == 4))


def render_mobilenet(results):
    """intsim's own PTQ / AdaRound of the dequantized pretrained MobileNets: each run calibrated
    on one half of the 1,300 ImageNet images and scored on the other, both ways."""
    runs = [r for r in results if r.get("tflite_model") and r["script"] in ("PTQ", "AdaRound")]
    if not runs:
        return "_(no results yet)_"
    lines = ["| network | intsim's quantization | calibrated on part0: float32 / integer (diff) | "
             "calibrated on part1: float32 / integer (diff) | images scored | commands (part0) |",
             "|---|---|---|---|---|---|"]
    for model in sorted({r["model"] for r in runs}):
        for label, pick in MOBILENET_ROWS:
            rows = {calibration_half(r): r for r in runs if r["model"] == model and pick(r)}
            if not rows:
                continue
            cells = []
            for fold in ("part0", "part1"):
                r = rows.get(fold)
                acc = None if r is None else ada_acc(r)
                cells.append("-" if r is None else f"{pct(r['fp32_acc'])} / {pct(acc)} ({acc - r['fp32_acc']:+.2f})")
            extra = f" ({rows[next(iter(rows))]['iters']} it./layer)" if label.endswith("AdaRound") else ""
            first = rows.get("part0", next(iter(rows.values())))
            lines.append(f"| {model.replace('_quant', '')} | {label}{extra} | {cells[0]} | {cells[1]} | "
                         f"{' + '.join(str(r['test_images']) for r in rows.values())} | {cmd(first)} |")
    return "\n".join(lines)


DEPTHWISE_SHOWN = 6      # the layers whose per-tensor weights cost the most, per network


def render_depthwise(results):
    """What per-tensor weight scales do, layer by layer (PTQ --weight-layers): each layer's
    weights alone quantized per-tensor, everything else float."""
    runs = sorted((r for r in results if r.get("tflite_model") and "weight_layers" in r), key=lambda r: r["command"])
    if not runs:
        return "_(no results yet)_"
    lines = ["| network (calibrated on) | float32 | layer | kind | weight SQNR dB | worst channel's SQNR dB | "
             "accuracy, only this layer per-tensor W8 | all layers per-tensor W8A8 (integer) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        costly = sorted(r["weight_layers"], key=lambda l: l[-1])[:DEPTHWISE_SHOWN]
        for i, layer in enumerate(costly):
            (name, kind, db), acc = layer[:3], layer[-1]
            worst = f"{layer[3]:.1f}" if len(layer) == 5 else "-"      # rows made before it was reported
            head = f"{r['model'].replace('_quant', '')} ({calibration_half(r)}) | {pct(r['fp32_acc'])}" if i == 0 else " | "
            tail = pct(r["int_acc"]) if i == 0 else ""
            lines.append(f"| {head} | {name} | {kind} | {db:.1f} | {worst} | {pct(acc)} "
                         f"({acc - r['fp32_acc']:+.2f}) | {tail} |")
    return "\n".join(lines)
