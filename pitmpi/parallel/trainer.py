"""The training loop every method shares: epochs, history, timing, progress.

A method subclasses :class:`Trainer` and supplies ``setup`` (before the clock
stops counting setup as training: the coarse phase of ``pit`` runs there and
is timed as training), ``step(k, epoch)`` for global iteration ``k``,
``evaluate(X, y)`` and ``gather_params()``.  Everything here is collective:
every rank calls ``run`` and the result lands on rank 0.
"""
import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from ..config import BLOCK_METHODS
from ..errors import ConfigError, Diverged
from ..model import ResNet
from ..optim import BatchSchedule, Schedule
from .comm import TRAFFIC

EPOCH_HISTORY = ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_wall")
RANK_TIMES = ("compute", "comm_wait", "regression", "coarse")


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
    checkpoint : dict
        What a resumed run needs beyond the above (see :mod:`pitmpi.checkpoint`):
        ``velocity`` (full optimizer state), ``regression`` (per boundary
        layer), ``rank`` (per-rank method state, for an exact resume).
    """

    params: dict
    history: dict
    timing: dict
    attrs: dict
    extra: dict = field(default_factory=dict)
    checkpoint: dict = field(default_factory=dict)


def peak_memory():
    """Peak resident memory of this process so far, bytes (0 where unknown)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0.0
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0


def blas_threads():
    """Threads of the BLAS NumPy uses (the most of any loaded BLAS library)."""
    from threadpoolctl import threadpool_info
    counts = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
    return max(counts, default=1)


def build_network(cfg, data):
    """The fine ResNet a config describes, for a dataset."""
    m, t = cfg["model"], cfg["train"]
    if m["kind"] == "dense":
        if cfg["regression"]["pool"]:
            raise ConfigError(f"regression.pool = {cfg['regression']['pool']} is not allowed with "
                              "model.kind = 'dense' (it averages conv states over patches of "
                              "positions; set regression.pool = 0)")
        if m["classifier"] != "flatten":
            raise ConfigError(f"model.classifier = {m['classifier']!r} is not allowed with "
                              "model.kind = 'dense' (its classifier reads the whole state: "
                              "'flatten')")
        width, shape = m["width"], {}
    else:
        if data.image_shape is None:
            raise ConfigError(f"model.kind = 'conv' needs images, but data.name = "
                              f"{cfg['data']['name']!r} has {data.n_features} features per sample "
                              "(use mnist, or an .npz whose x arrays are (n, H, W) or "
                              "(n, C, H, W))")
        width = m["channels"]
        shape = {"kind": "conv", "image_shape": data.image_shape, "kernel": m["kernel"],
                 "stride": m["stride"], "classifier": m["classifier"]}
    return ResNet(m["scheme"], data.n_features, width, m["layers"], data.n_classes,
                  m["T"], m["activation"], t["weight_decay"], m["dtype"], m["store_trajectory"],
                  t["label_smoothing"], **shape)


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
        comm.allreduce_order = cfg["train"]["allreduce"]  # before any split: they inherit it
        self.log = log or logging.getLogger("pitmpi")
        self.net = build_network(cfg, data)
        t = cfg["train"]
        try:
            self.batches = BatchSchedule(len(data.y_train), t["batch_size"], t["seed"])
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.lr = Schedule.from_config(t, self.batches.per_epoch)
        self.epochs = t["epochs"]
        self.x_train = self.features_in_dtype(data.x_train)
        self.y_train = data.y_train
        self.x_val = self.features_in_dtype(data.x_val)
        self.y_val = data.y_val
        self.seconds = {"regression": 0.0, "coarse": 0.0, "monitor": 0.0}
        self.monitor = None  # pit's exact-co-state monitor (monitor.every), set by the method
        if t["data_parallel_size"] > 1 and self.method not in BLOCK_METHODS:
            raise ConfigError(f"train.data_parallel_size = {t['data_parallel_size']} makes a "
                              f"layers x data grid for pit and model-parallel; train.method = "
                              f"{self.method!r} has no layer blocks (data-parallel splits every "
                              "batch over all ranks already)")
        if cfg["monitor"]["every"] and self.method != "pit":
            raise ConfigError(f"monitor.every = {cfg['monitor']['every']} measures the error of "
                              f"pit's predicted co-states; train.method = {self.method!r} uses "
                              "exact ones (set monitor.every = 0, or train.method = 'pit')")
        self.exact_resume = False
        self.last_checkpoint = 0  # epoch of the last complete checkpoint, and its file
        self.checkpoint_path = None

    def features_in_dtype(self, x):
        """``x`` as a C-ordered array of the network's dtype (no copy if it
        is one); None stays None (a rank that does not read the features)."""
        return None if x is None else np.ascontiguousarray(x, dtype=self.net.dtype)

    @classmethod
    def reads_features(cls, cfg, rank, size):
        """Whether rank ``rank`` of ``size`` reads the features with this
        method and ``cfg`` (a rank that does not loads only the labels)."""
        return True

    # hooks ------------------------------------------------------------
    def setup(self):
        """Collective preparation, timed as training (e.g. the coarse phase)."""

    def step(self, k, epoch):
        """One iteration.  Returns this rank's ``(loss_part, correct, count)``."""
        raise NotImplementedError

    def evaluate(self, X, y):
        """This rank's share of ``(Σ cross-entropy, #correct)`` over ``X``."""
        raise NotImplementedError

    def local_copy(self, full):
        """This rank's share of a full parameter-shaped dict (a copy)."""
        return {k: np.array(v, dtype=self.net.dtype) for k, v in full.items()}

    def gather_full(self, local):
        """The full dict on rank 0 (None elsewhere) from each rank's share."""
        return local if self.comm.rank == 0 else None

    def start(self, params, velocity=None):
        """Take this rank's share of full ``params`` (and optimizer ``velocity``)."""
        self.params = self.local_copy(params)
        t = self.cfg["train"]
        self.opt = self.block.optimizer(self.params, t["momentum"], t["lr_per"])
        if velocity is not None:
            self.opt.load_velocity(self.local_copy(velocity))

    def gather_params(self):
        """Full parameter dict on rank 0 (None elsewhere)."""
        return self.gather_full(self.params)

    def method_state(self):
        """This rank's method state beyond parameters and optimizer: a dict of arrays."""
        return {}

    def regression_states(self):
        """``{boundary layer: regression state}`` known to this rank."""
        return {}

    def resume(self, ckpt):
        """Continue from a :class:`~pitmpi.checkpoint.Checkpoint` instead of
        ``setup`` (the method's part; :meth:`restore` has done the history)."""
        self.start(ckpt.params, ckpt.velocity)

    def partition(self):
        """Layer range ``[a, b)`` of each rank, shape (ranks, 2); None without blocks."""
        return None

    def result_extra(self):
        """Method-specific root datasets and attributes: ``(extra, attrs)``."""
        return {}, {}

    def gather_extra_history(self, k_done):
        """Method-specific per-iteration histories of the first ``k_done``
        iterations, assembled on rank 0."""
        return {}

    # driver -------------------------------------------------------------
    def batch(self, k):
        idx = self.batches.indices(k)
        return np.take(self.x_train, idx, axis=0), self.y_train[idx]  # (take: faster than x[idx])

    def run(self, ckpt=None, save=None):
        """Train up to ``train.epochs`` epochs; returns a :class:`Result` on rank 0.

        Parameters
        ----------
        ckpt : Checkpoint, optional
            Continue from it (its epochs are not repeated).
        save : callable, optional
            Called on rank 0 with the :class:`Result` so far every
            ``output.checkpoint_every`` epochs (not after the last epoch).
        """
        comm = self.comm
        B = self.batches.per_epoch
        n_iter = self.epochs * B
        self.loss_parts = np.zeros(n_iter)
        self.hist = {k: [] for k in EPOCH_HISTORY}
        self.samples, first = 0, 0
        self.before = dict.fromkeys(RANK_TIMES, 0.0)  # per-rank seconds of earlier runs
        self.traffic_before = np.zeros((2, len(TRAFFIC)))  # and traffic: setup, iterations
        self.wall_before = ckpt.train_wall if ckpt is not None else 0.0
        comm.barrier()
        comm.ledger = 0.0
        start = time.perf_counter()
        if ckpt is None:
            self.setup()
        else:
            first = self.restore(ckpt)
        self.setup_traffic = comm.traffic  # the coarse phase's (none on resume)
        self.session_wall = time.perf_counter() - start
        every = self.cfg["output"]["checkpoint_every"]
        fail_at = self.injected_failure(first * B + 3)
        for epoch in range(first, self.epochs):
            t0 = time.perf_counter()
            correct = count = 0
            monitored = 0.0  # seconds of the monitor's sweeps, not training
            for k in range(epoch * B, (epoch + 1) * B):
                if k == fail_at:
                    raise RuntimeError(f"injected failure (PITMPI_FAIL_RANK) at iteration {k}")
                self.loss_parts[k], c, n = self.step(k, epoch)
                self.check_loss(k, epoch)
                correct += c
                count += n
                if self.monitor is not None and self.monitor.due(k):
                    monitored += self.run_monitor(k)
            epoch_seconds = time.perf_counter() - t0 - monitored
            self.session_wall += epoch_seconds
            self.samples += B * self.batches.batch_size
            ledger = comm.ledger  # evaluation and checkpoints are not training
            self.record_epoch(epoch, correct, count, epoch_seconds)
            comm.ledger = ledger  # before a checkpoint records it
            if every and (epoch + 1) % every == 0 and epoch + 1 < self.epochs:
                self.last_checkpoint = epoch + 1
                self.checkpoint_path = self.cfg["output"]["path"]
                result = self.snapshot(epoch + 1)
                if comm.rank == 0 and save is not None:
                    save(result)
            comm.ledger = ledger
        return self.snapshot(self.epochs)

    def run_monitor(self, k):
        """The monitor's measurement after iteration ``k``, its time, waits
        and traffic kept out of training's; returns its seconds."""
        t, ledger = time.perf_counter(), self.comm.ledger
        self.monitor.measure(k)
        self.comm.ledger = ledger
        spent = time.perf_counter() - t
        self.seconds["monitor"] += spent
        return spent

    def layer_range(self):
        """The layers ``(a, b)`` this rank updates."""
        return 0, self.net.layers

    def diverged(self, what, k, epoch):
        """Raise :class:`Diverged` for ``what`` found at iteration ``k``."""
        a, b = self.layer_range()
        m = self.cfg["model"]
        kept = (f"the checkpoint of epoch {self.last_checkpoint} in {self.checkpoint_path} "
                "is kept" if self.last_checkpoint else
                "no checkpoint was written this run (output.checkpoint_every = K writes one "
                "every K epochs)")
        raise Diverged(f"training diverged on rank {self.comm.rank} (layers [{a}, {b})) at "
                       f"iteration {k} (epoch {epoch + 1}): {what}; try a smaller train.lr "
                       f"(now {self.lr(k, epoch):g}) or a smaller step h = T / layers "
                       f"(now {m['T'] / m['layers']:g}); {kept}") from None

    def check_loss(self, k, epoch):
        """Stop on a non-finite or exploding loss part of this rank."""
        loss = self.loss_parts[k]
        limit = self.cfg["train"]["max_loss"]
        if not np.isfinite(loss):
            self.diverged(f"the loss is {loss}", k, epoch)
        if limit and loss > limit:
            self.diverged(f"the batch loss {loss:.4g} exceeds train.max_loss = {limit:g}", k, epoch)

    def check_finite(self, what, array, k, epoch):
        """Stop if ``array`` (a state or co-state) holds NaN or Inf."""
        if not math.isfinite(array.sum()):  # NaN and Inf propagate into the sum
            self.diverged(f"the {what} holds NaN or Inf", k, epoch)

    def injected_failure(self, default):
        """Test hook: with ``PITMPI_FAIL_RANK=r`` rank r raises at iteration
        ``PITMPI_FAIL_AT`` (default: 3 iterations into this run); -1: never."""
        if os.environ.get("PITMPI_FAIL_RANK") != str(self.comm.rank):
            return -1
        return int(os.environ.get("PITMPI_FAIL_AT", default))

    def restore(self, ckpt):
        """Load a checkpoint's state and history; returns the first epoch to run."""
        B = self.batches.per_epoch
        first = ckpt.epochs_done
        k0 = first * B
        if self.comm.rank == 0:
            self.loss_parts[:k0] = ckpt.history["loss"][:k0]
        for k in EPOCH_HISTORY:
            self.hist[k] = list(ckpt.history[k][:first])
        self.samples = ckpt.samples
        self.last_checkpoint, self.checkpoint_path = first, ckpt.path
        self.exact_resume = ckpt.exact(self.method, self.comm.size, self.partition())
        if self.exact_resume:
            self.before = ckpt.rank_times(self.comm.rank)
            self.traffic_before = ckpt.rank_traffic(self.comm.rank)
        self.resume(ckpt)
        return first

    def record_epoch(self, epoch, correct, count, epoch_seconds):
        """Validate, gather this epoch's figures to rank 0 and print them."""
        comm, B, hist = self.comm, self.batches.per_epoch, self.hist
        val_loss, val_correct = self.evaluate(self.x_val, self.y_val)
        parts = comm.gather((self.loss_parts[epoch * B:(epoch + 1) * B].sum(), correct, count,
                             val_loss, val_correct))
        if comm.rank != 0:
            return
        tot = np.sum(np.array(parts, dtype=float), axis=0)
        hist["train_loss"].append(tot[0] / B)
        hist["train_acc"].append(tot[1] / max(tot[2], 1))
        hist["val_loss"].append(tot[3] / len(self.y_val))
        hist["val_acc"].append(tot[4] / len(self.y_val))
        hist["epoch_wall"].append(self.wall_before + self.session_wall)
        if self.cfg["output"]["progress"]:
            left = (self.epochs - epoch - 1) * epoch_seconds
            self.log.info("epoch %d/%d  loss %.4f  train %.2f%%  val %.2f%%  "
                          "%.0f samples/s  ETA %.0fs%s", epoch + 1, self.epochs,
                          hist["train_loss"][-1], 100 * hist["train_acc"][-1],
                          100 * hist["val_acc"][-1],
                          B * self.batches.batch_size / max(epoch_seconds, 1e-12), left,
                          self.progress_extra(epoch))

    def progress_extra(self, epoch):
        """More of the epoch's progress line (rank 0), for the method to add."""
        return ""

    def snapshot(self, epochs_done):
        """Collective: the run so far as a :class:`Result` (a complete checkpoint) on rank 0."""
        comm = self.comm
        waited, traffic = comm.wait_seconds, comm.traffic  # before the gathers below, not training
        k_done = epochs_done * self.batches.per_epoch
        per_iter = comm.gather(self.loss_parts[:k_done])
        params = self.gather_params()
        velocity = self.gather_full(self.opt.velocity)
        now = {"comm_wait": waited, "regression": self.seconds["regression"],
               "coarse": self.seconds["coarse"]}
        now["compute"] = max(self.session_wall - sum(now.values()), 0.0)
        rank_times = comm.gather(tuple(self.before[k] + now[k] for k in RANK_TIMES)
                                 + (peak_memory(),))
        rank_traffic = comm.gather(self.traffic_before
                                   + [self.setup_traffic, traffic - self.setup_traffic])
        states = comm.gather(self.method_state())
        regs = comm.gather(self.regression_states())
        extra, attrs = self.result_extra()
        extra_hist = self.gather_extra_history(k_done)
        if comm.rank != 0:
            return None
        history = {k: np.array(v[:epochs_done]) for k, v in self.hist.items()}
        history["loss"] = np.sum(per_iter, axis=0)
        history.update(extra_hist)
        rt = np.array(rank_times)
        timing = {"train_wall": self.wall_before + self.session_wall, "rank_compute": rt[:, 0],
                  "rank_comm_wait": rt[:, 1], "rank_regression": rt[:, 2], "coarse_wall": rt[:, 3],
                  "rank_peak_memory": rt[:, 4],
                  "rank_setup_traffic": np.array([t[0] for t in rank_traffic]),
                  "rank_iteration_traffic": np.array([t[1] for t in rank_traffic])}
        attrs = {"method": self.method, "ranks": comm.size, "dataset": self.data.name,
                 "emulated": bool(getattr(comm, "emulated", False)),
                 "blas_threads": blas_threads(),
                 "samples": self.samples, "epochs_done": epochs_done,
                 "iterations_done": k_done, **attrs}
        ckpt = {"velocity": velocity,
                "regression": {str(b): st for r in regs for b, st in r.items()},
                "rank": {str(r): st for r, st in enumerate(states)}}
        return Result(params, history, timing, attrs, extra, ckpt)
