"""Verlet (Hamiltonian, leapfrog) ResNet block: forward and adjoint.

Conventions (DESIGN §2, §10), rows are samples, the state is the pair
``(Y, Z)`` stored side by side as one flattened array of width ``2 op.size``;
``op`` is the layers' linear map (:mod:`~pitmpi.kernels.operators`; dense
``op(Y, K) = Y @ K.T`` and ``opᵀ(Y, K) = Y @ K``, conv ``conv`` and ``convᵀ``)::

    A_j = opᵀ(Y_j, K[j]) + b[j],       Z_{j+1} = Z_j − h σ(A_j)
    B_j = op(Z_{j+1}, K[j]) + b[j],    Y_{j+1} = Y_j + h σ(B_j)

Adjoint, ``E = σ'(B_j) ⊙ Λ^Y_{j+1}``, ``F = σ'(A_j) ⊙ Λ^Z_j``::

    Λ^Z_j = Λ^Z_{j+1} + h opᵀ(E, K[j])          (dense E @ K[j])
    Λ^Y_j = Λ^Y_{j+1} − h op(F, K[j])           (dense F @ K[j].T)
    ∇K[j] = h (∂_K⟨E, op(Z_{j+1}, K)⟩ − ∂_K⟨Y_j, op(F, K)⟩)
          (dense h (Eᵀ Z_{j+1} − Y_jᵀ F)),     ∇b[j] = h Σ (E − F)

The step is exactly invertible (``Y_j = Y_{j+1} − hσ(B_j)``, then
``Z_j = Z_{j+1} + hσ(A_j)``), so ``store=False`` keeps only the end state and
the adjoint rebuilds the states backwards: memory independent of depth, at
the price of a second forward sweep.
"""
import numpy as np

from .activations import prescaled
from .trajectory import Trajectory
from .workspace import layers_per_chunk, scratch


def state_width(size):
    """Width of the flattened state carried between layers: ``2 op.size`` for Verlet."""
    return 2 * size


class VerletTrajectory(Trajectory):
    """Stored sweep: ``Y, Z`` (m+1, n, *s), ``SA = σ(A)``, ``SB = σ(B)``
    (m, n, *s), ``s = op.sample_shape``.

    With ``store=False`` only ``end`` (n, 2 op.size), the state ``[Y, Z]``,
    is kept and the arrays are None.
    """

    def __init__(self, end, Y=None, Z=None, SA=None, SB=None):
        super().__init__(end, Y)
        self.Z, self.SA, self.SB = Z, SA, SB


def halves(x, op):
    """The ``Y`` and ``Z`` halves of flattened states ``x`` (n, 2 op.size),
    as views of shape (n,) + op.sample_shape."""
    n, size = x.shape[0], op.size
    return (x[:, :size].reshape((n,) + op.sample_shape),
            x[:, size:].reshape((n,) + op.sample_shape))


def joined(Y, Z):
    """``[Y, Z]`` flattened side by side: (n, 2 op.size), a new array."""
    n = Y.shape[0]
    return np.hstack([Y.reshape(n, -1), Z.reshape(n, -1)])


def _step(Kj, bj, h, Yj, Zj, act, factor, sa, sb, Yn, Zn, op, ws):
    """One leapfrog step from ``(Yj, Zj)`` into ``(Yn, Zn)``; fills ``sa, sb``
    (``Kj, bj`` scaled by ``factor``, see :func:`prescaled`)."""
    op.apply_t(Yj, Kj, sa, ws)
    op.add_bias(sa, bj)
    act.apply_prescaled(sa, factor)
    np.multiply(sa, -h, out=Zn)
    Zn += Zj
    op.apply(Zn, Kj, sb, ws)
    op.add_bias(sb, bj)
    act.apply_prescaled(sb, factor)
    np.multiply(sb, h, out=Yn)
    Yn += Yj


def forward(K, b, h, x, act, store=True, ws=None, *, op):
    """Run layers ``K, b`` from the state ``x = [Y, Z]``.

    Parameters
    ----------
    K : ndarray, shape (m,) + op.kernel_shape
    b : ndarray, shape (m,) + op.bias_shape
    h : float
    x : ndarray, shape (n, 2 op.size)
    act : Activation
    store : bool
        Keep the whole trajectory (True) or only the end state (False).
    ws : Workspace, optional
        Where the trajectory and scratch arrays live (reused between calls;
        the trajectory is then valid until the next call with ``ws``).
    op : Dense or Conv
        The layers' linear map.

    Returns
    -------
    VerletTrajectory
        Its ``end`` is a new array.
    """
    factor, K, b = prescaled(K, b, act, x.shape[0] * op.size, ws)
    with np.errstate(over="ignore"):
        return _forward(K, b, h, x, act, factor, store, ws, op)


def _forward(K, b, h, x, act, factor, store, ws, op):
    m = K.shape[0]
    n, dt = x.shape[0], x.dtype
    shape = (n,) + op.sample_shape
    x_Y, x_Z = halves(x, op)
    if store:
        Y = scratch(ws, "Y", (m + 1,) + shape, dt)
        Z = scratch(ws, "Z", (m + 1,) + shape, dt)
        SA = scratch(ws, "SA", (m,) + shape, dt)
        SB = scratch(ws, "SB", (m,) + shape, dt)
        Y[0] = x_Y
        Z[0] = x_Z
        for j in range(m):
            _step(K[j], b[j], h, Y[j], Z[j], act, factor, SA[j], SB[j], Y[j + 1], Z[j + 1],
                  op, ws)
        return VerletTrajectory(joined(Y[-1], Z[-1]), Y, Z, SA, SB)
    Yc, Zc, Yn, Zn, sa, sb = (scratch(ws, name, shape, dt)
                              for name in ("Yc", "Zc", "Yn", "Zn", "sa", "sb"))
    Yc[...] = x_Y
    Zc[...] = x_Z
    for j in range(m):
        _step(K[j], b[j], h, Yc, Zc, act, factor, sa, sb, Yn, Zn, op, ws)
        Yc, Yn = Yn, Yc
        Zc, Zn = Zn, Zc
    return VerletTrajectory(joined(Yc, Zc))


def backward(K, b, h, traj, lam, act, gK, gb, ws=None, *, op):
    """Adjoint sweep through the block, from a stored or an end-only trajectory.

    Parameters
    ----------
    K : ndarray, shape (m,) + op.kernel_shape
    b : ndarray, shape (m,) + op.bias_shape
        Needed only to rebuild states when ``traj`` is end-only.
    h : float
    traj : VerletTrajectory
    lam : ndarray, shape (n, 2 op.size)
        Co-state ``[Λ^Y, Λ^Z]`` at the block's right end (not modified).
    act : Activation
    gK : ndarray, shape of ``K``, or None
        Overwritten with ``∇K`` (weight decay not included); None: the
        co-state only (two products a layer instead of four).
    gb : ndarray, shape of ``b``, or None
        Overwritten with ``∇b`` (None with ``gK``).
    ws : Workspace, optional
        Scratch arrays reused between calls.
    op : Dense or Conv
        As for :func:`forward`.

    Returns
    -------
    ndarray, shape (n, 2 op.size)
        Co-state at the block's left end (a new array).
    """
    n, dt = lam.shape[0], lam.dtype
    shape = (n,) + op.sample_shape
    lamY, lamZ, tmp = (scratch(ws, name, shape, dt) for name in ("lamY", "lamZ", "tmp"))
    lamY[...], lamZ[...] = halves(lam, op)
    if traj.stored:
        _adjoint_stored(K, h, traj, act, lamY, lamZ, tmp, gK, gb, ws, op)
    else:
        _adjoint_rebuilt(K, b, h, traj, act, lamY, lamZ, tmp, gK, gb, ws, op)
    return joined(lamY, lamZ)


def _adjoint_stored(K, h, traj, act, lamY, lamZ, tmp, gK, gb, ws, op):
    """The adjoint sweep over a stored trajectory, in place on ``lamY, lamZ``,
    a chunk of layers (:func:`~pitmpi.kernels.workspace.layers_per_chunk`)
    at a time."""
    m = K.shape[0]
    bufs = _ChunkBuffers(K, h, lamY, ws, op)
    for hi in range(m, 0, -bufs.c):
        lo = max(hi - bufs.c, 0)
        bufs.adjoint(lo, hi, traj.Y[lo:hi + 1], traj.Z[lo:hi + 1], traj.SA[lo:hi],
                     traj.SB[lo:hi], act, lamY, lamZ, tmp, gK, gb)
    if gK is not None:
        gK *= h
        gb *= h


def _adjoint_rebuilt(K, b, h, traj, act, lamY, lamZ, tmp, gK, gb, ws, op):
    """The adjoint sweep rebuilding the states backwards (``store=False``), in
    place on ``lamY, lamZ``: each chunk of layers is rebuilt from its right
    end into chunk-sized buffers, then swept as a stored one, so memory stays
    independent of depth."""
    n, dt = lamY.shape[0], lamY.dtype
    shape = lamY.shape
    bufs = _ChunkBuffers(K, h, lamY, ws, op)
    c = bufs.c
    Y, Z = (scratch(ws, name, (c + 1,) + shape, dt) for name in ("rY", "rZ"))
    SA, SB = (scratch(ws, name, (c,) + shape, dt) for name in ("rSA", "rSB"))
    Y[c], Z[c] = halves(traj.end, op)
    factor, Ks, bs = prescaled(K, b, act, n * op.size, ws)
    with np.errstate(over="ignore"):
        _rebuild_and_sweep(K, Ks, bs, h, act, factor, bufs, Y, Z, SA, SB, lamY, lamZ, tmp, gK,
                           gb, op, ws)
    if gK is not None:
        gK *= h
        gb *= h


def _rebuild_and_sweep(K, Ks, bs, h, act, factor, bufs, Y, Z, SA, SB, lamY, lamZ, tmp, gK, gb,
                       op, ws):
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
            op.apply(Z[i + 1], Ks[j], SB[i], ws)
            op.add_bias(SB[i], bs[j])
            act.apply_prescaled(SB[i], factor)
            np.multiply(SB[i], -h, out=Y[i])
            Y[i] += Y[i + 1]
            op.apply_t(Y[i], Ks[j], SA[i], ws)
            op.add_bias(SA[i], bs[j])
            act.apply_prescaled(SA[i], factor)
            np.multiply(SA[i], h, out=Z[i])
            Z[i] += Z[i + 1]
        bufs.adjoint(lo, hi, Y[:k + 1], Z[:k + 1], SA[:k], SB[:k], act, lamY, lamZ, tmp, gK, gb)


class _ChunkBuffers:
    """What the adjoint of a chunk of layers needs besides the trajectory:
    ``hK`` for all layers, and chunk-sized ``E, F`` (c, n, *s) and ``G``
    (c,) + op.kernel_shape."""

    def __init__(self, K, h, lam, ws, op):
        m = K.shape[0]
        dt = lam.dtype
        self.op, self.ws = op, ws
        self.c = layers_per_chunk(m, lam.size * dt.itemsize)
        self.E = scratch(ws, "E", (self.c,) + lam.shape, dt)  # σ'(B_j), then ⊙ Λ^Y_{j+1}
        self.F = scratch(ws, "F", (self.c,) + lam.shape, dt)  # σ'(A_j), then ⊙ Λ^Z_j
        self.G = scratch(ws, "gtmp", (self.c,) + K.shape[1:], dt)
        self.hK = np.multiply(K, h, out=scratch(ws, "hK", K.shape, dt))

    def adjoint(self, lo, hi, Y, Z, SA, SB, act, lamY, lamZ, tmp, gK, gb):
        """Sweep layers ``[lo, hi)`` back, given their states ``Y, Z``
        (hi − lo + 1, n, w) and activations ``SA, SB`` (hi − lo, n, w).

        Only the co-state recursion is sequential: ``σ'`` of the whole chunk
        first, then the recursion keeping each layer's ``E, F`` (six NumPy
        calls a layer), then the chunk's weight gradients in batched
        products; ``gK, gb`` get them without the factor ``h`` (None: the
        co-states only).
        """
        k = hi - lo
        e, f, g = self.E[:k], self.F[:k], self.G[:k]
        act.derivative(SB, e)
        act.derivative(SA, f)
        hK, op, ws = self.hK, self.op, self.ws
        fused = op.grads_with_products and gK is not None
        for i in range(k - 1, -1, -1):
            e[i] *= lamY
            op.apply_t(e[i], hK[lo + i], tmp, ws, (Z[i + 1], gK[lo + i]) if fused else None)
            lamZ += tmp
            f[i] *= lamZ
            op.apply(f[i], hK[lo + i], tmp, ws, (Y[i], g[i]) if fused else None)
            lamY -= tmp
        if gK is None:
            return
        # ∇K[j] = h (E_jᵀ Z_{j+1} − Y_jᵀ F_j),  ∇b[j] = h 1ᵀ(E_j − F_j) (dense)
        if not fused:
            op.weight_grads(e, Z[1:], gK[lo:hi], ws)
            op.weight_grads(Y[:-1], f, g, ws)
        gK[lo:hi] -= g
        op.bias_grads(e, gb[lo:hi])
        gb[lo:hi] -= op.bias_grads(f)
