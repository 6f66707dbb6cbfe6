"""Real TFLite files in intsim, one job a module:

  schema.py   the .tflite format through LiteRT's own generated object API (never a hand-written
              parser): reading a file's tensors, building one op by op
  read.py     a quantized .tflite model -> the same frozen integer ops PTQ produces (import_tflite),
              or its network dequantized into float (import_tflite_float)
  write.py    a frozen model -> a .tflite file (export_tflite)
  run.py      LiteRT runs and comparisons: run_litert_integers, export_and_check, and the inputs
              TFLite's ImageNet evaluation feeds a file

Each op's own reading and writing is in its file of ops/ (ops.OPS: TFLITE_READERS, TFLITE_WRITERS).
TFLite is NHWC, intsim NCHW: weights are transposed on import and every tensor in between is the
same integers in another layout.
"""
