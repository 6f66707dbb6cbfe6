"""Below 4 bits: one cell per (method, bits), the run each cell shows (the targets read the same cells)."""
from .common import is_compressed, pct, plain


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


def low_bit_cell(rows, method, w, a, variant=None):
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
            cells, used = zip(*(low_bit_cell(rows, method, w, a, variant) for w, a in LOW_BITS))
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
