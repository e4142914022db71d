"""Which regression features predict a conv net's co-states best, and at what cost.

    python run/conv_features.py results/mnist_conv.h5 --data /data/mnist [--boundary 2]

Takes the trained parameters of an output file, sweeps training batches
through the network exactly (forward, loss gradient, backward) and keeps, at
the block boundary ``--boundary`` (a layer index), each batch's states and
exact co-states.  Fits ``pit``'s regression (``per-class``, the ridge and
forgetting of the file's config) on the first ``--fit`` batches, in
arrival order as ``pit`` would, and reports on the next ``--test`` batches
the relative error ``‖Λ̂ − Λ‖ / ‖Λ‖`` of the predictions (1 is no better than
predicting zero) and the seconds per batch its updates and predictions
took, for each choice of features: the pooled states (``regression.pool``
over several patch sizes), with and without a co-state subspace
(``regression.rank``), and with ``--output-errors`` each of them with the
samples' output errors ``softmax(S) − q`` appended
(``regression.output_errors``).  With the controls fixed this measures the
features' power alone; in a ``pit`` run the controls move as well.

``--errors-from OLD.h5`` computes the output errors with the parameters of
another run, for example one epoch shorter with the same seed (a ``pit``
run reads each sample's error from its pass an epoch earlier):

    python -m pitmpi train run/mnist_conv.toml --set train.method=serial --set train.epochs=3 --out e3.h5
    python -m pitmpi train run/mnist_conv.toml --set train.method=serial --set train.epochs=4 --out e4.h5
    python run/conv_features.py e4.h5 --fit 100 --test 10 --pools 7 --ranks 16 --output-errors --errors-from e3.h5
"""
import argparse
import time
import tomllib

import numpy as np

from pitmpi import data as datasets
from pitmpi.io import read_result
from pitmpi.parallel.regression import CostateRegression, state_map_for
from pitmpi.parallel.trainer import build_network


def pairs(net, params, X, y, boundary, batch):
    """(states, co-states, labels) at ``boundary`` for consecutive batches of X."""
    left, right = net.block(0, boundary), net.block(boundary, net.layers)
    pl, pr = left.local_params(params), right.local_params(params)
    out = []
    for i in range(0, len(y) - batch + 1, batch):
        xb, yb = X[i:i + batch], y[i:i + batch]
        ctx = left.forward(pl, xb)
        state = np.array(ctx.output)
        lam, _, _ = right.backward(pr, right.forward(pr, state), y=yb, n_norm=batch)
        out.append((state, lam, yb))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", help="an output file of a conv run")
    ap.add_argument("--data", default="", help="the MNIST directory (else $PITMPI_DATA)")
    ap.add_argument("--boundary", type=int, help="layer index of the boundary (default: L/2)")
    ap.add_argument("--fit", type=int, default=200, help="batches to fit on")
    ap.add_argument("--test", type=int, default=20, help="batches to test on")
    ap.add_argument("--pools", type=int, nargs="+", default=[14, 7, 4, 2])
    ap.add_argument("--ranks", type=int, nargs="+", default=[0, 16])
    ap.add_argument("--output-errors", action="store_true",
                    help="also each choice with the output errors appended")
    ap.add_argument("--errors-from", default="",
                    help="an output file whose parameters give the output errors")
    a = ap.parse_args()
    attrs, params, _, _, _ = read_result(a.file)
    cfg = tomllib.loads(attrs["config"])
    if a.data:
        cfg["data"]["path"] = a.data
    ds = datasets.load(cfg["data"]["name"], cfg["data"]["path"] or None,
                       dtype=cfg["model"]["dtype"])
    net = build_network(cfg, ds)
    boundary = a.boundary or net.layers // 2
    batch = cfg["train"]["batch_size"]
    n = (a.fit + a.test) * batch
    order = np.random.default_rng(0).permutation(len(ds.y_train))[:n]
    sets = pairs(net, params, ds.x_train[order], ds.y_train[order], boundary, batch)
    errors = [None] * len(sets)
    if a.output_errors:
        source = read_result(a.errors_from)[1] if a.errors_from else params
        e = net.output_errors(source, ds.x_train[order], ds.y_train[order])
        errors = [e[i * batch:(i + 1) * batch] for i in range(len(sets))]
    fit, test = sets[:a.fit], sets[a.fit:]
    print(f"{a.file}: boundary at layer {boundary} of {net.layers}, state width "
          f"{net.state_width}; fit on {len(fit)} batches, test on {len(test)}")
    print("pool  errors  features  rank  rel. error (test)  update ms/batch  predict ms/batch")
    rg = dict(cfg["regression"], features="per-class", pairs_per_batch=0)
    for pool in a.pools:
        for rank in a.ranks:
            for with_errors in (False, True) if a.output_errors else (False,):
                rg.update(pool=pool, rank=rank, output_errors=with_errors)
                state_map = state_map_for(net, rg)
                reg = CostateRegression.from_config(net.state_width, net.n_classes, rg, state_map)
                inputs = [np.hstack([x, e]) if with_errors else x
                          for (x, _, _), e in zip(sets, errors)]
                t = time.perf_counter()
                for k, ((_, lam, y), x) in enumerate(zip(fit, inputs)):
                    reg.add(x, y, lam, refit=k + 1 == len(fit), n=batch)
                update = (time.perf_counter() - t) / len(fit)
                t = time.perf_counter()
                preds = [reg.predict(x, y, n=batch)
                         for (_, _, y), x in zip(test, inputs[len(fit):])]
                predict = (time.perf_counter() - t) / len(test)
                err = [np.linalg.norm(p - lam) / np.linalg.norm(lam)
                       for p, (_, lam, _) in zip(preds, test)]
                print(f"{pool:4d}  {'yes' if with_errors else 'no':>6}  {state_map.width:8d}  "
                      f"{rank:4d}  {np.mean(err):17.3f}  {1e3 * update:15.2f}  "
                      f"{1e3 * predict:16.2f}")


if __name__ == "__main__":
    main()
