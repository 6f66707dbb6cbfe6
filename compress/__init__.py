"""Compressed activations for backward (ActNN, Chen et al. 2021, arXiv 2104.14129), one job a module:

  pack.py      a tensor in b bits per value: per-group ranges, stochastic rounding, bit packing
  allocate.py  CompressConfig (the flags' settings) and ActNN's mixed precision (per sample, per layer)
  layers.py    conv/linear/BN/ReLU/max-pool and the fake quantizer keeping packed inputs for
               backward; compress_activations(model), saved_bytes(model, x)
"""
