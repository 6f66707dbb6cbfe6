"""The speed tables' custom part: which accumulation each conv/linear layer of a `bench.py` run
chose, and the share of the integer path's time each kind of op took."""
from .common import cmd


def render_bench_kernels(results):
    """Per bench row: for each kind (a conv/linear's measured accumulation, or the frozen op's
    class), how many layers and their share of the integer forward's time."""
    rows = sorted((r for r in results if r["script"] == "bench" and "int_layers" in r), key=lambda r: r["model"])
    if not rows:
        return "_(no results yet)_"
    lines = ["| model | op or accumulation | layers | share of the integer time | command |", "|---|---|---|---|---|"]
    for r in rows:
        kinds = {}
        for _, kind, share in r["int_layers"]:
            count, total = kinds.get(kind, (0, 0.0))
            kinds[kind] = (count + 1, total + share)
        for kind, (count, total) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"| {r['model']} | {kind} | {count} | {total:.1f}% | {cmd(r)} |")
    return "\n".join(lines)
