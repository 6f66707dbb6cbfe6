"""Cell helpers every table shares: how a result is named, its accuracy printed, a row selected."""
def pct(v):
    return f"{v:.2f}"


def delta(r):
    return f"{r['int_acc'] - r['fp32_acc']:+.2f}"


def granularity(r):
    return "per-channel" if r["per_channel"] else "per-tensor"


def bits(r):
    edges = r.get("first_last_bits")
    out = r["out_bits"] or edges or r["a_bits"]
    return (f"W{r['w_bits']}A{r['a_bits']}" + (f", first/last {edges}-bit" if edges else "")
            + (f", logits {out}-bit" if out != r["a_bits"] and out != edges else ""))


def kernel(r):
    """The rescale kernel: TFLite's default (double rounding) or TFLITE_SINGLE_ROUNDING's."""
    return "single" if r["single_rounding"] else "double"


def cmd(r):
    return f"`{r['command']}`"


def ada_acc(r):
    """An AdaRound run's accuracy: integer when the model runs in integers, else fake-quant."""
    return r.get("int_acc", r["fakequant_acc"])


def is_ptq(r):
    """A PTQ row of the accuracy tables (runs that also export to TFLite have their own table)."""
    return r["script"] == "PTQ" and "layer_diff_share" not in r and "tflite" not in r


def plain(r, *but):
    """A PTQ row with the default ranges, rounding and bias (except the settings named in `but`).
    ImageNet runs are integer-agreement checks with random weights: they have their own table."""
    if not is_ptq(r) or r["dataset"] == "imagenet":
        return False
    defaults = {"a_bits_int": r["a_bits"] != 32, "w_observer": r["w_observer"] == "minmax",
                "a_observer": r["a_observer"] == "minmax" or r["a_bits"] == 32, "bias_bits": r["bias_bits"] == 32,
                "w_rounding": r["w_rounding"] == "nearest", "quantize_layers": r["quantize_layers"] == "all",
                "fold_bn": r["fold_bn"], "a_signed": not r["a_signed"], "first_last_bits": not r.get("first_last_bits")}
    return all(ok for k, ok in defaults.items() if k not in but)


def observer_name(r):
    o = r["w_observer"] if r["a_bits"] == 32 else r["a_observer"]
    return f"lp p={r['lp_p']:g}" if o == "lp" else o


SMALL_CNNS = ("cnn", "cnn_bn")          # the models of issues 2-5 (their ablations and targets)


FLOAT_TARGET = {"resnet18": 92.5}       # issue 6; the small CNNs: 91.0 (issue 2)


ADAROUND_W4A8_TOL = {"resnet18": 1.5}   # issue 6; the small CNNs: 1.0 (issue 5)


def agree(a, n):
    return f"{a['images_identical']} of {n} (max diff {a['max_diff']})"


def find(results, **want):
    return [r for r in results if all(r.get(k) == v for k, v in want.items())]


def calibration_half(r):
    """Which half of the 1,300 images calibrated the run (split_images.py's part0 / part1)."""
    return "part0" if r["command"].split("--calib-dir")[1].split()[0].endswith("part0") else "part1"


LEGACY_MARK = "†"


def is_compressed(r):
    """A run of compressed activations (memory.py, or train/QAT with --ca-bits) or a fine-tune
    (train.py --init-from, the float control of a compressed one): a table family of its own,
    kept out of the float and quantization tables."""
    return r["script"] == "memory" or "ca_bits" in r or "init_from" in r
