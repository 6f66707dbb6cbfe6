"""What a user would pick instead of intsim: Google's litert-torch (torch.export -> PT2E int8:
per-channel symmetric int8 weights, histogram-observed int8 activations -> .tflite) on the same
pretrained network and images as `PTQ.py --dataset imagenet --model efficientnet_lite0`, its file
scored in LiteRT's reference kernels (BUILTIN_REF), and that file imported into intsim (its NCHW
TRANSPOSEs, PADs and float residual sums), checked integer for integer against LiteRT's reference
kernels. An optional dependency with pins of its own:

    python -m venv --system-site-packages .venv-litert-torch
    .venv-litert-torch/bin/pip install -r requirements-litert-torch.txt
    .venv-litert-torch/bin/python litert_torch_ptq.py --calib-dir data/imagenet-1300/part0 \\
        --data-dir data/imagenet-1300/part1
"""
import time

import numpy as np
import torch

import cli
import loading
from data import Batches
from engine import accuracy, evaluate
from errors import IntsimError
from frozen import output_integers, set_mode
from function import quantize
from tflite_io.read import import_tflite
from tflite_io.run import agreement

DRY_RUN_IMAGES = 4
PROGRESS_EVERY = 100       # images between progress lines while calibrating and scoring


def litert_torch_api():
    try:
        import litert_torch
        from litert_torch.quantize import pt2e_quantizer, quant_config
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        raise IntsimError("litert_torch_ptq.py needs litert-torch: pip install -r requirements-litert-torch.txt "
                          "(in a virtual environment of its own: it pins its own versions)") from None
    return litert_torch, pt2e_quantizer, quant_config, prepare_pt2e, convert_pt2e


def quantize_with_litert_torch(model, calib, path):
    """litert-torch's documented PT2E flow: export with a batch of 1 (its converter takes static
    shapes), observe every calibration image, convert, write the .tflite file."""
    litert_torch, pq, qc, prepare_pt2e, convert_pt2e = litert_torch_api()
    quantizer = pq.PT2EQuantizer().set_global(pq.get_symmetric_quantization_config(is_per_channel=True))
    example = (calib[:1],)
    prepared = prepare_pt2e(torch.export.export(model, example).module(), quantizer)
    with torch.no_grad():
        for i in range(len(calib)):
            prepared(calib[i:i + 1])
            if (i + 1) % PROGRESS_EVERY == 0:
                print(f"  calibrated on {i + 1} of {len(calib)} images", flush=True)
    converted = convert_pt2e(prepared, fold_quantize=False)
    edge = litert_torch.convert(converted, example, quant_config=qc.QuantConfig(pt2e_quantizer=quantizer))
    edge.export(path)


def litert_outputs(path, x, reference=True):
    """The file's output integers (N, C) on x (N, 3, H, W) reals, one image a call, and the
    file's input integers (N, 3, H, W) they came from: x quantized as its QUANTIZE would
    (function.quantize: round half away from zero of x / S, + Z). Also the output's (S, Z)."""
    from tflite_io.schema import litert
    interpreter, _ = litert()
    kind = interpreter.OpResolverType.BUILTIN_REF if reference else interpreter.OpResolverType.AUTO
    it = interpreter.Interpreter(model_path=path, experimental_op_resolver_type=kind)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    if list(inp["shape"]) != [1, *x.shape[1:]] or inp["dtype"] != np.int8 or out["dtype"] != np.int8:
        raise IntsimError(f"{path} takes {list(inp['shape'])} {inp['dtype'].__name__} and gives "
                          f"{out['dtype'].__name__}: litert-torch's int8 file of [1, {', '.join(map(str, x.shape[1:]))}] "
                          f"was expected")
    (s_in, z_in), (s_out, z_out) = inp["quantization"], out["quantization"]
    bounds = np.iinfo(np.int8)                   # x / S in float32, as LiteRT's QUANTIZE divides
    q = quantize(x, torch.tensor(s_in, dtype=torch.float32), z_in, bounds.min, bounds.max)
    integers = []
    for i in range(len(q)):
        it.set_tensor(inp["index"], q[i:i + 1].numpy().astype(np.int8))
        it.invoke()
        integers.append(torch.from_numpy(it.get_tensor(out["index"]).astype(np.int64)))
        if (i + 1) % PROGRESS_EVERY == 0:
            print(f"  LiteRT scored {i + 1} of {len(q)} images", flush=True)
    return torch.cat(integers), q, (s_out, z_out)


def intsim_on_file(path, q, batch_size):
    """litert-torch's own file imported into intsim (tflite_io.read.import_tflite) and run in
    intsim's integer path on the file's input integers q: its output integers (N, C)."""
    frozen, info = import_tflite(path)
    set_mode(frozen, "int")
    reals = info["input"].scale.double() * (q.double() - info["input"].zero_point)
    out = []
    for i in range(0, len(q), batch_size):
        out.append(output_integers(frozen, frozen(reals[i:i + batch_size])))
        print(f"  intsim ran the imported file on {i + len(out[-1])} of {len(q)} images", flush=True)
    return torch.cat(out)


def main():
    p = cli.parser(__doc__.split("\n")[0])
    cli.add_common(p)
    cli.add_imagenet(p)
    p.set_defaults(dataset="imagenet", model="efficientnet_lite0")
    p.add_argument("--export", default="runs/tflite/efficientnet_lite0_litert_torch.tflite",
                   help="where litert-torch's .tflite file goes")
    args, device = cli.start(p)
    if args.dataset != "imagenet" or args.model != "efficientnet_lite0":
        raise IntsimError("litert_torch_ptq.py compares on ImageNet with --model efficientnet_lite0")
    litert_torch_api()                             # missing: say so before loading any image
    start = time.time()
    model, _, _, (x_cal, _), (x_test, y_test) = loading.load_float_and_data(args, "cpu")
    if args.dry_run:
        x_cal, x_test, y_test = x_cal[:DRY_RUN_IMAGES], x_test[:DRY_RUN_IMAGES], y_test[:DRY_RUN_IMAGES]
        args.export = cli.trial_path(args, args.export)
    fp32 = evaluate(model, Batches(x_test, y_test, args.batch_size), "cpu")
    print(f"float32 {fp32:.2f}% on {len(y_test)} images; litert-torch PT2E on {len(x_cal)} calibration images", flush=True)
    quantize_with_litert_torch(model, x_cal, args.export)
    top1, outputs = {}, {}
    for name, reference in (("ref", True), ("default", False)):
        outputs[name], q, (s_out, z_out) = litert_outputs(args.export, x_test, reference)
        top1[name] = accuracy(s_out * (outputs[name].double() - z_out), y_test)
    print(f"litert-torch int8 in LiteRT: reference kernels {top1['ref']:.2f}%, default (XNNPACK) "
          f"{top1['default']:.2f}% (float32 {fp32:.2f}%, {top1['ref'] - fp32:+.2f})")
    same = agreement(intsim_on_file(args.export, q, args.batch_size).numpy(), outputs["ref"].numpy())
    print(f"that file imported into intsim: {same['images_identical']} of {len(q)} images give LiteRT's reference "
          f"output integers (largest difference {same['max_diff']})", flush=True)
    import litert_torch as lt
    cli.emit_result({"script": "litert_torch", "dataset": "imagenet", "model": args.model, "fp32_acc": round(fp32, 2),
                     "litert_torch_ref_acc": round(top1["ref"], 2), "litert_torch_default_acc": round(top1["default"], 2),
                     "imported_vs_litert_ref": same,
                     "calib_images": len(x_cal), "test_images": len(y_test), "tflite": args.export,
                     "litert_torch_version": getattr(lt, "__version__", "?"), "torch": torch.__version__,
                     "calib_dir": args.calib_dir, "data_dir": args.data_dir,
                     "minutes": round((time.time() - start) / 60, 1)},
                    args.result_json)


if __name__ == "__main__":
    cli.run(main)
