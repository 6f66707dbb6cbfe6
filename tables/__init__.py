"""The tables of RESULTS.md and README.md: which results each shows, in what order, with
which columns. `make_tables.py` renders them; the targets are in targets.py.

Every result carries its whole QConfig (the RESULT line of every script), so a table selects on
it directly: a PTQ row with the default ranges, rounding and bias is `plain`. TABLES are specs
(specs.py); CUSTOM the tables with a renderer of their own, by name (one module a topic).
"""
from .compressed import render_compressed
from .imagenet import render_depthwise, render_imagenet, render_mobilenet, render_pretrained, render_resnet18
from .lowbits import render_low_bits
from .ranges import render_base_quantizers, render_hessian, render_observers, render_table1
from .specs import TABLES
from .speed import render_bench_kernels
from .summary import render_headline

CUSTOM = {"observers": render_observers, "table1": render_table1, "hessian": render_hessian,
          "imagenet": render_imagenet, "resnet18": render_resnet18, "mobilenet": render_mobilenet,
          "depthwise": render_depthwise, "low_bits": render_low_bits,
          "base_quantizers": render_base_quantizers, "headline": render_headline, "compressed": render_compressed,
          "pretrained": render_pretrained, "bench_kernels": render_bench_kernels}
__all__ = ["CUSTOM", "TABLES"]
