"""``model-parallel``: layer blocks on ranks with exact gradients.

Each iteration is a full forward sweep (states passed rank to rank), then a
full backward sweep (co-states passed back): the iterates equal ``serial``'s,
and all but one rank wait at any time — the plumbing check that shows why
the pipeline of ``pit`` is needed.
"""
import numpy as np

from .blocks import BlockTrainer
from .comm import COSTATE_TAG, STATE_TAG, batch_tag
from .methods import register


class ModelParallelTrainer(BlockTrainer):
    method = "model-parallel"

    def __init__(self, comm, cfg, data, log=None):
        super().__init__(comm, cfg, data, log)
        sw, bs = self.net.state_width, self.batches.batch_size
        self.x_in = np.empty((bs, sw), dtype=self.net.dtype)
        self.lam_out = np.empty((bs, sw), dtype=self.net.dtype)

    def setup(self):
        self.log_partition()
        self.start(self.net.init_params(self.cfg["train"]["seed"]))

    def step(self, k, epoch):
        comm, blk = self.comm, self.block
        y = self.labels(k)
        if blk.first:
            inp = self.features(k)
        else:
            comm.recv(self.x_in, self.prev, batch_tag(STATE_TAG, k))
            inp = self.x_in
        ctx = blk.forward(self.params, inp)
        self.check_finite("state at its right boundary", ctx.output, k, epoch)
        if self.next is not None:
            comm.send(np.ascontiguousarray(ctx.output), self.next, batch_tag(STATE_TAG, k))
            comm.recv(self.lam_out, self.next, batch_tag(COSTATE_TAG, k))
            lam_in, grads, (loss, correct) = blk.backward(self.params, ctx, lam_out=self.lam_out)
        else:
            lam_in, grads, (loss, correct) = blk.backward(self.params, ctx, y=y)
        if self.prev is not None:
            comm.send(lam_in, self.prev, batch_tag(COSTATE_TAG, k))
        loss = self.finish_step(grads, k, epoch, loss)
        return loss, correct, (len(y) if blk.last else 0)


register("model-parallel", ModelParallelTrainer)
