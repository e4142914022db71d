"""Summing dicts of arrays over ranks with one ``Allreduce``."""
import numpy as np


class FlatSum:
    """One contiguous buffer for a fixed list of named arrays.

    Parameters
    ----------
    shapes : list of dict of str to ndarray
        Templates (shapes and order) of the dicts that will be summed.
    dtype : numpy dtype
    extra : int
        Scalars appended after the arrays (e.g. a loss to sum along).
    """

    def __init__(self, templates, dtype, extra=0):
        self.slots = []
        end = 0
        for i, tmpl in enumerate(templates):
            for name, v in tmpl.items():
                self.slots.append((i, name, slice(end, end + v.size)))
                end += v.size
        self.n_arrays = end
        self.flat = np.empty(end + extra, dtype=dtype)

    def allreduce(self, comm, dicts, scalars=()):
        """Sum ``dicts`` (same structure as the templates) over ranks, in place;
        returns the summed ``scalars``."""
        if comm.size == 1:  # nothing to sum: skip the copies in and out
            return np.array(scalars, dtype=self.flat.dtype)
        for i, name, slot in self.slots:
            self.flat[slot] = dicts[i][name].ravel()
        self.flat[self.n_arrays:] = scalars
        comm.allreduce_sum(self.flat)
        for i, name, slot in self.slots:
            dicts[i][name].ravel()[:] = self.flat[slot]
        return self.flat[self.n_arrays:].copy()
