"""Range setting and rounding: the observers ablation, the AdaRound paper's Table 1 and its Hessian terms, AdaRound's base quantizers."""
from .common import ada_acc, cmd, find, observer_name, pct, plain


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
