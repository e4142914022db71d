"""What the layer-parallel methods share: one block of layers per rank.

Rank ``r`` owns layers ``[s_r, s_{r+1})`` of the fine network (rank 0 also
the opening layer, the last rank the classifier), its own parameters and its
own optimizer state.  Evaluation pipes the validation set through the blocks;
parameters are gathered on rank 0 at the end.
"""
import numpy as np

from ..kernels import score_stats
from ..model import join_blocks
from .comm import STATE_TAG
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
        self.bounds = partition(self.costs, comm.size, self.grid_for(cfg), self.boundary_cost)
        r = comm.rank
        self.block = self.net.block(self.bounds[r], self.bounds[r + 1], reuse=True)
        self.prev = r - 1 if r > 0 else None
        self.next = r + 1 if r < comm.size - 1 else None
        self.params = None
        self.opt = None

    def grid_for(self, cfg):
        return 1

    @classmethod
    def reads_features(cls, cfg, rank, size):
        return rank == 0  # the opening layer's; evaluation pipes the states on

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
        self.opt = self.block.optimizer(self.params, self.cfg["train"]["momentum"])

    def resume(self, ckpt):
        self.log_partition()
        super().resume(ckpt)

    def log_partition(self):
        for line in describe(self.bounds, self.costs, self.boundary_cost):
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
