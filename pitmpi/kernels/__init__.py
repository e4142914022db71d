"""Pure-NumPy forward and adjoint kernels (no MPI here).

``SCHEMES`` maps a scheme name to its module, each offering ``state_width``,
``forward(K, b, h, x, act, store, ws)`` and ``backward(K, b, h, traj, lam,
act, gK, gb, ws)`` on a contiguous block of layers (``ws``: an optional
:class:`Workspace` of scratch arrays reused between calls).
"""
from . import euler, verlet
from .activations import ACTIVATIONS, Activation
from .layers import (classifier_loss_and_grad, cross_entropy, opening_backward,
                     opening_forward, score_stats, scores)
from .workspace import Workspace


def _euler_backward(K, b, h, traj, lam, act, gK, gb, ws=None):
    return euler.backward(K, h, traj, lam, act, gK, gb, ws)


class _Scheme:
    def __init__(self, name, module, backward):
        self.name = name
        self.state_width = module.state_width
        self.forward = module.forward
        self.backward = backward


SCHEMES = {
    "euler": _Scheme("euler", euler, _euler_backward),
    "verlet": _Scheme("verlet", verlet, verlet.backward),
}

__all__ = ["SCHEMES", "ACTIVATIONS", "Activation", "Workspace", "classifier_loss_and_grad",
           "cross_entropy", "opening_backward", "opening_forward", "score_stats", "scores"]
