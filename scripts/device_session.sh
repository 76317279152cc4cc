#!/usr/bin/env bash
# One short GPU session's work for the open benchmark issues, most valuable first, every step
# resumable: run it from the repository root on a machine with a GPU, with OUT set to the folder
# that comes back (the device tool's $OUT) and DATA to a Fashion-MNIST folder.
#
#   OUT=<output folder> DATA=<fashion-mnist folder> bash scripts/device_session.sh
#   TINY=1 OUT=/tmp/rehearsal DATA=<fashion-mnist folder> bash scripts/device_session.sh  # CPU
#
# The runs live in WORK (default: a folder under /tmp), seeded from the committed
# benchmark-state/; WORK is packed into OUT as five archives beside the logs (the device tool
# brings back at most 8 files of 16 MiB, two folders down), every minute and at the end:
# parts-1.tar.gz (ours, ours-trades), parts-2.tar.gz (baselines, gdmp), parts-3.tar.gz (the
# unseen classifiers and the clean cost), whole.tar.gz (the merged run and its page, without the adversarial
# examples it merged from the parts) and trades.tar.gz (the TRADES run). Unpack the parts into
# benchmark-state/ (tar xzf OUT/parts-1.tar.gz -C benchmark-state) and the TRADES run into
# training-state/ to go on here or on the CPU. Each step has a time budget in seconds
# (BUDGET_PARTS, BUDGET_WHOLE, BUDGET_TRADES; 0 skips a step) and is cut there, keeping what it
# stored. TINY=1 runs the same steps at a size a CPU finishes in minutes, to check the script
# before spending device time; its figures mean nothing.
#
# 1. The re-published benchmark's rows (issues 22 and 23): scripts/benchmark_parts.sh with all
#    eight parts at once (apgd-eot primary 20 x EOT 8, sanity checks, the headline; R = 10, the
#    first 256 test images), then, when all have finished, the whole run that writes the page.
# 2. The TRADES front (issue 23 item 3): TRADES at beta 3, the bundled recipe otherwise (beta 1
#    finished on the CPU: training-state/trades-beta1). It needs the training images in DATA.
set -u
: "${OUT:?set OUT to the output folder}" "${DATA:?set DATA to a Fashion-MNIST folder}"
WORK=${WORK:-/tmp/purifyguard-device}
mkdir -p "$OUT" "$WORK"
if [ -n "${TINY:-}" ]; then
    TRADES_STEPS=4; VALIDATION=16
    BUDGET_PARTS=${BUDGET_PARTS:-900}; BUDGET_WHOLE=${BUDGET_WHOLE:-600}
    BUDGET_TRADES=${BUDGET_TRADES:-120}
else
    TRADES_STEPS=6000; VALIDATION=1000
    BUDGET_PARTS=${BUDGET_PARTS:-360}; BUDGET_WHOLE=${BUDGET_WHOLE:-100}
    BUDGET_TRADES=${BUDGET_TRADES:-0}
fi
pack() {  # pack: WORK's folders into OUT's archives, each through a temporary name
    local name folders present
    for name in parts-1 parts-2 parts-3 whole trades; do
        case $name in
            parts-1) folders="fashion-mnist-ours fashion-mnist-ours-trades" ;;
            parts-2) folders="fashion-mnist-baselines fashion-mnist-gdmp" ;;
            parts-3) folders="fashion-mnist-mobilenetv3 fashion-mnist-vit fashion-mnist-regnet
                     fashion-mnist-clean-cost" ;;
            whole) folders="fashion-mnist-whole benchmarks.md" ;;
            trades) folders="trades-beta3" ;;
        esac
        # shellcheck disable=SC2086  # the folder names split on purpose
        present=$(cd "$WORK" && ls -d $folders 2> /dev/null)
        [ -n "$present" ] || continue
        # shellcheck disable=SC2086
        (cd "$WORK" && tar czf "$OUT/$name.partial" --exclude=fashion-mnist-whole/adversarial \
            $present ./*.log 2> /dev/null) && mv "$OUT/$name.partial" "$OUT/$name.tar.gz"
        rm -f "$OUT/$name.partial"
    done
    cp "$WORK"/benchmark.log "$WORK"/parts-status.txt "$OUT/" 2> /dev/null
}
packer() {  # pack every PACK_EVERY seconds (default 60) until WORK/.stop appears
    while true; do
        for _ in $(seq $(( ${PACK_EVERY:-60} / 5 ))); do
            sleep 5; [ -e "$WORK/.stop" ] && return
        done
        pack
    done
}
rm -f "$WORK/.stop"
packer &
PACKER=$!
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=utilization.gpu,memory.used \
    --format=csv -l 20 > "$WORK/gpu.log" 2>&1 &

# 1. the benchmark rows: the CPU's parts (the same settings, so the state of either goes on on
#    the other), seeded from the committed benchmark-state/ once (not at TINY's other settings)
[ -n "${TINY:-}" ] || for part in benchmark-state/fashion-mnist-*/; do
    [ -d "$part" ] || continue
    [ -d "$WORK/$(basename "$part")" ] || cp -r "$part" "$WORK/"
done
if [ "$BUDGET_PARTS" -gt 0 ]; then
    PARALLEL=1 BUDGET=$BUDGET_PARTS STATE=$WORK bash scripts/benchmark_parts.sh \
        > "$WORK/benchmark.log" 2>&1
    finished=$(grep -cE ': exit 0|finished before' "$WORK/benchmark.log")
    echo "benchmark parts: $finished of 8 finished"
    python scripts/benchmark_parts_status.py "$WORK" > "$WORK/parts-status.txt" 2>&1
fi
if [ "$BUDGET_WHOLE" -gt 0 ]; then
    BUDGET=$BUDGET_WHOLE STATE=$WORK DOCS=$WORK/benchmarks.md bash scripts/benchmark_parts.sh \
        whole >> "$WORK/benchmark.log" 2>&1
    tail -1 "$WORK/benchmark.log"
fi

# 2. the TRADES front: beta 3 (the bundled TRADES recipe, another beta; beta 1 is finished)
if [ "$BUDGET_TRADES" -gt 0 ]; then
    BETA=3
    RUN=$WORK/trades-beta$BETA
    [ -d "$RUN" ] || [ ! -d "training-state/trades-beta$BETA" ] \
        || cp -r "training-state/trades-beta$BETA" "$RUN"
    timeout "$BUDGET_TRADES" purifyguard train guidance --data-root "$DATA" --model resnet18 \
        --model-kwargs '{"channels": [16, 32, 64, 128], "output_stride": 8}' --augment \
        --eps 0.1 --beta "$BETA" --pgd-steps 10 --steps "$TRADES_STEPS" --batch-size 128 \
        --lr 0.1 --seed 0 --validation-size 5000 --validation-seed 0 \
        --validation-images "$VALIDATION" --validation-attack-steps 10 --checkpoint-every 200 \
        --log-every 50 --no-progress --resume --output-dir "$RUN" \
        > "$WORK/trades-beta$BETA.log" 2>&1
    echo "trades beta $BETA: exit $? (124: cut at its budget, resumable)"
fi

# what comes back: the archives of WORK, and the logs to read at once
touch "$WORK/.stop"; wait "$PACKER"; pkill -f 'nvidia-smi --query-gpu' 2> /dev/null
pack
echo "packed: $(cd "$OUT" && du -h ./*.tar.gz | tr '\n' ' ')"
