"""Data sets as normalised in-memory tensors, and one batch iterator for every script.

Fashion-MNIST and CIFAR-10 are small enough to hold in memory (60k x 1x28x28 floats is
188 MB), and slicing tensors is far faster than a per-image DataLoader on 2 CPU cores.
"""
import math
import os
import pickle
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from errors import IntsimError


@dataclass(frozen=True)
class DatasetInfo:
    in_channels: int
    image_size: int
    num_classes: int
    mean: tuple
    std: tuple
    eval_batch: int = 1000   # images per evaluation forward (224 px in float64: ~160 MB a tensor at 50)


DATASETS = {
    "fashion-mnist": DatasetInfo(1, 28, 10, mean=(0.2860,), std=(0.3530,)),
    "cifar10": DatasetInfo(3, 32, 10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "imagenet": DatasetInfo(3, 224, 1000, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), eval_batch=50),
}
IMAGENET_WNIDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_wnids.txt")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")   # image files in ImageNet class folders
IMAGENET_RESIZE = 256               # torchvision's evaluation transform: Resize(256), CenterCrop(224)
TFLITE_CROP_FRACTION = 0.875        # TFLite's ImageNet evaluation: central 87.5% crop, then resize
CIFAR_DIR = "cifar-10-batches-py"   # torchvision's layout: pickled batches
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]
CIFAR_PAD = 4                       # random-crop padding for CIFAR-10 training (the usual 4 pixels)


def dataset_info(name):
    if name not in DATASETS:
        raise IntsimError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def _check_idx(path):
    """An idx file (MNIST's format) whose size is what its header says: magic 0x0000TTNN (NN
    dimensions), NN big-endian int32 sizes, then the data (uint8 here)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = f.read(4)
        ndim = header[3] if len(header) == 4 and header[:2] == b"\0\0" else None
        dims = f.read(4 * ndim) if ndim else b""
    if ndim is None or len(dims) < 4 * ndim:
        raise IntsimError(f"{path} is not an idx file (a bad header): copy it again")
    expected = 4 + 4 * ndim + math.prod(int.from_bytes(dims[i:i + 4], "big") for i in range(0, 4 * ndim, 4))
    if size != expected:
        raise IntsimError(f"{path} is truncated or corrupt ({size} bytes, its header says {expected}): copy it again")


def _fashion_mnist(data_dir, train, download):
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import extract_archive
    raw = os.path.join(data_dir, "FashionMNIST", "raw")
    for gz, _ in FashionMNIST.resources:   # torchvision reads the extracted files only
        path = os.path.join(raw, gz)
        if os.path.isfile(path) and not os.path.isfile(path[:-3]):
            try:
                extract_archive(path, raw)
            except (OSError, EOFError, zlib.error) as e:
                if os.path.isfile(path[:-3]):
                    os.remove(path[:-3])           # a half-extracted file would pass for the data
                if isinstance(e, OSError) and e.errno is not None:    # the folder, not the archive
                    raise IntsimError(f"cannot extract {path} into {raw} ({e.strerror}): copy the folder somewhere "
                                      f"writable (`mkdir -p data && cp -r {os.path.dirname(raw)} data/`) and "
                                      f"pass --data-dir there") from None
                raise IntsimError(f"{path} is corrupt ({type(e).__name__}): copy it again") from None
        if os.path.isfile(path[:-3]):
            _check_idx(path[:-3])
    try:
        ds = FashionMNIST(data_dir, train=train, download=False)
    except RuntimeError:
        if not download:
            raise IntsimError(f"Fashion-MNIST not found in {raw}: copy it there "
                              f"(`mkdir -p data && cp -r ../shared/data/FashionMNIST data/`) "
                              f"or pass --download") from None
        try:
            ds = FashionMNIST(data_dir, train=train, download=True)
        except Exception as e:
            raise IntsimError(f"Fashion-MNIST not in {raw} and the download failed "
                              f"({type(e).__name__}): copy the four files there") from None
    _same_count(ds.data, ds.targets, f"Fashion-MNIST's {'training' if train else 'test'} files in {raw}")
    return ds.data.unsqueeze(1), ds.targets                      # (N, 1, 28, 28) uint8, (N,)


def _same_count(x, y, what):
    if len(x) != len(y):
        raise IntsimError(f"{what} hold {len(x)} images but {len(y)} labels: copy them again")


def _cifar10(data_dir, train, download):
    folder = os.path.join(data_dir, CIFAR_DIR)
    names = CIFAR_TRAIN if train else CIFAR_TEST
    if not all(os.path.isfile(os.path.join(folder, n)) for n in names):
        if not download:
            raise IntsimError(f"CIFAR-10 not found in {folder} (torchvision's python version: "
                              f"{', '.join(names)}): put it there or pass --download")
        try:
            from torchvision.datasets import CIFAR10
            CIFAR10(data_dir, train=train, download=True)
        except Exception as e:
            raise IntsimError(f"CIFAR-10 not in {folder} and the download failed "
                              f"({type(e).__name__}): put cifar-10-batches-py there") from None
    xs, ys = [], []
    for n in names:
        path = os.path.join(folder, n)
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")       # {'data': (N, 3072) uint8, 'labels': [N]}
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch["labels"], dtype=np.int64))
        except Exception as e:                                  # truncated, another pickle, wrong shapes
            raise IntsimError(f"{path} is not a CIFAR-10 batch ({type(e).__name__}): copy it again") from None
        _same_count(xs[-1], ys[-1], path)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def imagenet_class_index():
    """{wnid: class index} from the full list of the 1000 ILSVRC2012 wnids (line i = class i),
    so that a folder holding only some classes is still labelled with the standard indices."""
    with open(IMAGENET_WNIDS) as f:
        wnids = [line.split()[0] for line in f if line.strip()]
    return {w: i for i, w in enumerate(wnids)}


def imagenet_files(folder):
    """[(wnid, file name)] of the images under `<folder>/<wnid>/`, class folders in order and
    files sorted; one-line errors for a missing folder, a folder that is not a wnid, no images."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise IntsimError(f"ImageNet folder {folder} is a file, not a folder: point it (--data-dir, --calib-dir, "
                          f"SRC) at a folder of <wnid>/*.JPEG class folders, such as ILSVRC2012's val/")
    if not os.path.isdir(folder):
        raise IntsimError(f"ImageNet folder {folder} not found: point it (--data-dir, --calib-dir) at a folder "
                          f"of <wnid>/*.JPEG class folders, such as ILSVRC2012's val/")
    index = imagenet_class_index()
    files = []
    for wnid in sorted(os.listdir(folder)):
        if not os.path.isdir(os.path.join(folder, wnid)):
            continue
        if wnid not in index:
            raise IntsimError(f"{folder}/{wnid} is not an ImageNet class (not in {IMAGENET_WNIDS})")
        files += [(wnid, f) for f in sorted(os.listdir(os.path.join(folder, wnid)))
                  if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise IntsimError(f"no images in {folder}: expected <wnid>/*.JPEG class folders")
    return files


def _labelled_files(folder, limit=None):
    """[(image path, class index)] of an ImageNet-style folder, the first `limit` of them."""
    index = imagenet_class_index()
    return [(os.path.join(folder, wnid, f), index[wnid]) for wnid, f in imagenet_files(folder)][:limit]


def load_imagenet_folder(folder, limit=None):
    """Images of an ImageNet-style folder (`<folder>/<wnid>/*.JPEG`, e.g. val/) as (x, y):
    Resize(256), CenterCrop(224), torchvision's normalisation, float32 (N, 3, 224, 224); labels
    from the wnid list. All in memory (1,300 images: 0.8 GB): for the full 50,000-image
    validation set use `limit` or a streaming loader."""
    from torchvision import transforms
    files = _labelled_files(folder, limit)
    info = DATASETS["imagenet"]
    tf = transforms.Compose([transforms.Resize(IMAGENET_RESIZE), transforms.CenterCrop(info.image_size),
                             transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])
    x = torch.stack([tf(_open_image(path)) for path, _ in files])
    return x, torch.tensor([label for _, label in files])


def _open_image(path):
    from PIL import Image, UnidentifiedImageError
    try:
        return Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise IntsimError(f"{path} is not a readable image ({type(e).__name__}): remove or replace it") from None


def load_imagenet_scaled(folder, size, mean, std, limit=None):
    """load_imagenet_bytes' images as (bytes - mean) / std, float32 (N, 3, size, size), and labels:
    the input of networks trained on TF's ImageNet pipeline (EfficientNet-Lite: mean 127, std 128)."""
    q, labels = load_imagenet_bytes(folder, size, limit=limit)
    return (q.float() - mean) / std, labels


def load_imagenet_bytes(folder, size, crop_fraction=TFLITE_CROP_FRACTION, limit=None):
    """Images of an ImageNet-style folder as TFLite's ImageNet evaluation feeds a uint8 model:
    the central `crop_fraction` of each side (tf.image.central_crop), resized bilinearly to
    size x size (half-pixel centres, no antialiasing), rounded to RGB bytes. Returns (uint8
    (N, 3, size, size), labels 0..999 from the wnid list)."""
    files = _labelled_files(folder, limit)
    out = []
    for path, _ in files:
        img = torch.from_numpy(np.asarray(_open_image(path), dtype=np.float32)).permute(2, 0, 1)
        h, w = img.shape[1:]
        top, left = int((h - h * crop_fraction) / 2), int((w - w * crop_fraction) / 2)
        img = img[:, top:h - top, left:w - left]
        img = F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False)
        out.append(img[0].round().clamp(0, 255).to(torch.uint8))
    return torch.stack(out), torch.tensor([label for _, label in files])


def load_split(name, data_dir, train, download=False):
    """(images, labels): float32 (N, C, H, W) normalised with the data set's mean and std, int64 (N,)."""
    info = dataset_info(name)
    if name == "imagenet":
        raise IntsimError("ImageNet is read from class folders, not in splits: the quantizing scripts take "
                          "--data-dir (the images to score) and --calib-dir; train.py does not train on it")
    loader = _fashion_mnist if name == "fashion-mnist" else _cifar10
    x, y = loader(data_dir, train, download)
    mean = torch.tensor(info.mean).reshape(1, -1, 1, 1)
    std = torch.tensor(info.std).reshape(1, -1, 1, 1)
    return (x.float() / 255 - mean) / std, y


def load_test(name, data_dir, download=False, limit=None):
    """The test split (ImageNet: the images of the `data_dir` class folders), or its first `limit` images."""
    if name == "imagenet":
        return load_imagenet_folder(data_dir, limit)
    x, y = load_split(name, data_dir, train=False, download=download)
    return x[:limit], y[:limit]


def calibration_set(x, y, count, seed):
    """The images every script calibrates on (and AdaRound reconstructs on, Table 1 takes its
    Hessian from): the first `count` of the training set shuffled with `seed`, never a test
    image. They are the first `count` images of Batches(x, y, b, shuffle=True, seed=seed)'s
    first pass."""
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:count]
    return x[pick], y[pick]


def random_crop_flip(x, generator):
    """CIFAR-10 augmentation on a batch: pad by CIFAR_PAD, crop back at a random offset, and
    flip half of the images left-right."""
    n, _, h, w = x.shape
    padded = F.pad(x, (CIFAR_PAD,) * 4)
    dy = torch.randint(0, 2 * CIFAR_PAD + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * CIFAR_PAD + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]        # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]        # (N, 1, 1, W)
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
                 rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


class Batches:
    """Iterate over (x, y) batches of in-memory tensors; reshuffled each pass when shuffle is set
    (the order depends only on the seed). `augment(x, generator)` transforms each batch.
    `last_index` holds the dataset indices of the batch last yielded (ActNN's per-sample state)."""

    def __init__(self, x, y, batch_size, shuffle=False, seed=0, augment=None):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.augment = shuffle, augment
        self.generator = torch.Generator().manual_seed(seed)
        self.last_index = None

    def __len__(self):
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        n = len(self.x)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i:i + self.batch_size]
            self.last_index = idx
            x = self.x[idx]
            if self.augment is not None:
                x = self.augment(x, self.generator)
            yield x, self.y[idx]
