"""Co-state regression at a block boundary (DESIGN §5, the paper's eq. (6)).

Per-sample pairs ``(x_i, p_i)``, ``p_i = n Λ_i``, are fitted by ridge least
squares ``p ≈ φ(x) Θ`` with ``φ(x) = [x, 1]`` (``state``), ``[x, onehot(y), 1]``
(``state+label``) or ``onehot(y) ⊗ [x, 1]`` (``per-class``: one affine map per
class; a sample's co-state changes sign with its label, so the label matters).  The
normal equations ``G = Σ φφᵀ``, ``H = Σ φ pᵀ`` are kept with exponential
forgetting ``G ← γG + ΦᵀΦ``, so an update costs ``O(n f²)`` and a refit
``O(f³)`` (Cholesky).  A batch's co-state is predicted as ``Λ̂ = φ(X) Θ / n``.
"""
import numpy as np
import scipy.linalg.lapack


FEATURES = ("state", "state+label", "per-class")


class CostateRegression:
    """Ridge regression of per-sample co-states on states, with forgetting.

    ``per-class`` keeps one independent affine map per class: its normal
    equations are block diagonal, so each class is solved on its own
    (``c`` Cholesky factorisations of size ``sw + 1`` instead of one of size
    ``c (sw + 1)``).

    Parameters
    ----------
    state_width : int
        Width of the boundary state (``w``, or ``2w`` for Verlet).
    n_classes : int
    features : {"state", "state+label", "per-class"}
    ridge : float
        Ridge weight relative to the mean diagonal of each group's ``G``.
    forgetting : float
        ``γ`` in (0, 1]; 1 keeps every pair with equal weight.
    pairs_per_batch : int
        Add only the first this many pairs of each batch (batches are random
        draws, so these are a random subset; 0: all).  An update costs
        ``O(m f²)`` for ``m`` pairs.

    Attributes
    ----------
    G : ndarray, shape (groups, f, f)
    H, theta : ndarray, shape (groups, f, sw)
        ``groups`` is ``n_classes`` for ``per-class`` and 1 otherwise.
    """

    def __init__(self, state_width, n_classes, features="state", ridge=1e-6, forgetting=0.9,
                 pairs_per_batch=0):
        self.state_width, self.n_classes = int(state_width), int(n_classes)
        if features not in FEATURES:
            raise ValueError(f"unknown regression features {features!r}; allowed: {FEATURES}")
        self.kind = features
        self.use_labels = features != "state"
        self.ridge, self.forgetting = float(ridge), float(forgetting)
        self.pairs_per_batch = int(pairs_per_batch)
        self.groups = self.n_classes if features == "per-class" else 1
        f, sw = self.n_features, self.state_width
        self.G = np.zeros((self.groups, f, f))
        self.H = np.zeros((self.groups, f, sw))
        self.theta = np.zeros((self.groups, f, sw))
        self.scale = 1.0
        self.pairs = 0

    @property
    def n_features(self):
        """Features per group: ``sw + 1`` (``+ c`` with ``state+label``)."""
        return self.state_width + 1 + (self.n_classes if self.kind == "state+label" else 0)

    def features(self, x, y=None):
        """``φ(x)`` of each sample within its group, shape (n, f)."""
        n = x.shape[0]
        phi = np.empty((n, self.n_features))
        phi[:, :self.state_width] = x
        phi[:, -1] = 1.0
        if self.kind == "state+label":
            phi[:, self.state_width:-1] = 0.0
            phi[np.arange(n), self.state_width + np.asarray(y)] = 1.0
        return phi

    def _segments(self, y, n):
        """``(order, [(group, slice)])``: rows sorted by group, one slice each."""
        if self.groups == 1:
            return None, [(0, slice(0, n))]
        order = np.argsort(y, kind="stable")
        counts = np.bincount(y, minlength=self.groups)
        ends = np.cumsum(counts)
        starts = ends - counts
        return order, [(g, slice(a, b)) for g, (a, b) in enumerate(zip(starts, ends)) if b > a]

    def add(self, x, y, lam, refit=True, n=None):
        """Add the batch's pairs: states ``x`` (m, sw), labels ``y`` (m,) and
        batch co-states ``lam`` (m, sw), scaled here to ``p = n Λ`` (``n``:
        the size of the batch ``lam`` is normalised by; default ``m``)."""
        m = x.shape[0]
        n = m if n is None else n
        if 0 < self.pairs_per_batch < m:
            m = self.pairs_per_batch
            x, lam = x[:m], lam[:m]
            y = None if y is None else y[:m]
        phi = self.features(x, y)
        p = lam * n
        order, segments = self._segments(y, m)
        if order is not None:
            phi, p = phi[order], p[order]
        # forgetting without touching G and H: the true normal equations are
        # scale · (G, H), and a new pair enters with weight 1 / scale
        self.scale *= self.forgetting
        if self.scale < 1e-100:
            self.G *= self.scale
            self.H *= self.scale
            self.scale = 1.0
        root = (1.0 / self.scale) ** 0.5
        phi *= root
        p = p * root
        for g, rows in segments:
            self.G[g] += phi[rows].T @ phi[rows]
            self.H[g] += phi[rows].T @ p[rows]
        self.pairs += m
        if refit:
            self.refit()

    def merge(self, comm):
        """Sum the normal equations of every rank's pairs (collective; every
        rank has added the same number of batches, so the same ``scale``), then refit."""
        if comm.size > 1:
            self.G = np.ascontiguousarray(self.G)
            self.H = np.ascontiguousarray(self.H)
            comm.allreduce_sum(self.G)
            comm.allreduce_sum(self.H)
            self.pairs = int(sum(comm.allgather(self.pairs)))
        self.refit()

    def refit(self):
        """Solve ``(G_g + ρ_g I) Θ_g = H_g`` per group by Cholesky (LAPACK
        ``posv``), ``ρ_g = ridge · mean(diag G_g)``; a group without pairs
        gets ``Θ_g = 0``."""
        f = self.n_features
        for g in range(self.groups):
            scale = np.trace(self.G[g]) / f
            if scale <= 0:
                self.theta[g] = 0.0
                continue
            A = self.G[g].copy()
            A.flat[::f + 1] += self.ridge * scale
            _, theta, info = scipy.linalg.lapack.dposv(A, self.H[g], overwrite_a=True)
            if info != 0:  # not positive definite (no ridge): least-squares solution
                theta = np.linalg.lstsq(self.G[g], self.H[g], rcond=None)[0]
            self.theta[g] = theta
        return self.theta

    def predict(self, x, y=None):
        """Predicted batch co-state ``Λ̂ = φ(x) Θ / n``, shape (n, sw)."""
        n = x.shape[0]
        phi = self.features(x, y)
        order, segments = self._segments(y, n)
        if order is not None:
            phi = phi[order]
        lam = np.empty((n, self.state_width))
        for g, rows in segments:
            np.matmul(phi[rows], self.theta[g], out=lam[rows])
        if order is not None:
            lam[order] = lam.copy()
        lam /= n
        return lam.astype(x.dtype, copy=False)

    def state(self):
        """``{"G", "H", "scale", "theta", "pairs"}``: enough to continue
        elsewhere (seeding the fine run, checkpoints); the normal equations
        are ``scale · G`` and ``scale · H``."""
        return {"G": self.G.copy(), "H": self.H.copy(), "scale": np.float64(self.scale),
                "theta": self.theta.copy(), "pairs": np.int64(self.pairs)}

    def load_state(self, state):
        """Continue from :meth:`state` (``theta`` is refitted if absent)."""
        if state["G"].shape != self.G.shape or state["H"].shape != self.H.shape:
            raise ValueError(f"regression state of shape {state['G'].shape} does not fit "
                             f"this boundary's {self.G.shape}")
        self.G, self.H = np.array(state["G"], dtype=float), np.array(state["H"], dtype=float)
        self.scale = float(state.get("scale", 1.0))
        self.pairs = int(state["pairs"])
        if "theta" in state:
            self.theta = np.array(state["theta"], dtype=float)
        else:
            self.refit()


def prediction_errors(lam_hat, lam):
    """``(MSE of per-sample co-states, ‖Λ̂ − Λ‖ / ‖Λ̂‖)`` for one batch."""
    n = lam.shape[0]
    diff = lam_hat - lam
    mse = float(np.mean((n * diff) ** 2))
    norm_hat = float(np.linalg.norm(lam_hat))
    return mse, (float(np.linalg.norm(diff)) / norm_hat if norm_hat > 0 else np.inf)
