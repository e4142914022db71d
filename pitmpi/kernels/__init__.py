"""Pure-NumPy forward and adjoint kernels (no MPI here).

``SCHEMES`` maps a scheme name to its module, each offering ``state_width``,
``forward(K, b, h, x, act, store, ws, op)`` and ``backward(K, b, h, traj,
lam, act, gK, gb, ws, op)`` on a contiguous block of layers (``gK, gb``
None: the co-state only, without the weight gradients; ``ws``: an
optional :class:`Workspace` of scratch arrays reused between calls; ``op``:
the layers' linear map, :class:`Dense` or :class:`Conv`).
"""
from . import euler, verlet
from .activations import ACTIVATIONS, Activation
from .layers import (classifier_loss_and_grad, cross_entropy, opening_backward,
                     opening_forward, output_errors, score_stats, scores)
from .operators import Conv, Dense
from .workspace import Workspace


def _euler_backward(K, b, h, traj, lam, act, gK, gb, ws=None, *, op):
    return euler.backward(K, h, traj, lam, act, gK, gb, ws, op=op)


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

__all__ = ["SCHEMES", "ACTIVATIONS", "Activation", "Conv", "Dense", "Workspace", "classifier_loss_and_grad",
           "cross_entropy", "opening_backward", "opening_forward", "output_errors", "score_stats",
           "scores"]
