"""Contiguous layer blocks balanced by estimated cost (DESIGN §6).

Cost per sample of forward + backward, in multiply-add equivalents, for a
layer whose linear map costs ``M`` multiply-adds and gives ``s`` values a
sample (dense: ``M = w²``, ``s = w``; conv: ``M = c² k² H W``, ``s = c H W``,
counted at ``Conv.matmul_fraction`` (0.4) of the matrix-product rate: its
shifted copies of the images cost about as much as its small products):

- an ODE layer: ``3M`` for Euler (one product forward, two backward),
  ``6M`` for Verlet, plus ``κ·s`` per activation (one for Euler, two for
  Verlet);
- the opening layer: ``2M`` (dense ``2dw``: forward, and the weight
  gradient; no co-state is needed below it) plus ``κ·s``;
- the classifier: ``3c`` times the width it reads.

``κ`` is the cost of one activation element (``tanh`` with its derivative and
the element-wise updates around it) relative to one multiply-add inside a
matrix product.  Measured on the development machine (AVX2, OpenBLAS):
about 120 in float32 and 400 in float64 (NumPy's float64 ``tanh`` is scalar
there; since the exp form of large float64 arrays it is nearer 260 above
~600 elements, which shifts every layer alike); ``relu`` is cheap (κ = 4).

With the batch size given, every NumPy or LAPACK call also costs a fixed
overhead, ``CALL_US`` microseconds, turned into multiply-adds at the matrix
rate of the dtype and spread over the batch: a Verlet layer makes about 17
calls (10 forward, 6 in the adjoint's recursion, and a share of the batched
products that form a chunk of layers' weight gradients at once), and on
small problems (the Swiss roll: n = 32, w = 16) that is 40 % of its time.
An Euler layer makes 8–9 calls but is counted as 12, what its time in a run
shows (the ellipses, w = 8: ~18 µs a layer, against a regression of ~6.3
layers; with 9 the partition put 2 layers too few on rank 0, measured 4 %
slower).  ``pit``'s regression is costed the same way (its own arithmetic,
in float64, plus its calls), which is what puts it at about 3.3 layers
there (measured in a run: ~0.17 ms against ~46 µs a layer, 3.6) but about
1.5 on MNIST.  The partition depends on the config only, never on timings, so runs
stay reproducible.  Block boundaries lie on the coarse grid (multiples of
the coarsening factor) so that the coarse model has a state and co-state at
every boundary.
"""
import numpy as np

from ..errors import ConfigError
from .regression import one_hot_cheaper, state_map_for


ACTIVATION_COST = {("tanh", "float32"): 120.0, ("tanh", "float64"): 400.0,
                   ("relu", "float32"): 4.0, ("relu", "float64"): 4.0}


# multiply-adds per microsecond inside a matrix product, and the fixed cost
# of one NumPy/LAPACK call (development machine, one BLAS thread)
MATMUL_RATE = {"float64": 2.0e4, "float32": 4.0e4}
CALL_US = 1.0
CALLS = {"verlet": 17, "euler": 12, "opening": 8, "classifier": 15}
# the adjoint without the weight gradients (pit's relayed co-states) leaves
# out the batched gradient products' calls, and a third of the products
COSTATE_CALLS = {"verlet": 16, "euler": 11}
REGRESSION_CALL_US = 4.0  # heavier calls (LAPACK, fancy indexing), as measured in a run


def call_cost(net, calls, batch_size, us=CALL_US):
    """Per-sample multiply-add equivalent of ``calls`` fixed-cost calls."""
    if not batch_size:
        return 0.0
    return calls * us * MATMUL_RATE.get(net.dtype_name, 2.0e4) / batch_size


def ode_layer_cost(net, batch_size=None, grads=True):
    """Estimated cost per sample of one ODE layer's forward and adjoint
    sweep; ``grads=False``: an adjoint for the co-state only (2 of Euler's 3
    products, 4 of Verlet's 6); with ``batch_size``, the per-call overheads
    too."""
    op = net.op
    kappa = ACTIVATION_COST.get((net.activation, net.dtype_name), 100.0)
    products = 2 if net.scheme_name == "verlet" else 1
    sweeps = 3.0 if grads else 2.0
    calls = (CALLS if grads else COSTATE_CALLS)[net.scheme_name]
    return (products * (sweeps * op.macs() / op.matmul_fraction + kappa * op.size)
            + call_cost(net, calls, batch_size))


def layer_costs(net, batch_size=None):
    """Estimated cost per sample of each ODE layer (L,), with the opening
    layer's cost added to layer 0 and the classifier's to layer L-1; with
    ``batch_size``, the per-call overheads too."""
    opening = net.open_op
    kappa = ACTIVATION_COST.get((net.activation, net.dtype_name), 100.0)
    costs = np.full(net.layers, ode_layer_cost(net, batch_size))
    costs[0] += (2.0 * opening.macs() / opening.matmul_fraction + kappa * opening.size
                 + call_cost(net, CALLS["opening"], batch_size))
    costs[-1] += (3.0 * net.n_classes * net.classifier_width
                  + call_cost(net, CALLS["classifier"], batch_size))
    return costs


def regression_cost(net, cfg, batch_size):
    """Estimated per-sample cost of ``pit``'s co-state regression at a boundary
    (added to every block but the last), in the units of :func:`layer_costs`.

    Its float64 arithmetic per iteration — pair update ``m (f² + f sw)``,
    refits ``(f³/3 + f² sw)`` per group refitted — and the prediction ``n f
    sw`` in the network's dtype, plus its calls: class by class, about ``5 +
    3g`` for the prediction with ``g`` groups, 10 for the pair update, 14
    per group refit and 6 for the error history; with the one-hot products
    (:func:`~pitmpi.parallel.regression.one_hot_cheaper`: ``g`` times the
    arithmetic of prediction and update) 14, then 5 per refit plus 3 per
    group refitted, and 4.  With ``regression.rank = k`` the co-states live
    in ``k`` coordinates: pair update ``m (f²/2 + f k + 2 sw k)`` (``ΦᵀΦ``
    by ``syrk``, the projection and the basis' subspace iteration), refits
    ``f³/3 + f² k``, prediction ``n k (f + sw)`` and 2 more calls, 6 more
    per refit."""
    rg = cfg["regression"]
    sw, c = net.state_width, net.n_classes
    state_map = state_map_for(net, rg)
    q = sw if state_map is None else state_map.width  # the state part of φ
    f = q + 1 + (c if rg["features"] == "state+label" else 0)
    groups = c if rg["features"] == "per-class" else 1
    n = batch_size
    m = min(rg["pairs_per_batch"] or n, n)
    refits = groups / rg["refit_every"]
    rate = MATMUL_RATE.get(net.dtype_name, 2.0e4)
    k = rg["rank"] if 0 < rg["rank"] < sw else 0
    one_hot = one_hot_cheaper(groups, n, f, k or sw)
    copies = groups if one_hot else 1  # every class's map on every row
    if k:
        update = m * (f * f / 2 + f * k + 2 * sw * k)
        refit = f ** 3 / 3 + f * f * k
        predict = n * k * (copies * f + sw)  # every class's map, then back to sw
    else:
        update, refit = m * (f * f + f * sw), f ** 3 / 3 + f * f * sw
        predict = copies * n * f * sw
    arrival_us = (copies * update + refits * refit) / MATMUL_RATE["float64"]
    predict_us = predict / rate
    if one_hot:
        calls = 14 + 5 * min(refits, 1) + 3 * refits + 4
    else:
        calls = (5 + 3 * (groups if groups > 1 else 0)) + 10 + 14 * refits + 6
    if k:
        calls += 2 + 6 * refits
    return (arrival_us + predict_us + calls * REGRESSION_CALL_US) * rate / n


def partition(costs, ranks, grid=1, boundary_cost=0.0, middle_factor=0.0, grid_name=None):
    """Split layers into ``ranks`` contiguous blocks with boundaries on multiples
    of ``grid``, with the largest block cost as small as possible.

    Parameters
    ----------
    costs : ndarray, shape (L,)
    ranks : int
    grid : int
    boundary_cost : float
        Extra cost of every block but the last (``pit``'s regression).
    middle_factor : float
        Blocks 1..N−2 cost ``1 + middle_factor`` times their layers
        (``pit``'s relayed co-states sweep them again for a share of the
        batches, the adjoint for the co-state only).
    grid_name : str, optional
        What sets ``grid``, for the error messages (default
        ``"coarse.factor = <grid>"``).

    Returns
    -------
    ndarray of int, shape (ranks + 1,)
        Boundaries ``0 = s_0 < s_1 < ... < s_N = L``; rank r owns ``[s_r, s_{r+1})``.
    """
    L = len(costs)
    grid_name = grid_name or f"coarse.factor = {grid}"
    if L % grid:
        raise ConfigError(f"model.layers = {L} is not a multiple of {grid_name}")
    cells = L // grid
    if cells < ranks:
        need = ranks * grid
        fewer = " or fewer coarse.levels" if "coarse.levels" in grid_name else ""
        raise ConfigError(f"model.layers = {L} cannot be split into {ranks} blocks on the coarse "
                          f"grid (multiples of {grid_name}); use at least {need} layers, "
                          f"fewer blocks (fewer ranks, or train.max_blocks){fewer}")
    cell_costs = costs.reshape(cells, grid).sum(axis=1)
    # the smallest bottleneck (largest block cost) any split into `ranks` blocks
    # can have, by bisection on a greedy feasibility check; then the greedy split
    lo, hi = float(cell_costs.max()), float(cell_costs.sum()) + boundary_cost
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if len(_greedy(cell_costs, ranks, mid, boundary_cost, middle_factor)) <= ranks + 1:
            hi = mid
        else:
            lo = mid
    bounds = _greedy(cell_costs, ranks, hi, boundary_cost, middle_factor)
    return np.array(bounds, dtype=np.int64) * grid


def _greedy(cell_costs, ranks, cap, boundary_cost=0.0, middle_factor=0.0):
    """Boundaries (in cells) filling blocks left to right up to ``cap``, leaving
    at least one cell for each block still to come; every block but the last
    starts with ``boundary_cost``, and the middle ones' cells weigh
    ``1 + middle_factor``."""
    cells = len(cell_costs)
    start = lambda nb: boundary_cost if nb < ranks else 0.0  # nb: blocks opened so far
    weight = lambda nb: 1.0 + middle_factor if 1 < nb < ranks else 1.0
    bounds = [0]
    load = start(1)
    for i, c in enumerate(cell_costs):
        must_close = cells - i == ranks - len(bounds)  # exactly one cell per later block
        c_here = c * weight(len(bounds))
        if i > bounds[-1] and (load + c_here > cap * (1 + 1e-12) or must_close):
            bounds.append(i)
            load = start(len(bounds))
            c_here = c * weight(len(bounds))
        load += c_here
    bounds.append(cells)
    return bounds


def critical_path(net, cfg, bounds, coarse_iterations, boundary_cost=0.0, middle_factor=0.0,
                  replicas=1):
    """The cost model's estimate of a ``pit`` run's critical path, in seconds
    at the model's matrix rate (an estimate: no messages, no machine noise).

    Parameters
    ----------
    net : ResNet
        The fine network.
    cfg : dict
        Resolved configuration (batch size, coarse phase).
    bounds : ndarray of int, shape (B + 1,)
    coarse_iterations : int
        Iterations of the coarse phase (0: none).
    boundary_cost : float
        Per-sample regression cost of every block but the last (it learns
        from the whole batch's pairs on every replica).
    middle_factor : float
        As for :func:`partition`.
    replicas : int
        ``D`` of a layers × data grid: each block computes ``n / D`` rows.

    Returns
    -------
    dict
        ``serial_iteration``: one iteration of the whole net on one rank;
        ``iteration``: one pipeline iteration, set by the busiest block;
        ``exact_iteration``: one iteration on exact co-states
        (``monitor.fallback``), the blocks one after another;
        ``coarse``: the coarse phase (on rank 0, or shared by all ranks;
        with ``coarse.levels > 2`` the coarse model's own ``pit`` run on
        the same blocks, its coarse phase included).
    """
    n = cfg["train"]["batch_size"]
    rows = -(-n // replicas)
    rate = MATMUL_RATE.get(net.dtype_name, 2.0e4) * 1e6  # multiply-adds per second
    costs = layer_costs(net, rows)
    B = len(bounds) - 1
    blocks, sweep = [], 0.0
    for r, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        own = costs[a:b].sum() * rows
        regression = boundary_cost * n if r < B - 1 else 0.0
        blocks.append(own + regression + (own * middle_factor if 0 < r < B - 1 else 0.0))
        sweep += own + regression
    coarse = 0.0
    if coarse_iterations:
        co = cfg["coarse"]
        cnet = net.with_layers(net.layers // co["factor"])
        if co["levels"] > 2:  # the coarse model's own pit run, on the same blocks
            inner = critical_path(cnet, {**cfg, "coarse": {**co, "levels": co["levels"] - 1}},
                                  np.asarray(bounds) // co["factor"], coarse_iterations,
                                  boundary_cost, middle_factor, replicas)
            coarse = coarse_iterations * inner["iteration"] + inner["coarse"]
        else:
            crows = -(-n // (B * replicas)) if co["parallel"] == "data-parallel" else n
            coarse = coarse_iterations * layer_costs(cnet, crows).sum() * crows / rate
    return {"serial_iteration": layer_costs(net, n).sum() * n / rate,
            "iteration": max(blocks) / rate, "exact_iteration": sweep / rate, "coarse": coarse}


def describe(bounds, costs, boundary_cost=0.0, middle_factor=0.0):
    """One line per rank: layer range and share of the estimated cost."""
    N = len(bounds) - 1
    block = [costs[a:b].sum() * (1.0 + middle_factor if 0 < r < N - 1 else 1.0)
             + (boundary_cost if r < N - 1 else 0.0)
             for r, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    total = sum(block)
    return [f"rank {r}: layers [{a}, {b})  {100 * c / total:.1f}% of the estimated cost"
            for r, (a, b, c) in enumerate(zip(bounds[:-1], bounds[1:], block))]
