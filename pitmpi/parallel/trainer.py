"""The training loop every method shares: epochs, history, timing, progress.

A method subclasses :class:`Trainer` and supplies ``setup`` (before the clock
stops counting setup as training: the coarse phase of ``pit`` runs there and
is timed as training), ``step(k, epoch)`` for global iteration ``k``,
``evaluate(X, y)`` and ``gather_params()``.  Everything here is collective:
every rank calls ``run`` and the result lands on rank 0.
"""
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError
from ..model import ResNet
from ..optim import BatchSchedule, Schedule


@dataclass
class Result:
    """What a run produced (complete on rank 0 only).

    Attributes
    ----------
    params : dict of str to ndarray
        Full parameter set (names of DESIGN §2).
    history : dict of str to ndarray
        ``loss`` (per iteration), ``train_loss``, ``train_acc``, ``val_loss``,
        ``val_acc``, ``epoch_wall`` (per epoch), and method-specific entries.
    timing : dict of str to ndarray or float
    attrs : dict
        ``method``, ``ranks``, ``dataset`` and the like.
    extra : dict of str to ndarray
        Further datasets at the file's root (e.g. ``partition``).
    """

    params: dict
    history: dict
    timing: dict
    attrs: dict
    extra: dict = field(default_factory=dict)


def build_network(cfg, data):
    """The fine ResNet a config describes, for a dataset."""
    m, t = cfg["model"], cfg["train"]
    return ResNet(m["scheme"], data.n_features, m["width"], m["layers"], data.n_classes,
                  m["T"], m["activation"], t["weight_decay"], m["dtype"], m["store_trajectory"])


class Trainer:
    """Base class of the training methods.

    Parameters
    ----------
    comm : Comm
    cfg : dict
        Resolved configuration (see :mod:`pitmpi.config`).
    data : Dataset
    log : logging.Logger, optional
    """

    method = None

    def __init__(self, comm, cfg, data, log=None):
        self.comm, self.cfg, self.data = comm, cfg, data
        self.log = log or logging.getLogger("pitmpi")
        self.net = build_network(cfg, data)
        t = cfg["train"]
        try:
            self.batches = BatchSchedule(len(data.y_train), t["batch_size"], t["seed"])
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.lr = Schedule.from_config(t)
        self.epochs = t["epochs"]
        self.x_train = np.ascontiguousarray(data.x_train, dtype=self.net.dtype)
        self.y_train = data.y_train
        self.x_val = np.ascontiguousarray(data.x_val, dtype=self.net.dtype)
        self.y_val = data.y_val
        self.seconds = {"compute": 0.0, "regression": 0.0, "coarse": 0.0}
        self.extra_history = {}

    # hooks ------------------------------------------------------------
    def setup(self):
        """Collective preparation, timed as training (e.g. the coarse phase)."""

    def step(self, k, epoch):
        """One iteration.  Returns this rank's ``(loss_part, correct, count)``."""
        raise NotImplementedError

    def evaluate(self, X, y):
        """This rank's share of ``(Σ cross-entropy, #correct)`` over ``X``."""
        raise NotImplementedError

    def gather_params(self):
        """Full parameter dict on rank 0 (None elsewhere)."""
        raise NotImplementedError

    def result_extra(self):
        """Method-specific root datasets and attributes: ``(extra, attrs)``."""
        return {}, {}

    # driver -------------------------------------------------------------
    def batch(self, k):
        idx = self.batches.indices(k)
        return self.x_train[idx], self.y_train[idx]

    def run(self):
        """Train for ``train.epochs`` epochs; returns a :class:`Result` on rank 0."""
        comm = self.comm
        B = self.batches.per_epoch
        n_iter = self.epochs * B
        loss_parts = np.zeros(n_iter)
        hist = {k: [] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_wall")}
        comm.barrier()
        comm.wait_seconds = 0.0
        start = time.perf_counter()
        self.setup()
        train_wall = time.perf_counter() - start
        samples = 0
        # test hook: PITMPI_FAIL_RANK=r makes rank r raise at iteration 3
        fail_at = 3 if os.environ.get("PITMPI_FAIL_RANK") == str(comm.rank) else -1
        for epoch in range(self.epochs):
            t0 = time.perf_counter()
            correct = count = 0
            for k in range(epoch * B, (epoch + 1) * B):
                if k == fail_at:
                    raise RuntimeError(f"injected failure (PITMPI_FAIL_RANK) at iteration {k}")
                loss_parts[k], c, n = self.step(k, epoch)
                correct += c
                count += n
            epoch_seconds = time.perf_counter() - t0
            train_wall += epoch_seconds
            samples += B * self.batches.batch_size
            val_loss, val_correct = self.evaluate(self.x_val, self.y_val)
            parts = comm.gather((loss_parts[epoch * B:(epoch + 1) * B].sum(), correct, count,
                                 val_loss, val_correct))
            if comm.rank == 0:
                tot = np.sum(np.array(parts, dtype=float), axis=0)
                hist["train_loss"].append(tot[0] / B)
                hist["train_acc"].append(tot[1] / max(tot[2], 1))
                hist["val_loss"].append(tot[3] / len(self.y_val))
                hist["val_acc"].append(tot[4] / len(self.y_val))
                hist["epoch_wall"].append(train_wall)
                if self.cfg["output"]["progress"]:
                    left = (self.epochs - epoch - 1) * epoch_seconds
                    self.log.info("epoch %d/%d  loss %.4f  train %.2f%%  val %.2f%%  "
                                  "%.0f samples/s  ETA %.0fs", epoch + 1, self.epochs,
                                  hist["train_loss"][-1], 100 * hist["train_acc"][-1],
                                  100 * hist["val_acc"][-1],
                                  B * self.batches.batch_size / max(epoch_seconds, 1e-12), left)
        comm_wait = comm.wait_seconds
        per_iter = comm.gather(loss_parts)
        params = self.gather_params()
        compute = max(train_wall - comm_wait - self.seconds["regression"] - self.seconds["coarse"], 0.0)
        rank_times = comm.gather((compute, comm_wait, self.seconds["regression"],
                                  self.seconds["coarse"]))
        extra, attrs = self.result_extra()
        extra_hist = self.gather_extra_history()
        if comm.rank != 0:
            return None
        history = {k: np.array(v) for k, v in hist.items()}
        history["loss"] = np.sum(per_iter, axis=0)
        history.update(extra_hist)
        rt = np.array(rank_times)
        timing = {"train_wall": train_wall, "rank_compute": rt[:, 0], "rank_comm_wait": rt[:, 1],
                  "rank_regression": rt[:, 2], "coarse_wall": rt[:, 3]}
        attrs = {"method": self.method, "ranks": comm.size, "dataset": self.data.name,
                 "samples": samples, **attrs}
        return Result(params, history, timing, attrs, extra)

    def gather_extra_history(self):
        """Method-specific per-iteration histories, assembled on rank 0."""
        return {}
