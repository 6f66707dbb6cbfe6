"""Compressed activations (compress.py, ActNN): bit packing round trips, stochastic rounding is
unbiased with the spread its variance formula predicts, the stored minimum and step cover
every group, and the bytes held are the ones counted by hand."""
import pytest
import torch

from compress.pack import BITS, GROUP_SIZE, compress, decompress, pack, unpack
from errors import IntsimError


@pytest.mark.parametrize("bits", BITS)
def test_pack_then_unpack_gives_the_codes_back(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (8 * 37 + 3,), generator=g, dtype=torch.uint8)   # not a whole byte
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-codes.numel() * bits // 8)
    assert torch.equal(unpack(packed, bits, codes.numel()), codes)


def test_pack_puts_the_first_code_in_the_lowest_bits():
    # 2-bit codes 1, 2, 3, 0 -> 0b00_11_10_01 (a plain-Python reading of the layout)
    assert pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    assert pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0b10000001]
    # 3-bit codes straddle bytes: 5, 6, 7 -> stream bits 1,0,1, 0,1,1, 1,1,1 (lowest first) -> 0b11110101, 0b1
    assert pack(torch.tensor([5, 6, 7], dtype=torch.uint8), 3).tolist() == [0b11110101, 0b1]


@pytest.mark.parametrize("per_group", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_dequantized_values_lie_on_the_grid_within_one_step(bits, per_group):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, 11, generator=g) * 3 + 1
    c = compress(x, bits, per_group=per_group, generator=g)
    y = decompress(c)
    assert y.shape == x.shape and y.dtype == x.dtype
    step = c.step.float().max()
    assert (y - x).abs().max() <= step * (1 + 1e-6)
    # the stored grid covers each group: minimum <= every value <= minimum + B * step
    lo, hi = c.minimum.float().min(), (c.minimum.float() + (2 ** bits - 1) * c.step.float()).max()
    assert lo <= x.min() and hi >= x.max()


@pytest.mark.parametrize("bits", [1, 2])
def test_stochastic_rounding_is_unbiased(bits):
    """The mean of K dequantized draws converges to x: per value the draw is m + s (k or k + 1)
    with P(k + 1) = p, variance s^2 p (1 - p), so the mean's error stays within 5 standard
    deviations s sqrt(p (1 - p) / K) (plus float rounding)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 600, generator=g)
    draws = 4000
    mean = torch.zeros_like(x)
    for _ in range(draws):
        c = compress(x, bits, generator=g)
        mean += decompress(c) / draws
    step = c.step.float().repeat_interleave(GROUP_SIZE, dim=2).reshape(2, -1)[:, :600]
    frac = ((x - c.minimum.float().repeat_interleave(GROUP_SIZE, dim=2).reshape(2, -1)[:, :600]) / step) % 1
    sd = step * torch.sqrt(frac * (1 - frac) / draws)
    assert ((mean - x).abs() <= 5 * sd + 1e-5).all()
    # the bound has teeth: rounding to nearest (biased by up to half a step) fails it
    grid_min = c.minimum.float().repeat_interleave(GROUP_SIZE, dim=2).reshape(2, -1)[:, :600]
    nearest = grid_min + step * torch.round((x - grid_min) / step)
    assert ((nearest - x).abs() > 5 * sd + 1e-5).float().mean() > 0.5


def test_a_constant_group_comes_back_exactly_in_expectation_and_never_nan():
    x = torch.full((2, 256), 0.3)
    c = compress(x, 2, generator=torch.Generator().manual_seed(0))
    y = decompress(c)
    assert torch.isfinite(y).all() and (y - x).abs().max() <= c.step.float().max()


def test_bytes_held_are_the_packed_codes_and_two_bfloat16_per_group():
    x = torch.randn(3, 300)
    c = compress(x, 2, group_size=256)                       # 2 groups per sample (300 -> 512)
    assert c.nbytes() == 3 * 512 * 2 // 8 + 3 * 2 * (2 + 2)
    c = compress(x, 2, per_group=False)                      # one group of 900 values
    assert c.nbytes() == 900 * 2 // 8 + 2 + 2


@pytest.mark.parametrize("bad", [dict(bits=0), dict(bits=9), dict(bits=2, group_size=0)])
def test_bad_settings_name_the_problem(bad):
    with pytest.raises(IntsimError):
        compress(torch.randn(2, 8), **bad)


# ----------------------------------------------------------------------------- compressed layers
import copy  # noqa: E402

from torch import nn  # noqa: E402

from compress.allocate import CompressConfig  # noqa: E402
from compress.layers import compress_activations


def _grads(module, x, seed, params=None):
    """(dL/dx, dL/dparams) of L = sum(module(x) * r) for a fixed random r, in training mode
    (`params`: which parameters, default all)."""
    module.train()
    x = x.clone().requires_grad_(True)
    module.zero_grad()
    y = module(x)
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    (y * r).sum().backward()
    return [x.grad.clone()] + [p.grad.clone() for p in (module.parameters() if params is None else params)]


LAYERS = {
    "conv": lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1),
    "conv_groups_dilation": lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False),
    "linear": lambda: nn.Linear(40, 7),
    "batchnorm": lambda: nn.BatchNorm2d(3),
    "relu": lambda: nn.ReLU(),
    "relu6": lambda: nn.ReLU6(),                      # MobileNetV2's; both bounds are crossed
    "hardtanh": lambda: nn.Hardtanh(-1.0, 1.5),
    "maxpool_2x2": lambda: nn.MaxPool2d(2),
    "maxpool_3x3_s2_p1": lambda: nn.MaxPool2d(3, stride=2, padding=1),       # overlapping, ResNet's stem
}


def _input(name):
    g = torch.Generator().manual_seed(3)
    if name == "linear":
        return torch.randn(6, 40, generator=g)
    return torch.randn(4, 4 if "groups" in name else 3, 9, 9, generator=g) * (4 if name == "relu6" else 2) + 0.5


@pytest.mark.parametrize("name", LAYERS)
def test_compressed_layer_at_8_bits_gives_autograds_gradients(name):
    torch.manual_seed(0)
    exact = LAYERS[name]()
    twin = compress_activations(copy.deepcopy(exact), CompressConfig(bits=8))
    assert type(twin) is not type(exact) and isinstance(twin, type(exact))
    assert twin.state_dict().keys() == exact.state_dict().keys()
    x = _input(name)
    want, got = _grads(exact, x, seed=1), _grads(twin, x, seed=1)
    for w, g in zip(want, got):
        if name in ("relu", "relu6", "hardtanh", "maxpool_2x2", "maxpool_3x3_s2_p1"):
            assert torch.equal(w, g)                                 # masks and indices are exact
        else:                                                        # 8-bit x^: within a few %
            assert (w - g).norm() <= 0.02 * w.norm() + 1e-6, name
    if name == "batchnorm":                                          # running statistics as BN's
        assert torch.allclose(exact.running_mean, twin.running_mean)
        assert torch.allclose(exact.running_var, twin.running_var)


@pytest.mark.parametrize("name", ["conv", "linear", "batchnorm"])
def test_compressed_layer_at_2_bits_is_unbiased_over_many_backward_passes(name):
    """2-bit gradients are noisy but unbiased (they are linear in the stochastically rounded x^):
    their mean over K passes approaches the exact one, far closer than a single pass."""
    torch.manual_seed(0)
    exact = LAYERS[name]()
    twin = compress_activations(copy.deepcopy(exact), CompressConfig(bits=2, group_size=64))
    x = _input(name)
    want = _grads(exact, x, seed=1)
    passes = 400
    runs = [_grads(twin, x, seed=1) for _ in range(passes)]
    for i, w in enumerate(want):
        draws = torch.stack([r[i] for r in runs])
        one = (draws[0] - w).norm()
        mean_err = (draws.mean(0) - w).norm()
        if one <= 1e-4 * w.norm():       # this gradient needs no x (conv's dL/dx, biases): float noise only
            continue
        assert mean_err < 4 * one / passes ** 0.5, (name, i, float(mean_err), float(one))


def test_compress_activations_swaps_every_layer_of_a_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    model = compress_activations(torchvision.models.resnet18(num_classes=10))
    kinds = {type(m).__name__ for m in model.modules()}
    assert not kinds & {"Conv2d", "Linear", "BatchNorm2d", "ReLU", "MaxPool2d"}
    assert {"CAConv2d", "CALinear", "CABatchNorm2d", "CAReLU", "CAMaxPool2d"} <= kinds


def test_mobilenet_v2s_relu6_keeps_a_mask_so_every_saved_tensor_is_packed():
    """torchvision's MobileNetV2 (ReLU6 after every expansion): with ReLU6 left in float32 it
    kept 2.8x fewer bytes at 2 bits; with its 1-bit mask, as much as ResNet18 and more."""
    torchvision = pytest.importorskip("torchvision")
    from compress.layers import saved_bytes
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).train()
    x = torch.randn(2, 3, 32, 32)
    full = saved_bytes(model, x)
    compress_activations(model, CompressConfig(bits=2))
    assert "ReLU6" not in {type(m).__name__ for m in model.modules()}
    assert full / saved_bytes(model, x) > 12


def test_eval_mode_runs_the_plain_forward():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
    x = torch.randn(2, 1, 8, 8)
    twin = compress_activations(copy.deepcopy(net)).eval()
    assert torch.equal(net.eval()(x), twin(x))


def test_saved_bytes_of_a_tiny_net_are_the_ones_counted_by_hand():
    from compress.layers import saved_bytes
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(300, 16), nn.ReLU(), nn.Linear(16, 4)).train()
    x = torch.randn(2, 300, requires_grad=True)
    # float32: the first linear keeps x (2 x 300), ReLU keeps its output (2 x 16), which the
    # second linear keeps too (one storage); the weights are parameters
    assert saved_bytes(net, x) == 2 * 300 * 4 + 2 * 16 * 4
    compress_activations(net, CompressConfig(bits=2, group_size=256))
    # 2 bits: x in 2 groups of 256 per sample (codes 512 / 4 bytes, two bfloat16 per group),
    # the ReLU's 1-bit mask (32 bits), the second input in 1 padded group of 256
    assert saved_bytes(net, x) == 2 * (512 // 4 + 2 * 4) + 2 * 16 // 8 + 2 * (256 // 4 + 4)


def test_greedy_allocation_matches_brute_force_when_tensors_are_the_same_size():
    """Equal sizes: the variance C / (2^b - 1)^2 is convex in b, so taking bits greedily is
    optimal; compare with every allocation of 1..8 bits to 4 tensors within the budget."""
    import itertools
    from compress.allocate import allocate_bits, quantization_variance
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        c = (torch.rand(4, generator=g) * 10 ** torch.randint(0, 4, (4,), generator=g)).tolist()
        greedy = allocate_bits(c, [1, 1, 1, 1], average_bits=2.5)
        best = min((b for b in itertools.product(range(1, 9), repeat=4) if sum(b) <= 10),
                   key=lambda b: sum(quantization_variance(ci, bi) for ci, bi in zip(c, b)))
        total = lambda b: sum(quantization_variance(ci, bi) for ci, bi in zip(c, b))
        assert sum(greedy) <= 10 and total(greedy) == pytest.approx(total(best), rel=1e-12), (c, greedy, best)


def test_allocation_keeps_the_budget_and_gives_sensitive_tensors_more_bits():
    from compress.allocate import allocate_bits
    bits = allocate_bits([1000.0, 1.0, 1.0], [100, 100, 800], average_bits=2)
    assert sum(b * n for b, n in zip(bits, [100, 100, 800])) <= 2 * 1000
    assert bits[0] > bits[1] >= bits[2]        # equal sensitivity: the larger tensor gives up more bits
    with pytest.raises(IntsimError, match="below 1 bit"):
        allocate_bits([1.0, 1.0], [1, 1], average_bits=0.5)


# ----------------------------------------------------------------------------- ActNN's mixed precision

def loop_greedy(c, sizes, average_bits, initial_bits=8, min_bits=1):
    """The allocation as ActNN's calc_precision states it, one bit at a time (the reference for
    allocate_bits' one-sort version)."""
    from compress.allocate import quantization_variance
    bits = [initial_bits] * len(c)
    while sum(b * n for b, n in zip(bits, sizes)) > average_bits * sum(sizes):
        cost = [(quantization_variance(ci, b - 1) - quantization_variance(ci, b)) / n if b > min_bits
                else float("inf") for ci, b, n in zip(c, bits, sizes)]
        i = min(range(len(bits)), key=cost.__getitem__)
        bits[i] -= 1
    return bits


def test_allocation_by_one_sort_is_the_bit_by_bit_greedy():
    from compress.allocate import allocate_bits
    g = torch.Generator().manual_seed(3)
    for trial in range(100):
        k = int(torch.randint(1, 9, (1,), generator=g))
        c = (torch.rand(k, generator=g) * 10 ** torch.randint(-2, 4, (k,), generator=g)).tolist()
        sizes = torch.randint(1, 60, (k,), generator=g).tolist()
        average = 1 + 7 * torch.rand(1, generator=g).item()
        initial = int(torch.randint(max(2, int(average) + 1), 9, (1,), generator=g)) if average < 8 else 8
        assert allocate_bits(c, sizes, average, initial).tolist() == loop_greedy(c, sizes, average, initial), \
            (c, sizes, average, initial)


@pytest.mark.parametrize("widths", [[1, 2, 3, 8, 2], [4, 4, 4, 4, 4], [7, 1, 5, 6, 3]])
def test_rows_packed_at_their_own_widths_come_back(widths):
    from compress.pack import pack_rows, unpack_rows
    g = torch.Generator().manual_seed(sum(widths))
    row_bits = torch.tensor(widths, dtype=torch.uint8)
    codes = torch.stack([torch.randint(0, 2 ** b, (512,), generator=g, dtype=torch.uint8) for b in widths])
    packed = pack_rows(codes, row_bits)
    assert packed.numel() == sum(512 * b // 8 for b in widths)        # each row its own bits, nothing more
    assert torch.equal(unpack_rows(packed, row_bits, 512), codes)
    # row 0 first, in pack's own layout
    assert torch.equal(packed[:512 * widths[0] // 8], pack(codes[0], widths[0]))


def test_per_sample_widths_are_unbiased_and_as_fine_as_their_bits():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 512, generator=g)
    widths = torch.tensor([1, 2, 8])
    draws, mean = 2000, torch.zeros_like(x)
    for _ in range(draws):
        c = compress(x, widths, generator=g)
        y = decompress(c)
        mean += y / draws
    assert c.row_bits.tolist() == [1, 2, 8]
    assert c.nbytes() == 512 * (1 + 2 + 8) // 8 + 2 * 3 * 2 * 2 + 3      # codes, bf16 min/step per group, widths
    steps = c.step.float().amax(dim=(1, 2))                                # per sample: coarser at fewer bits
    assert steps[0] > steps[1] > steps[2]
    assert ((y - x).abs().amax(1) <= steps * (1 + 1e-6)).all()
    # a draw's spread is at most s / 2 per value: the mean of 2000 within 5 sd of x
    assert ((mean - x).abs() <= 5 * steps.view(-1, 1) / 2 / draws ** 0.5 + 1e-5).all()


def test_per_sample_allocation_gives_the_wider_sample_more_bits_and_keeps_the_average():
    from compress.allocate import BitAllocator, CompressConfig, Site
    cfg = CompressConfig(bits=2, initial_bits=8)
    site = Site(cfg, BitAllocator(cfg))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 1024, generator=g) * torch.tensor([[0.01], [1.0], [1.0], [100.0]])
    bits = site.allocator.bits_for(site, x)
    assert bits.float().mean().item() <= 2 and bits.sum().item() == 8     # the budget, used in full
    assert bits[3] > bits[1] == bits[2] >= bits[0]
    # C_i = sum over the sample's 4 groups of (256 / 4) R_G^2, by hand, then the bit-by-bit greedy
    c = [sum(64 * (grp.max() - grp.min()).item() ** 2 for grp in row.split(256)) for row in x]
    assert bits.tolist() == loop_greedy(c, [1024] * 4, 2)
    assert site.compress(x).row_bits.tolist() == bits.tolist()


def test_gradient_weights_follow_each_sample_by_its_dataset_index():
    """--ca-use-gradient: two samples with the same range; the one whose output gradient was
    larger (remembered under its dataset index) gets more bits the next time it is seen."""
    from compress.allocate import BitAllocator, CompressConfig, Site
    cfg = CompressConfig(bits=2, initial_bits=8, use_gradient=True)
    index = {"now": torch.tensor([10, 11])}
    site = Site(cfg, BitAllocator(cfg, batch_index=lambda: index["now"]))
    x = torch.stack([torch.linspace(-1, 1, 512)] * 2)
    assert site.allocator.bits_for(site, x).tolist() == [2, 2]            # no gradient seen yet: alike
    site.observe(torch.stack([torch.full((512,), 0.01), torch.full((512,), 10.0)]))
    index["now"] = torch.tensor([11, 10])                                  # the same samples, the other order
    bits = site.allocator.bits_for(site, x).tolist()
    assert bits[0] > bits[1] and sum(bits) == 4


def test_per_layer_allocation_moves_bits_to_the_sensitive_layer_after_one_pass():
    from compress.allocate import CompressConfig
    from compress.layers import compress_activations
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    with torch.no_grad():
        net[0].weight.mul_(1000)                        # layer 1's input: a thousand times the range
    compress_activations(net, CompressConfig(bits=2, initial_bits=8, per_layer=True))
    x = torch.randn(8, 256)
    net(x).sum().backward()                             # the first pass: every layer at the average
    first, second = net[0].ca, net[1].ca
    assert first.allocator is second.allocator and first.allocator.layer_bits == {}
    net(x).sum().backward()                             # the second: shared by the last pass's ranges
    bits = first.allocator.layer_bits
    assert bits[second] > bits[first] and (bits[first] + bits[second]) / 2 == pytest.approx(2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=4, initial_bits=2), "at least --ca-bits"),
    (dict(bits=2, initial_bits=8, per_group=False), "drop --ca-per-tensor"),
    (dict(bits=2, use_gradient=True), "--ca-use-gradient"),
])
def test_bad_mixed_precision_settings_name_the_flag(kwargs, message):
    from compress.allocate import CompressConfig
    with pytest.raises(IntsimError, match=message):
        CompressConfig(**kwargs)


# ----------------------------------------------------------------------------- QAT's converted layers

def converted_cnn(learn=False):
    from config import QConfig
    from model import ModelConfig, build_model, calibrate, convert, learn_scales, set_phase
    torch.manual_seed(0)
    float_net = build_model(ModelConfig("cnn", 1, 28, 10))
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    q = convert(float_net, QConfig(w_bits=4, a_bits=4, per_channel=True))
    calibrate(q, [(x, y)], "cpu", 1)
    set_phase(q, "qat")
    if learn:
        learn_scales(q, [(x, y)], "cpu", 1)
    return q.train(), x, y


def qat_grads(model, x, y):
    import torch.nn.functional as F
    model.zero_grad(set_to_none=True)
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("learn", [False, True])
def test_qat_with_8_bit_saved_activations_gives_qats_gradients_and_saves_less(learn):
    import copy
    from compress.allocate import CompressConfig
    from compress.layers import compress_activations, saved_bytes
    exact, x, y = converted_cnn(learn)
    packed = compress_activations(copy.deepcopy(exact), CompressConfig(bits=8))
    out_exact, g_exact = qat_grads(exact, x, y)
    out_packed, g_packed = qat_grads(packed, x, y)
    assert torch.equal(out_exact, out_packed)                 # the forward is QAT's own
    assert g_exact.keys() == g_packed.keys() and any("scale" in n for n in g_exact) == learn
    for name in g_exact:
        err = (g_packed[name] - g_exact[name]).norm() / g_exact[name].norm()
        assert err < 0.05, (name, err.item())
    assert saved_bytes(packed, x) < saved_bytes(exact, x) / 3


# ----------------------------------------------------------------------------- QAT's BN fold (batch statistics)

def fold_layer(kind, ca=None):
    """A QLayer with BN in QAT's batch-statistics mode (float weights: the fold's own arithmetic)."""
    from compress.allocate import Site
    from module import QLayer
    torch.manual_seed(0)
    layer, bn = (nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)) if kind == "conv" else (nn.Linear(12, 5), nn.BatchNorm1d(5))
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    bn.running_var.fill_(2.0)
    q = QLayer(layer, None, bn).train()
    q.bn_stats = "batch"
    q.ca = None if ca is None else Site(ca)
    return q


def fold_grads(q, x, seed):
    """_grads of the fold's x, W, gamma and beta (the conv's own bias gets none: BN removes it)."""
    return _grads(q, x, seed, (q.layer.weight, q.bn.weight, q.bn.bias))


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_qat_bn_fold_with_2_bit_saved_activations_is_unbiased(kind):
    """The fold keeps x and the normalised y^ each rounded on its own, so dL/dW (a product of the
    two) is unbiased; one x^ used for both would not be (its mean stayed 2-3x the noise floor)."""
    x = torch.randn(6, 3, 7, 7) * 2 + 0.5 if kind == "conv" else torch.randn(32, 12) * 2 + 0.5
    want = fold_grads(fold_layer(kind), x, seed=1)
    twin = fold_layer(kind, CompressConfig(bits=2, group_size=64))
    passes = 300
    runs = [fold_grads(twin, x, seed=1) for _ in range(passes)]
    *compressed, beta = zip(want, *runs)
    assert all(torch.allclose(g, beta[0], atol=1e-5) for g in beta[1:])  # dL/dbeta = sum of dL/dout: nothing saved
    for i, (w, *draws) in enumerate(compressed):     # dL/dx, dL/dW, dL/dgamma read the 2-bit tensors
        draws = torch.stack(draws)
        one, mean_err = (draws[0] - w).norm(), (draws.mean(0) - w).norm()
        assert one > 1e-3 * w.norm()
        assert mean_err < 4 * one / passes ** 0.5, (kind, i, float(mean_err), float(one))


def converted_cnn_bn(learn=False):
    from config import QConfig
    from model import ModelConfig, build_model, calibrate, convert, learn_scales, set_phase
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    q = convert(build_model(ModelConfig("cnn_bn", 1, 28, 10)), QConfig(w_bits=4, a_bits=4, per_channel=True))
    calibrate(q, [(x, y)], "cpu", 1)
    set_phase(q, "qat")                               # BN with batch statistics: the two-pass fold
    if learn:
        learn_scales(q, [(x, y)], "cpu", 1)
    return q.train(), x, y


@pytest.mark.parametrize("learn", [False, True])
def test_qat_bn_fold_with_compressed_activations_keeps_the_forward_and_saves_a_sixteenth(learn):
    from compress.layers import saved_bytes
    exact, x, y = converted_cnn_bn(learn)
    packed8 = compress_activations(copy.deepcopy(exact), CompressConfig(bits=8))
    before, fresh8 = copy.deepcopy(exact), copy.deepcopy(packed8)
    out_exact, g_exact = qat_grads(exact, x, y)
    out_packed, g_packed = qat_grads(packed8, x, y)
    assert torch.equal(out_exact, out_packed)                 # the forward is QAT's own
    for (name, a), (_, b) in zip(exact.named_buffers(), packed8.named_buffers()):
        assert torch.equal(a, b), name                        # BN's running statistics moved the same way
    assert g_exact.keys() == g_packed.keys()
    steps = [name for name in g_exact if name.endswith(".scale") and "w_quantizer" not in name]
    assert bool(steps) == learn
    for name in g_exact:
        if name not in steps:
            err = (g_packed[name] - g_exact[name]).norm() / g_exact[name].norm()
            assert err < 0.05, (name, err.item())
    # an activation step size's gradient sums g (q - x/S) over the layer's outputs, terms that
    # nearly cancel (one was 4e-7 against 3e-3 for the logits'): 8-bit noise can exceed it, so
    # these are checked in expectation over passes (each from the same state: the fold reads BN's
    # running variance, which a pass moves)
    passes = 40
    draws = [qat_grads(copy.deepcopy(fresh8), x, y)[1] for _ in range(passes if learn else 0)]
    for name in steps:
        d = torch.stack([g[name] for g in draws])
        one, mean_err = (d[0] - g_exact[name]).norm(), (d.mean(0) - g_exact[name]).norm()
        assert mean_err < 4 * one / passes ** 0.5, (name, float(mean_err), float(one))
    packed2 = compress_activations(before, CompressConfig(bits=2))
    # float32 autograd keeps x, y_f and layer(x, W_q) of each fold; 2 bits: x and y^ at ~2.1 bits
    assert saved_bytes(packed2, x) < saved_bytes(exact, x) / (12 if learn else 14)
