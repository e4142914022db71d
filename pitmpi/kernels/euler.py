"""Explicit Euler ResNet block: forward sweep and hand-written adjoint.

Conventions (DESIGN §2), rows are samples::

    A_j = Y_j @ K[j].T + b[j],    Y_{j+1} = Y_j + h σ(A_j)

and, going back with ``Λ_j = ∂J/∂Y_j`` and ``D = σ'(A_j) ⊙ Λ_{j+1}``::

    ∇K[j] = h Dᵀ Y_j,   ∇b[j] = h 1ᵀ D,   Λ_j = Λ_{j+1} + h D @ K[j].

A block runs the layers it is given (``K`` of shape ``(m, w, w)`` holds the
block's own layers), so a full network is the block ``[0, L)``.
"""
import numpy as np

from .activations import prescaled
from .workspace import layers_per_chunk, scratch


def state_width(width):
    """Width of the state carried between layers: ``w`` for Euler."""
    return width


class EulerTrajectory:
    """States ``Y`` (m+1, n, w) and activations ``S = σ(A)`` (m, n, w);
    with ``store=False`` only ``end`` (n, w) is kept and ``Y, S`` are None."""

    def __init__(self, end, Y=None, S=None):
        self.end = end
        self.Y = Y
        self.S = S

    @property
    def stored(self):
        return self.Y is not None

    @property
    def output(self):
        """The state at the block's right end, shape (n, w)."""
        return self.end


def forward(K, b, h, x, act, store=True, ws=None):
    """Run layers ``K, b`` from the state ``x``.

    Parameters
    ----------
    K : ndarray, shape (m, w, w)
    b : ndarray, shape (m, w)
    h : float
        Step size.
    x : ndarray, shape (n, w)
        State at the block's left end.
    act : Activation
    store : bool
        Keep the trajectory (needed by the adjoint: the scheme is not
        invertible) or only the end state (evaluation).
    ws : Workspace, optional
        Where the trajectory lives (reused between calls; it is then valid
        until the next call with ``ws``).

    Returns
    -------
    EulerTrajectory
        Its ``end`` is a new array.
    """
    m = K.shape[0]
    n, w = x.shape
    if store:
        Y = scratch(ws, "Y", (m + 1, n, w), x.dtype)
        S = scratch(ws, "S", (m, n, w), x.dtype)
    else:
        Y = [scratch(ws, "Ya", (n, w), x.dtype), scratch(ws, "Yb", (n, w), x.dtype)] * (m + 1)
        S = [scratch(ws, "s", (n, w), x.dtype)] * m
    Y[0][...] = x
    factor, K, b = prescaled(K, b, act, n, ws)
    with np.errstate(over="ignore"):
        for j in range(m):
            s = S[j]
            np.matmul(Y[j], K[j].T, out=s)
            s += b[j]
            act.apply_prescaled(s, factor)
            np.multiply(s, h, out=Y[j + 1])
            Y[j + 1] += Y[j]
    end = np.array(Y[m])
    return EulerTrajectory(end, Y, S) if store else EulerTrajectory(end)


def backward(K, h, traj, lam, act, gK, gb, ws=None):
    """Adjoint sweep through the block.

    Parameters
    ----------
    K : ndarray, shape (m, w, w)
    h : float
    traj : EulerTrajectory
        From :func:`forward` with the same ``K``.
    lam : ndarray, shape (n, w)
        Co-state ``Λ`` at the block's right end (not modified).
    act : Activation
    gK : ndarray, shape (m, w, w)
        Overwritten with ``∇K`` (weight decay not included).
    gb : ndarray, shape (m, w)
        Overwritten with ``∇b``.
    ws : Workspace, optional
        Scratch arrays reused between calls.

    Returns
    -------
    ndarray, shape (n, w)
        Co-state at the block's left end (a new array).
    """
    if not traj.stored:
        raise ValueError("the Euler adjoint needs the stored trajectory (forward with store=True)")
    m = K.shape[0]
    n, w = lam.shape
    dt = lam.dtype
    lam = np.array(lam, copy=True)
    tmp = scratch(ws, "tmp", lam.shape, dt)
    # only the co-state recursion is sequential: per chunk of layers, σ' at
    # once, then the recursion keeping each layer's D, then the chunk's weight
    # gradients in batched products (three calls a layer with small layers)
    c = layers_per_chunk(m, n * w * dt.itemsize)
    D = scratch(ws, "D", (c, n, w), dt)
    hK = np.multiply(K, h, out=scratch(ws, "hK", K.shape, dt))
    for hi in range(m, 0, -c):
        lo = max(hi - c, 0)
        d = act.derivative(traj.S[lo:hi], D[:hi - lo])
        for i in range(hi - lo - 1, -1, -1):
            d[i] *= lam
            np.matmul(d[i], hK[lo + i], out=tmp)
            lam += tmp
        np.matmul(d.transpose(0, 2, 1), traj.Y[lo:hi], out=gK[lo:hi])
        np.sum(d, axis=1, out=gb[lo:hi])
    gK *= h
    gb *= h
    return lam
