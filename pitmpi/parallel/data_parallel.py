"""``data-parallel``: the paper's baseline.

Every rank holds the whole network, computes the gradient of its share of
each batch (normalised by the whole batch size) and the shares are summed
with one ``Allreduce``; weight decay is added after the sum.  The iterates
equal ``serial``'s up to the rounding of the sum.
"""
import numpy as np

from ..optim import SGD
from .methods import register
from .serial import evaluate_full, full_step
from .trainer import Trainer


class DataParallelTrainer(Trainer):
    method = "data-parallel"

    def __init__(self, comm, cfg, data, log=None):
        super().__init__(comm, cfg, data, log)
        bs, size = self.batches.batch_size, comm.size
        if bs < size:
            from ..errors import ConfigError
            raise ConfigError(f"train.batch_size = {bs} is smaller than the {size} ranks of "
                              "data-parallel; every rank needs a share of each batch")
        edges = np.linspace(0, bs, size + 1).round().astype(int)
        self.rows = slice(edges[comm.rank], edges[comm.rank + 1])
        self.block = self.net.full()
        self.params = self.net.init_params(cfg["train"]["seed"])
        self.opt = SGD(self.params, cfg["train"]["momentum"])
        self.names = list(self.params)
        self.flat = np.empty(sum(v.size for v in self.params.values()), dtype=self.net.dtype)
        n_val = len(self.y_val)
        vedges = np.linspace(0, n_val, size + 1).round().astype(int)
        self.val_rows = slice(vedges[comm.rank], vedges[comm.rank + 1])

    def step(self, k, epoch):
        idx = self.batches.indices(k)
        n = len(idx)
        idx = idx[self.rows]
        grads, loss, correct = full_step(self.block, self.params, self.x_train[idx],
                                         self.y_train[idx], n_norm=n)
        offset = 0
        for name in self.names:
            g = grads[name]
            self.flat[offset:offset + g.size] = g.ravel()
            offset += g.size
        self.comm.allreduce_sum(self.flat)
        offset = 0
        for name in self.names:
            g = grads[name]
            g.ravel()[:] = self.flat[offset:offset + g.size]
            offset += g.size
        if self.comm.rank == 0:
            loss += self.block.decay(self.params)
        self.block.add_decay_grad(self.params, grads)
        self.opt.step(self.params, grads, self.lr(k, epoch))
        return loss, correct, len(idx)

    def evaluate(self, X, y):
        return evaluate_full(self.net, self.params, X[self.val_rows], y[self.val_rows])

    def gather_params(self):
        return self.params if self.comm.rank == 0 else None


register("data-parallel", DataParallelTrainer)
