"""Re-run the commands behind saved results and compare what they measure with what is stored.

    python rerun.py results/ptq_cnn_*.json              # re-run, compare, report
    python rerun.py results/adaround_cnn_W4A8_pt.json --update    # and replace the stored file

Each results/*.json holds the command that produced it. This runs that command again (with
its own --result-json into a temporary folder, and --plot there too unless --update, so no
committed figure is replaced by a check), then compares every measured value with the stored
one, except run times, paths and the machine. A row that records its thread count runs with it
again; a row stored on another CPU or torch says so beside its comparison (float results, e.g.
of training, need not reproduce there). Rows that differ are listed key by key; `--check` exits
with status 1 when one differs that was stored on this machine or says nothing of its machine
(CI). `--update` writes the new result over the stored file (atomically). QAT `--eval` rows run
after the training rows whose saved model they read. Ends with `RESULT {json}`: the rows
compared and those that differ.
"""
import json
import os
import shlex
import subprocess
import sys
import tempfile

import cli
from errors import IntsimError
from checkpoint import read_result, write_json

# not measurements: run times, paths, the command line, the machine
VOLATILE = {"minutes", "iters_per_s", "command", "plot", "ckpt", "evaluated_from", "threads", "device", "torch", "cpu",
            "cpu_flags", "epilogue"}
SCRIPTS_WITH_PLOT = ("AdaRound.py", "BRECQ.py", "table1.py")
WITHOUT_THREADS = ("split_images.py", "rerun.py")       # scripts with no float arithmetic to thread
ROOT = os.path.dirname(os.path.abspath(__file__))


def volatile(key):
    return key in VOLATILE or key.endswith("_s")


def measured(value):
    """The value with run times, paths and other non-measurements left out (recursively; a
    None stays: "no output bits" is a value too)."""
    if isinstance(value, dict):
        return {k: measured(v) for k, v in value.items() if not volatile(k)}
    if isinstance(value, list):
        return [measured(v) for v in value]
    return value


def differences(old, new, prefix=""):
    """[(key, stored, now)] where the measured values differ (a key the stored file lacks is
    something the script has learnt to report since, not a difference)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(old):
            out += differences(old[k], new.get(k), f"{prefix}{k}.")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{prefix}{i}.")]
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def other_machine(stored):
    """How the machine a row was stored on differs from this one, where the row says (its float
    results need not reproduce across those); "" where it does not differ or is not recorded."""
    here = cli.machine()
    return ", ".join(f"{k} {stored[k]} here {here[k]}" for k in ("cpu", "cpu_flags", "torch")      # threads: passed on
                     if k in stored and stored[k] != here[k])


def code_version():
    """The commit the code was checked out at (+ "modified" when a .py file differs from it;
    results/ and the tables are what a re-run rewrites, not code)."""
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT)
    head = git("rev-parse", "--short", "HEAD").stdout.strip() or "unknown"
    return head + (" + modified" if git("status", "--porcelain", "--untracked-files=no", "--", "*.py").stdout.strip() else "")


def rerun(path, stored, tmp, update):
    """Run the stored command of `path` (its result `stored`) again; returns the new result."""
    try:
        argv = shlex.split(stored["command"])
    except (AttributeError, ValueError):
        argv = []
    if len(argv) < 2 or argv[0] != "python" or not os.path.isfile(os.path.join(ROOT, argv[1])):
        raise IntsimError(f"{path}: cannot re-run {stored['command']!r} (not a script of this project)")
    out = os.path.join(tmp, os.path.basename(path))
    extra = ["--result-json", out]
    if stored.get("threads") and "--threads" not in argv and argv[1] not in WITHOUT_THREADS:
        extra += ["--threads", str(stored["threads"])]          # the count its float results were made with
    if argv[1] in SCRIPTS_WITH_PLOT:
        if "--plot" in argv:                     # the stored command names the committed figure
            i = argv.index("--plot")
            del argv[i:i + 2]
        scratch = os.path.join(tmp, os.path.basename(path) + ".png")
        extra += ["--plot", stored.get("plot", scratch) if update else scratch]
    # in the project's root, where the command's relative paths (ckpt/, runs/) were meant
    proc = subprocess.run([sys.executable, *argv[1:], *extra], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise IntsimError(f"{path}: the command failed: {last}")
    with open(out) as f:
        return json.load(f)


def main():
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="results/*.json files to re-run")
    p.add_argument("--update", action="store_true", help="replace each stored file by the new result")
    p.add_argument("--label", default=None, help="what these rows are, for the report (results/reruns/*.json)")
    p.add_argument("--check", action="store_true", help="exit with status 1 when a row differs (CI)")
    p.add_argument("--result-json", default=None, help="also write the RESULT line's JSON to this file")
    args = cli.parse(p)
    stored = {path: read_result(path) for path in args.results}       # every file checked before any run
    for path in args.results if args.update else []:
        problem = cli.unwritable(path)
        if problem:
            raise IntsimError(f"--update {path}: {problem}")
    paths = sorted(args.results, key=lambda q: "--eval" in str(stored[q]["command"]))
    report = {"label": args.label or " ".join(args.results), "code": code_version(), "compared": [], "differ": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            new = rerun(path, stored[path], tmp, args.update)
            diff = differences(measured(stored[path]), measured(new))
            report["compared"].append(path)
            elsewhere = other_machine(stored[path])
            if elsewhere:
                report.setdefault("stored_on_another_machine", {})[path] = elsewhere
            print(f"{path}: {'same' if not diff else f'{len(diff)} values differ'}"
                  + (f" (stored on another machine: {elsewhere})" if elsewhere else ""), flush=True)
            for key, a, b in diff:
                print(f"    {key}: stored {a!r}, now {b!r}")
            if diff:
                report["differ"][path] = [[k, a, b] for k, a, b in diff]
            if args.update:
                write_json(path, new)
    print(f"{len(report['compared'])} rows re-run, {len(report['differ'])} differ")
    cli.emit_result({"script": "rerun", **report}, args.result_json)
    fatal = [q for q in report["differ"] if q not in report.get("stored_on_another_machine", {})]
    if args.check and fatal:
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
