"""HDF5 output files.

Layout (one file, written by rank 0, readable with plain h5py)::

    /                     attrs: format_version, pitmpi_version, method, ranks,
                                 dataset, config (TOML text), created, ...
    /params/<name>        open.K, open.b, K, b, cls.W, cls.b  (DESIGN §2)
    /history/<name>       loss (per iteration), train_loss, train_acc,
                          val_loss, val_acc, epoch_wall (per epoch), ...
    /timing/<name>        train_wall (scalar), rank_compute, rank_comm_wait,
                          rank_regression, coarse_wall, rank_peak_memory (per rank),
                          rank_setup_traffic, rank_iteration_traffic (ranks x 4:
                          bytes sent, messages, all-reduce bytes, all-reduce steps)
    /<extra>              e.g. partition (ranks x 2): layer range per rank
    /checkpoint/velocity/<name>      optimizer state, same shapes as params
    /checkpoint/regression/<layer>/  G, H, theta, pairs, held_* of the boundary at <layer>
    /checkpoint/rank/<r>/            rank r's pipeline state (pit), for an
                                     exact resume on the same number of ranks

Files are written to a temporary name in the target directory and renamed
into place, so a reader never sees a half-written file under the final name.
"""
import datetime
import os
import tempfile

import h5py
import numpy as np

from . import __version__
from .config import to_toml
from .errors import UserError

FORMAT_VERSION = 2


def check_writable(path):
    """Raise UserError now if ``path`` could not be written at the end of a run."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise UserError(f"output.path {path!r} is a directory; name an .h5 file")
    parent = os.path.dirname(target)
    while not os.path.isdir(parent):
        if os.path.exists(parent):
            raise UserError(f"output.path {path!r}: {parent} is not a directory")
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise UserError(f"output.path {path!r}: directory {parent} is not writable")


def write_result(path, result, cfg):
    """Write a :class:`~pitmpi.parallel.trainer.Result` atomically to ``path``."""
    target = os.path.abspath(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".h5", dir=os.path.dirname(target))
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["pitmpi_version"] = __version__
            f.attrs["config"] = to_toml(cfg)
            f.attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
            for k, v in result.attrs.items():
                f.attrs[k] = v
            for group, items in (("params", result.params), ("history", result.history),
                                 ("timing", result.timing)):
                g = f.create_group(group)
                for name, value in items.items():
                    g.create_dataset(name, data=np.asarray(value))
            for name, value in result.extra.items():
                f.create_dataset(name, data=np.asarray(value))
            write_tree(f.create_group("checkpoint"), result.checkpoint)
            f.flush()
            os.fsync(f.id.get_vfd_handle())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_tree(group, tree):
    """Write a nested dict of arrays into an HDF5 group (None values are skipped)."""
    for name, value in tree.items():
        if value is None:
            continue
        if isinstance(value, dict):
            write_tree(group.create_group(name), value)
        else:
            group.create_dataset(name, data=np.asarray(value))


def read_tree(group):
    """The nested dict of arrays :func:`write_tree` wrote."""
    return {name: read_tree(item) if isinstance(item, h5py.Group) else item[()]
            for name, item in group.items()}


def read_result(path):
    """Read an output file into plain dicts: ``(attrs, params, history, timing, extra)``."""
    with h5py.File(path, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        groups = {}
        for g in ("params", "history", "timing"):
            groups[g] = {k: f[g][k][()] for k in f[g]} if g in f else {}
        extra = {k: f[k][()] for k in f if isinstance(f[k], h5py.Dataset)}
    return attrs, groups["params"], groups["history"], groups["timing"], extra
