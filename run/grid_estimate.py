"""The cost model's prediction for every layers × data grid of N ranks.

For a config and a rank count N, every grid of B blocks × D replicas (B D =
N) with ``pit`` and with ``model-parallel``, and ``data-parallel`` on N
ranks: the cost model's seconds per epoch on the critical path (the busiest
block's rows of each batch, the regression, the coarse phase spread over the
run's epochs) and the predicted speed-up over serial.  A prediction: it
leaves out messages and all-reduces, and machine noise.  Accuracy is not
in it: pit's accuracy depends on B (measure it with ``train --emulate``).
Each grid's configuration is resolved as its run resolves it: with the
``[many_blocks]`` values where it has 4 blocks or more.

    python run/grid_estimate.py --config run/mnist.toml --layers 64 --ranks 16
"""
import argparse
import sys

from pitmpi import config, data
from pitmpi.errors import UserError
from pitmpi.parallel.partition import (MATMUL_RATE, critical_path, layer_costs, partition,
                                       regression_cost)
from pitmpi.optim import BatchSchedule
from pitmpi.parallel.pit import boundary_step, relay_factor, two_level
from pitmpi.parallel.trainer import build_network


def grids(n_ranks):
    """``(blocks, replicas)`` of every grid of ``n_ranks``."""
    return [(n_ranks // d, d) for d in range(1, n_ranks + 1) if n_ranks % d == 0]


def estimate(load, ds, n_ranks):
    """Rows ``(name, blocks, replicas, seconds per epoch, speed-up)``.

    ``load(replicas)`` gives the configuration of the run on the grid with
    that many replicas (as ``train`` resolves it on ``n_ranks`` ranks)."""
    cfg = load(1)
    net = build_network(cfg, ds)
    n = cfg["train"]["batch_size"]
    per_epoch = BatchSchedule(len(ds.y_train), n, cfg["train"]["seed"]).per_epoch
    epochs = cfg["train"]["epochs"]
    rate = MATMUL_RATE.get(net.dtype_name, 2.0e4) * 1e6
    serial = layer_costs(net, n).sum() * n / rate * per_epoch
    rows = [("serial", 1, 1, serial, 1.0)]
    dp_rows = -(-n // n_ranks)
    dp = layer_costs(net, dp_rows).sum() * dp_rows / rate * per_epoch
    rows.append(("data-parallel", 1, n_ranks, dp, serial / dp))
    for blocks, replicas in grids(n_ranks):
        # as PitTrainer sets itself up on this grid: boundaries on multiples of c^(levels-1)
        grid_cfg = load(replicas)
        co = grid_cfg["coarse"]
        coarse = two_level(grid_cfg, n_ranks)
        step = boundary_step(grid_cfg, n_ranks)
        if blocks > net.layers // max(step, co["factor"]):
            continue
        bc = regression_cost(net, grid_cfg, n) if blocks > 1 else 0.0
        mf = relay_factor(grid_cfg, net) if blocks > 2 else 0.0
        bounds = partition(layer_costs(net, n), blocks, step, bc, mf)
        coarse_its = (co["iterations"] or per_epoch) if coarse else 0
        est = critical_path(net, grid_cfg, bounds, coarse_its, bc, mf, replicas)
        pit = est["iteration"] * per_epoch + est["coarse"] / epochs
        rows.append((f"pit {blocks}x{replicas}", blocks, replicas, pit, serial / pit))
        mp_rows = -(-n // replicas)
        mp_costs = layer_costs(net, mp_rows)
        mp = sum(mp_costs[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])) * mp_rows / rate
        rows.append((f"model-parallel {blocks}x{replicas}", blocks, replicas, mp * per_epoch,
                     serial / (mp * per_epoch)))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config")
    p.add_argument("--layers", type=int)
    p.add_argument("--ranks", type=int, default=16)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    try:
        report(args)
    except UserError as e:  # a bad config key or value, or no data: one line, exit 2
        print(f"grid_estimate: error: {e}", file=sys.stderr)
        sys.exit(2)


def report(args):
    """Print the table of every grid for the parsed command line ``args``."""
    overrides = list(args.set) + ([f"model.layers={args.layers}"] if args.layers else [])
    # every grid as named, whatever train.max_blocks the config sets
    load = lambda replicas: config.load(
        args.config, overrides + [f"train.data_parallel_size={replicas}", "train.max_blocks=0"],
        ranks=args.ranks)
    cfg = load(1)
    own = config.load(args.config, overrides, ranks=args.ranks)
    d = cfg["data"]
    ds = data.load(d["name"], d["path"], seed=d["seed"], n_train=d["n_train"], n_val=d["n_val"],
                   dtype=cfg["model"]["dtype"], features=False)
    print(f"cost model, {cfg['data']['name']}, L = {cfg['model']['layers']}, {args.ranks} ranks "
          f"(a prediction: no messages, no all-reduces, no machine noise)\n")
    print("| run | blocks | replicas | s per epoch | predicted speed-up |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, b, r, sec, su in estimate(load, ds, args.ranks):
        print(f"| {name} | {b} | {r} | {sec:.3f} | {su:.2f} |")
    if own["train"]["max_blocks"]:
        d = config.replicas_of(own, args.ranks)
        print(f"\nthe config's own pit grid on {args.ranks} ranks: {args.ranks // d}x{d} "
              f"(train.max_blocks = {own['train']['max_blocks']})")


if __name__ == "__main__":
    main()
