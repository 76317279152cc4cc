#!/usr/bin/env bash
# One short GPU session's work for the open benchmark issues, most valuable first, every step
# resumable: run it from the repository root on a machine with a GPU, with OUT set to a folder
# that outlives the call (the device tool's $OUT) and DATA to a Fashion-MNIST folder.
#
#   OUT=<output folder> DATA=<fashion-mnist folder> bash scripts/device_session.sh
#   TINY=1 OUT=/tmp/rehearsal DATA=<fashion-mnist folder> bash scripts/device_session.sh  # CPU
#
# STATE (default: OUT) holds the folders of earlier sessions to resume from: copy a returned
# $OUT there (or into benchmark-state/) and pass STATE=<that folder>. Each step has a time
# budget (seconds; BUDGET_HEADLINE, BUDGET_TRADES) and is cut there; what it stored comes back
# and the next session goes on. TINY=1 runs the same steps at a size a CPU finishes in minutes,
# to check the script before spending device time; its figures mean nothing.
#
# 1. The re-published benchmark's rows (issues 22 and 23): benchmarks/fashion_mnist.py with the
#    headline (apgd-eot primary, EOT 8 with EOT 2 beside, R = 10) on the first 256 test images.
# 2. The TRADES front (issue 23 item 3): TRADES at beta 3, the bundled recipe otherwise (beta 1
#    finished on the CPU: training-state/trades-beta1).
set -u
: "${OUT:?set OUT to the output folder}" "${DATA:?set DATA to a Fashion-MNIST folder}"
STATE=${STATE:-$OUT}
mkdir -p "$OUT"
if [ -n "${TINY:-}" ]; then
    N=4; RUNS=2; STEPS=1; AA_STEPS=1; EOT=1; BATCH=4; TRADES_STEPS=4; VALIDATION=16
    BUDGET_HEADLINE=${BUDGET_HEADLINE:-600}; BUDGET_TRADES=${BUDGET_TRADES:-120}
else
    N=256; RUNS=10; STEPS=20; AA_STEPS=10; EOT=8; BATCH=256; TRADES_STEPS=6000; VALIDATION=1000
    BUDGET_HEADLINE=${BUDGET_HEADLINE:-300}; BUDGET_TRADES=${BUDGET_TRADES:-150}
fi

resume_into() {  # resume_into NAME: the run folder OUT/NAME, seeded from STATE/NAME once
    if [ "$STATE" != "$OUT" ] && [ -d "$STATE/$1" ] && [ ! -d "$OUT/$1" ]; then
        cp -r "$STATE/$1" "$OUT/$1"
    fi
    echo "$OUT/$1"
}

# 1. the benchmark rows: ours first, then the defences it is compared with
BENCHMARK=$(resume_into benchmark-fashion-mnist)
timeout "$BUDGET_HEADLINE" python benchmarks/fashion_mnist.py --data-root "$DATA" --n "$N" \
    --runs "$RUNS" --primary apgd-eot --attacks primary --pgd-steps "$STEPS" \
    --aa-steps "$AA_STEPS" --eot "$EOT" --batch-size "$BATCH" \
    --defences ours trades undefended diffpure --output-dir "$BENCHMARK" \
    --docs "$OUT/benchmarks.md" > "$OUT/benchmark.log" 2>&1
echo "benchmark: exit $? (124: cut at its budget, resumable)"

# 2. the TRADES front: beta 3 (the bundled TRADES recipe, another beta; beta 1 is finished)
BETA=3
RUN=$(resume_into "trades-beta$BETA")
timeout "$BUDGET_TRADES" purifyguard train guidance --data-root "$DATA" --model resnet18 \
    --model-kwargs '{"channels": [16, 32, 64, 128], "output_stride": 8}' --augment \
    --eps 0.1 --beta "$BETA" --pgd-steps 10 --steps "$TRADES_STEPS" --batch-size 128 \
    --lr 0.1 --seed 0 --validation-size 5000 --validation-seed 0 \
    --validation-images "$VALIDATION" --validation-attack-steps 10 --checkpoint-every 200 \
    --log-every 50 --no-progress --resume --output-dir "$RUN" > "$OUT/trades-beta$BETA.log" 2>&1
echo "trades beta $BETA: exit $? (124: cut at its budget, resumable)"
