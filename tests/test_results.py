"""The stored results can be re-run: each row's command names a script of this project, its flags
parse with that script's own parser today, and the quantization config they build is the one
the row records (so a renamed flag or a mis-migrated row fails here, not in rerun.py an hour in)."""
import dataclasses
import glob
import importlib
import json
import os
import shlex

import pytest

import cli
from conftest import ROOT

ROWS = sorted(glob.glob(os.path.join(ROOT, "results", "*.json")))


class _Parsed(Exception):
    """Raised in place of the script's start-up once its parser is built."""


def parser_of(script, monkeypatch):
    """The argparse parser the script's main() builds (main stops before parsing anything)."""
    seen = {}

    def capture(p):
        seen["parser"] = p
        raise _Parsed

    monkeypatch.setattr(cli, "start", capture)
    with pytest.raises(_Parsed):
        importlib.import_module(script[:-len(".py")]).main()
    return seen["parser"]


@pytest.mark.parametrize("path", ROWS, ids=[os.path.basename(p) for p in ROWS])
def test_stored_command_parses_to_the_stored_config(path, monkeypatch):
    with open(path) as f:
        row = json.load(f)
    argv = shlex.split(row["command"])
    assert argv[0] == "python" and os.path.isfile(os.path.join(ROOT, argv[1])), row["command"]
    if argv[1] in ("rerun.py", "make_tables.py", "split_images.py"):
        return                                       # not quantization runs: no config to compare
    args = parser_of(argv[1], monkeypatch).parse_args(argv[2:])   # exits (fails) on an unknown flag
    if not hasattr(args, "qconfig_fields"):
        return                                       # train.py: float training
    qconfig = dataclasses.asdict(cli.qconfig_from(args))
    recorded = {name: row[name] for name in args.qconfig_fields if name in row}
    assert recorded, f"{path} records none of its QConfig fields"
    assert recorded == {name: qconfig[name] for name in recorded}
