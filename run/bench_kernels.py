"""Kernel speed: one ``loss_and_grad`` against the machine's matrix-multiply rate.

    OMP_NUM_THREADS=1 python run/bench_kernels.py [--n 256 --width 64 --layers 32]

For each scheme and dtype, times ``ResNet.loss_and_grad`` (median of repeats)
and the matrix products it performs alone (same shapes, same count), and
prints the fraction of that rate the whole call reaches.  Single BLAS thread
unless OMP_NUM_THREADS says otherwise (threadpoolctl enforces it).
"""
import argparse
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits

from pitmpi import ResNet


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_only(n, d, w, L, c, scheme, dtype):
    """The products of one forward+adjoint sweep, with the kernels' shapes."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, d)).astype(dtype)
    Y = rng.standard_normal((n, w)).astype(dtype)
    K = rng.standard_normal((w, w)).astype(dtype)
    Ko = rng.standard_normal((w, d)).astype(dtype)
    out, gk = np.empty((n, w), dtype), np.empty((w, w), dtype)
    per_layer = 6 if scheme == "verlet" else 3  # forward 2|1, adjoint 4|2 (incl. gradient)

    def run():
        Y0 = X @ Ko.T
        _ = Y0.T @ X
        for _ in range(L):
            for i in range(per_layer):
                if i % 3 == 2:
                    np.matmul(Y.T, Y, out=gk)
                else:
                    np.matmul(Y, K, out=out)
    flops = 2 * n * d * w * 2 + L * per_layer * 2 * n * w * w
    return run, flops


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--features", type=int, default=2)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    print(f"n={a.n} w={a.width} L={a.layers} d={a.features} c={a.classes}, {a.threads} BLAS thread(s)")
    print("scheme  dtype    loss_and_grad [ms]  matmuls alone [ms]  GFLOP/s (matmul)  fraction")
    with threadpool_limits(a.threads):
        for scheme in ("euler", "verlet"):
            for dtype in ("float64", "float32"):
                net = ResNet(scheme, a.features, a.width, a.layers, a.classes, T=1.0, dtype=dtype)
                p = net.init_params(0)
                rng = np.random.default_rng(1)
                X = rng.standard_normal((a.n, a.features)).astype(net.dtype)
                y = rng.integers(0, a.classes, a.n)
                t_full = median_time(lambda: net.loss_and_grad(p, X, y), a.repeats)
                run, flops = matmul_only(a.n, a.features, a.width, a.layers, a.classes, scheme, net.dtype)
                t_mm = median_time(run, a.repeats)
                print(f"{scheme:7s} {dtype:8s} {1e3 * t_full:18.2f}  {1e3 * t_mm:18.2f}  "
                      f"{flops / t_mm / 1e9:16.1f}  {t_mm / t_full:8.2f}")


if __name__ == "__main__":
    main()
