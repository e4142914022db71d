"""Reading output files back as checkpoints (``train --resume FILE.h5``).

Every output file is a complete checkpoint (see :mod:`pitmpi.io` for the
layout).  What carries over on resume:

- always: parameters, optimizer velocities, the epoch and iteration counters,
  the history so far, the total training wall time; the data order needs no
  state (batch ``g`` is a permutation drawn from ``(train.seed, epoch)``);
- with the same method and number of ranks ("exact" resume): everything else
  too, so the continued run is bitwise identical to an uninterrupted one —
  for ``pit`` each boundary's regression, the pipeline's in-flight state and
  the per-rank timings;
- otherwise: ``pit`` keeps the regression of every boundary that sits at the
  same layer as before, starts the others from zero and refills its pipeline;
  per-rank timings count from the resume.
"""
import os
import tomllib

import h5py
import numpy as np

from . import config as config_mod
from .errors import UserError
from .io import FORMAT_VERSION, read_tree
from .parallel.comm import TRAFFIC

# settings a resumed run may not change (they define the network, the data
# and the batch sequence)
FIXED_KEYS = (("data", "name"), ("data", "seed"), ("data", "n_train"), ("data", "n_val"),
              ("model", "scheme"), ("model", "width"), ("model", "layers"), ("model", "T"),
              ("model", "activation"), ("model", "dtype"),
              ("train", "seed"), ("train", "batch_size"))


class CheckpointError(UserError):
    """A file that cannot be resumed from."""


class Checkpoint:
    """A run's state as read from an output file (all ranks read the same)."""

    def __init__(self, path):
        self.path = path
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: checkpoint file not found")
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: not a file")
        try:
            with h5py.File(path, "r") as f:
                self._read(f)
        except CheckpointError:
            raise
        except OSError as e:
            raise CheckpointError(f"{path}: not a readable HDF5 file (truncated or corrupt?): "
                                  f"{e}") from None
        except (KeyError, ValueError, TypeError, tomllib.TOMLDecodeError) as e:
            raise CheckpointError(f"{path}: incomplete or damaged pitmpi checkpoint ({e})") from None

    def _read(self, f):
        path = self.path
        if "format_version" not in f.attrs:
            raise CheckpointError(f"{path}: not a pitmpi output file (no format_version attribute)")
        version = int(f.attrs["format_version"])
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{path}: format version {version} is newer than this pitmpi "
                                  f"reads ({FORMAT_VERSION}); upgrade pitmpi")
        if "checkpoint" not in f:
            raise CheckpointError(f"{path}: format version {version} holds no checkpoint data "
                                  f"(files of version {FORMAT_VERSION} do)")
        attr = lambda k: f.attrs[k].decode() if isinstance(f.attrs[k], bytes) else f.attrs[k]
        self.config_text = attr("config")
        self.config = config_mod.loads(self.config_text, origin=f"{path} (config attribute)")
        self.method, self.ranks = str(attr("method")), int(attr("ranks"))
        self.epochs_done, self.samples = int(attr("epochs_done")), int(attr("samples"))
        self.params = {k: f["params"][k][()] for k in f["params"]}
        self.history = {k: f["history"][k][()] for k in f["history"]}
        self.timing = {k: f["timing"][k][()] for k in f["timing"]}
        self.train_wall = float(self.timing["train_wall"])
        tree = read_tree(f["checkpoint"])
        self.partition = f["partition"][()] if "partition" in f else None
        self.velocity = tree["velocity"]
        self.regression = {int(k): v for k, v in tree.get("regression", {}).items()}
        self.rank_states = tree.get("rank", {})
        if set(self.velocity) != set(self.params):
            raise CheckpointError(f"{path}: optimizer state does not match the parameters")
        for k, v in self.params.items():
            if not np.all(np.isfinite(v)):
                raise CheckpointError(f"{path}: parameter {k} holds NaN or Inf")

    def exact(self, method, ranks, partition=None):
        """Whether a run of ``method`` on ``ranks`` ranks (with layer ranges
        ``partition``, if it has blocks) continues this one exactly."""
        if method != self.method or ranks != self.ranks:
            return False
        if partition is None or self.partition is None:
            return partition is None and self.partition is None
        return np.array_equal(partition, self.partition)

    def rank_state(self, rank):
        """The method state rank ``rank`` saved (exact resume only)."""
        return self.rank_states.get(str(rank), {})

    def rank_times(self, rank):
        """Seconds rank ``rank`` had spent so far, by kind."""
        return {"compute": float(self.timing["rank_compute"][rank]),
                "comm_wait": float(self.timing["rank_comm_wait"][rank]),
                "regression": float(self.timing["rank_regression"][rank]),
                "coarse": float(self.timing["coarse_wall"][rank])}

    def rank_traffic(self, rank):
        """What rank ``rank`` had sent so far (:data:`~pitmpi.parallel.comm.TRAFFIC`),
        in the setup (coarse phase) and in the iterations: (2, 4); zeros
        from a file written before traffic was counted."""
        if "rank_setup_traffic" not in self.timing:
            return np.zeros((2, len(TRAFFIC)))
        return np.array([self.timing["rank_setup_traffic"][rank],
                         self.timing["rank_iteration_traffic"][rank]], dtype=float)

    def resume_config(self, overrides=()):
        """The checkpoint's config with ``overrides`` applied, checked for resumability.

        The output path defaults to the checkpoint file itself, so a batch job
        resubmitted with ``--resume`` keeps updating one file.
        """
        cfg = config_mod.loads(self.config_text, overrides=overrides,
                               origin=f"{self.path} (config attribute)")
        if not any(o.split("=", 1)[0].strip() == "output.path" for o in overrides):
            cfg["output"]["path"] = self.path
        for section, key in FIXED_KEYS:
            old, new = self.config[section][key], cfg[section][key]
            if old != new:
                raise UserError(f"{section}.{key} = {new!r} differs from {old!r} in {self.path}; "
                                f"it cannot change on resume (start a new run instead)")
        epochs = cfg["train"]["epochs"]
        if epochs <= self.epochs_done:
            raise UserError(f"{self.path} has already trained {self.epochs_done} of "
                            f"train.epochs = {epochs}; set train.epochs above {self.epochs_done} "
                            f"to continue (--set train.epochs=N)")
        return cfg
