#!/usr/bin/env bash
# Strong-scaling check of the cost model at several rank counts (one node).
#
#   run/scaling.sh OUTDIR                       # Swiss roll, L = 64 and 256, 2 4 8 16 ranks
#   LAYERS="256 512" RANKS="4 8" EPOCHS=50 REPEATS=2 METHODS="serial pit" run/scaling.sh OUTDIR
#   METHODS="serial data-parallel pit pit-grid2 pit-grid4" run/scaling.sh OUTDIR   # layers x data grids
#   SETS="train.allreduce=mpi" run/scaling.sh OUTDIR   # more config settings for every run
#
# For each depth it writes the cost model's prediction from constants measured
# on this node (cost_model-L*.md), then runs serial (1 rank), data-parallel
# and pit at each rank count with one BLAS thread per rank (run/bench.py) and
# keeps each rank count's summary (summary-nN.md).  Compare the model's "pit
# efficiency per iteration" with the summaries' iter-eff column.  First it
# records the lockstep ceiling of each rank count's cores (run/pace.py,
# pace-nN.txt, PACE_SECONDS each; 0 skips): how much any method whose ranks
# wait for each other loses to cores that change speed independently.  Needs
# as many cores as the largest rank count.  From 4 blocks on, pit takes the
# config's [many_blocks] values (relayed co-states, more coarse levels:
# docs/configuration.md), and run/swissroll.toml caps pit at 4 blocks
# (train.max_blocks: 8 ranks run 4 x 2, 16 ranks 4 x 4), which cost_model.py
# does not model: compare those runs with the critical path that `report`
# prints for each (pit-per-rank.md).
set -euo pipefail
out=${1:?usage: run/scaling.sh OUTDIR}
layers=${LAYERS:-64 256}
ranks=${RANKS:-2 4 8 16}
epochs=${EPOCHS:-50}
repeats=${REPEATS:-2}
config=${CONFIG:-run/swissroll.toml}
methods=${METHODS:-serial data-parallel pit}
coarse=${COARSE_ITERATIONS:-600}
pace_seconds=${PACE_SECONDS:-30}
iters_per_epoch=${ITERS_PER_EPOCH:-16}   # Swiss roll: 512 samples / batch 32
py=${PYTHON:-python3}
sets=()
for kv in ${SETS:-}; do sets+=(--set "$kv"); done
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1

if [ "$pace_seconds" != 0 ]; then
    for N in $ranks; do
        "$py" "$here/pace.py" --cores "$N" --seconds "$pace_seconds" --bin 0.05 | tee "$out/pace-n$N.txt"
    done
fi
for L in $layers; do
    "$py" "$here/cost_model.py" --layers "$L" --iterations $((epochs * iters_per_epoch)) \
        --coarse-iterations "$coarse" | tee "$out/cost_model-L$L.md"
done
for N in $ranks; do
    "$py" "$here/bench.py" --config "$config" --layers $layers \
        --methods $methods --ranks "$N" --repeats "$repeats" \
        --scale-lr 32 --set "train.epochs=$epochs" ${sets[@]+"${sets[@]}"} --out "$out"
    cp "$out/summary.md" "$out/summary-n$N.md"
done
shopt -s nullglob  # METHODS without pit: no per-rank report
for f in "$out"/L*-pit-n*-r0.h5; do
    echo "## $(basename "$f")"
    "$py" -m pitmpi report "$f"
done > "$out/pit-per-rank.md"
