#!/usr/bin/env bash
# Node load test: how fast is one core when k cores are busy?
#
#   run/loadtest.sh OUTDIR                 # k = 1 2 4 8 16 copies of a serial run at once
#   COPIES="1 2" LAYERS=64 EPOCHS=10 run/loadtest.sh OUTDIR
#
# Runs k independent one-thread serial trainings at the same time and prints
# each k's per-iteration times (min / median / max over the copies).  On a node
# whose cores keep their speed under load the times stay flat; shared physical
# cores (SMT), a lower all-core clock or a busy host show as a rise with k, and
# cap every method's parallel efficiency at (time at k = 1) / (time at k = N).
set -euo pipefail
out=${1:?usage: run/loadtest.sh OUTDIR}
copies=${COPIES:-1 2 4 8 16}
layers=${LAYERS:-256}
epochs=${EPOCHS:-30}
config=${CONFIG:-run/swissroll.toml}
py=${PYTHON:-python3}
mkdir -p "$out"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
for k in $copies; do
    for i in $(seq "$k"); do
        "$py" -m pitmpi train "$config" --quiet --set train.method=serial \
            --set "model.layers=$layers" --set "train.epochs=$epochs" \
            --out "$out/k$k-$i.h5" &
    done
    wait
done
"$py" - "$out" $copies <<'PY'
import glob, statistics, sys
from pitmpi.report import load
out, copies = sys.argv[1], sys.argv[2:]
print("| busy cores k | ms/iter min | median | max | median / median at k = 1 |")
print("| ---: | ---: | ---: | ---: | ---: |")
base = None
for k in copies:
    t = [1e3 * r.wall / r.iterations for r in map(load, glob.glob(f"{out}/k{k}-*.h5"))]
    m = statistics.median(t)
    base = base or m
    print(f"| {k} | {min(t):.3f} | {m:.3f} | {max(t):.3f} | {m / base:.2f} |")
PY
