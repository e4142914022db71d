"""Where a pit run's per-iteration time goes, against the cost model's terms.

    python run/scaling_check.py SERIAL.h5 PIT.h5 [PIT.h5 ...]

For each pit output file (any number of ranks; the serial file of the same
depth and batch size gives ``T1``) it prints, from the per-rank timings the
run recorded:

- ``ms/iter`` and ``iter-eff`` (serial ms/iter / (N × pit ms/iter));
- ``regression``: the co-state regression's in-run cost per iteration
  (mean over the ranks that have one), the model's ``t_reg``;
- ``compute / share``: each rank's computing time per iteration over its
  share of serial's, ``T1 · L_r / L`` (1.00: its layers run as fast as in
  the serial run; mean and max over the ranks);
- ``slowest busy``: the largest per-rank compute + regression per iteration
  and its share of the iteration (the rest is waiting on neighbours);
- ``model, in-run inputs``: the efficiency the cost model gives with these
  measured inputs, ``T1 / (N (s̄ T1 / N + t_reg))`` (``s̄``: the mean
  compute / share).

``run/cost_model.py`` predicts from constants measured in isolation; this
script says which of its assumptions a real run on the same machine broke.
"""
import argparse
import sys

import numpy as np

from pitmpi.errors import UserError
from pitmpi.report import load


def figures(path):
    run = load(path)
    t, n = run.timing, run.iterations
    out = {"path": path, "method": run.method, "ranks": run.ranks, "iters": n,
           "ms": 1e3 * (run.wall - float(np.max(t["coarse_wall"]))) / n,
           "compute": 1e3 * np.asarray(t["rank_compute"]) / n,
           "regression": 1e3 * np.asarray(t["rank_regression"]) / n}
    if "partition" in run.extra:
        part = np.asarray(run.extra["partition"])
        out["layers"] = part[:, 1] - part[:, 0]
        out["L"] = int(part[-1, 1])
    return out


def check(serial, pit):
    """One row of the table (a dict of strings) for ``pit`` against ``serial``."""
    N, T1, L = pit["ranks"], serial["ms"], pit["L"]
    share = T1 * pit["layers"] / L
    ratio = pit["compute"] / share
    busy = pit["compute"] + pit["regression"]
    t_reg = float(np.mean(pit["regression"][:-1])) if N > 1 else 0.0
    model = T1 / (N * (float(np.mean(ratio)) * T1 / N + t_reg))
    return {"ranks": f"{N}", "layers per rank": f"{L / N:g}", "ms/iter": f"{pit['ms']:.3f}",
            "iter-eff": f"{T1 / (N * pit['ms']):.2f}", "regression ms": f"{t_reg:.3f}",
            "compute / share (mean, max)": f"{np.mean(ratio):.2f}, {np.max(ratio):.2f}",
            "slowest busy ms (share)": f"{np.max(busy):.3f} ({np.max(busy) / pit['ms']:.2f})",
            "model, in-run inputs": f"{model:.2f}"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("serial", help="output file of the serial run (1 rank)")
    p.add_argument("pit", nargs="+", help="output files of pit runs")
    args = p.parse_args(argv)
    try:
        serial = figures(args.serial)
        pits = [figures(path) for path in args.pit]
    except UserError as e:
        sys.exit(str(e))
    if serial["method"] != "serial":
        sys.exit(f"{args.serial}: method {serial['method']!r}, expected 'serial'")
    rows = []
    for pit in pits:
        if pit["method"] != "pit" or "layers" not in pit:
            sys.exit(f"{pit['path']}: method {pit['method']!r}, expected 'pit'")
        rows.append(check(serial, pit))
    print(f"serial: {serial['ms']:.3f} ms/iter ({args.serial})\n")
    head = list(rows[0])
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join("---:" for _ in head) + " |")
    for r in rows:
        print("| " + " | ".join(r[h] for h in head) + " |")


if __name__ == "__main__":
    main()
