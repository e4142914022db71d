"""How much a lockstep program loses to cores whose speed wanders independently.

Every ``pit`` iteration waits for the slowest rank, so if the cores of a node
(or the virtual CPUs of a cloud machine) change speed independently of one
another, the iteration follows the slowest core of the moment, while a
one-process run follows one core.  This script keeps every core busy with the
machine probe's workload (``run/bench.py``), one process pinned to each,
records each core's pace over time, and reports, on a common grid of time
bins,

- each core's pace (µs per call of the workload: median, 10th and 90th
  percentile) and the share of bins in which it ran over 1.25× the fastest
  pace seen (a slow spell);
- the **lockstep ceiling**: mean over bins of the cores' mean pace / mean
  over bins of the slowest core's pace.  A program whose ranks do equal work
  and wait for each other every iteration reaches at most this fraction of
  the speed its ranks would have alone on an average core: an upper bound on
  its parallel efficiency on this machine, whatever the code.

    OMP_NUM_THREADS=1 python run/pace.py                     # all cores, 60 s
    OMP_NUM_THREADS=1 python run/pace.py --cores 2 --seconds 120 --bin 0.5

The bins should be longer than an iteration and shorter than the slow
spells; ``pit``'s ``regression.delay`` absorbs only jitter shorter than a
few iterations.  On a machine whose cores keep their speed the ceiling is
~1.0.
"""
import argparse
import multiprocessing
import os
import sys
import time
from queue import Empty

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import probe_workload  # noqa: E402

SLOW = 1.25  # a bin over this × the fastest pace is slow
CALLS = 500  # calls of the workload per sample (~5 ms)


def record(core, start, seconds, queue):
    """Pin to ``core``, wait for ``start`` (epoch seconds), then sample the
    workload's pace until ``start + seconds``; put ``(core, samples)`` with
    samples of shape (m, 2): the time each sample began and its µs per call."""
    os.sched_setaffinity(0, {core})
    timed = probe_workload()
    timed(CALLS)  # warm
    while time.time() < start:
        pass
    samples = []
    while time.time() < start + seconds:
        began = time.time()
        samples.append((began, timed(CALLS)))
    queue.put((core, np.array(samples)))


def binned(samples, edges):
    """Mean pace of ``samples`` (m, 2) in each bin ``[edges[i], edges[i+1])``,
    shape (len(edges) − 1,), NaN where a bin holds no sample.  The mean, not
    the median: a core taken away for a while (time stolen by the host)
    lengthens the samples it hits, and that time counts."""
    bins = len(edges) - 1
    which = np.searchsorted(edges, samples[:, 0], side="right") - 1
    inside = (which >= 0) & (which < bins)
    counts = np.bincount(which[inside], minlength=bins)
    sums = np.bincount(which[inside], weights=samples[inside, 1], minlength=bins)
    with np.errstate(invalid="ignore"):
        return sums / counts  # 0 / 0: NaN


def summarise(records, bin_seconds):
    """Per-core figures and the lockstep ceiling of ``records``, a list of
    (m, 2) sample arrays (one per core, see :func:`record`), on bins of
    ``bin_seconds`` over the time all cores were sampled.

    Returns
    -------
    dict
        ``paces`` (bins, cores): each bin's mean pace per core, bins where
        a core has no sample dropped; ``slow_share`` (cores,): share of bins
        over ``SLOW`` × the fastest pace; ``ceiling``: mean of the cores'
        mean pace / mean of the slowest core's pace; ``fastest``: the 5th
        percentile of all bins' paces.
    """
    first = max(r[0, 0] for r in records)
    last = min(r[-1, 0] for r in records)
    edges = np.arange(first, last + 1e-12, bin_seconds)
    if len(edges) < 2:
        raise ValueError(f"the cores were sampled together for {last - first:.2f} s, "
                         f"less than one bin of {bin_seconds} s: sample longer")
    paces = np.column_stack([binned(r, edges) for r in records])
    paces = paces[np.isfinite(paces).all(axis=1)]
    fastest = float(np.percentile(paces, 5))
    return {"paces": paces, "fastest": fastest,
            "slow_share": (paces > SLOW * fastest).mean(axis=0),
            "ceiling": float(paces.mean(axis=1).mean() / paces.max(axis=1).mean())}


def report(summary, bin_seconds):
    """The summary as lines of text."""
    paces = summary["paces"]
    lines = [f"{len(paces)} bins of {bin_seconds:g} s; pace = µs per call of the probe "
             f"workload (fastest seen {summary['fastest']:.2f})"]
    for core in range(paces.shape[1]):
        p10, p50, p90 = np.percentile(paces[:, core], [10, 50, 90])
        lines.append(f"core {core}: median {p50:.2f}, p10 {p10:.2f}, p90 {p90:.2f}; "
                     f"slow (over {SLOW:g}x the fastest) in {summary['slow_share'][core]:.0%} "
                     "of bins")
    if paces.shape[1] == 2:
        lines.append(f"correlation of the two cores' paces: "
                     f"{np.corrcoef(paces[:, 0], paces[:, 1])[0, 1]:.2f}")
    lines.append(f"lockstep ceiling: {summary['ceiling']:.3f} (a program whose ranks wait for "
                 "each other every iteration reaches at most this fraction of its ranks' "
                 "speed alone on an average core)")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                        help="cores to keep busy, the first N this process may use (default: all)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--bin", type=float, default=0.5, help="bin length in seconds")
    args = parser.parse_args(argv)
    allowed = sorted(os.sched_getaffinity(0))
    if not 1 <= args.cores <= len(allowed):
        parser.error(f"--cores {args.cores}: this process may use {len(allowed)} cores")
    if args.seconds <= 0 or not 0 < args.bin <= args.seconds:
        parser.error(f"--seconds {args.seconds} and --bin {args.bin}: both must be positive "
                     "and the bin no longer than the run")
    cores = allowed[:args.cores]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    start = time.time() + 1.0
    workers = [context.Process(target=record, args=(c, start, args.seconds, queue))
               for c in cores]
    for w in workers:
        w.start()
    print(f"sampling {len(cores)} cores for {args.seconds:g} s ...", flush=True)
    try:
        got = dict(queue.get(timeout=args.seconds + 60) for _ in workers)
    except Empty:
        got = None  # a worker died before reporting (its traceback is above)
    for w in workers:
        w.join(timeout=10)
    if got is None or any(w.exitcode != 0 for w in workers):
        sys.exit("pace: a sampling process failed; see its error above")
    for line in report(summarise([got[c] for c in cores], args.bin), args.bin):
        print(line)


if __name__ == "__main__":
    main()
