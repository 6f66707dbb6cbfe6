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
from data import imagenet_files
from errors import IntsimError


def split(src, dst, parts):
    """Link image k of `src` into dst/part{k mod parts}/<wnid>/; returns the images per part."""
    if parts < 2:
        raise IntsimError("--parts must be at least 2 (one to calibrate, one to score)")
    src = os.path.abspath(src)
    counts = [0] * parts
    # sorted by file name across classes (ILSVRC2012's val names are in random class order)
    for k, (wnid, name) in enumerate(sorted(imagenet_files(src), key=lambda wf: (wf[1], wf[0]))):
        part = k % parts
        folder = os.path.join(dst, f"part{part}", wnid)
        os.makedirs(folder, exist_ok=True)
        link, target = os.path.join(folder, name), os.path.join(src, wnid, name)
        if os.path.islink(link) and os.readlink(link) == target:
            pass                                        # made by an earlier run: keep
        elif os.path.lexists(link):
            raise IntsimError(f"{link} exists and is not a link to {target}: use an empty dst folder")
        else:
            os.symlink(target, link)
        counts[part] += 1
    return counts


def main():
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("src", help="folder of <wnid>/*.JPEG class folders")
    p.add_argument("dst", help="where the parts go (part0, part1, ...)")
    p.add_argument("--parts", type=int, default=2, help="number of disjoint parts")
    p.add_argument("--result-json", default=None, help="also write the RESULT line's JSON to this file")
    args = cli.parse(p)
    counts = split(args.src, args.dst, args.parts)
    for part, n in enumerate(counts):
        print(f"{os.path.join(args.dst, f'part{part}')}: {n} images")
    cli.emit_result({"script": "split_images", "src": args.src, "dst": args.dst, "images_per_part": counts},
                    args.result_json)


if __name__ == "__main__":
    cli.run(main)
