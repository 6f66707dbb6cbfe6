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


def _inside(path, folder):
    return os.path.commonpath([path, folder]) == folder


def split(src, dst, parts):
    """Link image k of `src` into dst/part{k mod parts}/<wnid>/; returns the images per part.
    Everything is checked before the first link is made."""
    if parts < 2:
        raise IntsimError("--parts must be at least 2 (one to calibrate, one to score)")
    src, real_dst = os.path.abspath(src), os.path.realpath(dst)
    real_src = os.path.realpath(src)
    where = ("is SRC" if real_dst == real_src else "lies inside SRC" if _inside(real_dst, real_src)
             else "holds SRC" if _inside(real_src, real_dst) else None)
    if where:            # the parts would be made among the class folders (or SRC among the parts)
        raise IntsimError(f"DST {dst} {where} {src}: name a folder outside SRC for the parts")
    files = imagenet_files(src)
    if len(files) < parts:
        raise IntsimError(f"{src} holds {len(files)} image(s), fewer than --parts {parts}: every part needs "
                          f"at least one; lower --parts")
    # sorted by file name across classes (ILSVRC2012's val names are in random class order)
    plan = [(k % parts, wnid, name) for k, (wnid, name) in enumerate(sorted(files, key=lambda wf: (wf[1], wf[0])))]
    links = [(os.path.join(dst, f"part{part}", wnid, name), os.path.join(src, wnid, name)) for part, wnid, name in plan]
    for link, target in links:
        for folder in (os.path.dirname(os.path.dirname(link)), os.path.dirname(link)):
            if os.path.lexists(folder) and not os.path.isdir(folder):
                raise IntsimError(f"{folder} exists and is not a folder: use an empty DST folder")
        if os.path.lexists(link) and not (os.path.islink(link) and os.readlink(link) == target):
            raise IntsimError(f"{link} exists and is not a link to {target}: use an empty DST folder")
    counts = [0] * parts
    for (part, _, _), (link, target) in zip(plan, links):
        if not os.path.lexists(link):                   # a link an earlier run made is kept
            os.makedirs(os.path.dirname(link), exist_ok=True)
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
