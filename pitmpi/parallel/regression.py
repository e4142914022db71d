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
import scipy.linalg


FEATURES = ("state", "state+label", "per-class")


class CostateRegression:
    """Ridge regression of per-sample co-states on states, with forgetting.

    Parameters
    ----------
    state_width : int
        Width of the boundary state (``w``, or ``2w`` for Verlet).
    n_classes : int
    features : {"state", "state+label", "per-class"}
    ridge : float
        Ridge weight relative to the mean diagonal of ``G``.
    forgetting : float
        ``γ`` in (0, 1]; 1 keeps every pair with equal weight.
    """

    def __init__(self, state_width, n_classes, features="state", ridge=1e-6, forgetting=0.9):
        self.state_width, self.n_classes = int(state_width), int(n_classes)
        if features not in FEATURES:
            raise ValueError(f"unknown regression features {features!r}; allowed: {FEATURES}")
        self.kind = features
        self.use_labels = features != "state"
        self.ridge, self.forgetting = float(ridge), float(forgetting)
        f = self.n_features
        self.G = np.zeros((f, f))
        self.H = np.zeros((f, self.state_width))
        self.theta = np.zeros((f, self.state_width))
        self.pairs = 0

    @property
    def n_features(self):
        sw, c = self.state_width, self.n_classes
        return {"state": sw + 1, "state+label": sw + 1 + c, "per-class": c * (sw + 1)}[self.kind]

    def features(self, x, y=None):
        """``φ(x)``, shape (n, f)."""
        n = x.shape[0]
        if self.kind == "per-class":
            phi = np.zeros((n, self.n_classes, self.state_width + 1))
            rows = np.arange(n)
            phi[rows, y, :-1] = x
            phi[rows, y, -1] = 1.0
            return phi.reshape(n, -1)
        cols = [np.asarray(x, dtype=np.float64)]
        if self.use_labels:
            onehot = np.zeros((n, self.n_classes))
            onehot[np.arange(n), y] = 1.0
            cols.append(onehot)
        cols.append(np.ones((n, 1)))
        return np.hstack(cols)

    def add(self, x, y, lam, refit=True):
        """Add the batch's pairs: states ``x`` (n, sw), labels ``y`` (n,) and
        batch co-states ``lam`` (n, sw) (scaled to ``p = n Λ`` here)."""
        phi = self.features(x, y)
        p = lam * x.shape[0]
        self.G *= self.forgetting
        self.G += phi.T @ phi
        self.H *= self.forgetting
        self.H += phi.T @ p
        self.pairs += x.shape[0]
        if refit:
            self.refit()

    def refit(self):
        """Solve ``(G + ρ I) Θ = H`` with ``ρ = ridge · mean(diag G)``."""
        if self.pairs == 0:
            return self.theta
        A = self.G.copy()
        A[np.diag_indices_from(A)] += self.ridge * np.trace(self.G) / len(A)
        try:
            self.theta = scipy.linalg.cho_solve(scipy.linalg.cho_factor(A, check_finite=False),
                                                self.H, check_finite=False)
        except np.linalg.LinAlgError:  # singular without ridge: least-squares solution
            self.theta = scipy.linalg.lstsq(A, self.H, check_finite=False)[0]
        return self.theta

    def predict(self, x, y=None):
        """Predicted batch co-state ``Λ̂ = φ(x) Θ / n``, shape (n, sw)."""
        lam = self.features(x, y) @ self.theta
        lam /= x.shape[0]
        return lam.astype(x.dtype, copy=False)

    def state(self):
        """``(G, H, pairs)``: enough to continue elsewhere (seeding, checkpoints)."""
        return self.G.copy(), self.H.copy(), self.pairs

    def load_state(self, state):
        self.G, self.H, self.pairs = state[0].copy(), state[1].copy(), int(state[2])
        self.refit()


def prediction_errors(lam_hat, lam):
    """``(MSE of per-sample co-states, ‖Λ̂ − Λ‖ / ‖Λ̂‖)`` for one batch."""
    n = lam.shape[0]
    diff = lam_hat - lam
    mse = float(np.mean((n * diff) ** 2))
    norm_hat = float(np.linalg.norm(lam_hat))
    return mse, (float(np.linalg.norm(diff)) / norm_hat if norm_hat > 0 else np.inf)
