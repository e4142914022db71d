"""What the layer-parallel methods share: one block of layers per rank.

Rank ``r`` owns layers ``[s_r, s_{r+1})`` of the fine network (rank 0 also
the opening layer, the last rank the classifier), its own parameters and its
own optimizer state.  Evaluation pipes the validation set through the blocks;
parameters are gathered on rank 0 at the end.
"""
import numpy as np

from ..kernels import score_stats
from ..model import join_blocks
from .comm import COSTATE_TAG, STATE_TAG, batch_tag
from .partition import describe, layer_costs, partition
from .trainer import Trainer

EVAL_CHUNK = 4096  # most samples per evaluation chunk (memory)
MIN_EVAL_CHUNK = 64  # below this, per-call overheads cost more than the pipeline saves


def eval_chunk(n, ranks):
    """Samples per evaluation chunk for ``n`` samples on ``ranks`` blocks:
    about ``n / ranks``, so that the blocks work on different chunks at the
    same time (a pipeline of ``C`` chunks takes ``(C + N − 1) / (N C)`` of one
    block-after-another pass), within [MIN_EVAL_CHUNK, EVAL_CHUNK]."""
    return int(min(EVAL_CHUNK, max(MIN_EVAL_CHUNK, -(-n // ranks))))


class BlockTrainer(Trainer):
    """Base of ``model-parallel`` and ``pit``: partition, local block, eval."""

    grid = 1  # boundaries on multiples of this (pit: the coarsening factor)

    def __init__(self, comm, cfg, data, log=None):
        super().__init__(comm, cfg, data, log)
        self.costs = layer_costs(self.net, cfg["train"]["batch_size"])
        self.boundary_cost = self.regression_cost(cfg) if comm.size > 1 else 0.0
        self.middle_factor = self.middle_cost(cfg) if comm.size > 2 else 0.0
        self.bounds = partition(self.costs, comm.size, self.grid_for(cfg), self.boundary_cost,
                                self.middle_factor)
        r = comm.rank
        self.block = self.net.block(self.bounds[r], self.bounds[r + 1], reuse=True)
        self.prev = r - 1 if r > 0 else None
        self.next = r + 1 if r < comm.size - 1 else None
        self.params = None
        self.opt = None
        self.sweep_bufs = None  # (state in, co-state out) of exact_sweep, made on first use

    def grid_for(self, cfg):
        return 1

    @classmethod
    def reads_features(cls, cfg, rank, size):
        return rank == 0  # the opening layer's; evaluation pipes the states on

    def middle_cost(self, cfg):
        """Extra cost of blocks 1..N−2, a fraction of their layers' (see partition)."""
        return 0.0

    def regression_cost(self, cfg):
        """Extra per-sample cost of every block but the last (see partition)."""
        return 0.0

    def local_copy(self, full):
        return self.block.local_params(full)

    def gather_full(self, local):
        parts = self.comm.gather(local)
        return join_blocks(parts) if self.comm.rank == 0 else None

    def use_local_params(self, params):
        """Start from this block's own parameters, with a fresh optimizer."""
        self.params = params
        t = self.cfg["train"]
        self.opt = self.block.optimizer(self.params, t["momentum"], t["lr_per"])

    def resume(self, ckpt):
        self.log_partition()
        super().resume(ckpt)

    def log_partition(self):
        for line in describe(self.bounds, self.costs, self.boundary_cost, self.middle_factor):
            self.log.info("  %s", line)

    def layer_range(self):
        return int(self.bounds[self.comm.rank]), int(self.bounds[self.comm.rank + 1])

    def labels(self, g):
        return self.y_train[self.batches.indices(g)]

    def features(self, g):
        return np.take(self.x_train, self.batches.indices(g), axis=0)

    def finish_step(self, grads, k, epoch, loss):
        """Add weight decay, update this block; return its loss part."""
        return loss + self.opt.step(self.params, grads, self.lr(k, epoch))

    def exact_sweep(self, block, g, y, check=None, at_boundary=None):
        """Batch ``g`` through every block with the current controls: the
        states forward rank to rank, the loss gradient on the last rank, the
        co-states back (model-parallel's iteration, without the update).
        Collective over the chain; nothing else may be in flight.

        Parameters
        ----------
        block : Block
            This rank's block (its workspace, if any, is overwritten).
        g : int
            Batch id (rank 0 reads its features; the tags carry it).
        y : ndarray of int, shape (n,)
            The batch's labels (read on the last rank).
        check : callable, optional
            ``check(x_out)`` on the state at this block's right end.
        at_boundary : callable, optional
            On every rank but the last, ``at_boundary(ctx, lam_out)`` with the
            block's forward and the exact co-state at its right end, shape
            (n, state_width), before the block's own backward.

        Returns
        -------
        lam_in, grads, stats
            As :meth:`~pitmpi.model.Block.backward` with the exact co-state.
        """
        comm = self.comm
        if self.sweep_bufs is None:
            shape = (self.batches.batch_size, self.net.state_width)
            self.sweep_bufs = tuple(np.empty(shape, dtype=self.net.dtype) for _ in range(2))
        x_in, lam_out = self.sweep_bufs
        if block.first:
            inp = self.features(g)
        else:
            comm.recv(x_in, self.prev, batch_tag(STATE_TAG, g))
            inp = x_in
        ctx = block.forward(self.params, inp)
        if check is not None:
            check(ctx.output)
        if self.next is not None:
            comm.send(np.ascontiguousarray(ctx.output), self.next, batch_tag(STATE_TAG, g))
            comm.recv(lam_out, self.next, batch_tag(COSTATE_TAG, g))
            if at_boundary is not None:
                at_boundary(ctx, lam_out)
            lam_in, grads, stats = block.backward(self.params, ctx, lam_out=lam_out)
        else:
            lam_in, grads, stats = block.backward(self.params, ctx, y=y)
        if self.prev is not None:
            comm.send(lam_in, self.prev, batch_tag(COSTATE_TAG, g))
        return lam_in, grads, stats

    def evaluate(self, X, y):
        """Pipe ``X`` through the blocks in chunks (:func:`eval_chunk`),
        sent on without waiting; the last rank scores them."""
        comm, sw = self.comm, self.net.state_width
        loss, correct = 0.0, 0
        chunk = eval_chunk(len(y), comm.size)
        sends = []
        for i in range(0, len(y), chunk):
            yi = y[i:i + chunk]
            if self.block.first:
                inp = X[i:i + chunk]
            else:
                inp = np.empty((len(yi), sw), dtype=self.net.dtype)
                comm.recv(inp, self.prev, STATE_TAG)
            ctx = self.block.forward(self.params, inp, store=False)
            if self.next is not None:
                out = ctx.output  # a new array each forward, so it can travel while the next runs
                sends.append((comm.isend(out, self.next, STATE_TAG), out))
            else:
                l, c = score_stats(self.block.scores(self.params, ctx), yi)
                loss += l
                correct += c
        for request, _ in sends:
            comm.wait(request)
        return loss, correct

    def partition(self):
        return np.stack([self.bounds[:-1], self.bounds[1:]], axis=1)

    def result_extra(self):
        return {"partition": self.partition()}, {}
