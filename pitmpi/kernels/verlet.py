"""Verlet (Hamiltonian, leapfrog) ResNet block: forward and adjoint.

Conventions (DESIGN §2), rows are samples, the state is the pair ``(Y, Z)``
stored side by side as one array of width ``2w``::

    A_j = Y_j @ K[j] + b[j],         Z_{j+1} = Z_j − h σ(A_j)
    B_j = Z_{j+1} @ K[j].T + b[j],   Y_{j+1} = Y_j + h σ(B_j)

Adjoint, ``E = σ'(B_j) ⊙ Λ^Y_{j+1}``, ``F = σ'(A_j) ⊙ Λ^Z_j``::

    Λ^Z_j = Λ^Z_{j+1} + h E @ K[j]
    Λ^Y_j = Λ^Y_{j+1} − h F @ K[j].T
    ∇K[j] = h (Eᵀ Z_{j+1} − Y_jᵀ F),   ∇b[j] = h 1ᵀ(E − F)

The step is exactly invertible (``Y_j = Y_{j+1} − hσ(B_j)``, then
``Z_j = Z_{j+1} + hσ(A_j)``), so ``store=False`` keeps only the end state and
the adjoint rebuilds the states backwards: memory independent of depth, at
the price of a second forward sweep.
"""
import numpy as np

from .workspace import layers_per_chunk, scratch


def state_width(width):
    """Width of the state carried between layers: ``2w`` for Verlet."""
    return 2 * width


class VerletTrajectory:
    """Stored sweep: ``Y, Z`` (m+1, n, w), ``SA = σ(A)``, ``SB = σ(B)`` (m, n, w).

    With ``store=False`` only ``end`` (n, 2w) is kept and the arrays are None.
    """

    def __init__(self, end, Y=None, Z=None, SA=None, SB=None):
        self.end = end
        self.Y, self.Z, self.SA, self.SB = Y, Z, SA, SB

    @property
    def stored(self):
        return self.Y is not None

    @property
    def output(self):
        """The state ``[Y, Z]`` at the block's right end, shape (n, 2w)."""
        return self.end


def _step(Kj, bj, h, Yj, Zj, act, sa, sb, Yn, Zn):
    """One leapfrog step from ``(Yj, Zj)`` into ``(Yn, Zn)``; fills ``sa, sb``."""
    np.matmul(Yj, Kj, out=sa)
    sa += bj
    act.apply(sa)
    np.multiply(sa, -h, out=Zn)
    Zn += Zj
    np.matmul(Zn, Kj.T, out=sb)
    sb += bj
    act.apply(sb)
    np.multiply(sb, h, out=Yn)
    Yn += Yj


def forward(K, b, h, x, act, store=True, ws=None):
    """Run layers ``K, b`` from the state ``x = [Y, Z]``.

    Parameters
    ----------
    K : ndarray, shape (m, w, w)
    b : ndarray, shape (m, w)
    h : float
    x : ndarray, shape (n, 2w)
    act : Activation
    store : bool
        Keep the whole trajectory (True) or only the end state (False).
    ws : Workspace, optional
        Where the trajectory and scratch arrays live (reused between calls;
        the trajectory is then valid until the next call with ``ws``).

    Returns
    -------
    VerletTrajectory
        Its ``end`` is a new array.
    """
    m, w = K.shape[0], K.shape[1]
    n = x.shape[0]
    dt = x.dtype
    if store:
        Y = scratch(ws, "Y", (m + 1, n, w), dt)
        Z = scratch(ws, "Z", (m + 1, n, w), dt)
        SA = scratch(ws, "SA", (m, n, w), dt)
        SB = scratch(ws, "SB", (m, n, w), dt)
        Y[0] = x[:, :w]
        Z[0] = x[:, w:]
        for j in range(m):
            _step(K[j], b[j], h, Y[j], Z[j], act, SA[j], SB[j], Y[j + 1], Z[j + 1])
        return VerletTrajectory(np.hstack([Y[-1], Z[-1]]), Y, Z, SA, SB)
    Yc, Zc, Yn, Zn, sa, sb = (scratch(ws, name, (n, w), dt)
                              for name in ("Yc", "Zc", "Yn", "Zn", "sa", "sb"))
    Yc[...] = x[:, :w]
    Zc[...] = x[:, w:]
    for j in range(m):
        _step(K[j], b[j], h, Yc, Zc, act, sa, sb, Yn, Zn)
        Yc, Yn = Yn, Yc
        Zc, Zn = Zn, Zc
    return VerletTrajectory(np.hstack([Yc, Zc]))


def backward(K, b, h, traj, lam, act, gK, gb, ws=None):
    """Adjoint sweep through the block, from a stored or an end-only trajectory.

    Parameters
    ----------
    K : ndarray, shape (m, w, w)
    b : ndarray, shape (m, w)
        Needed only to rebuild states when ``traj`` is end-only.
    h : float
    traj : VerletTrajectory
    lam : ndarray, shape (n, 2w)
        Co-state ``[Λ^Y, Λ^Z]`` at the block's right end (not modified).
    act : Activation
    gK : ndarray, shape (m, w, w)
        Overwritten with ``∇K`` (weight decay not included).
    gb : ndarray, shape (m, w)
        Overwritten with ``∇b``.
    ws : Workspace, optional
        Scratch arrays reused between calls.

    Returns
    -------
    ndarray, shape (n, 2w)
        Co-state at the block's left end (a new array).
    """
    m, w = K.shape[0], K.shape[1]
    n, dt = lam.shape[0], lam.dtype
    lamY, lamZ, tmp = (scratch(ws, name, (n, w), dt) for name in ("lamY", "lamZ", "tmp"))
    lamY[...] = lam[:, :w]
    lamZ[...] = lam[:, w:]
    if traj.stored:
        _adjoint_stored(K, h, traj, act, lamY, lamZ, tmp, gK, gb, ws)
    else:
        _adjoint_rebuilt(K, b, h, traj, act, lamY, lamZ, tmp, gK, gb, ws)
    return np.hstack([lamY, lamZ])


def _adjoint_stored(K, h, traj, act, lamY, lamZ, tmp, gK, gb, ws):
    """The adjoint sweep over a stored trajectory, in place on ``lamY, lamZ``.

    Only the co-state recursion is sequential.  Layers are taken in chunks
    of about ``CHUNK_BYTES`` per array (so what a chunk touches stays in
    cache): ``σ'`` of the whole chunk first, then the recursion keeping each
    layer's ``E, F``, then the chunk's weight gradients in batched products.
    With small layers a layer costs six NumPy calls instead of twenty.
    """
    m, w = K.shape[0], K.shape[1]
    n, dt = lamY.shape[0], lamY.dtype
    c = layers_per_chunk(m, n * w * dt.itemsize)
    E = scratch(ws, "E", (c, n, w), dt)  # σ'(B_j), then ⊙ Λ^Y_{j+1}
    F = scratch(ws, "F", (c, n, w), dt)  # σ'(A_j), then ⊙ Λ^Z_j
    G = scratch(ws, "gtmp", (c, w, w), dt)
    hK = np.multiply(K, h, out=scratch(ws, "hK", K.shape, dt))
    hKT = hK.transpose(0, 2, 1)
    for hi in range(m, 0, -c):
        lo = max(hi - c, 0)
        e, f, g = E[:hi - lo], F[:hi - lo], G[:hi - lo]
        act.derivative(traj.SB[lo:hi], e)
        act.derivative(traj.SA[lo:hi], f)
        for i in range(hi - lo - 1, -1, -1):
            e[i] *= lamY
            np.matmul(e[i], hK[lo + i], out=tmp)
            lamZ += tmp
            f[i] *= lamZ
            np.matmul(f[i], hKT[lo + i], out=tmp)
            lamY -= tmp
        # ∇K[j] = h (E_jᵀ Z_{j+1} − Y_jᵀ F_j),  ∇b[j] = h 1ᵀ(E_j − F_j)
        np.matmul(e.transpose(0, 2, 1), traj.Z[lo + 1:hi + 1], out=gK[lo:hi])
        np.matmul(traj.Y[lo:hi].transpose(0, 2, 1), f, out=g)
        gK[lo:hi] -= g
        np.sum(e, axis=1, out=gb[lo:hi])
        gb[lo:hi] -= f.sum(axis=1)
    gK *= h
    gb *= h


def _adjoint_rebuilt(K, b, h, traj, act, lamY, lamZ, tmp, gK, gb, ws):
    """The adjoint sweep rebuilding each state from the next (``store=False``):
    memory independent of depth, one layer at a time."""
    m, w = K.shape[0], K.shape[1]
    n, dt = lamY.shape[0], lamY.dtype
    E, F = (scratch(ws, name, (n, w), dt) for name in ("E1", "F1"))
    gtmp = scratch(ws, "gtmp1", (w, w), dt)
    Yn, Zn, Yj, Zj, sa, sb = (scratch(ws, name, (n, w), dt)
                              for name in ("Yn", "Zn", "Yj", "Zj", "sa", "sb"))
    Yn[...] = traj.end[:, :w]
    Zn[...] = traj.end[:, w:]
    for j in range(m - 1, -1, -1):
        # invert the leapfrog step: Y_j from (Y_{j+1}, Z_{j+1}), then Z_j
        np.matmul(Zn, K[j].T, out=sb)
        sb += b[j]
        act.apply(sb)
        np.multiply(sb, -h, out=Yj)
        Yj += Yn
        np.matmul(Yj, K[j], out=sa)
        sa += b[j]
        act.apply(sa)
        np.multiply(sa, h, out=Zj)
        Zj += Zn
        act.scale_by_derivative(sb, lamY, out=E)
        np.matmul(E, K[j], out=tmp)
        tmp *= h
        lamZ += tmp
        act.scale_by_derivative(sa, lamZ, out=F)
        np.matmul(F, K[j].T, out=tmp)
        tmp *= h
        lamY -= tmp
        np.matmul(E.T, Zn, out=gK[j])
        np.matmul(Yj.T, F, out=gtmp)
        gK[j] -= gtmp
        gK[j] *= h
        np.subtract(E.sum(axis=0), F.sum(axis=0), out=gb[j])
        gb[j] *= h
        Yn, Yj = Yj, Yn
        Zn, Zj = Zj, Zn
