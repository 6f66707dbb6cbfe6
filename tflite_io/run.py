"""LiteRT runs and comparisons: a .tflite file (bytes or path) run in LiteRT's reference kernels
(BUILTIN_REF: the bit-exact claim) or its default interpreter, an exported model checked against
intsim's integer path, and the inputs TFLite's ImageNet evaluation feeds a file's input tensor."""
import numpy as np
import torch

from checkpoint import write_bytes
from data import Batches
from engine import predict
from errors import IntsimError
from frozen import output_integers, set_mode

from .read import import_tflite
from .schema import litert
from .write import export_tflite

# What TFLite's ImageNet evaluation feeds a model's input tensor, by its type, from the RGB bytes
# (tools/evaluation's AddDefaultNormalizationStep): (bytes - mean) * scale.
EVAL_NORMALIZATION = {"UINT8": (0.0, 1.0), "INT8": (128.0, 1.0), "FLOAT32": (127.5, 1.0 / 127.5)}
IMAGENET_OUTPUTS = (1000, 1001)      # ImageNet classes, with or without TF-slim's background class at 0


def imagenet_classifier(path, info):
    """(input size, background classes) of an imported model that ImageNet images can be fed to
    and scored on: a square 3-channel input and 1000 or 1001 outputs; otherwise one line naming
    what the file takes, before any image is loaded."""
    shape, out = info["input_shape"], info["output_shape"]
    if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
        raise IntsimError(f"{path} takes inputs of shape {list(shape)} (NHWC): intsim feeds it ImageNet images, "
                          f"which need a square RGB input [1, H, H, 3]; score this model on its own data set")
    if out[-1] not in IMAGENET_OUTPUTS:
        raise IntsimError(f"{path} has {out[-1]} outputs: not an ImageNet classifier (1000 or 1001), so its "
                          f"predictions cannot be scored against ImageNet labels")
    return shape[1], out[-1] - IMAGENET_OUTPUTS[0]


def model_input(images, input_type):
    """RGB bytes (N, 3, H, W) uint8 as TFLite's evaluation feeds an input tensor of `input_type`:
    the bytes (UINT8), bytes - 128 (INT8), (bytes - 127.5) / 127.5 in float32 (FLOAT32)."""
    if input_type not in EVAL_NORMALIZATION:
        raise IntsimError(f"the model's input is {input_type}: intsim feeds images to UINT8, INT8 or FLOAT32 inputs")
    mean, scale = EVAL_NORMALIZATION[input_type]
    if input_type == "UINT8":
        return images
    if input_type == "INT8":
        return (images.to(torch.int16) - int(mean)).to(torch.int8)
    return (images.float() - mean) * torch.tensor(scale, dtype=torch.float32)


def input_reals(images, info):
    """What the imported model (Quantize first) takes for those images: the reals S (q - Z) of
    an integer input, in float64 (exact), or a float input as it is (the model's own QUANTIZE,
    imported as intsim's Quantize, rounds it as LiteRT's reference QUANTIZE does, in float32)."""
    x = model_input(images, info["input_type"])
    if x.is_floating_point():
        return x
    return info["input"].scale.double() * (x.double() - info["input"].zero_point)


def run_litert_integers(model, images_nhwc, tensor, reference=True, batch_size=100):
    """The integers of `tensor` (N, ...) for NHWC inputs (in the model's input type), the model
    given as bytes or a path: LiteRT's reference kernels (BUILTIN_REF, the bit-exact claim) or
    its default interpreter (XNNPACK). A model with a fixed batch (a RESHAPE to [1, C]) needs
    batch_size=1. Inner tensors are preserved: without that LiteRT may overwrite `tensor`."""
    interpreter, _ = litert()
    kind = interpreter.OpResolverType.BUILTIN_REF if reference else interpreter.OpResolverType.AUTO
    source = {"model_content": model} if isinstance(model, bytes) else {"model_path": model}
    it = interpreter.Interpreter(**source, experimental_op_resolver_type=kind, experimental_preserve_all_tensors=True)
    index, out, shape = it.get_input_details()[0]["index"], [], None
    for i in range(0, len(images_nhwc), batch_size):
        chunk = np.ascontiguousarray(images_nhwc[i:i + batch_size])
        if chunk.shape != shape:                       # a new batch size: resize once, not per call
            it.resize_tensor_input(index, list(chunk.shape))
            it.allocate_tensors()
            shape = chunk.shape
        it.set_tensor(index, chunk)
        it.invoke()
        out.append(it.get_tensor(tensor).astype(np.int64))
    return np.concatenate(out)


def agreement(a, b):
    """How two runs' output integers (N, ...) compare: images identical in every integer, the
    largest difference, the share of integers that differ (%)."""
    diff = np.abs(np.asarray(a, dtype=np.int64) - np.asarray(b, dtype=np.int64)).reshape(len(a), -1)
    return {"images_identical": int((diff.max(1) == 0).sum()), "max_diff": int(diff.max()),
            "diff_share": round(100.0 * float((diff > 0).mean()), 4)}


def export_and_check(frozen, path, scheme, images, device, batch_size=256):
    """Write the frozen model as a .tflite file (validated by LiteRT, then atomically) and run it
    in LiteRT's reference kernels on `images` (NCHW reals): its output integers against intsim's
    integer path, and against intsim's integer path of the file read back (import_tflite, whose
    ops follow TFLite's Prepare: the float32 scale product of per-tensor layers, the double
    rescale of FULLY_CONNECTED)."""
    data, tensor, offset = export_tflite(frozen.cpu(), scheme, images[:1].cpu())
    write_bytes(path, data)
    frozen.to(device)
    ref = run_litert_integers(data, images.permute(0, 2, 3, 1).contiguous().numpy(), tensor)
    ref = ref.transpose(0, 3, 1, 2) if ref.ndim == 4 else ref          # NHWC -> intsim's NCHW
    batches = Batches(images, torch.zeros(len(images), dtype=torch.int64), batch_size)
    mine = output_integers(set_mode(frozen, "int"), predict(frozen, batches, device)).numpy() + offset
    back, _ = import_tflite(path)
    again = output_integers(set_mode(back, "int"), predict(back.to(device), batches, device)).numpy()
    return {"tflite": path, "tflite_scheme": scheme, "tflite_images": len(images),
            "tflite_vs_intsim": agreement(mine, ref), "tflite_vs_reimported": agreement(again, ref)}
