"""Kernel speed: one ``loss_and_grad`` against the machine's matrix-multiply rate.

    OMP_NUM_THREADS=1 python run/bench_kernels.py [--n 256 --width 64 --layers 32]
    OMP_NUM_THREADS=1 python run/bench_kernels.py --conv [--n 128 --channels 8 --layers 4]

For each scheme and dtype, times ``ResNet.loss_and_grad`` (median of repeats)
and the matrix products it performs alone (same shapes, same count), and
prints the fraction of that rate the whole call reaches.  Single BLAS thread
unless OMP_NUM_THREADS says otherwise (threadpoolctl enforces it).

``--conv`` times a convolutional net on MNIST-sized images instead (1 × 28 ×
28, the opening layer's stride ``--stride``, ``--channels`` channels, 3 × 3
kernels, flatten classifier), with its multiply-adds per second, and, where
PyTorch is importable (it is optional, never a dependency of pitmpi), the
same network's forward and backward by torch autograd on one thread.
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


def conv_macs(net, n):
    """Multiply-adds of one conv ``loss_and_grad``: the opening layer forward
    and its weight gradient, each ODE layer's maps three times a product
    (forward, co-state, weight gradient), the classifier three times."""
    per_layer = (2 if net.scheme_name == "verlet" else 1) * 3 * net.op.macs()
    return n * (2 * net.open_op.macs() + net.layers * per_layer
                + 3 * net.n_classes * net.classifier_width)


def torch_step(net, params, X, y):
    """The same network's loss and gradients by torch autograd: a callable,
    or None without torch."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    torch.set_num_threads(1)
    dt = torch.float32 if net.dtype == np.float32 else torch.float64
    P = {k: torch.tensor(v, dtype=dt, requires_grad=True) for k, v in params.items()}
    Xt = torch.tensor(X.reshape((len(X),) + net.image_shape), dtype=dt)
    yt = torch.tensor(y)
    act = torch.tanh if net.activation == "tanh" else torch.relu
    h, pad = net.h, net.kernel // 2

    def run():
        Y = act(F.conv2d(Xt, P["open.K"], P["open.b"], stride=net.stride, padding=pad))
        Z = torch.zeros_like(Y)
        for j in range(net.layers):
            K, b = P["K"][j], P["b"][j]
            if net.scheme_name == "verlet":
                Z = Z - h * act(F.conv_transpose2d(Y, K, b, padding=pad))
                Y = Y + h * act(F.conv2d(Z, K, b, padding=pad))
            else:
                Y = Y + h * act(F.conv2d(Y, K, b, padding=pad))
        S = Y.flatten(1) @ P["cls.W"].T + P["cls.b"]
        loss = F.cross_entropy(S, yt)
        for v in P.values():
            v.grad = None
        loss.backward()
        return loss
    return run


def conv_main(a):
    print(f"conv: n={a.n} images 1x28x28, opening stride {a.stride}, c={a.channels}, "
          f"L={a.layers}, 3x3, {a.threads} thread(s)")
    print("scheme  dtype    loss_and_grad [ms]  GMAC/s   torch autograd [ms]  torch / pitmpi")
    with threadpool_limits(a.threads):
        for scheme in ("euler", "verlet"):
            for dtype in ("float64", "float32"):
                net = ResNet(scheme, 784, a.channels, a.layers, 10, T=1.0, dtype=dtype,
                             kind="conv", image_shape=(1, 28, 28), stride=a.stride)
                p = net.init_params(0)
                rng = np.random.default_rng(1)
                X = rng.standard_normal((a.n, 784)).astype(net.dtype)
                y = rng.integers(0, 10, a.n)
                t_full = median_time(lambda: net.loss_and_grad(p, X, y), a.repeats)
                torch_run = torch_step(net, p, X, y)
                t_torch = median_time(torch_run, a.repeats) if torch_run else None
                rate = conv_macs(net, a.n) / t_full / 1e9
                tail = (f"{1e3 * t_torch:20.2f}  {t_torch / t_full:14.2f}" if t_torch
                        else f"{'(no torch)':>20s}  {'-':>14s}")
                print(f"{scheme:7s} {dtype:8s} {1e3 * t_full:18.2f}  {rate:6.2f}  {tail}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--features", type=int, default=2)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--conv", action="store_true", help="a convolutional net on 28 x 28 images")
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--stride", type=int, default=2)
    a = ap.parse_args()
    if a.conv:
        return conv_main(a)
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
