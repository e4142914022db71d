"""SGD with momentum and learning-rate schedules (paper Algorithm 3's update)."""
import numpy as np


class SGD:
    """Stochastic gradient descent with heavy-ball momentum.

    ``v ← μ v + g``, ``p ← p − η v`` for every parameter, in place; the update
    of a parameter depends on that parameter alone, so a block of layers
    updated on its own rank matches the whole network updated at once, bit
    for bit.

    Parameters
    ----------
    params : dict of str to ndarray
        Only the names are used (to create the velocities).
    momentum : float
    """

    def __init__(self, params, momentum):
        self.momentum = float(momentum)
        self.velocity = {k: np.zeros_like(v) for k, v in params.items()}
        self._step = {k: np.empty_like(v) for k, v in params.items()}

    def step(self, params, grads, lr):
        """Update ``params`` in place from ``grads`` with learning rate ``lr``."""
        for name, g in grads.items():
            v = self.velocity[name]
            v *= self.momentum
            v += g
            params[name] -= np.multiply(v, lr, out=self._step[name])


class Schedule:
    """Learning rate per iteration.

    - ``constant``: ``η_k = η``.
    - ``step``: ``η_k = η γ^⌊epoch / lr_step⌋``.
    - ``inverse``: ``η_k = η / (1 + k / τ)``; ``Σ η_k = ∞`` and ``Σ η_k² < ∞``,
      the step-size conditions of the paper's Theorem 4.2.
    """

    def __init__(self, kind, lr, gamma=0.1, step_epochs=10, decay_iters=1000):
        self.kind, self.lr, self.gamma = kind, float(lr), float(gamma)
        self.step_epochs, self.decay_iters = int(step_epochs), int(decay_iters)
        if kind not in ("constant", "step", "inverse"):
            raise ValueError(f"unknown schedule {kind!r}")

    def __call__(self, k, epoch):
        if self.kind == "constant":
            return self.lr
        if self.kind == "step":
            return self.lr * self.gamma ** (epoch // self.step_epochs)
        return self.lr / (1.0 + k / self.decay_iters)

    @classmethod
    def from_config(cls, train):
        return cls(train["schedule"], train["lr"], train["lr_gamma"], train["lr_step"],
                   train["lr_decay_iters"])


class BatchSchedule:
    """The global sequence of mini-batches, the same on every rank.

    Batch ``g`` (any integer; negative ids are the epoch before the first,
    used by the pipeline's warm-up) is slice ``g mod B`` of the permutation of
    epoch ``⌊g / B⌋``, ``B = n // batch_size`` batches per epoch (the
    remainder of each permutation is left out of that epoch).

    Parameters
    ----------
    n : int
        Number of training samples.
    batch_size : int
    seed : int
    """

    def __init__(self, n, batch_size, seed):
        if batch_size > n:
            raise ValueError(f"train.batch_size = {batch_size} is larger than the "
                             f"{n} training samples")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._perms = {}

    def permutation(self, epoch):
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch + 1]).permutation(self.n)
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def indices(self, g):
        """Sample indices of batch ``g``, shape (batch_size,)."""
        epoch, pos = divmod(g, self.per_epoch)
        return self.permutation(epoch)[pos * self.batch_size:(pos + 1) * self.batch_size]
