"""The project's targets, each checked against the results: the "Targets" table that ends
RESULTS.md. (Acceptance criteria of the issues that set them, kept apart from the rendering.)"""
import itertools

from tables.common import (ADAROUND_W4A8_TOL, FLOAT_TARGET, SMALL_CNNS, ada_acc, bits, calibration_half, delta, find,
                           granularity, is_compressed, kernel, observer_name, pct, plain)
from tables.compressed import ca_tag, compressed_run, plain_qat, schedule, train_baseline
from tables.imagenet import imagenet_agreement, pretrained_runs
from tables.lowbits import low_bit_cell


def check_targets(results):
    """(target, run, measured, met) rows: each issue's targets checked against the results."""
    rows, everything = [], results
    results = [r for r in results if not is_compressed(r)]      # compression has targets of its own
    ptq = [r for r in results if plain(r)]
    qat = [r for r in results if r["script"] == "QAT"]
    for r in find(results, script="train"):
        floor = FLOAT_TARGET.get(r["model"], 91.0)
        rows.append((f"float32 >= {floor}%", r["model"], pct(r["fp32_acc"]), r["fp32_acc"] >= floor))
    for b, tol in ((8, 0.3), (6, 1.0)):
        for r in [r for r in ptq if r["w_bits"] == r["a_bits"] == b and not r["single_rounding"]]:
            rows.append((f"PTQ W{b}A{b} integer within {tol} of float32",
                         f"{r['model']} {granularity(r)}", delta(r), abs(r["int_acc"] - r["fp32_acc"]) <= tol))
    for r in [r for r in ptq if r["w_bits"] == r["a_bits"] == 8]:
        label = f"{r['model']} W8A8 {granularity(r)}, {kernel(r)} rounding"
        if r["model"] in SMALL_CNNS:
            rows.append(("integer vs fake-quant: same class >= 99.9%, max output diff <= 1", label,
                         f"{r['int_fq_same_class']:.2f}%, {r['int_fq_max_diff']}",
                         r["int_fq_same_class"] >= 99.9 and r["int_fq_max_diff"] <= 1))
        else:   # issue 6 set 99% (on ImageNet) for ResNet18: 20 convs and 8 adds of double rounding
            rows.append(("integer vs fake-quant: same class >= 99% (issue 6's ImageNet bar)", label,
                         f"{r['int_fq_same_class']:.2f}%, max diff {r['int_fq_max_diff']}",
                         r["int_fq_same_class"] >= 99.0))
    for r in qat:
        lsq = ", LSQ" if r.get("learn_scales") else ""
        label = f"{r['model']} {bits(r)} {granularity(r)}{lsq}, {r['epochs']} epochs, {kernel(r)} rounding"
        if r["w_bits"] == r["a_bits"] == 4:
            rows.append(("QAT W4A4 integer within 1.0 of float32", label, delta(r),
                         abs(r["int_acc"] - r["fp32_acc"]) <= 1.0))
        if r["w_bits"] == r["a_bits"] == 8:
            for p in find(ptq, model=r["model"], w_bits=8, a_bits=8, per_channel=r["per_channel"],
                          single_rounding=r["single_rounding"]):
                rows.append(("QAT W8A8 not below PTQ W8A8 by more than 0.1", label,
                             f"{r['int_acc'] - p['int_acc']:+.2f}", round(r["int_acc"] - p["int_acc"], 2) >= -0.1))
        rows.append(("QAT: integer within 0.1 of the fake-quant accuracy reached in training", label,
                     f"{r['int_acc'] - r['qat_fakequant_acc']:+.2f}",
                     round(abs(r["int_acc"] - r["qat_fakequant_acc"]), 2) <= 0.1))   # accuracies have two decimals
    for r in pretrained_runs(results, "efficientnet_lite0"):     # issue 30: a pretrained PyTorch network
        if (r["w_bits"], r["a_bits"], r["per_channel"]) == (8, 8, True):
            run = f"efficientnet_lite0 W8A8 per-channel, calibrated on {calibration_half(r)}"
            rows.append(("pretrained EfficientNet-Lite0 W8A8 per-channel integer within 0.5 of float32", run, delta(r),
                         r["int_acc"] - r["fp32_acc"] >= -0.5))
            if "tflite_vs_intsim" in r:
                a = r["tflite_vs_intsim"]
                rows.append(("its exported file equals intsim on every output integer of the scored half", run,
                             f"{a['images_identical']} of {r['tflite_images']}", a["images_identical"] == r["test_images"]
                             == r["tflite_images"]))
    for r in find(results, script="Table1"):
        for part in ("first_layer", "all_layers"):
            t, run = r[part], f"{r['model']} W{r['w_bits']}A32, {part.replace('_', ' ')}"
            rows.append(("Table 1: ceil and floor collapse (near chance: below 20%)", run,
                         f"ceil {pct(t['ceil'])}, floor {pct(t['floor'])}", max(t["ceil"], t["floor"]) < 20.0))
            rows.append(("Table 1: stochastic mean not above nearest", run,
                         f"{t['stochastic']['mean']:.2f} vs {pct(t['nearest'])}", t["stochastic"]["mean"] <= t["nearest"]))
            rows.append(("Table 1: best stochastic draw above nearest", run,
                         f"{t['stochastic']['best']:.2f} vs {pct(t['nearest'])}", t["stochastic"]["best"] > t["nearest"]))
        c = r["correlations"]
        rows.append(("second-order term predicts accuracy better than first-order (absolute Pearson r)",
                     f"{r['model']}, {r['draws']} first-layer draws",
                     f"{c['pearson_second_vs_acc']:+.2f} vs {c['pearson_first_vs_acc']:+.2f}",
                     abs(c["pearson_second_vs_acc"]) > abs(c["pearson_first_vs_acc"])))
    for model in ("cnn_bn",):
        obs = [r for r in results if plain(r, "a_bits_int", "w_observer", "fold_bn") and r["a_bits"] == 32
               and r["model"] == model and r["w_bits"] == 4 and r["per_channel"]]
        if obs:
            best = max(obs, key=lambda r: r["fakequant_acc"])
            rows.append(("W4A32 per-channel: best observer within 2 of float32", f"{model}, {observer_name(best)}"
                         f"{'' if best['fold_bn'] else ', BN unfolded'}",
                         f"{best['fakequant_acc'] - best['fp32_acc']:+.2f}", best["fp32_acc"] - best["fakequant_acc"] <= 2.0))
    for r in find(results, script="AdaRound", dataset="fashion-mnist"):
        run = f"{r['model']} W{r['w_bits']}A{r['a_bits']} {granularity(r)}"
        if r["w_bits"] == 4 and r["a_bits"] == 8:
            tol = ADAROUND_W4A8_TOL.get(r["model"], 1.0)
            rows.append((f"AdaRound W4A8 integer within {tol} of float32", run, f"{ada_acc(r) - r['fp32_acc']:+.2f}",
                         r["fp32_acc"] - ada_acc(r) <= tol))
        if r["w_bits"] <= 3:
            rows.append(("AdaRound at W3/W2 clearly (>= 1.0) above nearest", run,
                         f"{ada_acc(r):.2f} vs {r['nearest_acc']:.2f}", ada_acc(r) - r["nearest_acc"] >= 1.0))
        defaults = (r["iters"], r["num_calib"], r["w_bits"], r["a_bits"], r["per_channel"]) == (10000, 1024, 4, 32, False)
        if r["model"] == "cnn_bn" and defaults:
            rows.append(("full AdaRound of cnn_bn (defaults) under 10 minutes on 2 cores", run,
                         f"{r['minutes']:.1f} min", r["minutes"] < 10.0))
    agree = imagenet_agreement(results)
    if agree:
        rows.append(("ImageNet ResNet18: integer and fake-quant predict the same class for >= 99% of the images",
                     f"{agree['images']} images, weights {agree['weights']}", f"{agree['same_class']:.2f}%",
                     agree["same_class"] >= 99.0))
    for r in find(results, script="bench"):
        rows.append(("integer inference <= 3x float32", f"{r['model']} W{r['w_bits']}A{r['a_bits']}",
                     f"{r['int_ratio']:.2f}x", r["int_ratio"] <= 3.0))
        rows.append(("integer inference <= 1.0x float32 (the speed issue's goal)", f"{r['model']} W{r['w_bits']}A{r['a_bits']}",
                     f"{r['int_ratio']:.2f}x", r["int_ratio"] <= 1.0))
        if "qat_train_ratio" in r:
            rows.append(("QAT training step <= 2.5x float32 step", r["model"], f"{r['qat_train_ratio']:.2f}x",
                         r["qat_train_ratio"] <= 2.5))
            rows.append(("QAT training step <= 1.5x float32 step (the speed issue's goal)", r["model"],
                         f"{r['qat_train_ratio']:.2f}x", r["qat_train_ratio"] <= 1.5))
    rows += tflite_targets(results)
    rows += low_bit_targets(results)
    rows += compression_targets(everything)
    return rows


def _low_bit_run(results, method, model, w, a, variant=None):
    """The run a low-bit table cell shows (tables.lowbits.low_bit_cell), or None."""
    rows = [r for r in results if r["model"] == model and r["dataset"] == "fashion-mnist"]
    return low_bit_cell(rows, method, w, a, variant)[1]


def _acc(r):
    return r["int_acc"] if "int_acc" in r else r["fakequant_acc"]


def low_bit_targets(results):
    """Issue 16: BRECQ and LSQ below 4 bits."""
    rows = []
    for model in ("cnn", "cnn_bn", "resnet18"):
        for (w, a), (grid, variant) in itertools.product(((2, 32), (2, 8)), (("", None),
                                                                           (", Lp 2.4 range", {"w_observer": "lp", "lp_p": 2.4}))):
            b, ada = (_low_bit_run(results, m, model, w, a, variant) for m in ("brecq", "adaround"))
            if b and ada:     # on the same weight grid
                rows.append((f"BRECQ W{w}A{a} at least 5 above AdaRound{grid}",
                             f"{model}, {b['iters']} / {ada['iters']} it.",
                             f"{_acc(b):.2f} vs {_acc(ada):.2f}", _acc(b) - _acc(ada) >= 5.0))
        if model == "resnet18":
            for grid, variant in (("", None), (", Lp 2.4 range", {"w_observer": "lp", "lp_p": 2.4})):
                b = _low_bit_run(results, "brecq", model, 2, 32, variant)
                if b:
                    edges = ", 8-bit first/last" if b.get("first_last_bits") == 8 else ""
                    rows.append((f"BRECQ ResNet18 W2A32 within 3 of float32{grid}", f"{b['iters']} it./unit{edges}",
                                 f"{_acc(b) - b['fp32_acc']:+.2f}", b["fp32_acc"] - _acc(b) <= 3.0))
            b = _low_bit_run(results, "brecq", model, 4, 4)
            if b and b.get("first_last_bits") == 8:
                rows.append(("BRECQ ResNet18 W4A4 (8-bit first/last) within 1.0 of float32", f"{b['iters']} it./unit",
                             f"{_acc(b) - b['fp32_acc']:+.2f}", b["fp32_acc"] - _acc(b) <= 1.0))
        # W4A4 within 0.5 is the small CNNs' target; W2A4 within 3 the goal on every network
        for (w, tol), (init, variant) in itertools.product(
                ((4, 0.5), (2, 3.0)) if model != "resnet18" else ((2, 3.0),),
                (("", None), (", S from the calibrated range", {"lsq_init": "range"}))):
            q = _low_bit_run(results, "qat_lsq", model, w, 4, variant)
            if q and q.get("first_last_bits") == 8:
                label = model if "epochs" not in q else f"{model}, {q['epochs']} epoch(s)"
                rows.append((f"QAT+LSQ W{w}A4 (8-bit first/last) within {tol} of float32{init}", label,
                             f"{_acc(q) - q['fp32_acc']:+.2f}", q["fp32_acc"] - _acc(q) <= tol))
    for r in find(results, method="brecq", model="cnn_bn", dataset="fashion-mnist"):
        if r["iters"] == 20000 and r["num_calib"] == 1024 and r.get("threads", 0) >= 2:
            rows.append(("BRECQ of cnn_bn (defaults) under 10 minutes on 2 cores", f"W{r['w_bits']}A{r['a_bits']}",
                         f"{r['minutes']:.1f} min", r["minutes"] < 10.0))
    return rows


def tflite_targets(results):
    """Issue 14: real TFLite in and out."""
    rows = []
    for r in sorted((r for r in results if "tflite" in r), key=lambda r: r["command"]):
        a, n = r["tflite_vs_intsim"], r["tflite_images"]
        rows.append(("export: LiteRT (reference kernels) = intsim's integer path on every image",
                     f"{r['model']} W{r['w_bits']}A{r['a_bits']} {granularity(r)} {r['tflite_scheme']}",
                     f"{a['images_identical']} of {n}, max diff {a['max_diff']}", a["images_identical"] == n))
    for r in find(results, script="tflite_run"):
        a, name = r["vs_litert_ref"], r["model"].replace("_quant.tflite", "")
        rows.append(("import: intsim = LiteRT (reference kernels) on every image", name,
                     f"{a['images_identical']} of {r['images']}", a["images_identical"] == r["images"]))
        speed = r["images_per_s"]
        rows.append(("import: intsim's integer path faster than LiteRT's reference kernels", name,
                     f"{speed['intsim_int'] / speed['litert_ref']:.2f}x", speed["intsim_int"] > speed["litert_ref"]))
        rows.append(("import: intsim's integer path within 3x of LiteRT XNNPACK (the speed issue's goal)", name,
                     f"{speed['litert_default'] / speed['intsim_int']:.2f}x slower",
                     speed["litert_default"] <= 3.0 * speed["intsim_int"]))
    for r in results:
        if r.get("tflite_model") and r["script"] == "PTQ" and r["w_bits"] == 8 and r["per_channel"]:
            zero_points = "" if r["w_symmetric"] else ", weights with zero points"
            rows.append((f"dequantized MobileNet, intsim PTQ W8A8 per-channel{zero_points} within 1 of float32 "
                         f"(scoring fold)",
                         f"{r['model'].replace('_quant', '')}, calibrated on {calibration_half(r)}",
                         f"{r['int_acc'] - r['fp32_acc']:+.2f}", r["fp32_acc"] - r["int_acc"] <= 1.0))
    return rows


def render_targets(results):
    rows = check_targets(results)
    if not rows:
        return "_(no results yet)_"
    lines = ["| target | run | measured | met |", "|---|---|---|---|"]
    lines += [f"| {t} | {run} | {m} | {'yes' if ok else '**no**'} |" for t, run, m, ok in rows]
    return "\n".join(lines)


def compression_targets(results):
    """Issue 17: compressed activations (ActNN)."""
    rows = []
    run = lambda script, model, tag: compressed_run(results, script, model, tag)
    for model, tol in (("cnn_bn", 0.3), ("resnet18", 0.5)):
        t = run("train", model, "ca2")
        b = train_baseline(results, t) if t else None
        if b:
            d = t["fp32_acc"] - b["fp32_acc"]
            rows.append((f"2-bit per-group training within {tol} of the same schedule with float32 activations",
                         f"{model}, {schedule(t)}", f"{d:+.2f} ({pct(t['fp32_acc'])} vs {pct(b['fp32_acc'])})",
                         d >= -tol))
    for model in ("cnn_bn", "resnet18"):
        pg, pt = run("memory", model, "ca2"), run("memory", model, "ca2pt")
        if pg and pt:
            rows.append(("2-bit Overall Var per-group at least 5x below per-tensor", model,
                         f"{pt['overall_var'] / pg['overall_var']:.1f}x", pt["overall_var"] >= 5 * pg["overall_var"]))
        if pg:
            rows.append(("2-bit per-group training step <= 2x a float32 step on CPU (goal)",
                         f"{model}, batch {pg['batch_size']}, {pg['threads']} thread(s)",
                         f"{pg['step_time_ratio']:.2f}x", pg["step_time_ratio"] <= 2.0))
        if pg and model == "resnet18":
            rows.append(("ResNet18 saved activations at 2 bits at least 10x below float32", f"batch {pg['batch_size']}",
                         f"{pg['memory_ratio']:.2f}x", pg["memory_ratio"] >= 10.0))
    for r in (r for r in results if r["script"] == "QAT" and "ca_bits" in r and ca_tag(r) == "ca2"):
        plain = plain_qat(results, r)
        if plain and r["w_bits"] == r["a_bits"] == 4:
            d = r["int_acc"] - plain["int_acc"]
            rows.append(("QAT W4A4 with 2-bit saved activations within 0.3 of plain QAT W4A4",
                         f"{r['model']} {granularity(r)}", f"{d:+.2f}", d >= -0.3))
    return rows
