"""Split a folder of ImageNet-style class folders (<wnid>/*.JPEG) into disjoint parts of
symlinks, so that one part calibrates and another is scored (calibration never sees the
scored images).

    python split_images.py ../shared/data/imagenet-val-1300/val data/imagenet-1300 --parts 2

makes data/imagenet-1300/part0/<wnid>/... and part1/...: the images sorted by file name,
image k going to part k mod --parts (ILSVRC2012's validation file names are in random class
order, so every part mixes the classes). Two-fold use, every image scored once:

    python PTQ.py --dataset imagenet --model resnet18 --weights W --calib-dir data/imagenet-1300/part0 --data-dir data/imagenet-1300/part1
    python PTQ.py --dataset imagenet --model resnet18 --weights W --calib-dir data/imagenet-1300/part1 --data-dir data/imagenet-1300/part0
"""
import os

import cli
from function import IntsimError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def list_images(src):
    """[(wnid, file name)] of every image under src/<wnid>/, sorted by file name."""
    if not os.path.isdir(src):
        raise IntsimError(f"image folder {src} not found: point it at <wnid>/*.JPEG class folders")
    images = [(wnid, f) for wnid in sorted(os.listdir(src)) if os.path.isdir(os.path.join(src, wnid))
              for f in os.listdir(os.path.join(src, wnid)) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not images:
        raise IntsimError(f"no images in {src}: expected <wnid>/*.JPEG class folders")
    return sorted(images, key=lambda wf: (wf[1], wf[0]))


def split(src, dst, parts):
    """Link image k of `src` into dst/part{k mod parts}/<wnid>/; returns the images per part."""
    if parts < 2:
        raise IntsimError("--parts must be at least 2 (one to calibrate, one to score)")
    src = os.path.abspath(src)
    counts = [0] * parts
    for k, (wnid, name) in enumerate(list_images(src)):
        part = k % parts
        folder = os.path.join(dst, f"part{part}", wnid)
        os.makedirs(folder, exist_ok=True)
        link, target = os.path.join(folder, name), os.path.join(src, wnid, name)
        if os.path.islink(link) and os.readlink(link) == target:
            pass                                        # made by an earlier run: keep
        elif os.path.lexists(link):
            raise IntsimError(f"{link} exists and is not a link to {target}: use an empty --dst folder")
        else:
            os.symlink(target, link)
        counts[part] += 1
    return counts


def main():
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("src", help="folder of <wnid>/*.JPEG class folders")
    p.add_argument("dst", help="where the parts go (part0, part1, ...)")
    p.add_argument("--parts", type=int, default=2, help="number of disjoint parts")
    args = p.parse_args()
    counts = split(args.src, args.dst, args.parts)
    for part, n in enumerate(counts):
        print(f"{os.path.join(args.dst, f'part{part}')}: {n} images")


if __name__ == "__main__":
    cli.run(main)
