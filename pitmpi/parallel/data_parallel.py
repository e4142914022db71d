"""``data-parallel``: the paper's baseline.

Every rank holds the whole network, computes the gradient of its share of
each batch (normalised by the whole batch size) and the shares are summed
with one ``Allreduce``; weight decay is added after the sum.  The iterates
equal ``serial``'s up to the rounding of the sum.
"""
import numpy as np

from ..errors import ConfigError
from .methods import register
from .serial import evaluate_full, full_step
from .trainer import Trainer


def share(n, size, rank):
    """Rows of ``n`` that ``rank`` of ``size`` takes: a near-equal contiguous slice."""
    edges = np.linspace(0, n, size + 1).round().astype(int)
    return slice(edges[rank], edges[rank + 1])


class DataParallelTrainer(Trainer):
    method = "data-parallel"

    def __init__(self, comm, cfg, data, log=None):
        super().__init__(comm, cfg, data, log)
        bs = self.batches.batch_size
        if bs < comm.size:
            raise ConfigError(f"train.batch_size = {bs} is smaller than the {comm.size} ranks "
                              "of data-parallel; every rank needs a share of each batch")
        self.rows = share(bs, comm.size, comm.rank)
        self.val_rows = share(len(self.y_val), comm.size, comm.rank)
        self.block = self.net.full(reuse=True)
        self.start(self.net.init_params(cfg["train"]["seed"]))

    def step(self, k, epoch):
        idx = self.batches.indices(k)
        n = len(idx)
        idx = idx[self.rows]
        X = np.take(self.x_train, idx, axis=0)
        grads, loss, correct = full_step(self.block, self.params, X, self.y_train[idx], n_norm=n)
        grads = self.opt.collect(grads)
        if self.comm.size > 1:
            self.comm.allreduce_sum(self.opt.grad_flat)
        penalty = self.opt.step(self.params, grads, self.lr(k, epoch))
        if self.comm.rank == 0:  # every rank holds the whole net: count its decay once
            loss += penalty
        return loss, correct, len(idx)

    def evaluate(self, X, y):
        return evaluate_full(self.net, self.params, X[self.val_rows], y[self.val_rows])


register("data-parallel", DataParallelTrainer)
