"""The paper's Figure 3: co-state regression error of single- vs two-level ``pit``.

Runs ``pit`` on 2 ranks for the Swiss roll (Verlet, 512 layers by default)
with ``coarse.levels = 1`` (regression starts empty) and ``= 2`` (seeded by
the coarse phase), then prints the regression MSE over the first iterations:

    python run/figure3.py --layers 512 --epochs 3 --out results/figure3

``python -m pitmpi report results/figure3/*.h5 --plots DIR`` draws the curves
(``regression_mse.png``).
"""
import argparse
import os
import subprocess
import sys

import h5py
import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=512)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", default="results/figure3")
    p.add_argument("--mpiexec", default=os.environ.get("PITMPI_MPIEXEC", "mpiexec"))
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    mse = {}
    for levels in (1, 2):
        path = os.path.join(args.out, f"L{args.layers}-levels{levels}.h5")
        cmd = [args.mpiexec, "-n", str(args.ranks), sys.executable, "-m", "pitmpi", "train",
               "run/swissroll.toml", "--quiet", "--out", path, "--set", "train.method=pit",
               "--set", f"model.layers={args.layers}", "--set", f"train.epochs={args.epochs}",
               "--set", f"coarse.levels={levels}"]
        for s in args.set:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True, env=env)
        with h5py.File(path) as f:
            mse[levels] = f["history/regression_mse"][:, 0]
    print(f"regression MSE of per-sample co-states, boundary 1, Swiss roll, Verlet, "
          f"L = {args.layers}, {args.ranks} ranks")
    print("| iterations | single-level | two-level | ratio |")
    print("| --- | ---: | ---: | ---: |")
    n = len(mse[1])
    for a, b in ((1, 5), (1, 10), (1, 20), (1, 50), (n - 20, n)):
        if b > n:
            continue
        one, two = np.nanmedian(mse[1][a:b]), np.nanmedian(mse[2][a:b])
        print(f"| {a}–{b - 1} (median) | {one:.3g} | {two:.3g} | {one / two:.1f} |")


if __name__ == "__main__":
    main()
