"""The residual network: parameters, layer blocks, loss and gradient.

A :class:`Block` is a contiguous range of ODE layers ``[a, b)``; the block
that starts at 0 also owns the opening layer and the one that ends at ``L``
the classifier and loss.  The whole network is the block ``[0, L)``, so the
serial trainer and every parallel method run the same code.

Parameter names (DESIGN §2): ``open.K (w, d)``, ``open.b (w,)``,
``K (L, w, w)``, ``b (L, w)``, ``cls.W (c, w)``, ``cls.b (c,)``; for a
convolutional net (DESIGN §10, ``w`` channels, images ``(C, H, W)``, k × k
kernels): ``open.K (w, C, k, k)``, ``open.b (w,)``, ``K (L, w, w, k, k)``,
``b (L, w)``, ``cls.W (c, w H' W')`` (flatten) or ``(c, w)`` (pool).  A
block's *local* parameters hold only its own layers: ``K[a:b]``, ``b[a:b]``.
"""
import numpy as np

from .kernels import (ACTIVATIONS, SCHEMES, Activation, Conv, Dense, Workspace,
                      classifier_loss_and_grad, cross_entropy, opening_backward, opening_forward,
                      output_errors, scores)
from .kernels.workspace import scratch
from .optim import SGD

PARAM_NAMES = ("open.K", "open.b", "K", "b", "cls.W", "cls.b")
OPENING = ("open.K", "open.b")
LAYERS = ("K", "b")
CLASSIFIER = ("cls.W", "cls.b")
DTYPES = {"float64": np.float64, "float32": np.float32}
KINDS = ("dense", "conv")
EVAL_SCRATCH_BYTES = 64 * 2**20  # most scratch of an evaluation chunk's layer (conv)
CLASSIFIERS = ("flatten", "pool")


class ResNet:
    """A ResNet seen as the discretised ODE of DESIGN §2.

    Parameters
    ----------
    scheme : {"euler", "verlet"}
    n_features : int
        Input dimension ``d``.
    width : int
        Layer width ``w`` (dense), or channels (conv).
    layers : int
        Number of ODE layers ``L``.
    n_classes : int
        Number of classes ``c``.
    T : float
        Final time; the step is ``h = T / L``.
    activation : {"tanh", "relu"}
    weight_decay : float
        ``β`` of DESIGN §2.
    dtype : {"float64", "float32"}
    store_trajectory : bool
        Verlet only: False rebuilds states backwards in the adjoint instead of
        storing them (memory independent of depth).
    label_smoothing : float
        ``ε`` in [0, 1): the training loss's target is ``(1 − ε) onehot(y)
        + ε / c`` (evaluation scores plain cross-entropy).
    kind : {"dense", "conv"}
        The ODE layers' linear map (:mod:`~pitmpi.kernels.operators`).
    image_shape : tuple of int, optional
        Conv: the inputs' ``(C, H, W)`` (``C H W = n_features``).
    kernel : int
        Conv: the kernels' size ``k`` (odd).
    stride : int
        Conv: the opening layer's stride (the ODE layers work at
        ``ceil(H / stride) × ceil(W / stride)``).
    classifier : {"flatten", "pool"}
        Conv: the classifier reads the whole last state, or its
        per-channel means (global average pooling).
    """

    def __init__(self, scheme, n_features, width, layers, n_classes, T,
                 activation="tanh", weight_decay=0.0, dtype="float64",
                 store_trajectory=True, label_smoothing=0.0, kind="dense", image_shape=None,
                 kernel=3, stride=1, classifier="flatten"):
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
        for name, value in (("n_features", n_features), ("width", width),
                            ("layers", layers), ("n_classes", n_classes)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not T > 0:
            raise ValueError(f"T must be positive, got {T!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.scheme_name = scheme
        self.scheme = SCHEMES[scheme]
        self.n_features = int(n_features)
        self.width = int(width)
        self.layers = int(layers)
        self.n_classes = int(n_classes)
        self.T = float(T)
        self.h = self.T / self.layers
        self.activation = activation
        self.act = Activation(activation)
        self.weight_decay = float(weight_decay)
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        self.store_trajectory = bool(store_trajectory)
        self.label_smoothing = float(label_smoothing)
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
        if classifier not in CLASSIFIERS:
            raise ValueError(f"unknown classifier {classifier!r}; allowed: {', '.join(CLASSIFIERS)}")
        self.kind, self.kernel, self.stride, self.classifier = kind, int(kernel), int(stride), classifier
        self.image_shape = None if image_shape is None else tuple(int(v) for v in image_shape)
        if kind == "dense":
            if classifier != "flatten":
                raise ValueError("a dense net's classifier reads the whole state (flatten)")
            self.open_op = Dense(self.width, self.n_features)  # the opening layer's map
            self.op = Dense(self.width)  # the ODE layers' linear map
        else:
            if self.image_shape is None or len(self.image_shape) != 3 \
                    or int(np.prod(self.image_shape)) != self.n_features:
                raise ValueError(f"a conv net needs images: image_shape (C, H, W) with C H W = "
                                 f"{self.n_features} features, got {image_shape!r}")
            C, H, W = self.image_shape
            self.open_op = Conv(self.width, H, W, self.kernel, in_channels=C, stride=self.stride)
            self.op = Conv(self.width, self.open_op.height, self.open_op.width, self.kernel)
        # what the classifier reads: the whole state, or one mean per channel
        self.classifier_width = self.op.size if classifier == "flatten" else self.width
        self.state_width = self.scheme.state_width(self.op.size)
        self._full = None  # the reusing whole-network block of loss_and_grad

    def __repr__(self):
        conv = (f", kind='conv', image_shape={self.image_shape}, kernel={self.kernel}, "
                f"stride={self.stride}, classifier={self.classifier!r}"
                if self.kind == "conv" else "")
        return (f"ResNet({self.scheme_name!r}, n_features={self.n_features}, width={self.width}, "
                f"layers={self.layers}, n_classes={self.n_classes}, T={self.T}, "
                f"activation={self.activation!r}, weight_decay={self.weight_decay}{conv})")

    def with_layers(self, layers):
        """The same network on another grid (same ``T``), e.g. the coarse model."""
        return ResNet(self.scheme_name, self.n_features, self.width, layers, self.n_classes,
                      self.T, self.activation, self.weight_decay, self.dtype_name,
                      self.store_trajectory, self.label_smoothing, self.kind, self.image_shape,
                      self.kernel, self.stride, self.classifier)

    def param_shapes(self):
        """Shapes of the full parameter set, by name."""
        L, c = self.layers, self.n_classes
        return {"open.K": self.open_op.kernel_shape, "open.b": self.open_op.bias_shape,
                "K": (L,) + self.op.kernel_shape, "b": (L,) + self.op.bias_shape,
                "cls.W": (c, self.classifier_width), "cls.b": (c,)}

    def init_params(self, seed):
        """Random initial parameters, the same for any partition.

        Each weight ``N(0, 1/fan-in)`` entrywise: ``open.K ~ N(0, 1/d)``,
        ``K ~ N(0, 1/w)``, ``cls.W ~ N(0, 1/w)`` for a dense net (conv:
        ``1/(C k²)``, ``1/(w k²)`` and one over the classifier's input
        width); biases zero.

        Parameters
        ----------
        seed : int

        Returns
        -------
        dict of str to ndarray
        """
        rng = np.random.default_rng(seed)
        shapes = self.param_shapes()
        fan_in = lambda weight_shape: np.sqrt(int(np.prod(weight_shape[1:])))  # (out, in...)
        p = {
            "open.K": rng.standard_normal(shapes["open.K"]) / fan_in(shapes["open.K"]),
            "open.b": np.zeros(shapes["open.b"]),
            "K": rng.standard_normal(shapes["K"]) / fan_in(self.op.kernel_shape),
            "b": np.zeros(shapes["b"]),
            "cls.W": rng.standard_normal(shapes["cls.W"]) / fan_in(shapes["cls.W"]),
            "cls.b": np.zeros(shapes["cls.b"]),
        }
        return {k: v.astype(self.dtype) for k, v in p.items()}

    def eval_rows(self, most):
        """Rows per evaluation chunk: ``most``, or fewer so that the
        layers' scratch (a conv's shifted copies) stays under
        :data:`EVAL_SCRATCH_BYTES`; at least 64."""
        per_sample = max(self.op.scratch_per_sample(), self.open_op.scratch_per_sample())
        if not per_sample:
            return most
        fit = EVAL_SCRATCH_BYTES // (per_sample * np.dtype(self.dtype).itemsize)
        return int(min(most, max(64, fit)))

    def classifier_input(self, state):
        """What the classifier reads of last states ``state`` (n, state_width):
        the ``Y`` part (n, op.size), or its per-channel means (n, w) with
        ``classifier = "pool"``."""
        Y = state[:, :self.op.size]
        if self.classifier == "flatten":
            return Y
        return Y.reshape(Y.shape[0], self.width, -1).mean(axis=2)

    def classifier_costate(self, lam):
        """The co-state of ``Y_L`` (n, op.size) from that of the classifier's
        input ``lam`` (the adjoint of :meth:`classifier_input`)."""
        if self.classifier == "flatten":
            return lam
        positions = self.op.size // self.width
        out = np.empty((lam.shape[0], self.width, positions), dtype=lam.dtype)
        out[...] = (lam / positions)[:, :, None]
        return out.reshape(lam.shape[0], -1)

    def block(self, a, b, reuse=False):
        """The block of layers ``[a, b)``; see :class:`Block`."""
        return Block(self, a, b, reuse)

    def full(self, reuse=False):
        """The whole network as one block."""
        return Block(self, 0, self.layers, reuse)

    def loss_and_grad(self, params, X, y):
        """Loss (with weight decay) and its gradient.

        Parameters
        ----------
        params : dict of str to ndarray
        X : ndarray, shape (n, d)
        y : ndarray of int, shape (n,)

        Returns
        -------
        loss : float
        grads : dict of str to ndarray, same keys and shapes as ``params``
        """
        if self._full is None:
            self._full = self.full(reuse=True)
        blk = self._full
        X = np.asarray(X, dtype=self.dtype)
        ctx = blk.forward(params, X)
        _, grads, (loss, _) = blk.backward(params, ctx, y=np.asarray(y), n_norm=len(y))
        blk.add_decay_grad(params, grads)
        # the block reuses its arrays; the caller owns what it gets
        return loss + blk.decay(params), {k: np.array(v) for k, v in grads.items()}

    def output_errors(self, params, X, y, chunk=256):
        """Each sample's output error ``softmax(S) − q`` (the loss gradient at
        its scores, with the label-smoothed targets ``q``: what sets the size
        and direction of its co-states), shape (n, c), for ``X`` in chunks
        as :meth:`predict`."""
        _, P = cross_entropy(self.predict(params, X, chunk), y)
        return output_errors(P, y, self.label_smoothing)

    def predict(self, params, X, chunk=8192):
        """Class scores, shape (n, c), for ``X`` (n, d), in chunks of at most
        ``chunk`` rows (fewer for a conv net, see :meth:`eval_rows`)."""
        chunk = self.eval_rows(chunk)
        blk = self.full()
        X = np.asarray(X, dtype=self.dtype)
        out = np.empty((X.shape[0], self.n_classes), dtype=self.dtype)
        for i in range(0, X.shape[0], chunk):
            out[i:i + chunk] = blk.scores(params, blk.forward(params, X[i:i + chunk], store=False))
        return out


class Block:
    """Layers ``[a, b)`` of ``net``, with the opening layer if ``a == 0`` and the
    classifier if ``b == L``.

    Parameters
    ----------
    net : ResNet
    a, b : int
        ``0 <= a < b <= L``.
    reuse : bool
        Keep the trajectory, scratch arrays and gradients in a
        :class:`~pitmpi.kernels.Workspace` reused by every call: much faster
        for a training loop (no fresh pages each iteration), but a
        :class:`BlockForward` is then valid only until the next
        :meth:`forward` and the gradients only until the next
        :meth:`backward`.  With False every call allocates anew.
    """

    def __init__(self, net, a, b, reuse=False):
        if not 0 <= a < b <= net.layers:
            raise ValueError(f"block [{a}, {b}) is not inside [0, {net.layers})")
        self.net, self.a, self.b = net, int(a), int(b)
        self.ws = Workspace() if reuse else None
        self.first = self.a == 0
        self.last = self.b == net.layers
        self.param_names = ((OPENING if self.first else ()) + LAYERS
                            + (CLASSIFIER if self.last else ()))

    def __repr__(self):
        return f"Block([{self.a}, {self.b}) of {self.net.layers})"

    def local_params(self, full_params):
        """Copy this block's share of a full parameter set."""
        out = {}
        for name in self.param_names:
            v = full_params[name]
            out[name] = np.array(v[self.a:self.b] if name in LAYERS else v, dtype=self.net.dtype)
        return out

    def forward(self, params, inp, store=None):
        """Forward sweep through the block.

        Parameters
        ----------
        params : dict
            Local parameters (see :meth:`local_params`).
        inp : ndarray
            Features ``X`` (n, d) if the block is first, else the state at
            ``a``, shape (n, state_width).
        store : bool, optional
            Keep what the adjoint needs (default); False keeps only the
            output (evaluation).  Verlet with ``store_trajectory = False``
            keeps only the output either way and rebuilds the states in the
            adjoint.

        Returns
        -------
        BlockForward
            ``.output`` is the state at ``b``, shape (n, state_width): a new
            array on every call, even when the workspace is reused (``pit``
            keeps it to pair with the co-state that comes back later).
        """
        net = self.net
        if store is None:
            store = net.store_trajectory or net.scheme_name != "verlet"
        ws = self.ws if store else None  # evaluation chunks: no big arrays kept
        S0 = None
        if self.first:
            S0 = opening_forward(params["open.K"], params["open.b"], inp, net.act, net.open_op)
            x = S0
            if net.state_width != net.op.size:
                x = np.hstack([S0, np.zeros_like(S0)])
        else:
            x = inp
        traj = net.scheme.forward(params["K"], params["b"], net.h, x, net.act, store=store, ws=ws,
                                  op=net.op)
        return BlockForward(inp, S0, traj)

    def scores(self, params, ctx):
        """Class scores (n, c) from a forward pass of the last block."""
        return scores(params["cls.W"], params["cls.b"], self.net.classifier_input(ctx.output))

    def backward(self, params, ctx, lam_out=None, y=None, n_norm=None, errors=None, grads=True):
        """Adjoint sweep through the block.

        Parameters
        ----------
        params : dict
            Local parameters.
        ctx : BlockForward
            From :meth:`forward`.
        lam_out : ndarray, shape (n, state_width), optional
            Co-state at ``b``; required unless the block is last.
        y : ndarray of int, shape (n,), optional
            Labels; required if the block is last.
        n_norm : int, optional
            Normaliser of the mean loss (default ``n``).
        errors : ndarray, shape (n, c), optional
            If the block is last, receives each sample's output error
            ``softmax(S) − q``, the loss gradient at its scores (what sets
            the size and direction of its co-states).
        grads : bool
            False: the co-state only, without the parameters' gradients
            (about two thirds of the work of an ODE layer).

        Returns
        -------
        lam_in : ndarray, shape (n, state_width) or None
            Co-state at ``a`` (None for the first block).
        grads : dict
            Gradients of the local parameters, weight decay not included
            (empty with ``grads=False``).
        stats : (float, int)
            For the last block the data loss of these rows (divided by
            ``n_norm``) and the count of correct predictions, else (0.0, 0).
        """
        net = self.net
        w = net.op.size
        want, grads = grads, {}
        stats = (0.0, 0)
        if self.last:
            n_norm = len(y) if n_norm is None else n_norm
            loss, correct, gW, gmu, lamY = classifier_loss_and_grad(
                params["cls.W"], params["cls.b"], net.classifier_input(ctx.output), y, n_norm,
                net.label_smoothing, errors)
            if want:
                grads["cls.W"], grads["cls.b"] = gW, gmu
            stats = (loss, correct)
            lamY = net.classifier_costate(lamY)
            if net.state_width != w:
                lam_out = np.hstack([lamY, np.zeros_like(lamY)])
            else:
                lam_out = lamY
        elif lam_out is None:
            raise ValueError(f"{self!r} is not last: it needs the co-state at its right end")
        K, ws, dt = params["K"], self.ws, net.dtype
        gK = scratch(ws, GRADIENT_SLOTS["K"], K.shape, dt) if want else None
        gb = scratch(ws, GRADIENT_SLOTS["b"], params["b"].shape, dt) if want else None
        lam_in = net.scheme.backward(K, params["b"], net.h, ctx.traj, lam_out, net.act, gK, gb, ws,
                                     op=net.op)
        if want:
            grads["K"], grads["b"] = gK, gb
        if self.first:
            if want:
                grads["open.K"], grads["open.b"] = opening_backward(
                    ctx.inp, ctx.S0, lam_in[:, :w], net.act, net.open_op,
                    out=scratch(ws, GRADIENT_SLOTS["open.K"], params["open.K"].shape, dt))
            lam_in = None
        return lam_in, grads, stats

    def decay_factors(self):
        """Weight-decay factor of each parameter (``βh`` for ``K, b``, ``β``
        for the opening layer and classifier), or None without weight decay."""
        beta = self.net.weight_decay
        if beta == 0.0:
            return None
        return {name: beta * self.net.h if name in LAYERS else beta for name in self.param_names}

    def decay(self, params):
        """This block's part of the weight-decay term of the loss."""
        factors = self.decay_factors() or {}
        return 0.5 * sum(f * float(np.vdot(params[name], params[name]))
                         for name, f in factors.items())

    def add_decay_grad(self, params, grads):
        """Add the weight-decay gradient (``βhK``, ``βhb``, ``βKo``, ...) in place."""
        for name, f in (self.decay_factors() or {}).items():
            p = params[name]
            tmp = scratch(self.ws, "decay." + name, p.shape, p.dtype)
            grads[name] += np.multiply(p, f, out=tmp)
        return grads

    def step_scales(self, lr_per):
        """Factor on each parameter's gradient in the update: ``1 / h`` for
        the ODE layers' controls with ``lr_per = "time"`` (the gradient of
        the continuous control ``U(t)``, so that a step moves the network's
        function alike at any depth), None (all 1) with ``"layer"`` (the
        paper's plain SGD on each layer's controls)."""
        if lr_per == "layer":
            return None
        if lr_per != "time":
            raise ValueError(f"lr_per = {lr_per!r}: expected 'time' or 'layer'")
        return {name: 1.0 / self.net.h if name in LAYERS else 1.0 for name in self.param_names}

    def optimizer(self, params, momentum, lr_per="layer"):
        """An :class:`~pitmpi.optim.SGD` for this block's ``params`` (moved
        into its buffer) with the block's weight decay and step scales
        (:meth:`step_scales`); with a reused workspace the adjoint then
        writes the layers' and the opening layer's gradients straight into
        the optimizer's gradient buffer."""
        opt = SGD(params, momentum, self.decay_factors(), self.step_scales(lr_per))
        if self.ws is not None:
            for name, where in GRADIENT_SLOTS.items():
                if name in opt.grads:
                    self.ws.adopt(where, opt.grads[name])
        return opt


GRADIENT_SLOTS = {"K": "gK", "b": "gb", "open.K": "gKo"}  # parameter: workspace name in backward


def join_blocks(parts):
    """Full parameters from the local parameters of consecutive blocks.

    Parameters
    ----------
    parts : list of dict
        ``Block.local_params`` of blocks ``[s_0, s_1), [s_1, s_2), ...`` in order.

    Returns
    -------
    dict
        ``K`` and ``b`` concatenated; opening and classifier from the blocks
        that hold them.
    """
    full = {k: v for p in parts for k, v in p.items() if k not in LAYERS}
    for name in LAYERS:
        full[name] = np.concatenate([p[name] for p in parts])
    return full


class BlockForward:
    """What a block's forward sweep keeps for its adjoint."""

    def __init__(self, inp, S0, traj):
        self.inp, self.S0, self.traj = inp, S0, traj

    @property
    def output(self):
        """State at the block's right end, shape (n, state_width)."""
        return self.traj.output
