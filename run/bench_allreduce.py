"""Time pitmpi's all-reduce on this machine: ``train.allreduce = "ordered"``
(every number summed in rank order, the bits of ``--emulate``) against
``"mpi"`` (the MPI library's ``MPI_Allreduce``), at the sizes a run sums.

    mpiexec -n 16 python run/bench_allreduce.py [--sizes 1000 70000 2100000] [--dtype float32]

Prints, on rank 0, a Markdown table of microseconds per all-reduce (the
fastest of ``--rounds`` rounds, the two modes in turns) and their ratio.
What a run sums: data-parallel the whole net's parameters every iteration,
a layers × data grid each block's among its replicas, a shared coarse phase
the coarse model's (``report FILE.h5`` prints the bytes a run sent).  On 2
ranks both modes call ``MPI_Allreduce`` (one addition: the same bits).
"""
import argparse
import time

import numpy as np


def time_allreduce(comm, n, dtype, order, repeats):
    """Seconds per ``comm.allreduce_sum`` of ``n`` numbers of ``dtype`` with
    ``comm.allreduce_order = order``, over ``repeats`` calls (the slowest
    rank's)."""
    comm.allreduce_order = order
    buf = np.ones(n, dtype)
    comm.barrier()
    t = time.perf_counter()
    for _ in range(repeats):
        comm.allreduce_sum(buf)
        buf.fill(1)
    return max(comm.allgather((time.perf_counter() - t) / repeats))


def measure(comm, sizes, dtype, rounds=3, budget=0.2):
    """Rows ``(n, ordered s, mpi s)``: the fastest of ``rounds`` rounds,
    each mode timed in turn, with repeats sized to about ``budget``
    seconds a round."""
    rows = []
    for n in sizes:
        once = time_allreduce(comm, n, dtype, "ordered", 1)
        repeats = int(max(1, min(1000, budget / max(once, 1e-6))))
        best = {"ordered": np.inf, "mpi": np.inf}
        for _ in range(rounds):
            for order in best:
                best[order] = min(best[order], time_allreduce(comm, n, dtype, order, repeats))
        rows.append((n, best["ordered"], best["mpi"]))
    return rows


def main(argv=None, comm=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 70000, 2_100_000],
                   help="numbers per all-reduce")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if any(n < 1 for n in args.sizes) or args.rounds < 1:
        p.error("--sizes and --rounds: expected whole numbers >= 1")
    if comm is None:
        from pitmpi.parallel.comm import world_comm
        comm = world_comm()
    rows = measure(comm, args.sizes, np.dtype(args.dtype), args.rounds)
    if comm.rank == 0:
        print(f"{comm.size} ranks, {args.dtype}, µs per all-reduce (the fastest of "
              f"{args.rounds} rounds)\n")
        print("| numbers | MB | ordered | mpi | ordered / mpi |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for n, ordered, mpi in rows:
            print(f"| {n} | {n * np.dtype(args.dtype).itemsize / 1e6:.3g} | {1e6 * ordered:.1f} "
                  f"| {1e6 * mpi:.1f} | {ordered / mpi:.2f} |")
    return rows


if __name__ == "__main__":
    main()
