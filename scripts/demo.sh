#!/usr/bin/env bash
# The CPU demo (`make demo`): synth-shapes data -> SentencePiece tokenizer -> coca_tiny trained on 2 ranks
# through the deepspeed launcher with ZeRO-3 (the coca_tiny_shapes recipe: every parameter partitioned; the log line
# "ZeRO-3 partitions N/N tensors" says so) -> held-out eval (runs/demo/eval.json) -> curves
# (runs/demo/curves.png) -> a short table. docs/images/demo_curves.png (three seeds) is drawn from three such runs
# by scripts/demo_curves.py. Fails (exit 1) if the model did not learn:
# zero-shot top-1 >= MIN_ZEROSHOT and caption match >= MIN_CAPTION on held-out single-object images (chance ~0.04).
#
# Every setting below can be overridden from the environment, e.g. `STEPS=200 bash scripts/demo.sh`
# (tests/e2e/test_demo_threshold.py runs a shorter variant this way).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR=${DATA_DIR:-data/shapes}
RUN_DIR=${RUN_DIR:-runs/demo}
NPROC=${NPROC:-2}
# data
TRAIN_SAMPLES=${TRAIN_SAMPLES:-20000}
VAL_SAMPLES=${VAL_SAMPLES:-1200}
DATA_SEED=${DATA_SEED:-0}  # synth-shapes generator seed (the training seed is the recipe's: EXTRA_SETS="--set seed=N")
IMAGE_SIZE=${IMAGE_SIZE:-64}  # the data's (and, when set, the model's; coca_tiny's is 64 with patch 8)
TWO_OBJECT_FRACTION=${TWO_OBJECT_FRACTION:-0.0}  # held-out images have one object; two-object captions cost steps
VOCAB_SIZE=${VOCAB_SIZE:-128}
# training: the coca_tiny_shapes recipe (megacoca/config/recipes.py) holds every setting; any of these, when set,
# overrides it: STEPS GLOBAL_BATCH LR WARMUP LR_DECAY EVAL_EVERY DS_CONFIG POOLER_LAYOUT, and EXTRA_SETS (more
# `--set KEY=VALUE` words, e.g. "--set seed=1")
RECIPE=${RECIPE:-coca_tiny_shapes}
EXTRA_SETS=${EXTRA_SETS:-}
# pass/fail
MIN_ZEROSHOT=${MIN_ZEROSHOT:-0.50}
MIN_CAPTION=${MIN_CAPTION:-0.60}

PY=${PYTHON:-python}
# A free port for the ranks' rendezvous, so the demo never collides with another job's default 29500.
MASTER_PORT=${MASTER_PORT:-$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per rank: the ranks share the cores
# CPU ranks keep freed memory, as a GPU's caching allocator does: by default glibc hands every large block back to
# the OS on free and each step page-faults its activations in again. 5-9% more samples/s on the demo, the same losses
# bit for bit, no higher peak (docs/benchmarks.md, "The demo on an Intel Xeon box"). The same values as the planner's
# measurements (megacoca.profiling.measure.CACHING_MALLOC).
export MALLOC_MMAP_MAX_=${MALLOC_MMAP_MAX_:-0} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-100000000000}
export PYTHONUNBUFFERED=1
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

t_start=$(now)
stamp="$TRAIN_SAMPLES $VAL_SAMPLES $IMAGE_SIZE $TWO_OBJECT_FRACTION $VOCAB_SIZE $DATA_SEED"
if [[ ! -f "$DATA_DIR/.demo-stamp" || "$(cat "$DATA_DIR/.demo-stamp")" != "$stamp" ]]; then
  echo "== data: synth-shapes ($TRAIN_SAMPLES train, $VAL_SAMPLES val, ${IMAGE_SIZE}px) + tokenizer"
  rm -rf "$DATA_DIR"
  $PY -m megacoca data synth-shapes --out "$DATA_DIR" --train-samples "$TRAIN_SAMPLES" \
    --val-samples "$VAL_SAMPLES" --image-size "$IMAGE_SIZE" --two-object-fraction "$TWO_OBJECT_FRACTION" \
    --seed "$DATA_SEED"
  $PY -m megacoca tokenizer train --shards "$DATA_DIR/train" --vocab-size "$VOCAB_SIZE" --output "$DATA_DIR/tokenizer"
  echo "$stamp" > "$DATA_DIR/.demo-stamp"
else
  echo "== data: reusing $DATA_DIR"
fi
t_data=$(since "$t_start")

sets=()
[[ -n "${STEPS:-}" ]] && sets+=(--set "schedule.steps=$STEPS")
if [[ -n "${GLOBAL_BATCH:-}" ]]; then
  sets+=(--set "schedule.global_batch_size=$GLOBAL_BATCH" --set "schedule.micro_batch_size=$((GLOBAL_BATCH / NPROC))")
elif [[ "$NPROC" != 2 ]]; then
  sets+=(--set "schedule.micro_batch_size=$((128 / NPROC))")  # the recipe's 128 per step, no accumulation
fi
[[ -n "${LR:-}" ]] && sets+=(--set "optim.lr=$LR")
[[ -n "${WARMUP:-}" ]] && sets+=(--set "schedule.warmup_steps=$WARMUP")
[[ -n "${LR_DECAY:-}" ]] && sets+=(--set "schedule.decay=$LR_DECAY")
[[ -n "${EVAL_EVERY:-}" ]] && sets+=(--set "eval.every=$EVAL_EVERY")
[[ -n "${DS_CONFIG:-}" ]] && sets+=(--deepspeed-config "$DS_CONFIG")
[[ -n "${POOLER_LAYOUT:-}" ]] && sets+=(--set "model.overrides.pooler_layout=$POOLER_LAYOUT")
[[ "$IMAGE_SIZE" != 64 ]] && sets+=(--set "model.overrides.image_size=$IMAGE_SIZE")

echo "== train: recipe $RECIPE on $NPROC ranks (deepspeed launcher) ${sets[*]:-} $EXTRA_SETS"
rm -rf "$RUN_DIR"
t_train0=$(now)
# shellcheck disable=SC2086
deepspeed --num_gpus "$NPROC" --master_port "$MASTER_PORT" --module megacoca.train --recipe "$RECIPE" \
  --train-shards "$DATA_DIR/train" --val-shards "$DATA_DIR/val" --run-dir "$RUN_DIR" \
  --set data.tokenizer="$DATA_DIR/tokenizer.model" ${sets[@]+"${sets[@]}"} $EXTRA_SETS
t_train=$(since "$t_train0")

echo "== eval: held-out split $DATA_DIR/val"
t_eval0=$(now)
OMP_NUM_THREADS=$(nproc) $PY -m megacoca eval --checkpoint "$RUN_DIR/checkpoints" --shards "$DATA_DIR/val" \
  --tokenizer "$DATA_DIR/tokenizer.model" --out "$RUN_DIR/eval.json" \
  --metrics "$RUN_DIR/metrics.jsonl" --curves "$RUN_DIR/curves.png"
t_eval=$(since "$t_eval0")

$PY - "$RUN_DIR/eval.json" "$t_data" "$t_train" "$t_eval" "$MIN_ZEROSHOT" "$MIN_CAPTION" <<'PYEOF'
import json, sys

path, t_data, t_train, t_eval, min_zs, min_cap = sys.argv[1:]
results = json.load(open(path))
t_data, t_train, t_eval, min_zs, min_cap = map(float, (t_data, t_train, t_eval, min_zs, min_cap))
results["wall_times_s"] = {"data_and_tokenizer": t_data, "train": t_train, "eval": t_eval,
                           "train_plus_eval": round(t_train + t_eval, 1)}
json.dump(results, open(path, "w"), indent=1)
ok_zs = results["zeroshot_top1"] >= min_zs
ok_cap = results["caption_match"] >= min_cap
print()
print(f"{'demo result':<22}{'value':>8}{'needed':>9}")
print("-" * 39)
for label, key, need in (("zero-shot top-1", "zeroshot_top1", min_zs), ("  color right", "zeroshot_color_acc", None),
                         ("  shape right", "zeroshot_shape_acc", None), ("image->text R@1", "i2t_r1", None),
                         ("text->image R@1", "t2i_r1", None), ("caption match", "caption_match", min_cap),
                         ("  color right", "caption_color_acc", None), ("  shape right", "caption_shape_acc", None)):
    print(f"{label:<22}{results[key]:>8.3f}{'' if need is None else format(need, '>9.2f')}")
print(f"{'wall time (s)':<22}{'data':>8}{'train':>9}{'eval':>8}{'train+eval':>12}")
print(f"{'':<22}{t_data:>8.0f}{t_train:>9.0f}{t_eval:>8.0f}{t_train + t_eval:>12.0f}")
print(f"wrote {path} and {path.rsplit('/', 1)[0]}/curves.png")
print(f"figures for docs/benchmarks.md: python scripts/demo_report.py {path.rsplit('/', 1)[0]}")
print("the docs' picture (several seeds: RUN_DIR=runs/demo_sN per seed): python scripts/demo_curves.py RUN_DIR ...")
if not (ok_zs and ok_cap):
    print("DEMO FAILED: the model did not reach the learning thresholds", file=sys.stderr)
    sys.exit(1)
print("demo passed")
PYEOF
