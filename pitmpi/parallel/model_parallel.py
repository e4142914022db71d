"""``model-parallel``: layer blocks on ranks with exact gradients.

Each iteration is a full forward sweep (states passed rank to rank), then a
full backward sweep (co-states passed back): the iterates equal ``serial``'s,
and all but one rank wait at any time — the plumbing check that shows why
the pipeline of ``pit`` is needed.
"""
from .blocks import BlockTrainer
from .methods import register


class ModelParallelTrainer(BlockTrainer):
    method = "model-parallel"

    def setup(self):
        self.log_partition()
        self.start(self.net.init_params(self.cfg["train"]["seed"]))

    def step(self, k, epoch):
        y = self.labels(k)
        check = lambda x_out: self.check_finite("state at its right boundary", x_out, k, epoch)
        _, grads, (loss, correct) = self.exact_sweep(self.block, k, y, check=check)
        loss = self.finish_step(grads, k, epoch, loss)
        return loss, correct, (len(y) if self.block.last else 0)


register("model-parallel", ModelParallelTrainer)
