#!/bin/bash
# pitmpi on PBS Pro / Torque: N MPI ranks, one CPU each, with automatic resubmission.
#
#   qsub run/pbs.sh
#   qsub -l select=4:ncpus=1:mpiprocs=1 -v CONFIG=run/swissroll.toml,OUT=results/sr.h5 run/pbs.sh
#
# Checkpoints every CHECKPOINT_EVERY epochs; stops WALLTIME - TIME_MARGIN
# seconds into the job and resubmits itself with --resume if not finished.
#PBS -N pitmpi
#PBS -l select=2:ncpus=1:mpiprocs=1
#PBS -l walltime=01:00:00
#PBS -o pitmpi.out
#PBS -e pitmpi.err

set -euo pipefail
cd "${PBS_O_WORKDIR:-.}"
CONFIG=${CONFIG:-run/mnist.toml}
OUT=${OUT:-results/mnist.h5}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-1}
WALLTIME=${WALLTIME:-3600}          # keep equal to -l walltime, in seconds
TIME_MARGIN=${TIME_MARGIN:-300}
MAX_RESUBMITS=${MAX_RESUBMITS:-10}
RESUBMIT_COUNT=${RESUBMIT_COUNT:-0}
PYTHON=${PYTHON:-python3}
EXTRA=${EXTRA:-}                    # more train arguments, e.g. "--set train.epochs=40"
# module load openmpi python   # your site's modules; mpi4py must be built against this MPI

NP=$(wc -l < "${PBS_NODEFILE:-/dev/null}" || echo 2)
(( NP > 0 )) || NP=2
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1

if [[ -f "$OUT" ]]; then
    args=(train --resume "$OUT")
else
    args=(train "$CONFIG" --out "$OUT")
fi
args+=(--set "output.checkpoint_every=$CHECKPOINT_EVERY")
read -r -a extra <<< "$EXTRA"
args+=("${extra[@]}")

status=0
timeout --signal=TERM $((WALLTIME - TIME_MARGIN)) mpiexec -n "$NP" "$PYTHON" -m pitmpi "${args[@]}" || status=$?

if (( status == 124 )); then
    if (( RESUBMIT_COUNT < MAX_RESUBMITS )); then
        echo "pitmpi: wall-time margin reached; resubmitting with --resume $OUT" >&2
        qsub -v CONFIG="$CONFIG",OUT="$OUT",EXTRA="$EXTRA",RESUBMIT_COUNT=$((RESUBMIT_COUNT + 1)) "$0"
    else
        echo "pitmpi: MAX_RESUBMITS=$MAX_RESUBMITS reached; resume by hand from $OUT" >&2
    fi
    exit 0
fi
exit "$status"   # 0 done, 2 bad input, 3 diverged (last checkpoint kept), else a failure
