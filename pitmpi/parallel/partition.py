"""Contiguous layer blocks balanced by estimated cost (DESIGN §6).

Per sample, the opening layer costs ``d·w``, an ODE layer ``w²`` (Verlet:
``2w²``, two products) and the classifier ``c·w``; forward and backward
scale alike, so these ratios are what balancing needs.  Block boundaries lie
on the coarse grid (multiples of the coarsening factor) so that the coarse
model has a state and co-state at every boundary.
"""
import numpy as np

from ..errors import ConfigError


def layer_costs(net):
    """Estimated cost per ODE layer (L,), with the opening layer's cost added
    to layer 0 and the classifier's to layer L-1."""
    per_layer = (2 if net.scheme_name == "verlet" else 1) * net.width ** 2
    costs = np.full(net.layers, float(per_layer))
    costs[0] += net.n_features * net.width
    costs[-1] += net.n_classes * net.width
    return costs


def partition(costs, ranks, grid=1):
    """Split layers into ``ranks`` contiguous blocks with boundaries on multiples
    of ``grid``, each block's cost as close as possible to ``total / ranks``.

    Parameters
    ----------
    costs : ndarray, shape (L,)
    ranks : int
    grid : int

    Returns
    -------
    ndarray of int, shape (ranks + 1,)
        Boundaries ``0 = s_0 < s_1 < ... < s_N = L``; rank r owns ``[s_r, s_{r+1})``.
    """
    L = len(costs)
    if L % grid:
        raise ConfigError(f"model.layers = {L} is not a multiple of coarse.factor = {grid}")
    cells = L // grid
    if cells < ranks:
        need = ranks * grid
        raise ConfigError(f"model.layers = {L} cannot be split into {ranks} blocks on the coarse "
                          f"grid (multiples of {grid}); use at least {need} layers or fewer ranks")
    cum = np.concatenate([[0.0], np.cumsum(costs.reshape(cells, grid).sum(axis=1))])
    total = cum[-1]
    bounds = [0]
    for r in range(1, ranks):
        target = total * r / ranks
        lo = bounds[-1] + 1                  # every block non-empty
        hi = cells - (ranks - r)             # leave a cell for each later block
        cand = int(np.clip(np.argmin(np.abs(cum[lo:hi + 1] - target)) + lo, lo, hi))
        bounds.append(cand)
    bounds.append(cells)
    return np.array(bounds, dtype=np.int64) * grid


def describe(bounds, costs):
    """One line per rank: layer range and share of the estimated cost."""
    total = costs.sum()
    return ["rank %d: layers [%d, %d)  %.1f%% of the cost" %
            (r, a, b, 100 * costs[a:b].sum() / total)
            for r, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
