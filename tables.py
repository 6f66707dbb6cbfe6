"""The tables of RESULTS.md and README.md: which results each shows, in what order, with
which columns. `make_tables.py` renders them; the targets are in targets.py.

Every result carries its whole QConfig (the RESULT line of every script), so a table selects on
it directly: a PTQ row with the default ranges, rounding and bias is `plain`.
"""
from config import QCONFIG_FIELDS


def pct(v):
    return f"{v:.2f}"


def delta(r):
    return f"{r['int_acc'] - r['fp32_acc']:+.2f}"


def granularity(r):
    return "per-channel" if r["per_channel"] else "per-tensor"


def bits(r):
    edges = r.get("first_last_bits")
    out = r["out_bits"] or edges or r["a_bits"]
    return (f"W{r['w_bits']}A{r['a_bits']}" + (f", first/last {edges}-bit" if edges else "")
            + (f", logits {out}-bit" if out != r["a_bits"] and out != edges else ""))


def kernel(r):
    """The rescale kernel: TFLite's default (double rounding) or TFLITE_SINGLE_ROUNDING's."""
    return "single" if r["single_rounding"] else "double"


def cmd(r):
    return f"`{r['command']}`"


def ada_acc(r):
    """An AdaRound run's accuracy: integer when the model runs in integers, else fake-quant."""
    return r.get("int_acc", r["fakequant_acc"])


def is_ptq(r):
    """A PTQ row of the accuracy tables (runs that also export to TFLite have their own table)."""
    return r["script"] == "PTQ" and "layer_diff_share" not in r and "tflite" not in r


def plain(r, *but):
    """A PTQ row with the default ranges, rounding and bias (except the settings named in `but`).
    ImageNet runs are integer-agreement checks with random weights: they have their own table."""
    if not is_ptq(r) or r["dataset"] == "imagenet":
        return False
    defaults = {"a_bits_int": r["a_bits"] != 32, "w_observer": r["w_observer"] == "minmax",
                "a_observer": r["a_observer"] == "minmax" or r["a_bits"] == 32, "bias_bits": r["bias_bits"] == 32,
                "w_rounding": r["w_rounding"] == "nearest", "quantize_layers": r["quantize_layers"] == "all",
                "fold_bn": r["fold_bn"], "a_signed": not r["a_signed"], "first_last_bits": not r.get("first_last_bits")}
    return all(ok for k, ok in defaults.items() if k not in but)


def observer_name(r):
    o = r["w_observer"] if r["a_bits"] == 32 else r["a_observer"]
    return f"lp p={r['lp_p']:g}" if o == "lp" else o


SMALL_CNNS = ("cnn", "cnn_bn")          # the models of issues 2-5 (their ablations and targets)
FLOAT_TARGET = {"resnet18": 92.5}       # issue 6; the small CNNs: 91.0 (issue 2)
ADAROUND_W4A8_TOL = {"resnet18": 1.5}   # issue 6; the small CNNs: 1.0 (issue 5)


def imagenet_runs(results):
    """The ImageNet ResNet18 runs (random weights: the integer-agreement checks)."""
    return [r for r in results if r["script"] == "PTQ" and r["dataset"] == "imagenet" and "tflite_model" not in r]


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


def agree(a, n):
    return f"{a['images_identical']} of {n} (max diff {a['max_diff']})"


# name -> (which results, sort key, columns as (header, cell))
TABLES = {
    "train": (lambda r: r["script"] == "train",
              lambda r: (r["dataset"], r["model"]),
              [("model", lambda r: r["model"]), ("data set", lambda r: r["dataset"]),
               ("float32 test acc. %", lambda r: pct(r["fp32_acc"])), ("epochs", lambda r: r["epochs"]),
               ("minutes", lambda r: f"{r['minutes']:.1f}"), ("command", cmd)]),
    "ptq": (lambda r: plain(r),
            lambda r: (r["dataset"], r["model"], -r["w_bits"], -r["a_bits"], r["single_rounding"],
                       r["per_channel"]),
            [("model", lambda r: r["model"]), ("W/A bits", bits),
             ("weights", granularity), ("rescale", kernel), ("float32", lambda r: pct(r["fp32_acc"])),
             ("fake-quant", lambda r: pct(r["fakequant_acc"])), ("integer", lambda r: pct(r["int_acc"])),
             ("int - fp32", delta), ("same class as fake-quant %", lambda r: f"{r['int_fq_same_class']:.2f}"),
             ("max output-int diff", lambda r: r["int_fq_max_diff"]), ("command", cmd)]),
    "layers": (lambda r: "layer_diff_share" in r,
               lambda r: (r["model"], r["single_rounding"]),
               [("model", lambda r: r["model"]), ("W/A bits", lambda r: f"W{r['w_bits']}A{r['a_bits']}"),
                ("rescale", kernel),
                ("output integers that differ, per layer (in order)",
                 lambda r: ", ".join(f"{k} {v:.2f}%" for k, v in r["layer_diff_share"])),
                ("same class %", lambda r: f"{r['int_fq_same_class']:.2f}"), ("command", cmd)]),
    "qat": (lambda r: r["script"] == "QAT" and "tflite" not in r,
            lambda r: (r["dataset"], r["model"], -r["w_bits"], -r["a_bits"], r["out_bits"] or r["a_bits"],
                       r.get("first_last_bits") or 0, r.get("learn_scales", False), r["per_channel"],
                       r["single_rounding"]),
            [("model", lambda r: r["model"]), ("W/A bits", bits),
             ("weights", granularity), ("step sizes", lambda r: ("LSQ from ranges" if r.get("lsq_init") == "range" else "LSQ")
                                            if r.get("learn_scales") else "ranges"),
             ("rescale", kernel), ("float32", lambda r: pct(r["fp32_acc"])),
             ("QAT fake-quant", lambda r: pct(r["qat_fakequant_acc"])), ("integer", lambda r: pct(r["int_acc"])),
             ("int - fp32", delta), ("int - QAT fake-quant", lambda r: f"{r['int_acc'] - r['qat_fakequant_acc']:+.2f}"),
             ("same class as fake-quant %", lambda r: f"{r['int_fq_same_class']:.2f}"),
             ("top logits tied %", lambda r: f"{r['int_top_tie_share']:.2f}" if "int_top_tie_share" in r else "-"),
             ("minutes", lambda r: f"{r['minutes']:.1f}" if "minutes" in r else "(eval)"), ("command", cmd)]),
    "act_observers": (lambda r: plain(r, "a_observer") and r["a_bits"] == 4 and r["per_channel"]
                      and not r["single_rounding"],
                      lambda r: (r["model"], -r["w_bits"], ["minmax", "lp", "sqnr"].index(r["a_observer"])),
                      [("model", lambda r: r["model"]), ("W/A bits", bits), ("activation range", observer_name),
                       ("float32", lambda r: pct(r["fp32_acc"])), ("fake-quant", lambda r: pct(r["fakequant_acc"])),
                       ("integer", lambda r: pct(r["int_acc"])), ("int - fp32", delta), ("command", cmd)]),
    "bias": (lambda r: plain(r, "bias_bits") and r["model"] in SMALL_CNNS and r["per_channel"] and r["w_bits"] == r["a_bits"]
             and r["w_bits"] in (8, 6, 4) and not r["single_rounding"],
             lambda r: (r["model"], -r["w_bits"], -r["bias_bits"]),
             [("model", lambda r: r["model"]), ("W/A bits", bits),
              ("bias", lambda r: "int32 at S_in*S_w" if r["bias_bits"] == 32
               else f"{r['bias_bits']}-bit, own scale"),
              ("float32", lambda r: pct(r["fp32_acc"])), ("integer", lambda r: pct(r["int_acc"])),
              ("int - fp32", delta), ("command", cmd)]),
    "adaround": (lambda r: r["script"] == "AdaRound" and r["dataset"] != "imagenet" and "tflite" not in r,
                 lambda r: (r["dataset"], r["model"], -r["w_bits"], -r["a_bits"], r["per_channel"]),
                 [("model", lambda r: r["model"]), ("W/A bits", lambda r: f"W{r['w_bits']}A{r['a_bits']}"),
                  ("weights", granularity), ("float32", lambda r: pct(r["fp32_acc"])),
                  ("nearest", lambda r: pct(r["nearest_acc"])), ("AdaRound", lambda r: pct(ada_acc(r))),
                  ("AdaRound - nearest", lambda r: f"{ada_acc(r) - r['nearest_acc']:+.2f}"),
                  ("AdaRound - fp32", lambda r: f"{ada_acc(r) - r['fp32_acc']:+.2f}"),
                  ("scored", lambda r: "integer" if "int_acc" in r else "fake-quant"),
                  ("iters/layer", lambda r: r["iters"]), ("minutes", lambda r: f"{r['minutes']:.1f}"),
                  ("command", cmd)]),
    "tflite_import": (lambda r: r["script"] == "tflite_run",
                      lambda r: r["model"],
                      [("model", lambda r: r["model"].replace("_quant.tflite", "")), ("images", lambda r: r["images"]),
                       ("intsim top-1 / top-5", lambda r: f"{pct(r['intsim_top1'])} / {pct(r['intsim_top5'])}"),
                       ("LiteRT reference top-1 / top-5", lambda r: f"{pct(r['litert_ref_top1'])} / {pct(r['litert_ref_top5'])}"),
                       ("images with identical output integers", lambda r: agree(r["vs_litert_ref"], r["images"])),
                       ("LiteRT default (XNNPACK) vs reference", lambda r: agree(r["litert_default_vs_ref"], r["images"])),
                       ("published top-1, float / 8-bit", lambda r: " / ".join(PUBLISHED_TOP1.get(r["model"], ("-", "-")))),
                       ("command", cmd)]),
    "tflite_export": (lambda r: "tflite" in r,
                      lambda r: (r["script"] != "PTQ", r["model"], r["tflite_scheme"], -r["w_bits"], r["per_channel"]),
                      [("model", lambda r: r["model"]), ("from", lambda r: r["script"]),
                       ("W/A bits", lambda r: f"W{r['w_bits']}A{r['a_bits']}"),
                       ("scheme", lambda r: r["tflite_scheme"]), ("weights", granularity),
                       ("images", lambda r: r["tflite_images"]),
                       ("LiteRT = intsim's integer path", lambda r: agree(r["tflite_vs_intsim"], r["tflite_images"])),
                       ("LiteRT = the file read back into intsim", lambda r: agree(r["tflite_vs_reimported"], r["tflite_images"])),
                       ("command", cmd)]),
    "tflite_speed": (lambda r: r["script"] == "tflite_run",
                     lambda r: r["model"],
                     [("model", lambda r: r["model"].replace("_quant.tflite", "")),
                      ("intsim integer path, images/s", lambda r: f"{r['images_per_s']['intsim_int']:.1f}"),
                      ("LiteRT reference kernels", lambda r: f"{r['images_per_s']['litert_ref']:.1f}"),
                      ("LiteRT default (XNNPACK)", lambda r: f"{r['images_per_s']['litert_default']:.1f}"),
                      ("intsim / reference", lambda r: f"{r['images_per_s']['intsim_int'] / r['images_per_s']['litert_ref']:.2f}x"),
                      ("threads", lambda r: r.get("threads", "-"))]),
    "bench": (lambda r: r["script"] == "bench",
              lambda r: (r["dataset"], r["model"], -r["w_bits"]),
              [("model", lambda r: r["model"]), ("W/A bits", lambda r: f"W{r['w_bits']}A{r['a_bits']}"),
               ("images", lambda r: r["test_images"]), ("threads", lambda r: r["threads"]),
               ("float32 s", lambda r: f"{r['float32_s']:.2f}"), ("fake-quant s", lambda r: f"{r['fakequant_s']:.2f}"),
               ("integer s", lambda r: f"{r['int_s']:.2f}"),
               ("integer / float32", lambda r: f"{r['int_ratio']:.2f}x"),
               ("QAT step / float32 step", lambda r: f"{r['qat_train_ratio']:.2f}x" if "qat_train_ratio" in r else "-"),
               ("command", cmd)]),
}


def find(results, **want):
    return [r for r in results if all(r.get(k) == v for k, v in want.items())]


OBSERVER_ORDER = ["minmax", "lp p=2", "lp p=2.4", "sqnr"]


def render_observers(results):
    """Weights-only (A32) fake-quant accuracy: rows model x bits x observer, columns
    granularity x BN folded/unfolded; the best cell of each (model, bits) in bold."""
    rows = [r for r in results if plain(r, "a_bits_int", "w_observer", "fold_bn") and r["a_bits"] == 32]
    if not rows:
        return "_(no results yet)_"
    cols = [(False, True), (False, False), (True, True), (True, False)]     # (per_channel, fold_bn)
    cell = {(r["model"], r["w_bits"], observer_name(r), r["per_channel"], r["fold_bn"]): r for r in rows}
    lines = ["| model | weights | range | float32 | per-tensor, BN folded | per-tensor, BN unfolded | "
             "per-channel, BN folded | per-channel, BN unfolded |", "|---|---|---|---|---|---|---|---|"]
    for model in sorted({r["model"] for r in rows}):
        for w in sorted({r["w_bits"] for r in rows if r["model"] == model}, reverse=True):
            group = [r for r in rows if r["model"] == model and r["w_bits"] == w]
            best = max(r["fakequant_acc"] for r in group)
            for obs in [o for o in OBSERVER_ORDER if any(observer_name(r) == o for r in group)]:
                cells = []
                for pc, fold in cols:
                    r = cell.get((model, w, obs, pc, fold))
                    v = "-" if r is None else pct(r["fakequant_acc"])
                    cells.append(f"**{v}**" if r is not None and r["fakequant_acc"] == best else v)
                lines.append(f"| {model} | W{w}A32 | {obs} | {pct(group[0]['fp32_acc'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The AdaRound paper's Table 1 (ResNet18 on ImageNet, first layer at 4 bits; cited, not run here).
PAPER_TABLE1 = {"nearest": "52.29", "ceil": "0.10", "floor": "0.10", "stochastic (mean +- std)": "52.06 +- 5.52",
                "stochastic (best draw)": "63.06 (of 100)"}


def render_table1(results):
    runs = sorted(find(results, script="Table1"), key=lambda r: r["model"] != "cnn_bn")
    if not runs:
        return "_(no results yet)_"
    head = ["rounding"] + [f"{r['model']} {part}" for r in runs for part in ("first layer", "all layers")]
    lines = ["| " + " | ".join(head + ["paper: ResNet18 first layer"]) + " |", "|" + "---|" * (len(head) + 1)]
    for label, get in (("nearest", lambda t: pct(t["nearest"])), ("ceil", lambda t: pct(t["ceil"])),
                       ("floor", lambda t: pct(t["floor"])),
                       ("stochastic (mean +- std)", lambda t: f"{t['stochastic']['mean']:.2f} +- {t['stochastic']['std']:.2f}"),
                       ("stochastic (best draw)", lambda t: pct(t["stochastic"]["best"]))):
        cells = [get(r[part]) for r in runs for part in ("first_layer", "all_layers")]
        lines.append("| " + " | ".join([label] + cells + [PAPER_TABLE1[label]]) + " |")
    lines.append("| float32 | " + " | ".join(pct(r["fp32_acc"]) for r in runs for _ in range(2)) + " | 69.68 |")
    lines.append("")
    lines.append("Commands: " + "; ".join(f"{cmd(r)} ({r['draws']} draws, {r['test_images']} test images)"
                                          for r in runs) + ".")
    return "\n".join(lines)


def render_hessian(results):
    runs = sorted(find(results, script="Table1"), key=lambda r: r["model"] != "cnn_bn")
    if not runs:
        return "_(no results yet)_"
    lines = ["| model | draws | images for g, H | first-order vs acc. | second-order vs acc. | "
             "first-order vs loss change | second-order vs loss change | first + second vs loss change | "
             "Spearman: first / second vs acc. |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        c = r["correlations"]
        lines.append(f"| {r['model']} | {r['draws']} | {r['hessian_images']} | {c['pearson_first_vs_acc']:+.2f} | "
                     f"{c['pearson_second_vs_acc']:+.2f} | {c['pearson_first_vs_dloss']:+.2f} | "
                     f"{c['pearson_second_vs_dloss']:+.2f} | {c['pearson_taylor_vs_dloss']:+.2f} | "
                     f"{c['spearman_first_vs_acc']:+.2f} / {c['spearman_second_vs_acc']:+.2f} |")
    return "\n".join(lines)


def calibration_half(r):
    """Which half of the 1,300 images calibrated the run (split_images.py's part0 / part1)."""
    return "part0" if r["command"].split("--calib-dir")[1].split()[0].endswith("part0") else "part1"


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


LOW_BITS = [(4, 32), (3, 32), (2, 32), (4, 8), (2, 8), (4, 4), (2, 4)]
EDGE_MARK = "ᶠ"                  # first and last layer (and input, logits) at 8 bits


LOW_BIT_ROWS = [("nearest (PTQ)", "nearest", {}), ("AdaRound", "adaround", {}), ("BRECQ", "brecq", {}),
                ("QAT", "qat", {}), ("QAT + LSQ", "qat_lsq", {}),
                # variants, shown where they were run: BRECQ's code searches an Lp (p = 2.4) weight range
                ("nearest, Lp 2.4 weight range", "nearest", {"w_observer": "lp", "lp_p": 2.4}),
                ("AdaRound, Lp 2.4 weight range", "adaround", {"w_observer": "lp", "lp_p": 2.4}),
                ("BRECQ, Lp 2.4 weight range", "brecq", {"w_observer": "lp", "lp_p": 2.4}),
                ("BRECQ, 2 layers per unit", "brecq", {"layers_per_group": 2}),
                ("QAT + LSQ, S from the calibrated range", "qat_lsq", {"lsq_init": "range"})]
VARIANT_DEFAULTS = {"w_observer": "minmax", "lp_p": None, "layers_per_group": 1,      # lp_p None: any
                    "lsq_init": "mean"}
RECONSTRUCTION_LR = 1e-3            # AdaRound.LR, the scripts' default


def _low_bit_candidates(rows, method, w, a, variant=None):
    """The runs of one cell: per-channel, W w A a, of one method (nearest: plain PTQ), with the
    default weight range and unit size unless `variant` names others."""
    want = {**VARIANT_DEFAULTS, **(variant or {})}
    rows = [r for r in rows if r.get("w_bits") == w and r["a_bits"] == a and r["per_channel"] and not r["out_bits"]
            and not r["single_rounding"] and r["fold_bn"] and r["w_observer"] == want["w_observer"]
            and want["lp_p"] in (None, r["lp_p"]) and r.get("layers_per_group", 1) == want["layers_per_group"]]
    if method == "nearest":
        return [r for r in rows if plain(r, "first_last_bits", "a_bits_int")]
    if method in ("adaround", "brecq"):            # the default Adam lr (the base-quantizer table varies it)
        return [r for r in rows if r.get("method") == method and r["a_observer"] == "minmax"
                and r["lr"] == RECONSTRUCTION_LR]
    lsq = method == "qat_lsq"
    return [r for r in rows if r["script"] == "QAT" and bool(r.get("learn_scales")) == lsq and "tflite" not in r
            and not is_compressed(r) and (not lsq or r.get("lsq_init", "mean") == want["lsq_init"])]


NOT_APPLICABLE = "n/a"


def _low_bit_cell(rows, method, w, a, variant=None):
    """Accuracy (integer where there is an integer path): with 4-bit activations the run with
    8-bit first/last layers when there is one (BRECQ's and LSQ's setting), else the plain one;
    among equals the one trained longest (iterations, or QAT's epochs). QAT.py builds integer
    models only: no A32 cell."""
    if method in ("qat", "qat_lsq") and a == 32:
        return NOT_APPLICABLE, None
    found = _low_bit_candidates(rows, method, w, a, variant)
    if not found and method == "nearest":                    # the reconstructions score nearest first
        found = [{**r, "int_acc": r["nearest"]["int_acc"]} if "int_acc" in r["nearest"] else
                 {**r, "fakequant_acc": r["nearest"]["fakequant_acc"]}
                 for m in ("adaround", "brecq") for r in _low_bit_candidates(rows, m, w, a, variant)]
        found = [{k: v for k, v in r.items() if k not in ("iters", "minutes")} for r in found]
    if not found:
        return "-", None
    edges = [r for r in found if r.get("first_last_bits")]
    plain_rows = [r for r in found if not r.get("first_last_bits")]
    pick = (edges or plain_rows) if a <= 4 else (plain_rows or edges)
    r = max(pick, key=lambda r: (r.get("iters", 0), r.get("epochs", 0)))
    return pct(r["int_acc"] if "int_acc" in r else r["fakequant_acc"]) + (EDGE_MARK if r.get("first_last_bits") else ""), r


def render_low_bits(results):
    """One table per Fashion-MNIST network: rows nearest / AdaRound / BRECQ / QAT / QAT+LSQ (and
    the variants that were run), columns LOW_BITS, then how long each reconstruction and
    training took."""
    out = []
    for model in ("cnn", "cnn_bn", "resnet18"):
        rows = [r for r in results if r["model"] == model and r["dataset"] == "fashion-mnist"]
        fp = [r["fp32_acc"] for r in rows if r["script"] == "train"]
        head = f"**{model}** (float32 {pct(fp[0])})" if fp else f"**{model}**"
        lines = [head, "", "| method | " + " | ".join(f"W{w}A{a}" for w, a in LOW_BITS) + " | runs |",
                 "|---|" + "---|" * (len(LOW_BITS) + 1)]
        for label, method, variant in LOW_BIT_ROWS:
            cells, used = zip(*(_low_bit_cell(rows, method, w, a, variant) for w, a in LOW_BITS))
            if variant and not any(used):
                continue
            cost = []
            for r in (r for r in used if r is not None):
                its = f"{r['iters']} it./{'unit' if method == 'brecq' else 'layer'}, " if "iters" in r else (
                    f"{r['epochs']} epochs, " if "epochs" in r else "")
                if "minutes" in r:
                    cost.append(f"W{r['w_bits']}A{r['a_bits']}: {its}{r['minutes']:.1f} min")
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {'; '.join(cost) or '-'} |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + (f"\n\n{EDGE_MARK}: first and last layer, the input and the logits at 8 bits "
                                 f"(`--first-last-bits 8`). Integer accuracy wherever the model runs in integers "
                                 f"(activations of at most 8 bits), fake-quant at A32. {NOT_APPLICABLE}: QAT.py "
                                 f"trains with quantized activations only; -: not run.")


BASE_LRS = (1e-2, 1e-3)            # the seed's two AdaRound learning rates


def weight_range_name(r):
    return f"lp p={r['lp_p']:g}" if r["w_observer"] == "lp" else r["w_observer"]


def render_base_quantizers(results):
    """AdaRound W4A32 / W4A8 per-channel from each weight range, BN folded and unfolded, at
    each learning rate: rows network x iterations x range x BN, columns nearest and AdaRound
    per learning rate; the best AdaRound cell of each (network, iterations, bits) in bold."""
    rows = [r for r in results if r["script"] == "AdaRound" and r["dataset"] == "fashion-mnist"
            and r["model"] in ("cnn_bn", "resnet18") and r["w_bits"] == 4 and r["a_bits"] in (32, 8)
            and r["per_channel"] and r["a_observer"] == "minmax" and not r["single_rounding"]
            and not r.get("first_last_bits") and not r["out_bits"] and r["lr"] in BASE_LRS]
    if not rows:
        return "_(no results yet)_"
    cell = {(r["model"], r["iters"], weight_range_name(r), r["fold_bn"], r["a_bits"], r["lr"]): r for r in rows}
    cols = [f"W4A{a} {what}" for a in (32, 8) for what in ["nearest"] + [f"lr {lr:g}" for lr in BASE_LRS]]
    lines = ["| network | it./layer | weight range | BN | " + " | ".join(cols) + " |",
             "|---|---|---|---|" + "---|" * len(cols)]
    for model in ("cnn_bn", "resnet18"):
        for iters in sorted({r["iters"] for r in rows if r["model"] == model}):
            group = [r for r in rows if r["model"] == model and r["iters"] == iters]
            if len(group) < 2:                   # a lone default run is in the AdaRound table
                continue
            best = {a: max((ada_acc(r) for r in group if r["a_bits"] == a), default=None) for a in (32, 8)}
            for obs in [o for o in OBSERVER_ORDER if any(weight_range_name(r) == o for r in group)]:
                for fold in (True, False):
                    if not any(r["fold_bn"] == fold and weight_range_name(r) == obs for r in group):
                        continue
                    cells = []
                    for a in (32, 8):
                        runs = [cell.get((model, iters, obs, fold, a, lr)) for lr in BASE_LRS]
                        found = [r for r in runs if r is not None]
                        if a != 32 and not fold:
                            cells += ["n/a"] * (1 + len(BASE_LRS))     # the integer path folds BN
                            continue
                        cells.append(pct(found[0]["nearest_acc"]) if found else "-")
                        cells += ["-" if r is None else (f"**{pct(ada_acc(r))}**" if ada_acc(r) == best[a]
                                                         else pct(ada_acc(r))) for r in runs]
                    lines.append(f"| {model} | {iters} | {obs} | {'folded' if fold else 'unfolded'} | "
                                 + " | ".join(cells) + " |")
    return "\n".join(lines)


CUSTOM = {"observers": render_observers, "table1": render_table1, "hessian": render_hessian,
          "imagenet": render_imagenet, "resnet18": render_resnet18, "mobilenet": render_mobilenet,
          "depthwise": render_depthwise, "low_bits": render_low_bits,
          "base_quantizers": render_base_quantizers}




def _headline_cell(rows):
    """The integer accuracy of the one matching run (fake-quant where there is no integer path)."""
    if not rows:
        return "-"
    r = rows[0]
    mark = LEGACY_MARK if r.get("legacy_kernels") else ""
    return pct(r["int_acc"] if "int_acc" in r else r["fakequant_acc"]) + mark


def render_headline(results):
    """One line per network: float32, PTQ W8A8 / W4A8, AdaRound W4A8, QAT W4A4 (8-bit logits);
    integer accuracy, per-channel weights, TFLite's default rescale, Fashion-MNIST."""
    fm = [r for r in results if r["dataset"] == "fashion-mnist" and r["script"] != "train" and r["per_channel"]
          and not r["single_rounding"]]
    lines = ["| model | float32 | PTQ W8A8 | PTQ W4A8 | AdaRound W4A8 | QAT W4A4, 8-bit logits |",
             "|---|---|---|---|---|---|"]
    for model in ("cnn", "cnn_bn", "resnet18"):
        train = find(results, script="train", model=model, dataset="fashion-mnist")
        ptq = [r for r in fm if plain(r) and r["model"] == model]
        cells = [pct(train[0]["fp32_acc"]) if train else "-",
                 _headline_cell([r for r in ptq if (r["w_bits"], r["a_bits"]) == (8, 8)]),
                 _headline_cell([r for r in ptq if (r["w_bits"], r["a_bits"]) == (4, 8)]),
                 _headline_cell([r for r in find(fm, script="AdaRound", model=model, w_bits=4, a_bits=8)]),
                 _headline_cell([r for r in find(fm, script="QAT", model=model, w_bits=4, a_bits=4, out_bits=8)
                                 if "minutes" in r])]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if any(LEGACY_MARK in line for line in lines[2:]):
        lines += ["", f"{LEGACY_MARK} measured with `--legacy-kernels` (before intsim adopted LiteRT's Prepare rules), "
                      f"not yet re-run"]
    return "\n".join(lines)


LEGACY_MARK = "†"
CUSTOM["headline"] = render_headline


def _changes(differ):
    """{key: (rows, largest |now - stored|)} over a rerun report's differences (per-layer keys
    are named by their last part: layers.2.loss_adaround -> loss_adaround)."""
    out = {}
    for diffs in differ.values():
        for key, old, new in diffs:
            name = key.split(".")[-1] if not key.split(".")[-1].isdigit() else key.split(".")[0]
            rows, big = out.get(name, (set(), 0.0))
            size = abs(new - old) if isinstance(old, (int, float)) and isinstance(new, (int, float)) else 0.0
            out[name] = (rows, max(big, size))
            rows.add(id(diffs))
    return {k: (len(rows), big) for k, (rows, big) in out.items()}


def render_reruns(reports):
    """Rows re-run from their stored commands (rerun.py): how many reproduced exactly, and what
    moved in the others."""
    if not reports:
        return "_(no re-runs yet)_"
    lines = ["| rows | code | compared with | re-run | identical | differ | what differed (rows, largest change) |",
             "|---|---|---|---|---|---|---|"]
    old_code = lambda r: "before the refactor" in r["code"]
    rerun_by_old = {path for r in reports if old_code(r) for path in r["compared"]}
    # the same rows re-run by the old code, then by today's: old first
    for r in sorted(reports, key=lambda r: (r["label"], not old_code(r))):
        changes = _changes(r["differ"])
        what = ", ".join(f"{k} ({n}, {big:.4g})" for k, (n, big) in sorted(changes.items())) or "-"
        by_old = all(p in rerun_by_old or "/reruns/rows/" in p for p in r["compared"]) and not old_code(r)
        against = "the pre-refactor re-run" if by_old else "the rows as stored (earlier sessions)"
        lines.append(f"| {r['label']} | {r['code']} | {against} | {len(r['compared'])} | "
                     f"{len(r['compared']) - len(r['differ'])} | {len(r['differ'])} | {what} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- compressed activations (issue 17)

def is_compressed(r):
    """A run of compressed activations (memory.py, or train/QAT with --ca-bits) or a fine-tune
    (train.py --init-from, the float control of a compressed one): a table family of its own,
    kept out of the float and quantization tables."""
    return r["script"] == "memory" or "ca_bits" in r or "init_from" in r


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
    from compress import CompressConfig
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


CUSTOM["compressed"] = render_compressed
