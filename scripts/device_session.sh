#!/usr/bin/env bash
# One short GPU session's work for the open benchmark issues, most valuable first, every step
# resumable: run it from the repository root on a machine with a GPU, with OUT set to a folder
# that outlives the call (the device tool's $OUT) and DATA to a Fashion-MNIST folder.
#
#   OUT=<output folder> DATA=<fashion-mnist folder> bash scripts/device_session.sh
#   TINY=1 OUT=/tmp/rehearsal DATA=<fashion-mnist folder> bash scripts/device_session.sh  # CPU
#
# STATE (default: OUT) holds the folders of earlier sessions to resume from: copy a returned
# $OUT there (or its fashion-mnist-* parts into benchmark-state/, which seeds any part STATE
# lacks) and pass STATE=<that folder>. Each step has a time budget (seconds; BUDGET_HEADLINE,
# BUDGET_WHOLE, BUDGET_TRADES) and is cut there; what it stored comes back and the next session
# goes on. TINY=1 runs the same steps at a size a CPU finishes in minutes,
# to check the script before spending device time; its figures mean nothing.
#
# 1. The re-published benchmark's rows (issues 22 and 23): scripts/benchmark_parts.sh, the seven
#    parts the CPU runs too (apgd-eot primary 20 x EOT 8, sanity checks, the headline; R = 10, the
#    first 256 test images), then, when all have finished, the whole run that writes the page.
# 2. The TRADES front (issue 23 item 3): TRADES at beta 3, the bundled recipe otherwise (beta 1
#    finished on the CPU: training-state/trades-beta1).
set -u
: "${OUT:?set OUT to the output folder}" "${DATA:?set DATA to a Fashion-MNIST folder}"
STATE=${STATE:-$OUT}
mkdir -p "$OUT"
if [ -n "${TINY:-}" ]; then
    TRADES_STEPS=4; VALIDATION=16
    BUDGET_HEADLINE=${BUDGET_HEADLINE:-900}; BUDGET_WHOLE=${BUDGET_WHOLE:-600}
    BUDGET_TRADES=${BUDGET_TRADES:-120}
else
    TRADES_STEPS=6000; VALIDATION=1000
    BUDGET_HEADLINE=${BUDGET_HEADLINE:-300}; BUDGET_WHOLE=${BUDGET_WHOLE:-120}
    BUDGET_TRADES=${BUDGET_TRADES:-150}
fi

resume_into() {  # resume_into NAME: the run folder OUT/NAME, seeded from STATE/NAME once
    if [ "$STATE" != "$OUT" ] && [ -d "$STATE/$1" ] && [ ! -d "$OUT/$1" ]; then
        cp -r "$STATE/$1" "$OUT/$1"
    fi
    echo "$OUT/$1"
}

# 1. the benchmark rows: the CPU's parts (scripts/benchmark_parts.sh, the same settings, so the
#    state of either goes on on the other), seeded from the committed benchmark-state/ once
for part in benchmark-state/fashion-mnist-*/; do
    [ -d "$part" ] || continue
    name=$(basename "$part")
    [ -d "$OUT/$name" ] || cp -r "$STATE/$name" "$OUT/$name" 2>/dev/null \
        || cp -r "$part" "$OUT/$name"
done
BUDGET=$BUDGET_HEADLINE STATE=$OUT bash scripts/benchmark_parts.sh > "$OUT/benchmark.log" 2>&1
echo "benchmark parts: $(grep -c ': exit 0' "$OUT/benchmark.log") of 7 ran to the end"
BUDGET=$BUDGET_WHOLE STATE=$OUT DOCS=$OUT/benchmarks.md bash scripts/benchmark_parts.sh whole \
    >> "$OUT/benchmark.log" 2>&1
tail -1 "$OUT/benchmark.log"

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
