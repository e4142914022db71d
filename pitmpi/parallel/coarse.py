"""Global prediction: train the coarse model, then hand its results to the fine one.

The coarse network has ``L / c`` layers on the same ``[0, T]`` (step ``c h``).
It is trained for ``coarse.iterations`` SGD steps, run as the chain of the
fine partition's blocks so that the state and the co-state at every block
boundary come out of each step; those pairs seed each boundary's regression
(the paper's information set ``I_0``).  Its controls are then prolonged to
the fine grid.

By default (``coarse.parallel = "rank0"``) rank 0 trains the coarse model
alone, as in the paper, while the other ranks wait: the serial fraction that
caps the speed-up.  With ``"data-parallel"`` every rank takes a contiguous
share of each coarse batch and the gradients are summed with one
``Allreduce``: the iterates are the serial ones up to rounding, and each
rank's regression pairs are summed into the normal equations at the end.
Either way this function receives the communicator of the ranks that train.
"""
import numpy as np

from ..errors import Diverged
from ..model import join_blocks
from .data_parallel import share
from .flat import FlatSum
from .regression import CostateRegression, WithOutputErrors, state_map_for


def prolong(coarse_params, factor, kind="constant"):
    """Coarse → fine controls.

    ``constant`` copies each coarse layer ``factor`` times; ``linear``
    interpolates ``K(t), b(t)`` linearly between coarse layer midpoints
    (constant beyond the first and last).  Opening and classifier are copied.

    Parameters
    ----------
    coarse_params : dict
        Full coarse parameters, ``K`` of shape (Lc, w, w).
    factor : int
    kind : {"constant", "linear"}

    Returns
    -------
    dict
        Full fine parameters, ``K`` of shape (Lc * factor, w, w).
    """
    fine = {k: v.copy() for k, v in coarse_params.items() if k not in ("K", "b")}
    Lc = coarse_params["K"].shape[0]
    if kind == "constant":
        for name in ("K", "b"):
            fine[name] = np.repeat(coarse_params[name], factor, axis=0)
        return fine
    # fine midpoint (j + 1/2) h sits at coarse coordinate (j + 1/2) / factor - 1/2
    u = (np.arange(Lc * factor) + 0.5) / factor - 0.5
    u = np.clip(u, 0.0, Lc - 1.0)
    i0 = np.minimum(np.floor(u).astype(int), max(Lc - 2, 0))
    i1 = np.minimum(i0 + 1, Lc - 1)
    t = u - i0
    for name in ("K", "b"):
        c = coarse_params[name]
        shape = (-1,) + (1,) * (c.ndim - 1)
        fine[name] = ((1.0 - t).reshape(shape) * c[i0] + t.reshape(shape) * c[i1]).astype(c.dtype)
    return fine


def check_coarse_loss(loss, g, iterations, lr, coarse_cfg, limit):
    """Stop the coarse phase at its first non-finite or exploding batch loss
    (every rank that trains it sees the same, summed loss).

    Raises
    ------
    Diverged
        Naming the coarse phase, its iteration and the keys to change.
    """
    if np.isfinite(loss) and not (limit and loss > limit):
        return
    what = (f"the batch loss is {loss}" if not np.isfinite(loss) else
            f"the batch loss {loss:.4g} exceeds train.max_loss = {limit:g}")
    source = "coarse.lr" if coarse_cfg["lr"] else "coarse.lr = 0, so train.lr"
    raise Diverged(f"training diverged in the coarse phase (global prediction) at coarse "
                   f"iteration {g} of {iterations}: {what}; try a smaller coarse.lr (now {lr:g}, "
                   f"from {source}) or fewer coarse.iterations (now "
                   f"{coarse_cfg['iterations']}); no output file was written")


def coarse_phase(comm, net, cfg, batches, x_train, y_train, bounds, log=None):
    """Train the coarse model (data-parallel over ``comm``) and prepare what
    the fine ranks need.  Collective; the results are complete on rank 0.

    Parameters
    ----------
    comm : Comm
    net : ResNet
        The fine network.
    cfg : dict
        Resolved configuration.
    batches : BatchSchedule
        The coarse phase uses batches ``0 .. m-1`` of it.
    x_train, y_train : ndarray
    bounds : ndarray of int, shape (N + 1,)
        Fine block boundaries, multiples of ``coarse.factor``.

    Returns
    -------
    fine_params : dict
        Prolonged full fine parameters.  On ranks other than 0 of ``comm``
        every return value is None.
    regression_states : list of tuple
        ``CostateRegression.state()`` for each internal boundary ``s_1..s_{N-1}``.
    warm_states : list of ndarray or None
        For rank r >= 1, the coarse state at ``s_r`` of batch ``-r`` (what rank
        r starts from at iteration 0); None for rank 0.
    info : dict
        ``iterations``, ``final_loss``, ``coarse_params`` (the coarse
        model's full parameters).
    """
    co, tr, rg = cfg["coarse"], cfg["train"], cfg["regression"]
    c = co["factor"]
    cnet = net.with_layers(net.layers // c)
    cbounds = np.asarray(bounds) // c
    blocks = [cnet.block(a, b, reuse=True) for a, b in zip(cbounds[:-1], cbounds[1:])]
    full = cnet.init_params(tr["seed"])
    local = [blk.local_params(full) for blk in blocks]
    opts = [blk.optimizer(p, tr["momentum"], tr["lr_per"]) for blk, p in zip(blocks, local)]
    regs = [CostateRegression.from_config(net.state_width, net.n_classes, rg,
                                          state_map_for(net, rg))
            for _ in blocks[1:]]
    iterations = co["iterations"] or batches.per_epoch
    lr = co["lr"] or tr["lr"]
    rows = share(batches.batch_size, comm.size, comm.rank)
    gradient_sum = FlatSum(local, net.dtype, extra=1)
    # regression.output_errors: the last block's backward (first below) fills them
    errors = (np.empty((rows.stop - rows.start, net.n_classes), dtype=net.dtype)
              if rg["output_errors"] else None)
    loss = np.nan
    for g in range(iterations):
        idx = batches.indices(g)
        n = len(idx)
        idx = idx[rows]
        X, y = np.take(x_train, idx, axis=0), y_train[idx]
        ctxs, inp = [], X
        for blk, p in zip(blocks, local):
            ctxs.append(blk.forward(p, inp))
            inp = ctxs[-1].output
        lam = None
        grads = [None] * len(blocks)
        for i in range(len(blocks) - 1, -1, -1):
            if i < len(blocks) - 1:
                x = ctxs[i].output
                regs[i].add(x if errors is None else WithOutputErrors.rows(x, errors), y, lam,
                            refit=False, n=n)
            lam, grads[i], (part, _) = blocks[i].backward(local[i], ctxs[i], lam_out=lam,
                                                          y=y, n_norm=n, errors=errors)
            if blocks[i].last:
                data_loss = part
        (loss,) = gradient_sum.allreduce(comm, grads, [data_loss])
        check_coarse_loss(loss, g, iterations, lr, co, tr["max_loss"])
        for p, gr, opt in zip(local, grads, opts):
            opt.step(p, gr, lr)
        if log is not None and (g + 1) % max(iterations // 4, 1) == 0:
            log.info("  coarse iteration %d/%d: batch loss %.4f", g + 1, iterations, loss)
    for reg in regs:
        reg.merge(comm, refit=comm.rank == 0)  # rank 0 alone passes them on
    if comm.rank != 0:
        return None, None, None, None
    warm = warm_states(blocks, local, x_train, batches)
    coarse = join_blocks(local)
    fine = prolong(coarse, c, co["prolongation"])
    return fine, [reg.state() for reg in regs], warm, {"iterations": iterations, "final_loss": loss,
                                                       "coarse_params": coarse}


def warm_states(blocks, local, x_train, batches):
    """The coarse states at each block boundary for the pipeline's warm-up
    batches: for block r >= 1 the state at its left end of batch ``-r``
    (what rank r starts from at iteration 0; None for block 0).

    Parameters
    ----------
    blocks : list of Block
        The coarse network's blocks.
    local : list of dict
        Their parameters.
    x_train : ndarray
    batches : BatchSchedule
    """
    warm = [None] * len(blocks)
    for r in range(1, len(blocks)):
        inp = x_train[batches.indices(-r)]
        for blk, p in zip(blocks[:r], local[:r]):
            inp = blk.forward(p, inp, store=False).output
        warm[r] = np.ascontiguousarray(inp)
    return warm
