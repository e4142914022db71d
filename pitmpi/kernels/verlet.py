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

from .activations import prescaled
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


def _step(Kj, bj, h, Yj, Zj, act, factor, sa, sb, Yn, Zn):
    """One leapfrog step from ``(Yj, Zj)`` into ``(Yn, Zn)``; fills ``sa, sb``
    (``Kj, bj`` scaled by ``factor``, see :func:`prescaled`)."""
    np.matmul(Yj, Kj, out=sa)
    sa += bj
    act.apply_prescaled(sa, factor)
    np.multiply(sa, -h, out=Zn)
    Zn += Zj
    np.matmul(Zn, Kj.T, out=sb)
    sb += bj
    act.apply_prescaled(sb, factor)
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
    factor, K, b = prescaled(K, b, act, x.shape[0], ws)
    with np.errstate(over="ignore"):
        return _forward(K, b, h, x, act, factor, store, ws)


def _forward(K, b, h, x, act, factor, store, ws):
    m, w = K.shape[0], K.shape[1]
    n, dt = x.shape[0], x.dtype
    if store:
        Y = scratch(ws, "Y", (m + 1, n, w), dt)
        Z = scratch(ws, "Z", (m + 1, n, w), dt)
        SA = scratch(ws, "SA", (m, n, w), dt)
        SB = scratch(ws, "SB", (m, n, w), dt)
        Y[0] = x[:, :w]
        Z[0] = x[:, w:]
        for j in range(m):
            _step(K[j], b[j], h, Y[j], Z[j], act, factor, SA[j], SB[j], Y[j + 1], Z[j + 1])
        return VerletTrajectory(np.hstack([Y[-1], Z[-1]]), Y, Z, SA, SB)
    Yc, Zc, Yn, Zn, sa, sb = (scratch(ws, name, (n, w), dt)
                              for name in ("Yc", "Zc", "Yn", "Zn", "sa", "sb"))
    Yc[...] = x[:, :w]
    Zc[...] = x[:, w:]
    for j in range(m):
        _step(K[j], b[j], h, Yc, Zc, act, factor, sa, sb, Yn, Zn)
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
    w = K.shape[1]
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
    """The adjoint sweep over a stored trajectory, in place on ``lamY, lamZ``,
    a chunk of layers (:func:`~pitmpi.kernels.workspace.layers_per_chunk`)
    at a time."""
    m = K.shape[0]
    bufs = _ChunkBuffers(K, h, lamY, ws)
    for hi in range(m, 0, -bufs.c):
        lo = max(hi - bufs.c, 0)
        bufs.adjoint(lo, hi, traj.Y[lo:hi + 1], traj.Z[lo:hi + 1], traj.SA[lo:hi],
                     traj.SB[lo:hi], act, lamY, lamZ, tmp, gK, gb)
    gK *= h
    gb *= h


def _adjoint_rebuilt(K, b, h, traj, act, lamY, lamZ, tmp, gK, gb, ws):
    """The adjoint sweep rebuilding the states backwards (``store=False``), in
    place on ``lamY, lamZ``: each chunk of layers is rebuilt from its right
    end into chunk-sized buffers, then swept as a stored one, so memory stays
    independent of depth."""
    w = K.shape[1]
    n, dt = lamY.shape[0], lamY.dtype
    bufs = _ChunkBuffers(K, h, lamY, ws)
    c = bufs.c
    Y, Z = (scratch(ws, name, (c + 1, n, w), dt) for name in ("rY", "rZ"))
    SA, SB = (scratch(ws, name, (c, n, w), dt) for name in ("rSA", "rSB"))
    Y[c] = traj.end[:, :w]
    Z[c] = traj.end[:, w:]
    factor, Ks, bs = prescaled(K, b, act, n, ws)
    with np.errstate(over="ignore"):
        _rebuild_and_sweep(K, Ks, bs, h, act, factor, bufs, Y, Z, SA, SB, lamY, lamZ, tmp, gK, gb)
    gK *= h
    gb *= h


def _rebuild_and_sweep(K, Ks, bs, h, act, factor, bufs, Y, Z, SA, SB, lamY, lamZ, tmp, gK, gb):
    """Chunk by chunk from the right: rebuild the states with the prescaled
    ``Ks, bs``, then the chunk's adjoint (with ``K``)."""
    m, c = K.shape[0], bufs.c
    for hi in range(m, 0, -c):
        lo = max(hi - c, 0)
        k = hi - lo
        if hi < m:  # its right end is the left end of the chunk just swept
            Y[k] = Y[0]
            Z[k] = Z[0]
        for i in range(k - 1, -1, -1):
            # invert the leapfrog step: Y_j from (Y_{j+1}, Z_{j+1}), then Z_j
            j = lo + i
            np.matmul(Z[i + 1], Ks[j].T, out=SB[i])
            SB[i] += bs[j]
            act.apply_prescaled(SB[i], factor)
            np.multiply(SB[i], -h, out=Y[i])
            Y[i] += Y[i + 1]
            np.matmul(Y[i], Ks[j], out=SA[i])
            SA[i] += bs[j]
            act.apply_prescaled(SA[i], factor)
            np.multiply(SA[i], h, out=Z[i])
            Z[i] += Z[i + 1]
        bufs.adjoint(lo, hi, Y[:k + 1], Z[:k + 1], SA[:k], SB[:k], act, lamY, lamZ, tmp, gK, gb)


class _ChunkBuffers:
    """What the adjoint of a chunk of layers needs besides the trajectory:
    ``hK`` for all layers, and chunk-sized ``E, F`` (c, n, w) and ``G`` (c, w, w)."""

    def __init__(self, K, h, lam, ws):
        m, w = K.shape[0], K.shape[1]
        n, dt = lam.shape[0], lam.dtype
        self.c = layers_per_chunk(m, n * w * dt.itemsize)
        self.E = scratch(ws, "E", (self.c, n, w), dt)  # σ'(B_j), then ⊙ Λ^Y_{j+1}
        self.F = scratch(ws, "F", (self.c, n, w), dt)  # σ'(A_j), then ⊙ Λ^Z_j
        self.G = scratch(ws, "gtmp", (self.c, w, w), dt)
        self.hK = np.multiply(K, h, out=scratch(ws, "hK", K.shape, dt))
        self.hKT = self.hK.transpose(0, 2, 1)

    def adjoint(self, lo, hi, Y, Z, SA, SB, act, lamY, lamZ, tmp, gK, gb):
        """Sweep layers ``[lo, hi)`` back, given their states ``Y, Z``
        (hi − lo + 1, n, w) and activations ``SA, SB`` (hi − lo, n, w).

        Only the co-state recursion is sequential: ``σ'`` of the whole chunk
        first, then the recursion keeping each layer's ``E, F`` (six NumPy
        calls a layer), then the chunk's weight gradients in batched
        products; ``gK, gb`` get them without the factor ``h``.
        """
        k = hi - lo
        e, f, g = self.E[:k], self.F[:k], self.G[:k]
        act.derivative(SB, e)
        act.derivative(SA, f)
        hK, hKT = self.hK, self.hKT
        for i in range(k - 1, -1, -1):
            e[i] *= lamY
            np.matmul(e[i], hK[lo + i], out=tmp)
            lamZ += tmp
            f[i] *= lamZ
            np.matmul(f[i], hKT[lo + i], out=tmp)
            lamY -= tmp
        # ∇K[j] = h (E_jᵀ Z_{j+1} − Y_jᵀ F_j),  ∇b[j] = h 1ᵀ(E_j − F_j)
        np.matmul(e.transpose(0, 2, 1), Z[1:], out=gK[lo:hi])
        np.matmul(Y[:-1].transpose(0, 2, 1), f, out=g)
        gK[lo:hi] -= g
        np.sum(e, axis=1, out=gb[lo:hi])
        gb[lo:hi] -= f.sum(axis=1)
