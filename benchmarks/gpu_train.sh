#!/usr/bin/env bash
# Continue training BOTH bundled models (four-modality `default` and `flair`) on one GPU, at the
# same time, from their bundled weights, on freshly synthesised cases (generator v2, seed 100;
# calibration 2000 and test 1000 stay held out).
#
# Writes exactly six files:
#   $OUT/default/{model.safetensors,spec.json,train_log.jsonl}
#   $OUT/flair/{model.safetensors,spec.json,train_log.jsonl}
#
#   bash benchmarks/gpu_train.sh                                   # GPU: ~70 s synthesis + 270 s
#   DEVICE=cpu TRAIN_SECONDS=20 CASES=4 SYNTH_SECONDS=120 OUT=/tmp/o bash benchmarks/gpu_train.sh
#
# Settings (environment): TRAIN_SECONDS (270) training wall clock per model; CASES (192) cases
# planned; SYNTH_SECONDS (70) synthesis deadline (cases finished by then are used); WORKERS
# (nproc) synthesis processes; BATCH (256); LR (3e-4); WARMUP (200); DEVICE (cuda); SEED (100);
# VOXEL (1.0 mm); EVAL_SECONDS (100; 0 = no evaluation) and EVAL_Z_STRIDE (2) for the
# evaluation after training (tables on stdout only). The package is used from $PYTHONPATH
# (src/ if unset); nothing is installed.
# SIGTERM/SIGINT stop both runs, which save their EMA weights first; the files are still copied.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-$PWD/src}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
OUT="${OUT:?set OUT to the output folder}"
TRAIN_SECONDS="${TRAIN_SECONDS:-270}"
CASES="${CASES:-192}"
SYNTH_SECONDS="${SYNTH_SECONDS:-70}"
WORKERS="${WORKERS:-$(nproc)}"
BATCH="${BATCH:-256}"
LR="${LR:-3e-4}"
WARMUP="${WARMUP:-200}"
DEVICE="${DEVICE:-cuda}"
SEED="${SEED:-100}"
VOXEL="${VOXEL:-1.0}"
EVAL_SECONDS="${EVAL_SECONDS:-100}"
EVAL_Z_STRIDE="${EVAL_Z_STRIDE:-2}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_train.XXXXXX")"
echo "gpu_train: work $WORK, out $OUT, device $DEVICE, $TRAIN_SECONDS s, batch $BATCH, lr $LR"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

t0=$(date +%s)
"$PY" benchmarks/synth_slices.py "$WORK" --cases "$CASES" --seed "$SEED" --workers "$WORKERS" \
    --seconds "$SYNTH_SECONDS" --voxel-size "$VOXEL" \
    --model default:flair,t1,t1ce,t2 --model flair:flair || exit 1
echo "gpu_train: synthesis took $(( $(date +%s) - t0 )) s"

# Held-out cases for the evaluation after training (calibration seed 2000, test seed 1000: the
# cases `whatishealthy synth` makes with those seeds), made on spare cores while the GPU trains.
if [ "$EVAL_SECONDS" != "0" ]; then
    ( "$PY" benchmarks/synth_slices.py "$WORK/eval/calib" --eval-cases --cases 8 --seed 2000 \
          --workers $(( WORKERS > 6 ? WORKERS / 2 - 2 : 1 )) --seconds 200 --voxel-size "$VOXEL"
      "$PY" benchmarks/synth_slices.py "$WORK/eval/test" --eval-cases --cases 16 --seed 1000 \
          --workers $(( WORKERS > 6 ? WORKERS / 2 - 2 : 1 )) --seconds 200 --voxel-size "$VOXEL"
    ) > "$WORK/eval_synth.log" 2>&1 &
    eval_synth=$!
fi

minutes=$("$PY" -c "print($TRAIN_SECONDS / 60)")
pids=()
train_one() {  # name, modalities
    OMP_NUM_THREADS=4 "$PY" -m napari_whatishealthy train "$WORK/data" --out "$WORK/$1" \
        --init-from "$1" --modalities "$2" --steps 1000000 --batch "$BATCH" --lr "$LR" \
        --warmup "$WARMUP" --label-dropout 0.2 --ema-decay 0.999 --device "$DEVICE" \
        --time-limit "$minutes" --log-every 100 --val-every 500 --checkpoint-every 1000000 \
        --seed "$SEED" --name "$1" --no-progress > >(sed -u "s/^/[$1] /") 2>&1 &
    pids+=($!)  # the python process itself (output prefixed through a process substitution)
}
stop() { echo "gpu_train: stopping (the runs save first)"; kill -TERM "${pids[@]}" 2>/dev/null; }
trap stop TERM INT
train_one default flair,t1,t1ce,t2
train_one flair flair
wait "${pids[@]}"
wait "${pids[@]}" 2>/dev/null  # a trapped signal interrupts the first wait

status=0
for name in default flair; do
    mkdir -p "$OUT/$name"
    for f in checkpoint/model.safetensors checkpoint/spec.json train_log.jsonl; do
        if [ -f "$WORK/$name/$f" ]; then cp "$WORK/$name/$f" "$OUT/$name/"; else echo "gpu_train: missing $name/$f"; status=1; fi
    done
done
ls -l "$OUT"/default "$OUT"/flair
echo "gpu_train: training done in $(( $(date +%s) - t0 )) s"

# Evaluation (printed to stdout only): the bundled and the new weights of both models on the
# held-out cases, every option of benchmarks/score_options.py, thresholds from the calibration
# cases applied to the test cases, the FLAIR baseline beside. EVAL_SECONDS=0 skips it.
if [ "$EVAL_SECONDS" != "0" ]; then
    wait "$eval_synth"; cat "$WORK/eval_synth.log"
    half=$("$PY" -c "print(int($EVAL_SECONDS) * 2 // 5)")
    rest=$("$PY" -c "print(int($EVAL_SECONDS) - int($EVAL_SECONDS) * 2 // 5 - 10)")
    evals=()
    for model in default flair "$WORK/default/checkpoint" "$WORK/flair/checkpoint"; do
        tag=$(echo "$model" | sed "s#$WORK/##; s#/checkpoint#-new#")
        ( OMP_NUM_THREADS=2 "$PY" benchmarks/score_options.py "$WORK/eval/calib" --model "$model" \
              --device "$DEVICE" --z-stride "$EVAL_Z_STRIDE" --cache "$WORK/cache-$tag" \
              --write-thresholds "$WORK/thr-$tag.json" --seconds "$half" > "$WORK/eval-$tag-calib.txt" 2>&1
          OMP_NUM_THREADS=2 "$PY" benchmarks/score_options.py "$WORK/eval/test" --model "$model" \
              --device "$DEVICE" --z-stride "$EVAL_Z_STRIDE" --cache "$WORK/cache-$tag" \
              --thresholds "$WORK/thr-$tag.json" --seconds "$rest" > "$WORK/eval-$tag-test.txt" 2>&1
        ) &
        evals+=($!)
    done
    wait "${evals[@]}"
    for f in "$WORK"/eval-*-calib.txt "$WORK"/eval-*-test.txt; do
        echo; echo "=== $(basename "$f" .txt) ==="; grep -v "^# " "$f" || true; grep "^# .*budget" "$f" || true
    done
fi
echo "gpu_train: done in $(( $(date +%s) - t0 )) s"
exit $status
