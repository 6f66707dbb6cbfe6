"""The README's headline table and the table of re-runs (rerun.py reports)."""
from .common import LEGACY_MARK, find, pct, plain


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
