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

from .workspace import scratch


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
    lamY, lamZ, E, F, tmp = (scratch(ws, name, (n, w), dt)
                             for name in ("lamY", "lamZ", "E", "F", "tmp"))
    lamY[...] = lam[:, :w]
    lamZ[...] = lam[:, w:]
    gtmp = scratch(ws, "gtmp", (w, w), dt)
    rebuild = not traj.stored
    if rebuild:
        Yn, Zn, Yj, Zj, sa, sb = (scratch(ws, name, (n, w), dt)
                                  for name in ("Yn", "Zn", "Yj", "Zj", "sa", "sb"))
        Yn[...] = traj.end[:, :w]
        Zn[...] = traj.end[:, w:]
    for j in range(m - 1, -1, -1):
        if rebuild:
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
            Y_j, Z_next, sa_j, sb_j = Yj, Zn, sa, sb
        else:
            Y_j, Z_next, sa_j, sb_j = traj.Y[j], traj.Z[j + 1], traj.SA[j], traj.SB[j]
        act.scale_by_derivative(sb_j, lamY, out=E)
        np.matmul(E, K[j], out=tmp)
        tmp *= h
        lamZ += tmp
        act.scale_by_derivative(sa_j, lamZ, out=F)
        np.matmul(F, K[j].T, out=tmp)
        tmp *= h
        lamY -= tmp
        np.matmul(E.T, Z_next, out=gK[j])
        np.matmul(Y_j.T, F, out=gtmp)
        gK[j] -= gtmp
        gK[j] *= h
        np.subtract(E.sum(axis=0), F.sum(axis=0), out=gb[j])
        gb[j] *= h
        if rebuild:
            Yn, Yj = Yj, Yn
            Zn, Zj = Zj, Zn
    return np.hstack([lamY, lamZ])
