"""What the layer-parallel methods share: one block of layers per rank.

Rank ``r`` owns layers ``[s_r, s_{r+1})`` of the fine network (rank 0 also
the opening layer, the last rank the classifier), its own parameters and its
own optimizer state.  Evaluation pipes the validation set through the blocks;
parameters are gathered on rank 0 at the end.
"""
import numpy as np

from ..config import replicas_of
from ..kernels import score_stats
from ..model import join_blocks
from .comm import COSTATE_TAG, STATE_TAG, batch_tag
from .layout import Layout
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
    """Base of ``model-parallel`` and ``pit``: partition, local block, eval.

    Parameters
    ----------
    comm, cfg, data, log
        As :class:`~pitmpi.parallel.trainer.Trainer`.
    bounds : array_like of int, shape (blocks + 1,), optional
        The block boundaries to use instead of the partition's (a coarse
        level of ``pit`` takes the fine blocks', coarsened).
    """

    grid = 1  # boundaries on multiples of this (pit: the coarsening factor)

    def __init__(self, comm, cfg, data, log=None, bounds=None):
        super().__init__(comm, cfg, data, log)
        self.layout = Layout.from_config(comm, cfg)
        self.chain = self.layout.chain  # states and co-states travel along it
        B, r = self.layout.blocks, self.layout.block
        self.costs = layer_costs(self.net, cfg["train"]["batch_size"])
        self.boundary_cost = self.regression_cost(cfg) if B > 1 else 0.0
        self.middle_factor = self.middle_cost(cfg) if B > 2 else 0.0
        if bounds is None:
            bounds = partition(self.costs, B, self.grid_for(cfg), self.boundary_cost,
                               self.middle_factor, self.grid_name(cfg))
        self.bounds = np.asarray(bounds)
        self.block = self.net.block(self.bounds[r], self.bounds[r + 1], reuse=True)
        self.prev = r - 1 if r > 0 else None
        self.next = r + 1 if r < B - 1 else None
        self.rows = self.layout.rows(self.batches.batch_size)  # this replica's rows of a batch
        self.n_rows = self.rows.stop - self.rows.start
        self.params = None
        self.opt = None
        self.sweep_bufs = None  # (state in, co-state out) of exact_sweep, made on first use

    def grid_for(self, cfg):
        return 1

    def grid_name(self, cfg):
        """What sets :meth:`grid_for`, for error messages (None: coarse.factor)."""
        return None

    @classmethod
    def reads_features(cls, cfg, rank, size):
        # the opening layer's replicas; evaluation pipes the states on
        return rank < replicas_of(cfg, size)

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
        return join_blocks(self.layout.of_blocks(parts)) if self.comm.rank == 0 else None

    def use_local_params(self, params):
        """Start from this block's own parameters, with a fresh optimizer."""
        self.params = params
        t = self.cfg["train"]
        self.opt = self.block.optimizer(self.params, t["momentum"], t["lr_per"])

    def resume(self, ckpt):
        self.log_partition()
        super().resume(ckpt)

    def log_partition(self):
        lines = describe(self.bounds, self.costs, self.boundary_cost, self.middle_factor)
        if self.layout.replicas > 1:
            t, lay = self.cfg["train"], self.layout
            why = (f" (train.max_blocks = {t['max_blocks']})"
                   if lay.replicas != t["data_parallel_size"] else "")
            lines = ([f"{lay.world.size} ranks as {lay.blocks} layer block(s) x {lay.replicas} "
                      f"replicas{why}"]
                     + [line.replace("rank ", "block ", 1) for line in lines] + lay.describe())
        for line in lines:
            self.log.info("  %s", line)

    def layer_range(self):
        r = self.layout.block
        return int(self.bounds[r]), int(self.bounds[r + 1])

    def batch_rows(self, g):
        """The indices of this replica's rows of batch ``g``."""
        idx = self.batches.indices(g)
        return idx if self.layout.replicas == 1 else idx[self.rows]

    def labels(self, g):
        return self.y_train[self.batch_rows(g)]

    def features(self, g):
        return np.take(self.x_train, self.batch_rows(g), axis=0)

    def finish_step(self, grads, k, epoch, loss, lr=None):
        """Sum the gradient over the block's replicas, add weight decay,
        update this block; return its loss part (the decay term counted on
        the first replica only)."""
        if self.layout.replicas > 1:
            grads = self.opt.collect(grads)
            self.layout.group.allreduce_sum(self.opt.grad_flat)
        penalty = self.opt.step(self.params, grads, self.lr(k, epoch) if lr is None else lr)
        return loss + (penalty if self.layout.replica == 0 else 0.0)

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
        y : ndarray of int, shape (rows,)
            The labels of this replica's rows of the batch (read on the last
            rank; the loss is normalised by the whole batch).
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
        comm, n = self.chain, self.batches.batch_size
        if self.sweep_bufs is None:
            shape = (self.n_rows, self.net.state_width)
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
            lam_in, grads, stats = block.backward(self.params, ctx, y=y, n_norm=n)
        if self.prev is not None:
            comm.send(lam_in, self.prev, batch_tag(COSTATE_TAG, g))
        return lam_in, grads, stats

    def evaluate(self, X, y):
        """Pipe ``X`` through the blocks in chunks (:func:`eval_chunk`),
        sent on without waiting; the last rank scores them."""
        comm, sw = self.chain, self.net.state_width
        loss, correct = 0.0, 0
        if self.layout.replicas > 1:  # every replica its share of the rows
            mine = self.layout.rows(len(y))
            X = X[mine] if X is not None else None
            y = y[mine]
        chunk = self.net.eval_rows(eval_chunk(len(y), self.layout.blocks))
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
        return ({"partition": self.partition()},
                {"blocks": self.layout.blocks, "data_parallel_size": self.layout.replicas})
