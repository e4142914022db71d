"""``serial``: paper Algorithm 3 — forward, backward, update — on one rank."""
from ..errors import UserError
from ..kernels import score_stats
from .trainer import Trainer


def full_step(block, params, X, y, n_norm=None):
    """Forward and backward through a whole-network block.

    Returns
    -------
    grads : dict
        Gradient of the data loss (normalised by ``n_norm``), no weight decay.
    loss : float
        Data loss of these rows divided by ``n_norm``.
    correct : int
    """
    ctx = block.forward(params, X)
    _, grads, (loss, correct) = block.backward(params, ctx, y=y, n_norm=n_norm)
    return grads, loss, correct


def evaluate_full(net, params, X, y, chunk=8192):
    """``(Σ cross-entropy, #correct)`` of a whole network over ``X``, in
    chunks of at most ``chunk`` rows (:meth:`~pitmpi.model.ResNet.eval_rows`)."""
    block = net.full()
    loss = 0.0
    correct = 0
    chunk = net.eval_rows(chunk)
    for i in range(0, len(y), chunk):
        Xi, yi = X[i:i + chunk], y[i:i + chunk]
        ctx = block.forward(params, Xi, store=False)
        l, c = score_stats(block.scores(params, ctx), yi)
        loss += l
        correct += c
    return loss, correct


class SerialTrainer(Trainer):
    """Mini-batch SGD with momentum on the whole network, one rank."""

    method = "serial"

    def __init__(self, comm, cfg, data, log=None):
        if comm.size > 1:
            raise UserError(f"train.method = 'serial' runs on one rank, but this job has "
                            f"{comm.size}; launch it without mpirun, or choose "
                            "'data-parallel', 'model-parallel' or 'pit'")
        super().__init__(comm, cfg, data, log)
        self.block = self.net.full(reuse=True)
        self.start(self.net.init_params(cfg["train"]["seed"]))

    def step(self, k, epoch):
        X, y = self.batch(k)
        grads, loss, correct = full_step(self.block, self.params, X, y)
        loss += self.opt.step(self.params, grads, self.lr(k, epoch))
        return loss, correct, len(y)

    def evaluate(self, X, y):
        return evaluate_full(self.net, self.params, X, y)
