"""Build the README's results tables from the saved RESULT files (results/*.json).

    python make_tables.py            # rewrite the tables in README.md in place
    python make_tables.py --check    # exit 1 if README.md is not up to date

Each table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->` in README.md.
"""
import argparse
import glob
import json
import os
import re
import sys


def load_results(folder):
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            rows.append(json.load(f))
    return rows


def pct(v):
    return f"{v:.2f}"


def delta(r):
    return f"{r['int_acc'] - r['fp32_acc']:+.2f}"


def granularity(r):
    return "per-channel" if r.get("per_channel") else "per-tensor"


def bits(r):
    out = r.get("out_bits") or r["a_bits"]
    return f"W{r['w_bits']}A{r['a_bits']}" + (f", logits {out}-bit" if out != r["a_bits"] else "")


def rounding(r):
    return "single" if r.get("single_rounding") else "double"


def cmd(r):
    return f"`{r['command']}`"


# name -> (which results, sort key, columns as (header, cell))
TABLES = {
    "train": (lambda r: r["script"] == "train",
              lambda r: (r["dataset"], r["model"]),
              [("model", lambda r: r["model"]), ("data set", lambda r: r["dataset"]),
               ("float32 test acc. %", lambda r: pct(r["fp32_acc"])), ("epochs", lambda r: r["epochs"]),
               ("minutes", lambda r: f"{r['minutes']:.1f}"), ("command", cmd)]),
    "ptq": (lambda r: r["script"] == "PTQ" and "layer_diff_share" not in r,
            lambda r: (r["dataset"], r["model"], -r["w_bits"], -r["a_bits"], r.get("single_rounding", False),
                       r["per_channel"]),
            [("model", lambda r: r["model"]), ("W/A bits", bits),
             ("weights", granularity), ("rescale", rounding), ("float32", lambda r: pct(r["fp32_acc"])),
             ("fake-quant", lambda r: pct(r["fakequant_acc"])), ("integer", lambda r: pct(r["int_acc"])),
             ("int - fp32", delta), ("same class as fake-quant %", lambda r: f"{r['int_fq_same_class']:.2f}"),
             ("max output-int diff", lambda r: r["int_fq_max_diff"]), ("command", cmd)]),
    "layers": (lambda r: "layer_diff_share" in r,
               lambda r: (r["model"], r.get("single_rounding", False)),
               [("model", lambda r: r["model"]), ("W/A bits", lambda r: f"W{r['w_bits']}A{r['a_bits']}"),
                ("rescale", rounding),
                ("output integers that differ, per layer (in order)",
                 lambda r: ", ".join(f"{k} {v:.2f}%" for k, v in r["layer_diff_share"])),
                ("same class %", lambda r: f"{r['int_fq_same_class']:.2f}"), ("command", cmd)]),
    "qat": (lambda r: r["script"] == "QAT",
            lambda r: (r["dataset"], r["model"], -r["w_bits"], -r["a_bits"], r.get("out_bits") or r["a_bits"],
                       r["per_channel"], r.get("single_rounding", False)),
            [("model", lambda r: r["model"]), ("W/A bits", bits),
             ("weights", granularity), ("rescale", rounding), ("float32", lambda r: pct(r["fp32_acc"])),
             ("QAT fake-quant", lambda r: pct(r["qat_fakequant_acc"])), ("integer", lambda r: pct(r["int_acc"])),
             ("int - fp32", delta), ("int - QAT fake-quant", lambda r: f"{r['int_acc'] - r['qat_fakequant_acc']:+.2f}"),
             ("same class as fake-quant %", lambda r: f"{r['int_fq_same_class']:.2f}"),
             ("top logits tied %", lambda r: f"{r['int_top_tie_share']:.2f}" if "int_top_tie_share" in r else "-"),
             ("minutes", lambda r: f"{r['minutes']:.1f}" if "minutes" in r else "(eval)"), ("command", cmd)]),
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
    return [r for r in results if all(r.get(k, False if k in ("single_rounding", "per_channel") else None) == v
                                      for k, v in want.items())]


def check_targets(results):
    """(target, run, measured, met) rows: each issue's targets checked against the results."""
    rows = []
    ptq = [r for r in results if r["script"] == "PTQ" and "layer_diff_share" not in r]
    qat = [r for r in results if r["script"] == "QAT"]
    for r in find(results, script="train"):
        rows.append(("float32 >= 91.0%", r["model"], pct(r["fp32_acc"]), r["fp32_acc"] >= 91.0))
    for b, tol in ((8, 0.3), (6, 1.0)):
        for r in [r for r in ptq if r["w_bits"] == r["a_bits"] == b and not r.get("single_rounding")]:
            rows.append((f"PTQ W{b}A{b} integer within {tol} of float32",
                         f"{r['model']} {granularity(r)}", delta(r), abs(r["int_acc"] - r["fp32_acc"]) <= tol))
    for r in [r for r in ptq if r["w_bits"] == r["a_bits"] == 8]:
        rows.append(("integer vs fake-quant: same class >= 99.9%, max output diff <= 1",
                     f"{r['model']} W8A8 {granularity(r)}, {rounding(r)} rounding",
                     f"{r['int_fq_same_class']:.2f}%, {r['int_fq_max_diff']}",
                     r["int_fq_same_class"] >= 99.9 and r["int_fq_max_diff"] <= 1))
    for r in qat:
        if r["w_bits"] == r["a_bits"] == 4:
            rows.append(("QAT W4A4 integer within 1.0 of float32",
                         f"{r['model']} {bits(r)} {granularity(r)}, {rounding(r)} rounding", delta(r),
                         abs(r["int_acc"] - r["fp32_acc"]) <= 1.0))
        label = f"{r['model']} {bits(r)} {granularity(r)}, {rounding(r)} rounding"
        if r["w_bits"] == r["a_bits"] == 8:
            for p in find(ptq, model=r["model"], w_bits=8, a_bits=8, per_channel=r["per_channel"],
                          single_rounding=r.get("single_rounding", False)):
                rows.append(("QAT W8A8 not below PTQ W8A8 by more than 0.1", label,
                             f"{r['int_acc'] - p['int_acc']:+.2f}", r["int_acc"] >= p["int_acc"] - 0.1))
        rows.append(("QAT: integer within 0.1 of the fake-quant accuracy reached in training", label,
                     f"{r['int_acc'] - r['qat_fakequant_acc']:+.2f}", abs(r["int_acc"] - r["qat_fakequant_acc"]) <= 0.1))
    for r in find(results, script="bench"):
        rows.append(("integer inference <= 3x float32", f"{r['model']} W{r['w_bits']}A{r['a_bits']}",
                     f"{r['int_ratio']:.2f}x", r["int_ratio"] <= 3.0))
        if "qat_train_ratio" in r:
            rows.append(("QAT training step <= 2.5x float32 step", r["model"], f"{r['qat_train_ratio']:.2f}x",
                         r["qat_train_ratio"] <= 2.5))
    return rows


def render_targets(results):
    rows = check_targets(results)
    if not rows:
        return "_(no results yet)_"
    lines = ["| target | run | measured | met |", "|---|---|---|---|"]
    lines += [f"| {t} | {run} | {m} | {'yes' if ok else '**no**'} |" for t, run, m, ok in rows]
    return "\n".join(lines)


def render(name, results):
    if name == "targets":
        return render_targets(results)
    keep, key, columns = TABLES[name]
    rows = sorted((r for r in results if keep(r)), key=key)
    if not rows:
        return "_(no results yet)_"
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell(r)) for _, cell in columns) + " |" for r in rows]
    return "\n".join(lines)


def update(text, results):
    for name in list(TABLES) + ["targets"]:
        pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + render(name, results) + "\n" + m.group(2), text)
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--results", default="results", help="folder of RESULT json files")
    p.add_argument("--readme", default="README.md", help="markdown file whose tables are rewritten")
    p.add_argument("--check", action="store_true", help="only check that the tables are up to date")
    args = p.parse_args()
    if not os.path.isfile(args.readme):
        sys.exit(f"error: {args.readme} not found: pass --readme")
    with open(args.readme) as f:
        text = f.read()
    new = update(text, load_results(args.results))
    if args.check:
        if new != text:
            print(f"{args.readme} tables are out of date: run python make_tables.py", file=sys.stderr)
            sys.exit(1)
        print(f"{args.readme} tables are up to date")
        return
    with open(args.readme, "w") as f:
        f.write(new)
    print(f"rewrote the tables in {args.readme} from {args.results}/")


if __name__ == "__main__":
    main()
