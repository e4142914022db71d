"""SGD with momentum and learning-rate schedules (paper Algorithm 3's update)."""
import numpy as np


class SGD:
    """Stochastic gradient descent with heavy-ball momentum and weight decay.

    ``g ← g + β_p p``, ``v ← μ v + g``, ``p ← p − η v`` for every parameter,
    in place; the update of a parameter depends on that parameter alone, so
    a block of layers updated on its own rank matches the whole network
    updated at once, bit for bit.

    The parameters move into one contiguous buffer: the entries of the dict
    given become views of it, and :attr:`grads` holds views of a gradient
    buffer of the same layout (a caller that computes its gradients there
    saves a copy; see :meth:`pitmpi.model.Block.optimizer`).  An update is
    then seven whole-buffer operations instead of about six per parameter,
    which on small networks is most of its cost (measured for a Swiss-roll
    block of four parameters: 66 → 38–46 µs an iteration in a run, 17 µs in
    a tight loop).

    Parameters
    ----------
    params : dict of str to ndarray
        All of one dtype; its entries are replaced by views of the buffer.
    momentum : float
    decay : dict of str to float, optional
        Weight-decay factor ``β_p`` of each parameter (its gradient is
        ``β_p p`` and its loss term ``β_p p² / 2``); None: no weight decay.
    scale : dict of str to float, optional
        Factor ``s_p`` on each parameter's gradient (weight decay included)
        before the momentum: ``v ← μ v + s_p (g + β_p p)``; ``1 / h`` on an
        ODE layer's controls makes the step one per unit time
        (``train.lr_per = "time"``).  None: 1 for all.
    """

    def __init__(self, params, momentum, decay=None, scale=None):
        self.momentum = float(momentum)
        dtypes = {v.dtype for v in params.values()}
        if len(dtypes) != 1:
            raise ValueError(f"SGD needs parameters of one dtype, got {sorted(map(str, dtypes))}")
        dtype = dtypes.pop()
        self.slots = {}
        end = 0
        # laid out by name, not by the dict's order (a checkpoint's, read
        # back, is alphabetical): the sums over the buffer, such as the decay
        # penalty, then add the same numbers in the same order after a resume
        for name in sorted(params):
            v = params[name]
            self.slots[name] = (slice(end, end + v.size), v.shape)
            end += v.size
        self.flat = np.empty(end, dtype)
        self.grad_flat = np.zeros(end, dtype)
        self.velocity_flat = np.zeros(end, dtype)
        self._tmp = np.empty(end, dtype)
        for name in params:
            view = self.view(self.flat, name)
            view[...] = params[name]
            params[name] = view
        self.params = dict(params)
        self.grads = {name: self.view(self.grad_flat, name) for name in params}
        self.velocity = {name: self.view(self.velocity_flat, name) for name in params}
        self.decay = self._per_parameter(decay, end, dtype)
        self.scale = self._per_parameter(scale, end, dtype)

    def _per_parameter(self, factors, size, dtype):
        """A buffer holding each parameter's factor over its slots (None stays None)."""
        if factors is None:
            return None
        out = np.empty(size, dtype)
        for name, (where, _) in self.slots.items():
            out[where] = factors[name]
        return out

    def view(self, flat, name):
        """Parameter ``name``'s part of a buffer of this layout."""
        where, shape = self.slots[name]
        return flat[where].reshape(shape)

    def load_velocity(self, velocity):
        """Set the momentum state from a dict of arrays of the parameters' shapes."""
        for name, v in self.velocity.items():
            v[...] = velocity[name]

    def collect(self, grads):
        """Copy into :attr:`grads` (so into :attr:`grad_flat`) the gradients
        that are not there already; returns :attr:`grads`.  ``grads`` must
        name every parameter (a missing one would keep a stale gradient)."""
        if grads.keys() != self.grads.keys():
            raise ValueError(f"gradients of {sorted(grads)} for the parameters "
                             f"{sorted(self.grads)}: every parameter needs one")
        for name, g in grads.items():
            if g is not self.grads[name]:
                np.copyto(self.grads[name], g)
        return self.grads

    def step(self, params, grads, lr):
        """Add weight decay to ``grads``, then update ``params`` in place with
        learning rate ``lr``.

        Parameters
        ----------
        params : dict of str to ndarray
            The dict given to the constructor (its entries untouched since).
        grads : dict of str to ndarray
            Gradients, same keys; those not already in :attr:`grads` are
            copied there.

        Returns
        -------
        float
            The weight-decay term of the loss, ``Σ β_p p² / 2``, at the
            parameters before the update.
        """
        self.collect(grads)
        for name, mine in self.params.items():
            if params.get(name) is not mine:
                raise ValueError(f"parameter {name!r} was replaced after the optimizer took "
                                 "it; build a new optimizer for new parameters")
        penalty = 0.0
        if self.decay is not None:
            scaled = np.multiply(self.flat, self.decay, out=self._tmp)
            penalty = 0.5 * float(np.dot(scaled, self.flat))
            self.grad_flat += scaled
        if self.scale is not None:
            self.grad_flat *= self.scale
        v = self.velocity_flat
        v *= self.momentum
        v += self.grad_flat
        self.flat -= np.multiply(v, lr, out=self._tmp)
        return penalty


class Schedule:
    """Learning rate per iteration.

    - ``constant``: ``η_k = η``.
    - ``step``: ``η_k = η γ^⌊epoch / lr_step⌋``.
    - ``inverse``: ``η_k = η / (1 + k / τ)``; ``Σ η_k = ∞`` and ``Σ η_k² < ∞``,
      the step-size conditions of the paper's Theorem 4.2.

    With ``warmup_iters = W > 0`` each is multiplied by ``min(1, (k + 1) / W)``.
    """

    def __init__(self, kind, lr, gamma=0.1, step_epochs=10, decay_iters=1000, warmup_iters=0):
        self.kind, self.lr, self.gamma = kind, float(lr), float(gamma)
        self.step_epochs, self.decay_iters = int(step_epochs), int(decay_iters)
        self.warmup_iters = int(warmup_iters)
        if kind not in ("constant", "step", "inverse"):
            raise ValueError(f"unknown schedule {kind!r}")

    def __call__(self, k, epoch):
        if self.kind == "constant":
            lr = self.lr
        elif self.kind == "step":
            lr = self.lr * self.gamma ** (epoch // self.step_epochs)
        else:
            lr = self.lr / (1.0 + k / self.decay_iters)
        if k < self.warmup_iters:
            lr *= (k + 1) / self.warmup_iters
        return lr

    @classmethod
    def from_config(cls, train, per_epoch=1):
        """The schedule of a ``[train]`` table; ``per_epoch`` iterations an epoch."""
        return cls(train["schedule"], train["lr"], train["lr_gamma"], train["lr_step"],
                   train["lr_decay_iters"], round(train["lr_warmup"] * per_epoch))


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
