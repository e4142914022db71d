"""Explicit Euler ResNet block: forward sweep and hand-written adjoint.

Conventions (DESIGN §2, §10), rows are samples, ``op`` the layer's linear map
(:mod:`~pitmpi.kernels.operators`; dense: ``op(Y, K) = Y @ K.T``)::

    A_j = op(Y_j, K[j]) + b[j],    Y_{j+1} = Y_j + h σ(A_j)

and, going back with ``Λ_j = ∂J/∂Y_j`` and ``D = σ'(A_j) ⊙ Λ_{j+1}``::

    ∇K[j] = h ∂_K⟨D, op(Y_j, K)⟩ (dense Dᵀ Y_j),   ∇b[j] = h Σ D,
    Λ_j = Λ_{j+1} + h opᵀ(D, K[j]) (dense D @ K[j]).

A block runs the layers it is given (``K`` of shape ``(m,) + op.kernel_shape``
holds the block's own layers), so a full network is the block ``[0, L)``.
States enter and leave flattened, (n, op.size).
"""
import numpy as np

from .activations import prescaled
from .trajectory import Trajectory
from .workspace import layers_per_chunk, scratch


def state_width(size):
    """Width of the flattened state carried between layers: ``op.size`` for Euler."""
    return size


class EulerTrajectory(Trajectory):
    """States ``Y`` (m+1, n, *s) and activations ``S = σ(A)`` (m, n, *s),
    ``s = op.sample_shape``; with ``store=False`` only ``end`` (n, op.size)
    is kept and ``Y, S`` are None."""

    def __init__(self, end, Y=None, S=None):
        super().__init__(end, Y)
        self.S = S


def forward(K, b, h, x, act, store=True, ws=None, *, op):
    """Run layers ``K, b`` from the state ``x``.

    Parameters
    ----------
    K : ndarray, shape (m,) + op.kernel_shape
    b : ndarray, shape (m,) + op.bias_shape
    h : float
        Step size.
    x : ndarray, shape (n, op.size)
        State at the block's left end.
    act : Activation
    store : bool
        Keep the trajectory (needed by the adjoint: the scheme is not
        invertible) or only the end state (evaluation).
    ws : Workspace, optional
        Where the trajectory lives (reused between calls; it is then valid
        until the next call with ``ws``).
    op : Dense or Conv
        The layers' linear map.

    Returns
    -------
    EulerTrajectory
        Its ``end`` is a new array.
    """
    m = K.shape[0]
    n = x.shape[0]
    shape = (n,) + op.sample_shape
    if store:
        Y = scratch(ws, "Y", (m + 1,) + shape, x.dtype)
        S = scratch(ws, "S", (m,) + shape, x.dtype)
    else:
        Y = [scratch(ws, "Ya", shape, x.dtype), scratch(ws, "Yb", shape, x.dtype)] * (m + 1)
        S = [scratch(ws, "s", shape, x.dtype)] * m
    Y[0][...] = x.reshape(shape)
    factor, K, b = prescaled(K, b, act, n * op.size, ws)
    with np.errstate(over="ignore"):
        for j in range(m):
            s = S[j]
            op.apply(Y[j], K[j], s, ws)
            op.add_bias(s, b[j])
            act.apply_prescaled(s, factor)
            np.multiply(s, h, out=Y[j + 1])
            Y[j + 1] += Y[j]
    end = np.array(Y[m]).reshape(n, op.size)
    return EulerTrajectory(end, Y, S) if store else EulerTrajectory(end)


def backward(K, h, traj, lam, act, gK, gb, ws=None, *, op):
    """Adjoint sweep through the block.

    Parameters
    ----------
    K : ndarray, shape (m,) + op.kernel_shape
    h : float
    traj : EulerTrajectory
        From :func:`forward` with the same ``K``.
    lam : ndarray, shape (n, op.size)
        Co-state ``Λ`` at the block's right end (not modified).
    act : Activation
    gK : ndarray, shape of ``K``, or None
        Overwritten with ``∇K`` (weight decay not included); None: the
        co-state only (one product a layer instead of two).
    gb : ndarray, shape (m,) + op.bias_shape, or None
        Overwritten with ``∇b`` (None with ``gK``).
    ws : Workspace, optional
        Scratch arrays reused between calls.
    op : Dense or Conv
        As for :func:`forward`.

    Returns
    -------
    ndarray, shape (n, op.size)
        Co-state at the block's left end (a new array).
    """
    if not traj.stored:
        raise ValueError("the Euler adjoint needs the stored trajectory (forward with store=True)")
    m = K.shape[0]
    n = lam.shape[0]
    shape = (n,) + op.sample_shape
    dt = lam.dtype
    lam = np.array(lam, copy=True).reshape(shape)
    tmp = scratch(ws, "tmp", shape, dt)
    # only the co-state recursion is sequential: per chunk of layers, σ' at
    # once, then the recursion keeping each layer's D, then the chunk's weight
    # gradients in batched products (three calls a layer with small layers)
    c = layers_per_chunk(m, n * op.size * dt.itemsize)
    D = scratch(ws, "D", (c,) + shape, dt)
    hK = np.multiply(K, h, out=scratch(ws, "hK", K.shape, dt))
    fused = op.grads_with_products and gK is not None
    for hi in range(m, 0, -c):
        lo = max(hi - c, 0)
        d = act.derivative(traj.S[lo:hi], D[:hi - lo])
        for i in range(hi - lo - 1, -1, -1):
            d[i] *= lam
            grad = (traj.Y[lo + i], gK[lo + i]) if fused else None
            op.apply_t(d[i], hK[lo + i], tmp, ws, grad)
            lam += tmp
        if gK is None:
            continue
        if not fused:
            op.weight_grads(d, traj.Y[lo:hi], gK[lo:hi], ws)
        op.bias_grads(d, gb[lo:hi])
    if gK is not None:
        gK *= h
        gb *= h
    return lam.reshape(n, op.size)
