"""The exact-co-state monitor of ``pit`` (``monitor.every``; DESIGN §10).

``pit`` trains every block but the last on a *predicted* co-state at its
right end.  The error that ``history/regression_rel`` records compares a
prediction with the co-state the right neighbour sent back, which was itself
computed from that neighbour's own prediction; errors can compound along the
chain of boundaries without showing there.  Every ``monitor.every``-th
iteration the monitor measures the real thing: with the current controls it
sweeps that iteration's batch through all blocks exactly (forward, the loss
gradient, backward; :meth:`~pitmpi.parallel.blocks.BlockTrainer.exact_sweep`)
and records

- per boundary ``s_{r+1}`` (owned by rank r < N−1) the relative error
  ``‖Λ̂ − Λ‖ / ‖Λ‖`` of the regression's prediction ``Λ̂`` for the exact
  state there against the exact co-state ``Λ`` (the paper's assumption (7));
- per block r < N−1 the cosine between the gradient of its controls computed
  from ``Λ̂`` and the exact one, both from the exact state at its left end
  and without weight decay (the last block's gradient is exact);
- the cosine over the whole network (the last block included).

The sweep is not timed as training and changes nothing that training uses.
"""
import numpy as np


class CostateMonitor:
    """Exact co-states every ``every`` iterations, for one rank of a ``pit`` chain.

    Parameters
    ----------
    trainer : PitTrainer
    every : int
        Measure after iterations ``k`` with ``(k + 1) % every == 0``.
    n_iter : int
        Iterations of the whole run.
    """

    def __init__(self, trainer, every, n_iter):
        self.trainer, self.every = trainer, every
        a, b = trainer.layer_range()
        self.block = trainer.net.block(a, b)  # own arrays: the pipeline's workspace stays intact
        m = n_iter // every
        self.rel = np.full(m, np.nan)  # this rank's right boundary (NaN on the last rank)
        # (⟨ĝ, g⟩, ‖ĝ‖², ‖g‖²) of this block's gradient from Λ̂ (ĝ) and the exact one (g)
        self.dots = np.full((m, 3), np.nan)
        self.last_error = np.nan  # this rank's boundary error at the latest measurement

    def due(self, k):
        """Whether the monitor measures after iteration ``k``."""
        return (k + 1) % self.every == 0

    def measure(self, k):
        """Collective: the exact sweep of iteration ``k``'s batch, recorded."""
        t = self.trainer
        i = (k + 1) // self.every - 1
        g = k  # the batch rank 0 took at iteration k
        y = t.labels(g)

        grid = t.layout.replicas > 1  # then each replica holds rows: sum over the group

        def at_boundary(ctx, lam):
            # what pit trains with
            x = t.regression_input(ctx.output, g)
            lam_hat = t.bounded(t.reg.predict(x, y, n=t.batches.batch_size))
            if grid:
                diff = lam_hat - lam
                self.squares = np.array([np.vdot(diff, diff), np.vdot(lam, lam)], dtype=np.float64)
            else:
                self.rel[i] = np.linalg.norm(lam_hat - lam) / max(np.linalg.norm(lam), 1e-300)
            _, grads, _ = self.block.backward(t.params, ctx, lam_out=lam_hat)
            self.predicted = flat(grads)

        self.predicted = self.squares = None
        _, grads, _ = t.exact_sweep(self.block, g, y, at_boundary=at_boundary)
        exact = flat(grads)
        predicted = exact if self.predicted is None else self.predicted  # the last block: exact
        if grid:  # the block's gradient is the sum over its replicas' rows
            both = np.concatenate([predicted, exact])
            t.layout.group.allreduce_sum(both)
            predicted, exact = both[:len(exact)], both[len(exact):]
            if self.squares is not None:
                t.layout.group.allreduce_sum(self.squares)
                self.rel[i] = self.squares[0] ** 0.5 / max(self.squares[1] ** 0.5, 1e-300)
        self.dots[i] = (predicted @ exact, predicted @ predicted, exact @ exact)
        self.last_error = self.rel[i]

    def history(self, k_done):
        """Collective: ``{name: array}`` of the first ``k_done`` iterations on
        rank 0 (``{}`` elsewhere)."""
        comm, m = self.trainer.comm, k_done // self.every
        parts = comm.gather((self.rel[:m], self.dots[:m]))
        if comm.rank != 0:
            return {}
        parts = self.trainer.layout.of_blocks(parts)  # a block's replicas agree
        rel = np.array([p[0] for p in parts[:-1]]).reshape(-1, m).T
        dots = np.stack([p[1] for p in parts], axis=1)  # (m, N, 3)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = dots[:, :-1, 0] / np.sqrt(dots[:, :-1, 1] * dots[:, :-1, 2])
            total = dots.sum(axis=1)
            cos_all = total[:, 0] / np.sqrt(total[:, 1] * total[:, 2])
        return {"monitor_iteration": (np.arange(m, dtype=np.int64) + 1) * self.every - 1,
                "monitor_costate_rel": rel, "monitor_grad_cos": cos,
                "monitor_grad_cos_all": cos_all, "monitor_dots": dots}

    def restore(self, history, k0):
        """Continue the records of a checkpoint taken after ``k0`` iterations
        (kept only where it measured on the same schedule)."""
        m = k0 // self.every
        its = history.get("monitor_iteration")
        if its is None or len(its) < m or not np.array_equal(
                its[:m], (np.arange(m) + 1) * self.every - 1):
            return False
        r = self.trainer.layout.block
        dots = history["monitor_dots"]
        if r < dots.shape[1]:
            self.dots[:m] = dots[:m, r]
            if r < history["monitor_costate_rel"].shape[1]:
                self.rel[:m] = history["monitor_costate_rel"][:m, r]
        return True


def flat(grads):
    """The gradients of a block's controls as one float64 vector (a copy)."""
    return np.concatenate([np.ravel(grads[name]) for name in sorted(grads)]).astype(np.float64)
