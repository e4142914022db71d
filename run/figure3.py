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
    mse, rel = {}, {}
    for levels in (1, 2):
        path = os.path.join(args.out, f"L{args.layers}-levels{levels}.h5")
        cmd = [args.mpiexec, "-n", str(args.ranks), sys.executable, "-m", "pitmpi", "train",
               "run/swissroll.toml", "--quiet", "--out", path, "--set", "train.method=pit",
               "--set", f"model.layers={args.layers}", "--set", f"train.epochs={args.epochs}",
               "--set", f"coarse.levels={levels}"]
        for s in args.set:
            cmd += ["--set", s]
        if not os.path.exists(path):
            subprocess.run(cmd, check=True, env=env)
        with h5py.File(path) as f:
            mse[levels] = f["history/regression_mse"][:, 0]
            rel[levels] = f["history/regression_rel"][:, 0]
    print(f"co-state regression at boundary 1, Swiss roll, Verlet, L = {args.layers}, "
          f"{args.ranks} ranks: MSE of per-sample co-states and ‖Λ̂ − Λ‖/‖Λ̂‖ "
          "(inf: the empty single-level regression predicts 0)")
    print("| iteration | MSE single-level | MSE two-level | ratio | rel single | rel two |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    n = len(mse[1])
    rows = [(k, k + 1, str(k)) for k in (1, 2, 3, 5, 10) if k < n]
    rows += [(a, b, f"{a}–{b - 1} (median)") for a, b in ((1, 20), (n - 20, n)) if b <= n]
    for a, b, name in rows:
        one, two = np.nanmedian(mse[1][a:b]), np.nanmedian(mse[2][a:b])
        r1, r2 = np.nanmedian(rel[1][a:b]), np.nanmedian(rel[2][a:b])
        print(f"| {name} | {one:.3g} | {two:.3g} | {one / two:.1f} | {r1:.3g} | {r2:.3g} |")


if __name__ == "__main__":
    main()
