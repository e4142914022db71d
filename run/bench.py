"""Benchmark harness: methods × depths × repeats, medians, one BLAS thread per rank.

Runs ``python -m pitmpi train`` in subprocesses (``mpiexec -n N`` for the
parallel methods), one output file per run (a file already in the output
folder is kept and used, and said so, so an interrupted sweep continues;
``--force`` runs it again), then prints and writes a Markdown
summary (``summary.md`` in the output folder) of medians with min–max:

    python run/bench.py --config run/swissroll.toml --layers 16 32 64 128 256 \\
        --methods serial data-parallel model-parallel pit pit-1level \\
        --ranks 2 --repeats 3 --set train.epochs=10 --out results/bench-swissroll

``pit-1level`` is ``pit`` with ``coarse.levels=1``; ``pit-grid2`` (4, 8) is
``pit`` on a layers × data grid of 2 (4, 8) replicas per block (``pit`` takes
the config's grid: ``run/swissroll.toml`` caps it at 4 blocks with
``train.max_blocks``, ``--set train.max_blocks=0`` lifts the cap);
``serial-allcores`` is
``serial`` with as many BLAS threads as cores (the baseline nobody can call
starved).  The files are ordinary output files: ``python -m pitmpi report
results/bench-swissroll/*.h5 --plots DIR`` compares and plots them.

Columns of the summary: wall = training seconds (coarse phase included);
iter = ms per iteration without the coarse phase; speed-up = median serial
wall / median wall and iter-eff = serial iter / (N × iter), both against
the one-thread serial run of the same depth; "median epoch" = the same from
the median epoch's training time instead of the whole run's (an epoch of a
run that a slow spell of the machine hit does not move it; with a few epochs
only, prefer the whole-run columns); peak = largest per-rank peak resident
memory (MiB).  Before each run the harness times a fixed small NumPy loop
(the machine probe, stored in the file as ``bench_probe_us``); the summary
ends with its spread and names the runs that started in a slow spell, then
with the share of each run's epochs that took over 1.25× the run's fast
pace, naming the runs where that is half or more (their median epoch is
slow too).

With ``--seeds S1 S2 ...`` every method runs once per seed (``train.seed``)
in each repeat, and the summary adds a table of final accuracies against
serial's with the same seed (same initial weights, same batches), e.g. the
MNIST accuracy check of docs/benchmarks.md:

    python run/bench.py --config run/mnist.toml --layers 8 16 --methods serial pit \
        --seeds 0 1 2 3 4 --repeats 1 --out results/mnist-seeds

The timing table then pools the seeds' runs.  The accuracy table also
gives each seed's best accuracy and, for ``pit``, the cost model's
speed-up to serial's final accuracy of the same seed (``report --target``'s
est. speed-up; ``--bandwidth GB/S`` adds the messages each run counted).

With ``--emulate`` the parallel methods run on emulated ranks (``train
--emulate N``, threads of one process with the iterates of ``mpiexec -n
N``): an accuracy study at many ranks on a workstation, one ``--ranks``
at a time into the same folder (the serial runs are kept and reused).
Their timings mean nothing, so the timing table shows "-" for them; its
last column, the cost model's predicted speed-up of the whole run, is
there for every ``pit`` run:

    python run/bench.py --config run/swissroll.toml --layers 64 --methods serial pit \
        --ranks 8 --emulate --seeds 0 1 2 --repeats 1 --bandwidth 12.5 --out results/sr-8
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import h5py
import numpy as np

from pitmpi.errors import UserError
from pitmpi.report import SLOW_EPOCH, Network, estimated_speedup, load

METHODS = {"serial": ("serial", []), "serial-allcores": ("serial", []),
           "data-parallel": ("data-parallel", []),
           "model-parallel": ("model-parallel", ["train.max_blocks=0"]),
           "pit": ("pit", []), "pit-1level": ("pit", ["coarse.levels=1"])}
# layers x data grids: pit-gridD and model-parallel-gridD, exactly D replicas of every block
# (whatever train.max_blocks the config sets; plain pit keeps the config's)
for _d in (2, 4, 8):
    for _m in ("pit", "model-parallel"):
        METHODS[f"{_m}-grid{_d}"] = (_m, [f"train.data_parallel_size={_d}", "train.max_blocks=0"])


def probe_workload():
    """The machine probe's fixed small NumPy workload (a Swiss-roll sized
    product and ``tanh``): a function of ``calls`` that runs it that many
    times and returns the microseconds per call."""
    rng = np.random.default_rng(0)
    a, K = rng.standard_normal((32, 16)), 0.1 * rng.standard_normal((16, 16))

    def timed(calls):
        t = time.perf_counter()
        for _ in range(calls):
            np.tanh(a @ K, out=a)
        return (time.perf_counter() - t) / calls * 1e6
    return timed


def probe(chunks=7, calls=300):
    """Microseconds per call of :func:`probe_workload`, the median over
    ``chunks``: how fast the machine is right now, taken before each run so
    that a run which started in a slow spell of a shared machine can be told
    from a slower method."""
    timed = probe_workload()
    return statistics.median(timed(calls) for _ in range(chunks))


def run_one(args, name, layers, repeat, seed=None):
    method, extra = METHODS[name]
    ranks = 1 if method == "serial" else args.ranks
    seeded = "" if seed is None else f"-s{seed}"
    emulated = "e" if ranks > 1 and getattr(args, "emulate", False) else ""
    path = os.path.join(args.out, f"L{layers:04d}-{name}-n{ranks}{emulated}{seeded}-r{repeat}.h5")
    if os.path.exists(path) and not args.force:
        print(f"  {os.path.basename(path)}: kept from an earlier run (--force runs it again)",
              flush=True)
        return path
    cmd = [sys.executable, "-m", "pitmpi", "train"] + ([args.config] if args.config else [])
    cmd += ["--quiet", "--out", path, "--set", f"train.method={method}",
            "--set", f"model.layers={layers}"]
    for s in list(args.set) + extra + ([] if seed is None else [f"train.seed={seed}"]):
        cmd += ["--set", s]
    if args.scale_lr:
        cmd += ["--set", f"train.lr={args.lr * layers / args.scale_lr:g}", "--set", "train.lr_per=layer"]
    if ranks > 1 and getattr(args, "emulate", False):
        cmd += ["--emulate", str(ranks)]
    elif ranks > 1:
        cmd = [args.mpiexec, "-n", str(ranks)] + cmd
    env = dict(os.environ)
    threads = os.cpu_count() if name == "serial-allcores" else 1
    env.update(OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    speed = probe()
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
    with h5py.File(path, "a") as f:
        f.attrs["bench_probe_us"] = speed
    print(f"  {os.path.basename(path)}: {time.perf_counter() - t:.1f} s "
          f"(machine probe {speed:.2f} µs)", flush=True)
    return path


def figures(path, seed=None):
    run = load(path)
    t = run.timing
    coarse = float(np.max(t["coarse_wall"]))
    est = run.estimate()
    return {"wall": run.wall, "iter": 1e3 * (run.wall - coarse) / run.iterations,
            "epoch_iter": run.median_epoch_ms, "slow": run.slow_epoch_share,
            "probe": float(run.attrs.get("bench_probe_us", np.nan)),
            "file": os.path.basename(path), "val": 100 * float(run.history["val_acc"][-1]),
            "best": 100 * float(np.max(run.history["val_acc"])),
            "peak": float(np.max(t["rank_peak_memory"])) / 2**20, "ranks": run.ranks,
            "seed": seed, "emulated": run.emulated,
            "predicted": None if est is None else est[1] / est[0], "run": run}


def med(values, fmt="{:.2f}"):
    m = statistics.median(values)
    if len(values) == 1:
        return fmt.format(m), m
    return f"{fmt.format(m)} ({fmt.format(min(values))}–{fmt.format(max(values))})", m


def summarise(results, layers, methods):
    rows = ["| layers | method | ranks | wall s | ms/iter | speed-up | iter-eff "
            "| ms/iter, median epoch | iter-eff, median epoch | val % | peak MiB "
            "| predicted speed-up |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for L in layers:
        base = results.get((L, "serial"))
        for name in methods:
            runs = results.get((L, name))
            if not runs:
                continue
            wall_s, wall = med([r["wall"] for r in runs])
            it_s, it = med([r["iter"] for r in runs], "{:.3f}")
            ep_s, ep = med([r["epoch_iter"] for r in runs], "{:.3f}")
            val_s, _ = med([r["val"] for r in runs])
            n = runs[0]["ranks"]
            su = eff = ep_eff = "-"
            predicted = [r["predicted"] for r in runs if r.get("predicted") is not None]
            predicted = med(predicted)[0] if predicted else "-"
            if any(r.get("emulated") for r in runs):  # threads of one process: no timings
                wall_s = it_s = ep_s = "-"
            elif base:
                b_wall = statistics.median(r["wall"] for r in base)
                b_it = statistics.median(r["iter"] for r in base)
                b_ep = statistics.median(r["epoch_iter"] for r in base)
                sus = [b_wall / r["wall"] for r in runs]
                su = med(sus)[0]
                eff = f"{b_it / (n * it):.2f}"
                ep_eff = f"{b_ep / (n * ep):.2f}"
            peak = f"{statistics.median(r['peak'] for r in runs):.0f}"
            rows.append(f"| {L} | {name} | {n} | {wall_s} | {it_s} | {su} | {eff} | {ep_s} "
                        f"| {ep_eff} | {val_s} | {peak} | {predicted} |")
    return "\n".join(rows)


def accuracy_table(results, layers, methods, network=None):
    """Markdown table of each method's final accuracy per seed and its
    difference from serial's with the same seed (median over the repeats
    of that seed; the runs are deterministic, so repeats agree); then each
    seed's best accuracy and, for ``pit``, the cost model's speed-up to
    serial's final accuracy of that seed ("never" where the run does not
    reach it; with a :class:`~pitmpi.report.Network`, messages included)."""
    rows = ["| layers | method | val % per seed | val − serial's, same seed: median (min–max) "
            "| seeds within 0.3 points | best val % per seed "
            "| to serial's final accuracy, est. speed-up per seed |",
            "| ---: | --- | --- | --- | ---: | --- | --- |"]
    for L in layers:
        base_runs = results.get((L, "serial"), [])
        base = _per_seed(base_runs)
        for name in methods:
            if name == "serial" or not results.get((L, name)):
                continue
            runs = results[(L, name)]
            val = _per_seed(runs)
            shown = " ".join(f"{s}: {v:.2f}" for s, v in val.items())
            best = " ".join(f"{s}: {v:.2f}" for s, v in _per_seed(runs, "best").items())
            sooner = " ".join(f"{s}: {_sooner(runs, base_runs, s, network)}" for s in val)
            diffs = [v - base[s] for s, v in val.items() if s in base]
            if not diffs:
                rows.append(f"| {L} | {name} | {shown} | - | - | {best or '-'} | - |")
                continue
            within = sum(abs(d) <= 0.3 + 1e-9 for d in diffs)
            rows.append(f"| {L} | {name} | {shown} | {med(diffs, '{:+.2f}')[0]} "
                        f"| {within} of {len(diffs)} | {best or '-'} | {sooner} |")
    return "\n".join(rows)


def _per_seed(runs, key="val"):
    """``{seed: median of key}`` of ``runs`` (figures with a seed and ``key``)."""
    seeds = sorted({r["seed"] for r in runs if r.get("seed") is not None and key in r})
    return {s: statistics.median(r[key] for r in runs if r["seed"] == s) for s in seeds}


def _sooner(runs, base_runs, seed, network):
    """The cost model's speed-up of the first of ``runs`` with ``seed`` to
    the final accuracy of the serial run with that seed: text, "never",
    or "-" (no serial run, or no estimate: not ``pit``)."""
    run = next((r["run"] for r in runs if r["seed"] == seed and "run" in r), None)
    base = next((r["run"] for r in base_runs if r["seed"] == seed and "run" in r), None)
    if run is None or base is None or run.estimate() is None:
        return "-"
    target = float(base.history["val_acc"][-1]) - 1e-9
    if run.iterations_to(target) is None:
        return "never"
    return estimated_speedup(run, base, target, network) + "×"


SLOW_PROBE = 1.15  # a run that started with the probe this much above the fastest one is flagged


def probe_line(results):
    """One line on how fast the machine was when each run started (:func:`probe`)."""
    runs = [r for rs in results.values() for r in rs
            if np.isfinite(r["probe"]) and not r.get("emulated")]
    if not runs:
        return "machine probe: none recorded (runs from an earlier harness, or emulated ones)"
    speeds = [r["probe"] for r in runs]
    fastest = min(speeds)
    slow = sorted(r["file"] for r in runs if r["probe"] > SLOW_PROBE * fastest)
    line = (f"machine probe before each run: {fastest:.2f} / {statistics.median(speeds):.2f} / "
            f"{max(speeds):.2f} µs (min / median / max over {len(runs)} runs); ")
    if not slow:
        return line + "no run started in a slow spell"
    return (line + f"{len(slow)} started with the machine over {SLOW_PROBE:g}× slower than at its "
            f"fastest (re-run them, or read their figures with care): {', '.join(slow)}")


def slow_epochs_line(results):
    """One line on the epochs that fell into slow spells of the machine
    (:attr:`pitmpi.report.Run.slow_epoch_share`), naming the runs where they
    are half or more, whose median-epoch figures are then slow too."""
    runs = [r for rs in results.values() for r in rs
            if r.get("slow") is not None and not r.get("emulated")]
    if not runs:
        return "slow epochs: no epoch times recorded (or only emulated runs', which mean nothing)"
    shares = [r["slow"] for r in runs]
    line = (f"epochs over {SLOW_EPOCH:g}× their run's fast pace (slow spells of the machine): "
            f"{100 * statistics.median(shares):.0f} % of a run's epochs in the median run, "
            f"{100 * max(shares):.0f} % at most; ")
    bad = sorted(r["file"] for r in runs if r["slow"] >= 0.5)
    if not bad:
        return line + "no run had half of its epochs slow"
    return (line + f"{len(bad)} had half or more, so their median epoch is slow too (re-run "
            f"them): {', '.join(bad)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML config (default: the built-in default problem)")
    p.add_argument("--layers", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--methods", nargs="+", default=["serial", "data-parallel", "model-parallel", "pit"],
                   choices=list(METHODS))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", metavar="S",
                   help="run every method once per seed (train.seed) in each repeat and "
                        "compare final accuracies with serial's of the same seed")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", default="results/bench")
    p.add_argument("--mpiexec", default=os.environ.get("PITMPI_MPIEXEC", "mpiexec"))
    p.add_argument("--emulate", action="store_true",
                   help="run the parallel methods on emulated ranks (train --emulate N: "
                        "threads of one process, the iterates of mpiexec -n N) for accuracy "
                        "studies; their timings mean nothing, so the summary shows only the "
                        "cost model's predicted speed-ups for them")
    p.add_argument("--bandwidth", type=float, metavar="GB/S",
                   help="add the runs' counted messages at this bandwidth (and 2 µs a message) "
                        "to the cost model's speed-ups to serial's final accuracy (--seeds)")
    p.add_argument("--force", action="store_true", help="rerun even if a file exists")
    p.add_argument("--scale-lr", type=int, metavar="L0",
                   help="the paper's per-layer SGD (train.lr_per = layer) with learning rate "
                        "--lr × layers / L0, as earlier benchmarks ran (with T fixed, the step "
                        "h = T/L shrinks every layer's gradient by 1/L; the default per-unit-time "
                        "rate needs no scaling)")
    p.add_argument("--lr", type=float, default=0.1, help="learning rate at L0 layers (--scale-lr)")
    args = p.parse_args(argv)
    try:
        network = Network.from_options(args.bandwidth)
    except UserError as e:
        p.error(str(e))
    os.makedirs(args.out, exist_ok=True)
    results = {}
    # repeats outermost: a slow spell of the machine hits every method alike
    for repeat in range(args.repeats):
        for seed in args.seeds or [None]:
            for L in args.layers:
                for name in args.methods:
                    path = run_one(args, name, L, repeat, seed)
                    results.setdefault((L, name), []).append(figures(path, seed))
    text = summarise(results, args.layers, args.methods)
    if args.seeds:
        text += "\n\n" + accuracy_table(results, args.layers, args.methods, network)
    text += "\n\n" + probe_line(results) + "\n\n" + slow_epochs_line(results)
    head = (f"config {args.config or '(default)'}, --set {' '.join(args.set) or '-'}, "
            + (f"lr = {args.lr:g} × L / {args.scale_lr}, " if args.scale_lr else "")
            + (f"seeds {' '.join(map(str, args.seeds))}, " if args.seeds else "")
            + f"{args.ranks} {'emulated ' if args.emulate else ''}ranks, {args.repeats} "
            + "repeats, medians (min–max)"
            + (f"; messages at {args.bandwidth:g} GB/s, 2 µs" if network else "") + "\n\n")
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(head + text + "\n")
    print(head + text)


if __name__ == "__main__":
    main()
