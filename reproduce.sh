#!/usr/bin/env bash
# Re-run every experiment behind the tables of RESULTS.md and README.md, then rebuild the tables.
# Train (about 15 min per model on 2 CPU cores; ckpt/ already holds the results):
#   bash reproduce.sh train
# Quantize (PTQ about 1 min a row, QAT about 6 min a row, bench about 5 min):
#   bash reproduce.sh ptq qat bench
# Ranges and rounding (issue 4: observers ~10 min, bias ~2 min, table1 ~15 min):
#   bash reproduce.sh observers bias table1
# AdaRound (issue 5, about 40 min):
#   bash reproduce.sh adaround
# ResNet18 on Fashion-MNIST (issue 6; SKIP_TRAIN=1 starts from ckpt/) and the ImageNet agreement:
#   SKIP_TRAIN=1 bash reproduce.sh resnet18 imagenet
set -euo pipefail
cd "$(dirname "$0")"
MODELS="cnn cnn_bn"
R=results

for what in "$@"; do
  case "$what" in
    train)
      for m in $MODELS; do python train.py --model "$m" --overwrite --result-json "$R/train_fashion-mnist_$m.json"; done ;;
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
    observers)
      # Weight observers at W8A32 / W4A32 (activations float): observer x granularity x BN
      # folded or not (cnn has no BN); then activation observers at 4-bit activations.
      for m in $MODELS; do
        folds="fold"; [ "$m" = cnn_bn ] && folds="fold unfold"
        for w in 8 4; do
          for obs in "minmax" "lp 2.0" "lp 2.4" "sqnr"; do
            read -r o pp <<< "$obs"; pflag=""; tag="$o"
            if [ -n "$pp" ]; then pflag="--lp-p $pp"; tag="$o$pp"; fi
            for f in $folds; do
              fflag=""; [ "$f" = unfold ] && fflag="--unfold-bn"
              python PTQ.py --model "$m" --w-bits "$w" --a-bits 32 --w-observer "$o" $pflag $fflag \
                --result-json "$R/obs_${m}_W${w}A32_${tag}_pt_$f.json"
              python PTQ.py --model "$m" --w-bits "$w" --a-bits 32 --w-observer "$o" $pflag $fflag --per-channel \
                --result-json "$R/obs_${m}_W${w}A32_${tag}_pc_$f.json"
            done
          done
        done
        for wa in "8 4" "4 4"; do
          read -r w a <<< "$wa"
          for o in lp sqnr; do
            python PTQ.py --model "$m" --w-bits "$w" --a-bits "$a" --per-channel --a-observer "$o" \
              --result-json "$R/act_${m}_W${w}A${a}_${o}_pc.json"
          done
        done
        python PTQ.py --model "$m" --w-bits 8 --a-bits 4 --per-channel --result-json "$R/act_${m}_W8A4_minmax_pc.json"
      done ;;
    bias)
      # Bias on its own grid at the activations' bit width, against TFLite's int32 bias (the
      # int32 rows are the ptq step's per-channel rows).
      for m in $MODELS; do
        for b in 8 6 4; do
          python PTQ.py --model "$m" --w-bits "$b" --a-bits "$b" --per-channel --bias-bits "$b" \
            --result-json "$R/bias_${m}_W${b}A${b}_b${b}_pc.json"
        done
      done ;;
    adaround)
      # 10000 iterations per layer (the default) where a target is checked (W4A8, and the
      # timing of cnn_bn W4A32); 2000 elsewhere, to keep the whole step near 40 minutes.
      for m in $MODELS; do
        for g in pt pc; do
          gflag=""; [ "$g" = pc ] && gflag="--per-channel"
          python AdaRound.py --model "$m" --w-bits 4 --a-bits 8 $gflag --result-json "$R/adaround_${m}_W4A8_$g.json"
          for wa in "4 32" "3 8" "2 8"; do
            read -r w a <<< "$wa"
            iters=2000; [ "$m$w$a$g" = "cnn_bn432pt" ] && iters=10000
            python AdaRound.py --model "$m" --w-bits "$w" --a-bits "$a" $gflag --iters "$iters" \
              --result-json "$R/adaround_${m}_W${w}A${a}_$g.json"
          done
        done
      done ;;
    table1)
      python table1.py --model cnn_bn --result-json "$R/table1_cnn_bn.json" ;;
    bench)
      python bench.py --model cnn_bn --result-json "$R/bench_cnn_bn_W8A8.json" ;;
    resnet18)
      # Issue 6 on Fashion-MNIST (training ~1.7 h on 2 cores; ckpt/ holds the result; then ~2 h:
      # PTQ ~8 min a run, AdaRound ~35 min a run, Table 1 ~10 min, bench ~4 min):
      # AdaRound with 1000 iterations per layer (21 layers), Table 1 with 20 draws on 2000 test
      # images and g, H on 256 training images, to fit the CPU budget.
      [ -n "${SKIP_TRAIN:-}" ] || python train.py --model resnet18 --epochs 6 --overwrite --result-json "$R/train_fashion-mnist_resnet18.json"
      python PTQ.py --model resnet18 --per-channel --result-json "$R/ptq_resnet18_W8A8_pc.json"
      python PTQ.py --model resnet18 --w-bits 4 --a-bits 8 --per-channel --result-json "$R/ptq_resnet18_W4A8_pc.json"
      for wa in "4 8" "4 32"; do
        read -r w a <<< "$wa"
        python AdaRound.py --model resnet18 --w-bits "$w" --a-bits "$a" --per-channel --iters 1000 \
          --result-json "$R/adaround_resnet18_W${w}A${a}_pc.json"
      done
      python table1.py --model resnet18 --draws 20 --test-limit 2000 --hessian-images 256 \
        --result-json "$R/table1_resnet18.json"
      python bench.py --model resnet18 --per-channel --test-limit 2000 --train-batches 10 --result-json "$R/bench_resnet18_W8A8.json" ;;
    imagenet)
      # Integer vs fake-quant agreement on the 1,300 real ImageNet images, random weights,
      # two-fold: each half calibrates the model that scores the other (~15 min each).
      python split_images.py ../shared/data/imagenet-val-1300/val data/imagenet-1300 --parts 2
      for f in 0 1; do
        python PTQ.py --dataset imagenet --model resnet18 --weights random --per-channel --batch-size 50 \
          --calib-batches 13 --calib-dir "data/imagenet-1300/part$f" --data-dir "data/imagenet-1300/part$((1 - f))" \
          --result-json "$R/imagenet_resnet18_random_W8A8_pc_calib$f.json"
      done ;;
    zoo)
      # Issue 30: each network of zoo.py unmodified, converted, checked op by op and in LiteRT
      # (5-70 s each, ~6 min in all; needs ai-edge-litert and the split above).
      python split_images.py ../shared/data/imagenet-val-1300/val data/imagenet-1300 --parts 2
      for n in $(python zoo.py --list | cut -d' ' -f1); do
        python zoo.py --network "$n" --images data/imagenet-1300/part0 --threads 1 --result-json "$R/zoo_$n.json"
      done ;;
    *) echo "unknown step $what: use train, ptq, qat, observers, bias, table1, adaround, bench, resnet18, imagenet, zoo" >&2; exit 2 ;;
  esac
done
[ -n "${SKIP_TABLES:-}" ] || python make_tables.py
