"""Cost model of ``pit`` and ``data-parallel``: predicted efficiency at N ranks.

Measures, on this machine and one BLAS thread:

- ``a``, ``b``: one ODE layer's forward + backward + update costs ``a + b·n``
  seconds for a batch of ``n`` samples (``a``: per-layer overhead of Python
  and small kernels, ``b``: per-sample cost), from timings at two batch sizes;
- ``c_open``, ``c_cls``: the opening and classifier layers, same form;
- ``t_msg``: one ``Sendrecv`` of an ``n × sw`` state between two ranks
  (measured with ``mpiexec -n 2`` if available, else taken as 0);
- ``t_reg``: one regression prediction + error record + pair update + refit
  at a boundary, timed after a block's layers as in a run (caches cold:
  1.5–2× ``t_reg_alone``, the same in a tight loop);

and estimates ``t_red``, one ``Allreduce`` of all parameters (data-parallel),
from their bytes at 5 GB/s (not measured).

Model, per iteration, with ``L`` layers balanced over ``N`` blocks:

    serial        T1 = L (a + b n) + open + cls
    pit           TN = max_r block_r + x t_msg + t_reg          (block_r ≈ T1 / N)
    data-parallel TD = L (a + b n / N) + open/N + cls/N + t_red

(``x`` = 1 on two ranks, whose two messages travel in one ``Sendrecv``, else
2: one ``Sendrecv`` with each neighbour, see ``PitTrainer.exchange``)

and with the coarse phase (``m`` iterations of the ``L/c``-layer model,
data-parallel over the ranks) ``C = m · [(L/c)(a + b n / N) + t_red]``, a
run of ``K`` iterations has efficiency ``K T1 / (N (C + K TN))``.

    python run/cost_model.py --layers 256 --width 16 --batch 32 --iterations 2400

prints the measured constants and the predicted efficiency for 2 … 64 ranks.
The model assumes every rank runs at the speed measured here alone;
``--slowdown S`` scales the ranks' layer time when several run at once (S
from ``run/scaling_check.py``, which compares the model's terms with what
real runs recorded, or from ``run/loadtest.sh``).
"""
import argparse
import os
import subprocess
import sys
import timeit

import numpy as np

from pitmpi import ResNet
from pitmpi.optim import SGD
from pitmpi.parallel.regression import CostateRegression, prediction_errors

PINGPONG = r"""
import sys, time, numpy as np
from mpi4py import MPI
c = MPI.COMM_WORLD
n, sw, reps = int(sys.argv[1]), int(sys.argv[2]), 2000
a, b = np.ones((n, sw)), np.empty((n, sw))
other = 1 - c.rank
for _ in range(100):
    c.Sendrecv(a, other, 0, b, other, 0)
c.Barrier()
t = time.perf_counter()
for _ in range(reps):
    c.Sendrecv(a, other, 0, b, other, 0)
if c.rank == 0:
    print((time.perf_counter() - t) / reps)
"""


def block_step(net, params, a, b, n, rng):
    """One forward + backward + update of layers ``[a, b)`` for ``n`` samples."""
    blk = net.block(a, b)
    local = blk.local_params(params)
    opt = SGD(local, 0.9)
    width = net.n_features if blk.first else net.state_width
    X = rng.standard_normal((n, width)).astype(net.dtype)
    y = rng.integers(0, net.n_classes, n)
    lam = rng.standard_normal((n, net.state_width)).astype(net.dtype) / n

    def once():
        ctx = blk.forward(local, X)
        _, grads, _ = blk.backward(local, ctx, lam_out=None if blk.last else lam,
                                   y=y if blk.last else None)
        opt.step(local, grads, 1e-6)

    return once


def seconds(fn, number=20):
    fn()
    return min(timeit.repeat(fn, number=number, repeat=5)) / number


def time_block(net, params, a, b, n, rng):
    return seconds(block_step(net, params, a, b, n, rng))


def measure(args):
    rng = np.random.default_rng(0)
    L = 16
    net = ResNet(args.scheme, args.features, args.width, L, args.classes, 1.0, "tanh",
                 1e-4, args.dtype)
    params = net.init_params(0)
    out = {}
    for n in (args.batch, 4 * args.batch):
        mid = time_block(net, params, 4, 12, n, rng) / 8
        first = time_block(net, params, 0, 4, n, rng) - 4 * mid
        last = time_block(net, params, 12, 16, n, rng) - 4 * mid
        out[n] = (mid, first, last)
    n1, n2 = args.batch, 4 * args.batch
    b = (out[n2][0] - out[n1][0]) / (n2 - n1)
    a = out[n1][0] - b * n1
    reg = CostateRegression(net.state_width, args.classes, args.features_kind)
    x = rng.standard_normal((args.batch, net.state_width))
    yy = rng.integers(0, args.classes, args.batch)
    reg.add(x, yy, x)

    def reg_once():  # what a boundary does per iteration, refit every arrival
        prediction_errors(reg.predict(x, yy), x)
        reg.add(x, yy, x)

    t_reg_alone = seconds(reg_once, 50)
    # in a run the regression follows a block's layers, which push its arrays
    # out of the caches: time it there, as the difference with the block alone
    block = block_step(net, params, 4, 12, args.batch, rng)

    def block_and_reg():
        block()
        reg_once()

    t_reg = max(seconds(block_and_reg) - seconds(block), t_reg_alone)
    flat = np.ones(sum(v.size for v in params.values()) * args.layers // L)
    t_red = 2 * flat.nbytes / 5e9  # shared-memory copy bandwidth, rough
    t_msg = 0.0
    try:
        r = subprocess.run([os.environ.get("PITMPI_MPIEXEC", "mpiexec"), "-n", "2", sys.executable,
                            "-c", PINGPONG, str(args.batch), str(net.state_width)],
                           capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        t_msg = float(r.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        print("(no mpiexec: message time taken as 0)")
    return {"a": a, "b": b, "open": out[n1][1], "cls": out[n1][2], "t_msg": t_msg,
            "t_reg": t_reg, "t_reg_alone": t_reg_alone, "t_red": t_red}


def predict(k, L, n, N, iterations, coarse_iters, factor, slowdown=1.0):
    layer = k["a"] + k["b"] * n
    T1 = L * layer + k["open"] + k["cls"]
    s = slowdown if N > 1 else 1.0
    rounds = 1 if N == 2 else 2  # Sendrecv rounds per iteration (PitTrainer.exchange)
    TN = s * T1 / N + (rounds * k["t_msg"] + k["t_reg"] if N > 1 else 0.0)
    TD = s * (L * (k["a"] + k["b"] * n / N) + (k["open"] + k["cls"]) / N) + (k["t_red"] if N > 1 else 0)
    # with one rank pit is serial: no coarse phase
    C = coarse_iters * ((L // factor) * (k["a"] + k["b"] * n / N) + k["t_red"]) if N > 1 else 0.0
    return {"T1": T1, "pit_iter": TN, "pit_eff_iter": T1 / (N * TN),
            "pit_eff_run": iterations * T1 / (N * (C + iterations * TN)),
            "dp_eff": T1 / (N * TD)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scheme", default="verlet")
    p.add_argument("--features", type=int, default=2, help="input features d")
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--features-kind", default="per-class")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--layers", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", default="float64")
    p.add_argument("--iterations", type=int, default=2400, help="fine iterations of the run")
    p.add_argument("--coarse-iterations", type=int, default=300)
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--slowdown", type=float, default=1.0,
                   help="ranks' layer time when N run at once / alone (default 1)")
    args = p.parse_args(argv)
    k = measure(args)
    print("measured (seconds): " + ", ".join(f"{n} = {v:.3g}" for n, v in k.items()))
    print(f"\nL = {args.layers}, w = {args.width}, n = {args.batch}, {args.iterations} iterations, "
          f"coarse phase {args.coarse_iterations} iterations of L/{args.factor} layers")
    print("| ranks | layers per rank | pit ms/iter | pit efficiency per iteration | "
          "pit efficiency of the run | data-parallel efficiency |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for N in (1, 2, 4, 8, 16, 32, 64):
        if args.layers // N < args.factor:
            break
        e = predict(k, args.layers, args.batch, N, args.iterations, args.coarse_iterations,
                    args.factor, args.slowdown)
        print(f"| {N} | {args.layers // N} | {1e3 * e['pit_iter']:.3f} | {e['pit_eff_iter']:.2f} "
              f"| {e['pit_eff_run']:.2f} | {e['dp_eff']:.2f} |")


if __name__ == "__main__":
    main()
