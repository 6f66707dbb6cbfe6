#!/usr/bin/env bash
# Re-run every experiment behind the README's tables, then rebuild the tables.
# Train (about 15 min per model on 2 CPU cores; ckpt/ already holds the results):
#   bash reproduce.sh train
# Quantize (PTQ about 1 min a row, QAT about 6 min a row, bench about 5 min):
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
      # Train with the default (double-rounding) kernel, then evaluate the same saved model with
      # the single-rounding kernel (QAT training does not depend on the kernel; only the
      # integer evaluation does). W4A4 also with 8-bit logits (--out-bits 8).
      for m in $MODELS; do
        for spec in "8 8 -" "6 6 -" "4 4 -" "4 4 8" "2 8 -"; do
          read -r w a o <<< "$spec"
          if [ "$o" = "-" ]; then extra=""; sfx=""; else extra="--out-bits $o"; sfx="_out$o"; fi
          python QAT.py --model "$m" --w-bits "$w" --a-bits "$a" --per-channel $extra \
            --result-json "$R/qat_${m}_W${w}A${a}${sfx}_pc.json"
          python QAT.py --model "$m" --w-bits "$w" --a-bits "$a" --per-channel $extra --single-rounding \
            --eval "runs/qat/fashion-mnist_${m}_W${w}A${a}${sfx}_pc.pt" --result-json "$R/qat_${m}_W${w}A${a}${sfx}_pc_single.json"
        done
      done ;;
    bench)
      python bench.py --model cnn_bn --result-json "$R/bench_cnn_bn_W8A8.json" ;;
    *) echo "unknown step $what: use train, ptq, qat, bench" >&2; exit 2 ;;
  esac
done
python make_tables.py
