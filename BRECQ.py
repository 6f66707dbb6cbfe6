"""BRECQ: AdaRound's learned rounding, one residual block at a time, with a Fisher-weighted loss and
the activation step sizes learned alongside (Li et al. 2021, "BRECQ: Pushing the Limit of
Post-Training Quantization by Block Reconstruction", arXiv 2102.05426), then the same integer
inference as PTQ, QAT and AdaRound.

    python BRECQ.py --model resnet18 --w-bits 2                     # W2A32
    python BRECQ.py --model resnet18 --w-bits 4 --a-bits 4 --per-channel --first-last-bits 8

What differs from AdaRound.py (which this script runs with method BRECQ below):
  1. units, not layers (reconstruct.find_units): a residual block, found in the converted graph
     as everything between an add's immediate dominator and the add's ReLU (a ResNet BasicBlock:
     both convs and the downsample conv), is reconstructed as one; a layer outside every block
     (the stem, the classifier, each layer of cnn / cnn_bn) is its own unit, or
     --layers-per-group consecutive ones are one;
  2. the loss weights each output error by BRECQ's Fisher diagonal (sec. 3.3): the gradient of
     the KL divergence between the float and the quantized model's softmax w.r.t. the unit's
     output, |g| + 1 as BRECQ's code adds, on the model quantized up to and including the unit;
  3. with quantized activations the unit ends at its output's activation quantizer, and the
     step sizes of the unit's activation quantizers are learned in the same loop (straight-
     through rounding, Adam at --scale-lr with a cosine to 0). BRECQ's code does this in a second
     pass after all weights (5000 iterations); here one pass per unit learns both.
"""
import AdaRound
import cli

ITERS = 20000                 # per unit (BRECQ's code default)
SCALE_LR = 4e-5               # Adam lr of the activation step sizes (BRECQ's code; its cosine schedule to 0)
BRECQ = AdaRound.Method(name="brecq", label="BRECQ", iters=ITERS, blocks=True, loss="fisher", scale_lr=SCALE_LR)


def main():
    AdaRound.main(BRECQ, __doc__)


if __name__ == "__main__":
    cli.run(main)
