"""Run a real quantized .tflite model in intsim's integer path and in LiteRT, image by image.

    python tflite_run.py data/models/mobilenet_v1_0.25_128_quant.tflite --data-dir ../shared/data/imagenet-val-1300/val

The model is imported into intsim's own frozen integer ops (tflite_io/read.py) and run on ImageNet
images prepared as TFLite's evaluation does (central 87.5% crop, bilinear resize, RGB bytes, fed
as the input tensor's type takes them: the bytes for uint8, bytes - 128 for int8, (bytes - 127.5)
/ 127.5 for a float32 input that the model quantizes itself). The same inputs go through LiteRT's
reference kernels (BUILTIN_REF, the bit-exact claim) and its default interpreter (XNNPACK, which
rounds differently: its distance is reported, not chased). Reports top-1 / top-5 of each (1000
outputs, or 1001 with background at 0), how many images give the same output integers in intsim
and in LiteRT, and images per second of each, in one run.
"""
import time

import torch

import cli
from data import load_imagenet_bytes
from frozen import output_integers, set_mode
from tflite_io.read import import_tflite
from tflite_io.run import agreement, imagenet_classifier, input_reals, model_input, run_litert_integers

DRY_RUN_IMAGES = 20


def topk(scores, labels, k, background):
    """Top-k accuracy in %, scores (N, 1000 + background: the output integers, probabilities
    where the model ends in SOFTMAX) with the background class first (the TF-slim ImageNet
    models' output 0). Classes whose 8-bit probabilities tie are ranked by index (a stable
    sort): the same rule for intsim's integers and LiteRT's."""
    best = scores[:, background:].sort(dim=1, descending=True, stable=True).indices[:, :k]
    return 100.0 * (best == labels[:, None]).any(1).float().mean().item()


def run_litert(path, info, images, reference):
    """The integers of the compared tensor for each image (N, C) and the seconds it took (one
    image a call: the models' RESHAPE fixes the batch at 1). The input goes in the file's order
    (NHWC; NCHW in files from PyTorch)."""
    start = time.time()
    x = model_input(images, info["input_type"])
    x = (x if info["input_layout"] == "NCHW" else x.permute(0, 2, 3, 1)).numpy()
    out = run_litert_integers(path, x, info["compare_tensor"], reference, batch_size=1)
    return torch.from_numpy(out.reshape(len(images), -1)), time.time() - start


def run_intsim(frozen, info, images, batch_size):
    """intsim's output integers (N, C), the seconds the integer path took, and the seconds of one
    untimed warm-up batch before it (torch.compile compiles the integer kernels there: 2 to 20 s
    the first time in a process; ops/compiled.py)."""
    set_mode(frozen, "int")
    start = time.time()
    frozen(input_reals(images[:batch_size], info))
    warm_up = time.time() - start
    out, start = [], time.time()
    for i in range(0, len(images), batch_size):
        out.append(output_integers(frozen, frozen(input_reals(images[i:i + batch_size], info))))
    return torch.cat(out), time.time() - start, warm_up


def main():
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("model_path", metavar="MODEL.tflite", help="a quantized (uint8 or int8) .tflite model")
    p.add_argument("--data-dir", required=True, help="ImageNet-style folder of <wnid>/*.JPEG images")
    p.add_argument("--limit", type=int, default=None, help="score only the first N images")
    p.add_argument("--batch-size", type=int, default=50, help="images per intsim forward")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    p.add_argument("--dry-run", action="store_true", help=f"only the first {DRY_RUN_IMAGES} images")
    p.add_argument("--result-json", default=None, help="also write the RESULT line's JSON to this file")
    cli.add_threads(p)
    args, _ = cli.start(p)
    frozen, info = import_tflite(args.model_path)
    size, background = imagenet_classifier(args.model_path, info)       # before any image is read
    limit = min(args.limit or DRY_RUN_IMAGES, DRY_RUN_IMAGES) if args.dry_run else args.limit
    images, labels = load_imagenet_bytes(args.data_dir, size, limit=limit)
    print(f"{args.model_path}: {len(images)} images {size}x{size}, {info['input_type']} input, "
          f"the whole model, to its {info['last_op']}", flush=True)

    ref, ref_s = run_litert(args.model_path, info, images, reference=True)
    default, default_s = run_litert(args.model_path, info, images, reference=False)
    mine, mine_s, warm_up_s = run_intsim(frozen, info, images, args.batch_size)
    top = {name: {k: round(topk(out, labels, k, background), 2) for k in (1, 5)}
           for name, out in (("intsim", mine), ("litert_ref", ref), ("litert_default", default))}
    r = {"script": "tflite_run", "dataset": "imagenet", "model": args.model_path.split("/")[-1], "images": len(images),
         "last_op": info["last_op"],
         **{f"{name}_top{k}": acc for name, by_k in top.items() for k, acc in by_k.items()},
         "vs_litert_ref": agreement(mine, ref), "litert_default_vs_ref": agreement(default, ref),
         "images_per_s": {"intsim_int": round(len(images) / mine_s, 1), "litert_ref": round(len(images) / ref_s, 1),
                          "litert_default": round(len(images) / default_s, 1)}, "intsim_warm_up_s": round(warm_up_s, 1)}
    print(f"top-1 / top-5   intsim {r['intsim_top1']:.2f} / {r['intsim_top5']:.2f}   LiteRT reference "
          f"{r['litert_ref_top1']:.2f} / {r['litert_ref_top5']:.2f}   LiteRT default "
          f"{r['litert_default_top1']:.2f} / {r['litert_default_top5']:.2f}")
    a = r["vs_litert_ref"]
    print(f"intsim vs LiteRT reference: {a['images_identical']} of {len(images)} images give identical output "
          f"integers (largest difference {a['max_diff']}); LiteRT default vs reference: largest difference "
          f"{r['litert_default_vs_ref']['max_diff']}")
    print("images/s        " + "   ".join(f"{k} {v:.1f}" for k, v in r["images_per_s"].items()))
    cli.emit_result(r, args.result_json, device=torch.device("cpu"))        # the imported model runs on the CPU


if __name__ == "__main__":
    cli.run(main)
