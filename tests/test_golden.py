"""Every script, run small on the real Fashion-MNIST, against its stored golden RESULT
(tests/golden/, written by tests/golden_runs.py): any change of behaviour fails here until the
golden file is regenerated on purpose. Each run's result is also checked for what it must show."""
import json
import os

import pytest

from golden_runs import REGENERATE, RUNS, golden_path, group, measured, run, same_machine, write_golden

ACCURACY_TOLERANCE = 1.0     # points, where floats may round differently (another CPU or torch build)
RESULTS = {}


@pytest.fixture(scope="session")
def golden_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("golden")


def result(name, tmp, data_dir):
    """The run's RESULT, once per session (an _eval run first runs the run whose model it scores)."""
    if group(name) != name:
        result(group(name), tmp, data_dir)
    if name not in RESULTS:
        RESULTS[name] = run(name, str(tmp), data_dir)
    return RESULTS[name]


def accuracies(value, key=""):
    """The accuracies in a result, flattened: what is compared across machines."""
    if isinstance(value, dict):
        return {f"{key}.{k}": v for kk, vv in value.items() for k, v in accuracies(vv, kk).items()}
    if not (key.endswith("_acc") or key in ("nearest", "ceil", "floor", "mean")):
        return {}
    if isinstance(value, list):                              # one accuracy per draw
        return {f"{key}[{i}]": v for i, v in enumerate(value)}
    return {key: value}


def check_ptq_cnn_bn_w8a8(r):
    assert r["fp32_acc"] > 90 and abs(r["int_acc"] - r["fp32_acc"]) < 1.0
    assert r["int_fq_same_class"] >= 99.5 and r["int_fq_max_diff"] <= 2
    layers = dict(r["layer_diff_share"])
    assert [name for name, _ in r["layer_diff_share"]] == ["quant_in", "features.0", "features.4", "classifier"]
    assert layers["quant_in"] == 0 and all(0 <= v < 20 for v in layers.values())


def check_ptq_cnn_bn_w4a32_lp_stochastic(r):
    assert r["a_bits"] == 32 and "int_acc" not in r and r["fakequant_acc"] > 80
    assert (r["w_observer"], r["lp_p"], r["w_rounding"], r["fold_bn"]) == ("lp", 2.0, "stochastic", False)


def check_ptq_cnn_bn_w8a4_sqnr_bias4(r):
    assert r["a_observer"] == "sqnr" and r["bias_bits"] == 4 and r["int_acc"] > 50


def check_qat_cnn_bn_w4a4(r):
    # frozen with one rounding, the integer model is the trained fake-quant model (the bias now on
    # its int32 grid, and evaluated in float64): the same class for nearly every image
    assert r["fp32_acc"] > 90 and r["int_acc"] > 60
    assert r["int_fq_same_class"] >= 99.5 and abs(r["int_acc"] - r["qat_fakequant_acc"]) <= 1.0


def check_qat_cnn_bn_w4a4_eval(r):
    trained = RESULTS["qat_cnn_bn_w4a4"]
    assert r["w_bits"] == 4 and r["a_bits"] == 4 and not r["single_rounding"]   # the saved model's config
    assert r["fakequant_acc"] == trained["fakequant_acc"] and r["qat_fakequant_acc"] == trained["qat_fakequant_acc"]


def check_adaround_cnn_bn_w4a8(r):
    assert r["method"] == "adaround" and r["iters"] == 20 and r["num_calib"] == 64
    assert [s["layer"] for s in r["layers"]] == ["features.0", "features.4", "classifier"]
    assert all(s["loss_adaround"] <= s["loss_nearest"] * 1.05 for s in r["layers"])
    assert r["int_acc"] > 80 and r["int_fq_same_class"] > 97


def check_brecq_cnn_bn_w2a8(r):
    assert r["method"] == "brecq" and r["loss"] == "fisher" and r["iters"] == 20 and r["num_calib"] == 64
    assert [(u["unit"], u["kind"], u["step_sizes"]) for u in r["units"]] == [
        ("features.0", "layer", 1), ("features.4", "layer", 1), ("classifier", "layer", 1)]
    assert r["int_fq_same_class"] > 95


def check_table1_cnn_bn(r):
    assert r["script"] == "Table1" and r["draws"] == 3
    for part in ("first_layer", "all_layers"):
        row = r[part]
        assert {"nearest", "ceil", "floor"} <= set(row) and 0 <= row["stochastic"]["mean"] <= 100
        # floor and ceil move every weight the same way: far below rounding to nearest
        assert row["ceil"] < row["nearest"] - 10 and row["floor"] < row["nearest"] - 10
    # a ReLU network is piecewise linear in these weights, so H = J^T H_CE J is positive semi-definite
    assert len(r["draw_second"]) == 3 and all(v > 0 for v in r["draw_second"])


@pytest.mark.slow
# an _eval run scores the model its group's run saved: both on one pytest-xdist worker (--dist loadgroup)
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xdist_group(group(n))) for n in RUNS])
def test_script_reproduces_its_golden_result(name, golden_tmp, data_dir):
    r = result(name, golden_tmp, data_dir)
    check = globals().get(f"check_{name}")
    if check:
        check(r)
    if REGENERATE:
        write_golden(name, r)
    path = golden_path(name)
    assert os.path.isfile(path), f"no golden file for {name}: INTSIM_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py -k {name}"
    with open(path) as f:
        golden = json.load(f)
    if same_machine(golden["machine"]):            # everything measured is deterministic here: it must be identical
        assert measured(r) == golden["result"], (
            f"{name} changed behaviour; if on purpose: INTSIM_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py -k {name}")
    else:                       # another float kernel set: the accuracies only, within a tolerance
        got, want = accuracies(measured(r)), accuracies(golden["result"])
        assert got.keys() == want.keys()
        assert all(abs(got[k] - want[k]) <= ACCURACY_TOLERANCE for k in want), (got, want)
