"""Elementwise activations and their derivatives, written for in-place use.

The adjoint kernels need ``σ'(A)`` where ``A`` is a pre-activation.  Both
supported activations let us recover ``σ'(A)`` from the *output* ``S = σ(A)``
alone (``tanh' = 1 - S²``, ``relu' = [S > 0]``), so the forward sweep stores
``S`` and never ``A``.
"""
import numpy as np

from .workspace import scratch


class Activation:
    """An activation ``σ`` with ``apply`` (in place) and ``scale_by_derivative``.

    Parameters
    ----------
    name : str
        ``"tanh"`` or ``"relu"``.
    """

    def __init__(self, name):
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")
        self.name = name

    def apply(self, a):
        """Overwrite ``a`` (any shape) with ``σ(a)`` and return it.

        A ``tanh`` of at least ``EXP_TANH_MIN[dtype]`` elements is computed
        as ``2 / (1 + exp(−2a)) − 1`` (:meth:`apply_prescaled` after scaling
        ``a`` by −2): NumPy's ``tanh`` is scalar code on CPUs without AVX-512
        and ``exp`` is about twice as fast (float32: 1.5×), so past a few
        hundred (float32: a few thousand) elements the five passes cost
        less.  The result is within 4.5e-16 (float32: 1.8e-7, 1.5 units in
        the last place of 1) of ``np.tanh`` (absolute; near 0 that is not a
        small *relative* error, but every use adds it to states of order 1).
        """
        if self.name == "tanh":
            if a.size < EXP_TANH_MIN.get(a.dtype.type, np.inf):
                return np.tanh(a, out=a)
            a *= EXP_TANH_SCALE
            with np.errstate(over="ignore"):
                return self.apply_prescaled(a, EXP_TANH_SCALE)
        return np.maximum(a, 0, out=a)

    def prescale(self, dtype, size):
        """The factor by which a kernel should scale this activation's inputs
        of ``size`` elements (folding it into its weights and biases, where it
        costs nothing per element) before :meth:`apply_prescaled`:
        ``EXP_TANH_SCALE`` (−2) for a ``tanh`` of at least
        ``EXP_TANH_PRESCALED_MIN[dtype]`` elements, else 1.  Scaling by a
        power of two is exact, so the pre-activations are the same numbers."""
        if self.name == "tanh" and size >= EXP_TANH_PRESCALED_MIN.get(np.dtype(dtype).type, np.inf):
            return EXP_TANH_SCALE
        return 1.0

    def apply_prescaled(self, a, factor):
        """Overwrite ``a = factor · A`` with ``σ(A)`` and return it, ``factor``
        from :meth:`prescale`.  With −2 (``tanh``), four passes: ``2 / (1 +
        exp(a)) − 1``; ``exp`` overflows to ``inf`` where ``A`` is below about
        −354 and the result there, −1, is right: call it inside
        ``np.errstate(over="ignore")``.  Measured on the development machine
        (AVX2): faster than ``np.tanh`` from about 300 elements in float64
        (6.0 against 7.6 µs at 512, 8.9 against 14.3 at 1024) and 3,000 in
        float32 (10.2 against 15.5 µs at 4,096, 16 against 22 at 8,192)."""
        if factor == 1.0:
            return self.apply(a)
        np.exp(a, out=a)
        a += 1.0
        np.divide(2.0, a, out=a)
        a -= 1.0
        return a

    def scale_by_derivative(self, s, lam, out):
        """Write ``σ'(A) ⊙ lam`` into ``out``, given ``s = σ(A)``.

        Parameters
        ----------
        s, lam, out : ndarray, shape (n, w)
        """
        self.derivative(s, out)
        out *= lam
        return out

    def derivative(self, s, out):
        """Write ``σ'(A)`` into ``out``, given ``s = σ(A)`` (any shape)."""
        if self.name == "tanh":
            np.multiply(s, s, out=out)
            np.subtract(1.0, out, out=out)
        else:
            np.greater(s, 0, out=out)
        return out

    def __repr__(self):
        return f"Activation({self.name!r})"


def prescaled(K, b, act, elements, ws=None):
    """``(factor, factor·K, factor·b)`` for :meth:`Activation.apply_prescaled`
    on pre-activations of ``elements`` entries (n · op.size) of layers ``K``,
    ``b`` (linear in both): the arrays themselves when the factor is 1, else
    scaled copies (in ``ws``)."""
    factor = act.prescale(K.dtype, elements)
    if factor == 1.0:
        return factor, K, b
    Ks = np.multiply(K, factor, out=scratch(ws, "Kpre", K.shape, K.dtype))
    return factor, Ks, np.multiply(b, factor, out=scratch(ws, "bpre", b.shape, b.dtype))


ACTIVATIONS = ("tanh", "relu")
EXP_TANH_SCALE = -2.0
# elements from which tanh takes the exp form, by dtype
EXP_TANH_MIN = {np.float64: 512, np.float32: 6144}  # apply: the scaling, then four passes
EXP_TANH_PRESCALED_MIN = {np.float64: 320, np.float32: 4096}  # apply_prescaled's four passes
