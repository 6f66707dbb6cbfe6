"""QConfig: how a model is quantized. The one source of these defaults: every script's
quantization flags are generated from the fields below (cli.add_qconfig), every RESULT carries
the whole config (asdict), and the tables read it from there.
"""
from dataclasses import dataclass, field, fields
from typing import Optional

from errors import IntsimError
from function import (FLOAT_BITS, INT_MAX_BITS, MAX_BITS, MIN_BITS, ROUNDINGS, activation_grid, check_act_bits,
                      check_bits, weight_grid)
from observer import LP_DEFAULT_P, OBSERVERS, WEIGHT_OBSERVERS, check_p

LAYER_CHOICES = ("all", "first")   # which conv/linear layers get quantized weights


def flag(name, help, action=None):
    """Field metadata: the command-line flag, its help, and for booleans the argparse action
    (store_true, or store_false for a flag that turns a default-on field off)."""
    return {"flag": name, "help": help, "action": action}


@dataclass(frozen=True, kw_only=True)
class QConfig:
    # weights
    w_bits: int = field(default=8, metadata=flag("--w-bits", f"weight bits ({MIN_BITS}..{MAX_BITS})"))
    per_channel: bool = field(default=False, metadata=flag(
        "--per-channel", "one weight scale per output channel", "store_true"))
    w_symmetric: bool = field(default=True, metadata=flag(
        "--w-asymmetric", "unsigned weights with a zero point (default: signed narrow range, Z_w = 0)", "store_false"))
    w_observer: str = field(default="minmax", metadata=flag(
        "--w-observer", f"weight range: {', '.join(WEIGHT_OBSERVERS)}"))
    w_rounding: str = field(default="nearest", metadata=flag(
        "--w-rounding", f"weight rounding: {', '.join(ROUNDINGS)} (stochastic: seeded by --seed)"))
    fold_bn: bool = field(default=True, metadata=flag(
        "--unfold-bn", "quantize the conv weights before BN instead of the folded ones (needs --a-bits 32)",
        "store_false"))
    bias_bits: int = field(default=32, metadata=flag(
        "--bias-bits", f"32: int32 bias at S_in*S_w (TFLite); {MIN_BITS}..{MAX_BITS}: bias on its own grid first"))
    first_last_bits: Optional[int] = field(default=None, metadata=flag(
        "--first-last-bits", f"bits of the first and the last conv/linear layer's weights, of the model's input and "
                             f"of its logits ({MIN_BITS}..{MAX_BITS}; BRECQ and LSQ keep them at 8; default: as the "
                             f"rest)"))
    quantize_layers: str = field(default="all", metadata=flag(
        "--quantize-layers", f"which conv/linear layers get quantized weights: {', '.join(LAYER_CHOICES)} "
                             f"(the rest stay float; 'first' needs --a-bits 32)"))
    # activations
    a_bits: int = field(default=8, metadata=flag(
        "--a-bits", f"activation bits ({MIN_BITS}..{MAX_BITS}, or {FLOAT_BITS}: float activations)"))
    out_bits: Optional[int] = field(default=None, metadata=flag(
        "--out-bits", "bits of the model's output, the logits (default: --a-bits)"))
    a_signed: bool = field(default=False, metadata=flag(
        "--a-signed", "signed activations with a zero point (TFLite's int8) instead of unsigned (uint8)",
        "store_true"))
    a_observer: str = field(default="minmax", metadata=flag(
        "--a-observer", f"activation range: {', '.join(OBSERVERS)}"))
    lp_p: float = field(default=LP_DEFAULT_P, metadata=flag("--lp-p", "p of the lp observers (> 0)"))
    # integer kernels
    single_rounding: bool = field(default=False, metadata=flag(
        "--single-rounding", "rescale with one rounding (TFLITE_SINGLE_ROUNDING) instead of TFLite's default two",
        "store_true"))
    legacy_kernels: bool = field(default=False, metadata=flag(
        "--legacy-kernels", "intsim's kernels before it adopted TFLite's Prepare (every M from a double product, "
                            "FULLY_CONNECTED with the fixed-point rescale, MEAN's M from S_in/(N S_out)): "
                            "reproduces results stored before", "store_true"))

    def __post_init__(self):
        check_bits(self.w_bits, "weight bits")
        check_act_bits(self.a_bits, "activation bits")
        if self.out_bits is not None:
            check_act_bits(self.out_bits, "output bits")
            if self.float_activations and self.out_bits != FLOAT_BITS:
                raise IntsimError("--out-bits needs integer activations: with --a-bits 32 the logits stay float")
        for value, allowed, what in ((self.a_observer, OBSERVERS, "activation observer"),
                                     (self.w_observer, WEIGHT_OBSERVERS, "weight observer"),
                                     (self.w_rounding, ROUNDINGS, "rounding"),
                                     (self.quantize_layers, LAYER_CHOICES, "layer choice")):
            if value not in allowed:
                raise IntsimError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}")
        check_p(self.lp_p)
        if not self.fold_bn and not self.float_activations:
            raise IntsimError("BN can stay unfolded only with float activations (--a-bits 32): "
                              "integer inference needs it folded into the conv")
        if self.quantize_layers != "all" and not self.float_activations:
            raise IntsimError("--quantize-layers first leaves layers in float: it needs float activations "
                              "(--a-bits 32)")
        if self.bias_bits != 32:
            check_bits(self.bias_bits, "bias bits (or 32)")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first/last layer bits")

    @property
    def float_activations(self):
        return self.a_bits == FLOAT_BITS

    @property
    def integer_capable(self):
        """Whether the integer path exists: integer activations and at most INT_MAX_BITS
        everywhere (wider, e.g. W16A16, runs in fake-quant only)."""
        bits = (self.w_bits, self.a_bits, self.out_bits or self.a_bits, self.first_last_bits or self.w_bits)
        return not self.float_activations and max(bits) <= INT_MAX_BITS

    @property
    def w_grid(self):
        return weight_grid(self.w_bits, self.w_symmetric)

    def layer_w_grid(self, edge):
        """A layer's weight grid; `edge`: it is the first or the last conv/linear layer."""
        return weight_grid(self.first_last_bits if edge and self.first_last_bits else self.w_bits, self.w_symmetric)

    def a_grid(self, output=False, input=False):
        """The activations' grid (the model's output: out_bits; with first_last_bits the input
        and, without out_bits, the output take those)."""
        bits = self.a_bits
        if output:
            bits = self.out_bits or self.first_last_bits or self.a_bits
        elif input and self.first_last_bits:
            bits = self.first_last_bits
        return activation_grid(bits, self.a_signed)

    def name(self):
        """W8A8 per-channel, and so on."""
        edges = f", first/last {self.first_last_bits}-bit" if self.first_last_bits else ""
        return f"W{self.w_bits}A{self.a_bits} {'per-channel' if self.per_channel else 'per-tensor'}{edges}"


QCONFIG_FIELDS = [f.name for f in fields(QConfig)]
