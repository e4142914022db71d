#!/bin/bash
# pitmpi on Slurm: N MPI tasks, one CPU each, with automatic resubmission.
#
#   sbatch run/slurm.sh                         # uses run/mnist.toml, results/mnist.h5
#   sbatch --ntasks=8 --export=ALL,CONFIG=run/swissroll.toml,OUT=results/sr.h5 run/slurm.sh
#
# The run writes a checkpoint every CHECKPOINT_EVERY epochs.  The job stops
# training TIME_MARGIN seconds before its wall-time limit (the last checkpoint
# stays complete: files are replaced atomically) and, if the run is not
# finished, resubmits itself with --resume; at most MAX_RESUBMITS times.
#SBATCH --job-name=pitmpi
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --output=pitmpi-%j.out
#SBATCH --error=pitmpi-%j.err

set -euo pipefail
CONFIG=${CONFIG:-run/mnist.toml}
OUT=${OUT:-results/mnist.h5}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-1}
TIME_MARGIN=${TIME_MARGIN:-300}
MAX_RESUBMITS=${MAX_RESUBMITS:-10}
RESUBMIT_COUNT=${RESUBMIT_COUNT:-0}
PYTHON=${PYTHON:-python3}
EXTRA=${EXTRA:-}                    # more train arguments, e.g. "--set train.epochs=40"
# module load openmpi python   # your site's modules; mpi4py must be built against this MPI

# one BLAS thread per CPU of a task, so ranks do not oversubscribe the node
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
export OPENBLAS_NUM_THREADS=$OMP_NUM_THREADS MKL_NUM_THREADS=$OMP_NUM_THREADS

# seconds left in this allocation, minus the margin
end=$(squeue -h -j "$SLURM_JOB_ID" -o %e)
left=$(( $(date -d "$end" +%s) - $(date +%s) - TIME_MARGIN ))
if (( left < 60 )); then echo "pitmpi: less than a minute left; not starting" >&2; exit 1; fi

if [[ -f "$OUT" ]]; then
    args=(train --resume "$OUT")
else
    args=(train "$CONFIG" --out "$OUT")
fi
args+=(--set "output.checkpoint_every=$CHECKPOINT_EVERY")
read -r -a extra <<< "$EXTRA"
args+=("${extra[@]}")

status=0
timeout --signal=TERM "$left" srun --cpu-bind=cores "$PYTHON" -m pitmpi "${args[@]}" || status=$?

if (( status == 124 )); then   # stopped by the time limit: continue in a new job
    if (( RESUBMIT_COUNT < MAX_RESUBMITS )); then
        echo "pitmpi: wall-time margin reached; resubmitting with --resume $OUT" >&2
        sbatch --export=ALL,CONFIG="$CONFIG",OUT="$OUT",EXTRA="$EXTRA",RESUBMIT_COUNT=$((RESUBMIT_COUNT + 1)) "$0"
    else
        echo "pitmpi: MAX_RESUBMITS=$MAX_RESUBMITS reached; resume by hand from $OUT" >&2
    fi
    exit 0
fi
exit "$status"   # 0 done, 2 bad input, 3 diverged (last checkpoint kept), else a failure
