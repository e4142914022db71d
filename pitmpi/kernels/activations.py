"""Elementwise activations and their derivatives, written for in-place use.

The adjoint kernels need ``σ'(A)`` where ``A`` is a pre-activation.  Both
supported activations let us recover ``σ'(A)`` from the *output* ``S = σ(A)``
alone (``tanh' = 1 - S²``, ``relu' = [S > 0]``), so the forward sweep stores
``S`` and never ``A``.
"""
import numpy as np


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
        """Overwrite ``a`` (any shape) with ``σ(a)`` and return it."""
        if self.name == "tanh":
            return np.tanh(a, out=a)
        return np.maximum(a, 0, out=a)

    def scale_by_derivative(self, s, lam, out):
        """Write ``σ'(A) ⊙ lam`` into ``out``, given ``s = σ(A)``.

        Parameters
        ----------
        s, lam, out : ndarray, shape (n, w)
        """
        if self.name == "tanh":
            np.multiply(s, s, out=out)
            np.subtract(1.0, out, out=out)
            out *= lam
        else:
            np.multiply(lam, s > 0, out=out)
        return out

    def __repr__(self):
        return f"Activation({self.name!r})"


ACTIVATIONS = ("tanh", "relu")
