"""Scratch arrays that a kernel reuses from one call to the next.

A deep block's trajectory is megabytes; allocating it afresh every iteration
makes the operating system hand out and zero new pages each time, which cost
as much as the forward sweep's arithmetic (measured: 2.6 ms against 1.4 ms
for 16 Verlet layers, n = 128, w = 64, float32).  A :class:`Workspace` keeps
one array per name and hands it out again while the shape and dtype match.
"""
import numpy as np


class Workspace:
    """Named arrays kept between calls.

    Whatever a kernel took from a workspace is overwritten by the next call
    that takes the same name, so a result that aliases it is valid only
    until then.
    """

    def __init__(self):
        self._arrays = {}

    def get(self, name, shape, dtype):
        """An uninitialised array of ``shape`` and ``dtype``, reused when possible."""
        a = self._arrays.get(name)
        if a is None or a.shape != tuple(shape) or a.dtype != dtype:
            a = np.empty(shape, dtype=dtype)
            self._arrays[name] = a
        return a

    def adopt(self, name, array):
        """Hand out ``array`` (e.g. a view of a caller's buffer) for ``name``
        from now on, while the shape and dtype asked for match it."""
        self._arrays[name] = array

    def nbytes(self):
        """Bytes held."""
        return sum(a.nbytes for a in self._arrays.values())


def scratch(ws, name, shape, dtype):
    """``ws.get(name, shape, dtype)``, or a fresh array when ``ws`` is None."""
    return np.empty(shape, dtype=dtype) if ws is None else ws.get(name, shape, dtype)


CHUNK_BYTES = 1 << 18
"""Bytes per array that an adjoint sweep's batched parts handle at once."""


def layers_per_chunk(m, layer_bytes):
    """How many of ``m`` layers of ``layer_bytes`` each (one (n, w) array)
    the batched parts of an adjoint sweep take at once: about
    ``CHUNK_BYTES`` worth (so that what they touch stays in cache; measured:
    batching all 32 layers of n = 256, w = 64, float64 was 6 % slower than
    layer by layer, chunks of 2 layers are not), at least one layer."""
    return max(1, min(m, CHUNK_BYTES // max(layer_bytes, 1)))
