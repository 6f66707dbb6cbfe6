"""Build the tables of RESULTS.md and README.md from the saved RESULT files (results/*.json).

    python make_tables.py            # rewrite the tables in place
    python make_tables.py --check    # exit 1 if a table is not up to date

Each table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->` in a markdown file;
tables/ says what each NAME shows, targets.py renders the `targets` table. Rendering here is
generic: a spec (which rows, their order, the columns) becomes a markdown table.
"""
import glob
import json
import os
import re
import sys

from checkpoint import read_result, write_text
from cli import parser, unwritable
from config import QCONFIG_FIELDS
from errors import IntsimError
from tables import CUSTOM, TABLES
from tables.common import is_compressed
from tables.summary import render_reruns
from targets import render_targets

FILES = ("README.md", "RESULTS.md")
ONE_TABLE = {"zoo": "networks", "litert_torch": "pretrained"}     # script -> the table that shows its rows


def load_results(folder):
    """Every results/*.json; one line naming the file for a folder without any, unreadable
    JSON, or a result that lacks the QConfig every table selects on."""
    paths = sorted(glob.glob(os.path.join(folder, "*.json")))
    if not paths:
        sys.exit(f"error: no results in {folder}/: pass --results FOLDER of RESULT json files")
    rows = []
    for path in paths:
        try:
            r = read_result(path)
        except IntsimError as e:
            sys.exit(f"error: {e}")
        missing = [k for k in QCONFIG_FIELDS if k not in r and r.get("script") not in ("train", "split_images", "tflite_run", "memory", "litert_torch")]
        if missing:
            sys.exit(f"error: {path} lacks {', '.join(missing)}: re-run its command (`python rerun.py {path} --update`)")
        rows.append(r)
    return rows


def render_spec(keep, key, columns, results):
    rows = sorted((r for r in results if keep(r)), key=key)
    if not rows:
        return "_(no results yet)_"
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell(r)) for _, cell in columns) + " |" for r in rows]
    return "\n".join(lines)


def load_reruns(folder):
    """The reports of rerun.py kept in <results>/reruns/ (each with a label and the code it ran)."""
    reports = []
    for path in sorted(glob.glob(os.path.join(folder, "reruns", "*.json"))):
        try:
            with open(path) as f:
                report = json.load(f)
        except (OSError, ValueError) as e:
            sys.exit(f"error: {path} is not a readable rerun report ({type(e).__name__}): run rerun.py again")
        if not isinstance(report, dict) or "label" not in report:
            sys.exit(f"error: {path} is not a rerun report (no label): run rerun.py again")
        reports.append(report)
    return reports


def render(name, results, reruns=()):
    # rows of these scripts are shown in one table only
    results = [r for r in results if ONE_TABLE.get(r["script"], name) == name]
    if name == "targets":
        return render_targets(results)
    if name == "reruns":
        return render_reruns(reruns)
    if name == "compressed":                 # the one table that shows compressed-activation runs
        return CUSTOM[name](results)
    results = [r for r in results if not is_compressed(r)]
    if name in CUSTOM:
        return CUSTOM[name](results)
    return render_spec(*TABLES[name], results)


def update(text, results, reruns=()):
    """`text` with every table marker it holds filled from `results` (and the rerun reports)."""
    def fill(m):
        return m.group(1) + render(m.group(2), results, reruns) + "\n" + m.group(3)
    return re.sub(r"(<!-- table:(\w+) -->\n).*?(<!-- /table:\2 -->)", fill, text, flags=re.S)


def main():
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--results", default="results", help="folder of RESULT json files")
    p.add_argument("--files", nargs="+", default=list(FILES), help="markdown files whose tables are rewritten")
    p.add_argument("--check", action="store_true", help="only check that the tables are up to date")
    args = p.parse_args()
    results, reruns = load_results(args.results), load_reruns(args.results)
    for path in args.files:             # all of them before any is rewritten
        if not os.path.isfile(path):
            sys.exit(f"error: {path} not found: pass --files")
        problem = None if args.check else unwritable(path)
        if problem:
            sys.exit(f"error: {path} {problem}")
    stale = []
    for path in args.files:
        with open(path) as f:
            text = f.read()
        new = update(text, results, reruns)
        unknown = set(re.findall(r"<!-- table:(\w+) -->", text)) - set(TABLES) - set(CUSTOM) - {"targets", "reruns"}
        if unknown:
            sys.exit(f"error: {path} has tables make_tables does not know: {', '.join(sorted(unknown))}")
        if new != text:
            stale.append(path)
            if not args.check:
                write_text(path, new)
    if args.check:
        if stale:
            sys.exit(f"{', '.join(stale)}: tables are out of date: run python make_tables.py")
        print(f"{', '.join(args.files)}: tables are up to date")
    else:
        print(f"rewrote the tables in {', '.join(stale) or 'nothing (all up to date)'} from {args.results}/")


if __name__ == "__main__":
    main()
