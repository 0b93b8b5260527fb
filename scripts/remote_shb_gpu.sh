#!/usr/bin/env bash
# Fine-tune the whole DeepCount on ShanghaiTech B on a lent GPU machine that takes files in
# small loads and keeps them between calls while it stays warm (docs/RESULTS.md, "The whole
# network fine-tuned on a GPU", says how each call was made and what it gave).
# Run from the repository root there, one verb per call (prepare runs here, before them):
#
#   scripts/remote_shb_gpu.sh prepare       here: the three loads under .gpu/ (ignored), each
#                                           under 64 MiB with the tree once the bundled model is
#                                           moved out of it for the calls: a = the start weights
#                                           (deepcount remote start default) + wheels
#                                           + the first 3.6 MiB of training data, b = the rest of
#                                           the training data, c = the test data
#   scripts/remote_shb_gpu.sh stage DIR     unpack DIR/data/chunk-*.tar (deepcount remote
#                                           pack) under $STAGE/data, hash-checked; copy DIR/start.*
#                                           (the whole-network start weights); install DIR/whl/*.whl
#   scripts/remote_shb_gpu.sh probe SECS    train on what is staged for SECS seconds -> $STAGE/rate
#                                           (optimizer steps a second, start-up included)
#   scripts/remote_shb_gpu.sh train SECS    train configs/shb_gpu.yaml for about SECS seconds
#                                           (max_steps from the rate, 10 validations), then the
#                                           best weights' backbone and branch 4 as float16 shards
#                                           under 15 MiB in $OUT (joined here: deepcount remote join)
#   scripts/remote_shb_gpu.sh test DIR      stage DIR (the test chunks), evaluate the trained run
#                                           on the ShanghaiTech B test set (pad and features
#                                           tilings, backbone and every branch) -> $OUT
set -euo pipefail
# NAME: the run's name (default shb-gpu); STAGE: where loads are unpacked there (default /root/stage);
# EXTRA: more --section.key overrides for probe and train (a second cycle: --model.init FILE
# --recipe.lr ...; a CPU rehearsal: --trainer.accelerator cpu ...)
STAGE=${STAGE:-/root/stage}
NAME=${NAME:-shb-gpu}
OUT=${OUT:-$STAGE/out}
DATA_HERE=${DEEPCOUNT_DATA:-../shared/data}  # prepare's source (the remote's data is $STAGE/data)
export PYTHONPATH=$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH} DEEPCOUNT_DATA=$STAGE/data PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
[ "${1:-}" = prepare ] || mkdir -p "$STAGE/data" "$OUT"

stage() {
  local dir=$1
  if compgen -G "$dir/whl/*.whl" >/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$dir"/whl/*.whl
  fi
  if [ -f "$dir/start.safetensors" ]; then cp "$dir"/start.safetensors "$dir"/start.json "$STAGE/"; fi
  if [ -f "$dir/data/manifest.json" ]; then
    $py -m deepcount.cli remote unpack "$dir/data/manifest.json" "$STAGE/data" "$dir"/data/chunk-*.tar
  fi
}

hms() { printf '00:%02d:%02d:%02d' $(($1 / 3600)) $(($1 % 3600 / 60)) $(($1 % 60)); }

case "${1:-}" in
prepare)
  rm -rf .gpu/a .gpu/b .gpu/c .gpu/pack && mkdir -p .gpu/a/whl .gpu/b/data .gpu/c
  shb=$DATA_HERE/ShanghaiTech/part_B_final
  $py -m deepcount.cli remote start default .gpu/a/start.safetensors
  $py -m pip download -q --no-deps -d .gpu/a/whl jsonargparse==4.53.0 docstring-parser==0.18.0
  $py -m deepcount.cli remote pack "$shb/../.." .gpu/pack "$shb/train_data" --chunk-mb 3.6
  mkdir -p .gpu/a/data && mv .gpu/pack/chunk-000.tar .gpu/a/data/ && cp .gpu/pack/manifest.json .gpu/a/data/
  mv .gpu/pack/* .gpu/b/data/ && rmdir .gpu/pack
  $py -m deepcount.cli remote pack "$shb/../.." .gpu/c/data "$shb/test_data" --chunk-mb 15
  du -sh .gpu/a .gpu/b .gpu/c
  exit 0
  ;;
stage)
  stage "$2"
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
  $py -c "import torch, lightning, jsonargparse; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'lightning', lightning.__version__)"
  ;;
probe)
  secs=$2
  rm -rf "$STAGE/runs/probe"
  $py -m deepcount.cli train --config configs/shb_gpu.yaml --model.init "$STAGE/start.safetensors" \
    --name probe --out "$STAGE/runs" --data.val_fraction 0 --trainer.max_steps 100000 \
    --trainer.val_check_interval 100000 --trainer.checkpoint_every_n_steps 100000 \
    --trainer.max_time "$(hms "$secs")" --trainer.progress_bar false ${EXTRA:-} 2>&1 | tee "$OUT/probe.log"
  steps=$(grep -o '"step": [0-9]*' "$OUT/probe.log" | tail -1 | grep -o '[0-9]*$')
  $py -c "print(round($steps / $secs, 3))" | tee "$STAGE/rate"
  ;;
train)
  secs=$2
  rate=$(cat "$STAGE/rate")
  # 10 validations, max_steps a multiple of their interval (a multiple of 50 steps)
  read -r steps every < <($py -c "n = max(500, int($rate * $secs * 0.9)); e = max(50, n // 10 // 50 * 50); print(10 * e, e)")
  echo "rate $rate steps/s -> max_steps $steps, validating every $every" | tee "$OUT/train.log"
  set +e
  timeout $((secs + 120)) $py -m deepcount.cli train --config configs/shb_gpu.yaml --model.init "$STAGE/start.safetensors" \
    --name "$NAME" --out "$STAGE/runs" --trainer.max_steps "$steps" --trainer.val_check_interval "$every" \
    --trainer.checkpoint_every_n_steps "$steps" --trainer.max_time "$(hms $((secs + 60)))" \
    --trainer.log_every_n_steps 50 ${EXTRA:-} 2>&1 | grep -v '^Epoch\|^Validation' | tee -a "$OUT/train.log"
  set -e
  run=$STAGE/runs/$NAME
  cat "$run"/csv/version_0/metrics.csv >> "$OUT/train.log" 2>/dev/null || true
  if [ -f "$run/$NAME.safetensors" ]; then  # the backbone and branch 4 (training.slim_weights), as shards
    $py -c "import sys; from deepcount.training import slim_weights; slim_weights(*sys.argv[1:3], [4], dtype=__import__('torch').float32)" \
      "$run/$NAME.safetensors" "$run/$NAME-b4.safetensors"
    $py -m deepcount.cli remote shards "$run/$NAME-b4.safetensors" "$OUT" --name "$NAME" --max-mb 15 --sidecar "$run/$NAME-b4.json"
  else  # stopped before the export: the best checkpoint, as it is
    $py -m deepcount.cli remote shards "$run/checkpoints/best.ckpt" "$OUT" --name "$NAME-best-ckpt" --max-mb 15
  fi
  ;;
test)
  stage "$2"
  for tiling in pad features; do
    $py -m deepcount.cli evaluate --model "$STAGE/runs/$NAME/$NAME.safetensors" --dataset shb --split test \
      --tiling $tiling --device "${DEVICE:-cuda}" --out "$STAGE/eval/shb_test_$tiling" -q ${TEST_LIMIT:+--limit $TEST_LIMIT}
    cp "$STAGE/eval/shb_test_$tiling/evaluation.json" "$OUT/shb_test_$tiling.json"
  done
  ;;
*)
  sed -n '2,20p' "$0"; exit 2
  ;;
esac
