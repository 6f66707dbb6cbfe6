#!/usr/bin/env bash
# Re-run every experiment behind the README's tables, then rebuild the tables.
# Train (about 15 min per model on 2 CPU cores; ckpt/ already holds the results):
#   bash reproduce.sh train
# Quantize (PTQ about 30 s a row, QAT about 5 min a row, bench a few minutes):
#   bash reproduce.sh ptq qat bench
set -euo pipefail
cd "$(dirname "$0")"
MODELS="cnn cnn_bn"
R=results

for what in "$@"; do
  case "$what" in
    train)
      for m in $MODELS; do python train.py --model "$m" --result-json "$R/train_fashion-mnist_$m.json"; done ;;
    ptq)
      for m in $MODELS; do
        for wa in "8 8" "6 6" "4 8" "4 4" "2 8"; do
          read -r w a <<< "$wa"
          python PTQ.py --model "$m" --w-bits "$w" --a-bits "$a" --result-json "$R/ptq_${m}_W${w}A${a}_pt.json"
          python PTQ.py --model "$m" --w-bits "$w" --a-bits "$a" --per-channel --result-json "$R/ptq_${m}_W${w}A${a}_pc.json"
        done
        python PTQ.py --model "$m" --single-rounding --result-json "$R/ptq_${m}_W8A8_pt_single.json"
        python PTQ.py --model "$m" --single-rounding --per-channel --result-json "$R/ptq_${m}_W8A8_pc_single.json"
      done
      python PTQ.py --model cnn_bn --per-layer 2000 --result-json "$R/layers_cnn_bn_W8A8_double.json"
      python PTQ.py --model cnn_bn --single-rounding --per-layer 2000 --result-json "$R/layers_cnn_bn_W8A8_single.json" ;;
    qat)
      # QAT trains the exactly rounded model, which the single-rounding kernel runs; two rows
      # with TFLite's default double rounding show what that costs at 4 bits.
      for m in $MODELS; do
        for wa in "8 8" "6 6" "4 4" "2 8"; do
          read -r w a <<< "$wa"
          python QAT.py --model "$m" --w-bits "$w" --a-bits "$a" --per-channel --single-rounding \
            --result-json "$R/qat_${m}_W${w}A${a}_pc_single.json"
        done
        python QAT.py --model "$m" --w-bits 4 --a-bits 4 --per-channel --result-json "$R/qat_${m}_W4A4_pc.json"
      done ;;
    bench)
      python bench.py --model cnn_bn --result-json "$R/bench_cnn_bn_W8A8.json" ;;
    *) echo "unknown step $what: use train, ptq, qat, bench" >&2; exit 2 ;;
  esac
done
python make_tables.py
