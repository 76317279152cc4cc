#!/usr/bin/env bash
# The re-published Fashion-MNIST benchmark (issues 22 and 23) on a CPU, in parts that outlive a
# working session: two queues of parts run side by side (one process and one torch thread each,
# for a 2-core machine), every part resumable, stored in benchmark-state/fashion-mnist-<part>.
# Run it from the repository root; stop it whenever the session ends (each part loses at most
# its current batch) and commit benchmark-state/; the next session reruns the same command.
#
#   DATA=<fashion-mnist folder> bash scripts/benchmark_parts.sh          # go on with the parts
#   DATA=<fashion-mnist folder> bash scripts/benchmark_parts.sh whole    # when all are done
#   TINY=1 STATE=/tmp/parts DATA=<fashion-mnist folder> bash scripts/benchmark_parts.sh  # rehearse
#   python scripts/benchmark_parts_status.py        # where each part stands (runs beside them)
#
# DOCS=<file> writes the page of `whole` elsewhere than docs/benchmarks.md.
# BUDGET=<seconds> stops every part at that deadline (timeout; what they stored is kept), so a
# session can leave itself time to commit: BUDGET=7200 for two hours.
# PARALLEL=1 runs all eight parts at once (one process each), for a GPU machine with the cores.
# A part with a benchmark.json has finished and is skipped; REJUDGE=1 runs it again (it attacks
# nothing again and its headline returns its stored verdict: it rewrites its report).
# Each part runs its defences' primary attack, sanity checks and headline; the part clean-cost
# measures the clean cost on the 10,000 test images alone (--clean-only, about 2 CPU-hours).
# `whole` merges the parts (purifyguard merge) into $STATE/fashion-mnist-whole, copies in the
# clean cost stored so far and runs the full benchmark there with every defence: it attacks
# nothing again, finishes the clean cost, adds the fronts, and writes docs/benchmarks.md.
# TINY=1 runs the same steps at a size a CPU finishes in minutes; its figures mean nothing.
set -u
: "${DATA:?set DATA to a Fashion-MNIST folder}"
STATE=${STATE:-benchmark-state}
if [ -n "${TINY:-}" ]; then
    SIZE=(--n 4 --plug-in-n 2 --runs 2 --pgd-steps 1 --aa-steps 1 --eot 1 --batch-size 2
          --sanity-n 2)
    CLEAN_N=8
    FINAL=(--clean-n "$CLEAN_N" --docs "$STATE/benchmarks.md")
else
    # the sanity checks on 16 images: on 32 they take over 2 CPU-hours for each purifier; the
    # plug-in rows (ours in front of the TRADES classifier and of the unseen classifiers, and
    # those alone) on the first 128 images, as issue 22 allows for the rows beyond the six
    SIZE=(--n 256 --plug-in-n 128 --runs 10 --pgd-steps 20 --aa-steps 10 --eot 8 --batch-size 32
          --sanity-n 16)
    CLEAN_N=10000
    FINAL=(--clean-n "$CLEAN_N" --docs "${DOCS:-docs/benchmarks.md}")
fi
COMMON=(--data-root "$DATA" "${SIZE[@]}" --primary apgd-eot --attacks primary --seed 0
        --sanity --threads 1 --fronts benchmarks/results/fronts-fashion-mnist.json)
UNSEEN_STATE=training-state
UNSEEN=("mobilenetv3=$UNSEEN_STATE/unseen-mobilenetv3/final"
        "vit=$UNSEEN_STATE/unseen-vit/final" "regnet=$UNSEEN_STATE/unseen-regnet/final")
declare -A PARTS=(
    [ours]="--defences ours"
    [baselines]="--defences trades undefended diffpure"
    [gdmp]="--defences gdmp"
    [ours-trades]="--defences ours-trades-classifier"
    [mobilenetv3]="--defences --unseen mobilenetv3=$UNSEEN_STATE/unseen-mobilenetv3/final"
    [vit]="--defences --unseen vit=$UNSEEN_STATE/unseen-vit/final"
    [regnet]="--defences --unseen regnet=$UNSEEN_STATE/unseen-regnet/final"
    [clean-cost]="--defences undefended ours --unseen ${UNSEEN[*]} --clean-n $CLEAN_N --clean-only"
)
# ours' headline is the longest part left: vit moved to the second queue to even them out
QUEUE_1=(ours ours-trades clean-cost)
QUEUE_2=(baselines gdmp mobilenetv3 regnet vit)

DEADLINE=$(( $(date +%s) + ${BUDGET:-31536000} ))

run_part() {  # run_part NAME: the benchmark with that part's defences, into its own folder
    local folder="$STATE/fashion-mnist-$1" left=$(( DEADLINE - $(date +%s) ))
    if [ -f "$folder/benchmark.json" ] && [ -z "${REJUDGE:-}" ]; then
        echo "part $1: finished before (REJUDGE=1 rewrites its report)"; return
    fi
    [ "$left" -gt 0 ] || { echo "part $1: not started (BUDGET spent)"; return; }
    # shellcheck disable=SC2086  # the part's options split on purpose
    timeout "$left" python benchmarks/fashion_mnist.py "${COMMON[@]}" ${PARTS[$1]} \
        --output-dir "$folder" --docs "$STATE/fashion-mnist-$1.md" \
        >> "$STATE/fashion-mnist-$1.log" 2>&1
    stopped "part $1" $?
}

stopped() {  # stopped WHAT STATUS: say how WHAT ended
    if [ "$2" = 124 ]; then echo "$1: stopped at the BUDGET deadline (resumable)"
    else echo "$1: exit $2"; fi
}

run_queue() {  # each part in turn
    for part in "$@"; do run_part "$part"; done
}

mkdir -p "$STATE"
if [ "${1:-parts}" = whole ]; then
    folders=()
    for part in "${!PARTS[@]}"; do
        [ "$part" = clean-cost ] && continue  # no attack: its folder is copied in below
        [ -f "$STATE/fashion-mnist-$part/benchmark.json" ] \
            || { echo "part $part has not finished: run the parts first"; exit 1; }
        folders+=("$STATE/fashion-mnist-$part")
    done
    purifyguard merge "${folders[@]}" --into "$STATE/fashion-mnist-whole" || exit 1
    if [ -d "$STATE/fashion-mnist-clean-cost/clean-cost" ]; then
        cp -r "$STATE/fashion-mnist-clean-cost/clean-cost" "$STATE/fashion-mnist-whole/"
    fi
    timeout $(( DEADLINE - $(date +%s) )) python benchmarks/fashion_mnist.py "${COMMON[@]}" \
        "${FINAL[@]}" \
        --defences ours undefended trades diffpure gdmp ours-trades-classifier \
        --unseen "${UNSEEN[@]}" \
        --output-dir "$STATE/fashion-mnist-whole" > "$STATE/fashion-mnist-whole.log" 2>&1
    stopped "whole (log: $STATE/fashion-mnist-whole.log)" $?
elif [ -n "${PARALLEL:-}" ]; then
    for part in "${!PARTS[@]}"; do run_part "$part" & done
    wait
else
    run_queue "${QUEUE_1[@]}" &
    run_queue "${QUEUE_2[@]}" &
    wait
fi
