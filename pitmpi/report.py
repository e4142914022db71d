"""Offline analysis of output files (``python -m pitmpi report``).

One file: a summary (problem, method, ranks, partition, accuracies, wall
time, time split per rank).  Several files: a comparison table with the
speed-up and parallel efficiency of each run against its baseline — the
``serial`` run of the same dataset and depth among the files, else the
fastest one-rank run of that dataset and depth — and, with ``--target``, the
training time until the validation accuracy first reached the target.
"""
import math
import os
from dataclasses import dataclass

import numpy as np

from . import config as config_mod
from .errors import UserError
from .io import read_result

TIME_KINDS = (("rank_compute", "compute"), ("rank_comm_wait", "comm wait"),
              ("rank_regression", "regression"), ("coarse_wall", "coarse phase"))
SLOW_EPOCH = 1.25  # an epoch this much slower than the run's fast pace fell into a slow spell
UNCOUNTED = "the file was written before pitmpi counted its traffic"


@dataclass(frozen=True)
class Network:
    """The α-β model of a cluster's network: a message of ``m`` bytes takes
    ``latency + m / bandwidth`` seconds (``report --bandwidth --latency``).

    Attributes
    ----------
    bandwidth : float
        Bytes per second.
    latency : float
        Seconds per message (or all-reduce step).
    """

    bandwidth: float
    latency: float

    def seconds(self, traffic):
        """Seconds to send ``traffic`` (..., 4) in the order of
        :data:`~pitmpi.parallel.comm.TRAFFIC`, one after another (no overlap
        with computing): shape (...)."""
        t = np.asarray(traffic, dtype=float)
        return (t[..., 0] + t[..., 2]) / self.bandwidth + (t[..., 1] + t[..., 3]) * self.latency

    @classmethod
    def from_options(cls, bandwidth, latency=None):
        """The network of ``--bandwidth GB/S`` and ``--latency US`` (default
        2 µs), or None without a bandwidth; UserError naming the option for
        a value that is not a network's."""
        if bandwidth is None:
            if latency is not None:
                raise UserError(f"--latency {latency}: it needs --bandwidth (the network's GB/s)")
            return None
        latency = 2.0 if latency is None else latency
        if not (math.isfinite(bandwidth) and bandwidth > 0):
            raise UserError(f"--bandwidth {bandwidth}: expected a network bandwidth in GB/s "
                            f"above 0, e.g. 12.5")
        if not (math.isfinite(latency) and latency >= 0):
            raise UserError(f"--latency {latency}: expected a latency in microseconds, "
                            f"0 or more, e.g. 2")
        return cls(bandwidth * 1e9, latency * 1e-6)


@dataclass
class Run:
    """One output file, read for analysis."""

    path: str
    attrs: dict
    cfg: dict
    params: dict
    history: dict
    timing: dict
    extra: dict

    @property
    def kind(self):
        """Method and ranks, e.g. ``pit ×2`` or ``pit 1-level ×2`` (levels
        other than the default two named)."""
        levels = self.cfg["coarse"]["levels"]
        one = f" {levels}-level" if self.method == "pit" and levels != 2 else ""
        grid = f" {self.blocks}x{self.replicas}" if self.replicas > 1 else ""
        return f"{self.method}{one}{grid} ×{self.ranks}"

    @property
    def label(self):
        return f"{self.kind} L={self.layers}"

    @property
    def method(self):
        return str(self.attrs.get("method"))

    @property
    def ranks(self):
        return int(self.attrs.get("ranks", 1))

    @property
    def emulated(self):
        """Whether the ranks were threads of one process (``--emulate``):
        the iterates of a real job, but timings that mean nothing."""
        return bool(self.attrs.get("emulated", False))

    @property
    def replicas(self):
        """``D`` of a layers × data grid (1 without one)."""
        return int(self.attrs.get("data_parallel_size", 1))

    @property
    def blocks(self):
        """Layer blocks: ranks / replicas."""
        return self.ranks // self.replicas

    @property
    def layers(self):
        return int(self.cfg["model"]["layers"])

    @property
    def dataset(self):
        return str(self.attrs.get("dataset"))

    @property
    def wall(self):
        return float(self.timing["train_wall"])

    @property
    def iterations(self):
        return len(self.history.get("loss", ())) or 1

    def epoch_seconds(self):
        """Training seconds of each epoch, shape (epochs,), the first counted
        from the end of the coarse phase (None without epochs)."""
        walls = np.asarray(self.history.get("epoch_wall", ()), dtype=float)
        if not walls.size:
            return None
        start = float(np.max(self.timing.get("coarse_wall", [0.0])))
        return np.diff(np.concatenate([[start], walls]))

    @property
    def median_epoch_ms(self):
        """Milliseconds per iteration in the median epoch (None without epochs):
        a slow spell of the machine during some epochs does not move it, as it
        moves ``wall / iterations``."""
        per_epoch = self.epoch_seconds()
        if per_epoch is None:
            return None
        return 1e3 * float(np.median(per_epoch)) * per_epoch.size / self.iterations

    @property
    def slow_epoch_share(self):
        """Fraction of the epochs that took over :data:`SLOW_EPOCH` times the
        run's fast pace (its 10th-percentile epoch), None without epochs.
        Epochs of one run do the same work, so these fell into slow spells
        of the machine; with half or more of them slow, the median epoch is
        slow too."""
        per_epoch = self.epoch_seconds()
        if per_epoch is None:
            return None
        return float(np.mean(per_epoch > SLOW_EPOCH * np.percentile(per_epoch, 10)))

    def estimate(self, iterations=None, network=None):
        """The cost model's seconds for ``iterations`` (default: all) of this
        ``pit`` run on its critical path (coarse phase plus the busiest
        block's iterations and the pipeline's fill; with a :class:`Network`,
        plus :meth:`message_seconds`), and for the same iterations of the
        whole net on one rank: ``(pit, serial)``, or None for other runs."""
        a = self.attrs
        if "estimate_iteration_seconds" not in a:
            return None
        k = self.iterations if iterations is None else iterations
        exact, fills, sweeps = self.fallback_counts(k)
        pit = (float(a["estimate_coarse_seconds"])
               + (k - exact + fills * (self.blocks - 1)) * float(a["estimate_iteration_seconds"])
               + (exact + sweeps) * float(a.get("estimate_exact_iteration_seconds", 0.0)))
        if network is not None:
            pit += self.message_seconds(network, k) or 0.0
        return pit, k * float(a["estimate_serial_iteration_seconds"])

    def traffic_parts(self):
        """What each rank sent (counted, :data:`~pitmpi.parallel.comm.TRAFFIC`)
        in the setup (the coarse phase) and in one iteration on average:
        ``(setup, per_iteration)``, each (ranks, 4), or None for a file
        written before traffic was counted."""
        if "rank_setup_traffic" not in self.timing:
            return None
        return (np.asarray(self.timing["rank_setup_traffic"], dtype=float),
                np.asarray(self.timing["rank_iteration_traffic"], dtype=float) / self.iterations)

    def traffic(self, iterations=None):
        """What each rank sent in the setup and the first ``iterations``
        (default: all, the run's iterations sending alike): (ranks, 4), or
        None without counts."""
        parts = self.traffic_parts()
        if parts is None:
            return None
        k = self.iterations if iterations is None else iterations
        return parts[0] + parts[1] * k

    def message_seconds(self, network, iterations=None):
        """The busiest rank's seconds in messages and all-reduces on
        ``network`` over the setup and the first ``iterations``, none of it
        overlapping computation (a bound, not a measurement); None without
        counted traffic."""
        traffic = self.traffic(iterations)
        return None if traffic is None else float(network.seconds(traffic).max())

    def fallback_counts(self, k):
        """Of the first ``k`` iterations: those on exact co-states
        (``monitor.fallback``), the pipeline's fills (1 + the returns from
        exact co-states), and the monitor's sweeps that the fallback relies
        on (0 without it)."""
        exact = self.history.get("fallback_exact")
        if exact is None or not len(exact):
            return 0, 1, 0
        exact = np.asarray(exact[:k], dtype=bool)
        returns = int(np.sum(exact[:-1] & ~exact[1:]))
        its = self.history.get("monitor_iteration", np.array([], dtype=int))
        sweeps = int(np.sum(np.asarray(its) < k)) - int(np.sum(exact[its[its < k]]))
        return int(exact.sum()), 1 + returns, sweeps

    def iterations_to(self, target):
        """Iterations until the end of the first epoch whose validation
        accuracy reached ``target`` (None: never)."""
        acc = self.history.get("val_acc", np.array([]))
        hit = np.flatnonzero(acc >= target)
        return int((hit[0] + 1) * self.iterations // len(acc)) if hit.size else None

    def time_to(self, target):
        """Training seconds until validation accuracy first reached ``target`` (None: never)."""
        acc = self.history.get("val_acc", np.array([]))
        hit = np.flatnonzero(acc >= target)
        return float(self.history["epoch_wall"][hit[0]]) if hit.size else None


def load(path):
    """Read one output file as a :class:`Run`; UserError naming the file if it cannot."""
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory; name .h5 output files")
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    try:
        attrs, params, hist, timing, extra = read_result(path)
        cfg = config_mod.loads(attrs["config"], origin=f"{path} (config attribute)")
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path}: not a readable pitmpi output file ({e})") from None
    if "val_acc" not in hist or "train_wall" not in timing:
        raise UserError(f"{path}: not a pitmpi output file (no history/val_acc or timing)")
    return Run(path, attrs, cfg, params, hist, timing, extra)


def table(header, rows):
    """A plain-text table with aligned columns."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                               enumerate(zip(r, widths)))
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def summarise(path, network=None):
    """The text summary of one output file (with a :class:`Network`, its
    estimate includes the messages)."""
    run = load(path)
    h, t, m = run.history, run.timing, run.cfg["model"]
    lines = [f"{path}",
             f"  problem   {run.dataset}, {network_words(m)}, "
             f"{m['layers']} layers, T = {m['T']}, {m['dtype']}",
             f"  method    {run.method} on {run.ranks} "
             f"{'emulated rank(s) (threads of one process: the timings below mean nothing)' if run.emulated else 'rank(s)'}"
             f"{f' as {run.blocks} layer blocks x {run.replicas} replicas' if run.replicas > 1 else ''}, "
             f"{len(h['val_acc'])} epochs, {run.iterations} iterations, "
             f"{int(run.attrs.get('samples', 0))} samples"]
    if "partition" in run.extra:
        lines.append("  partition " + ", ".join(f"[{a},{b})" for a, b in run.extra["partition"]))
    lines.append(f"  accuracy  train {100 * h['train_acc'][-1]:.2f}%, validation "
                 f"{100 * h['val_acc'][-1]:.2f}% (best {100 * h['val_acc'].max():.2f}%), "
                 f"final train loss {h['train_loss'][-1]:.4f}")
    epoch_ms = run.median_epoch_ms
    lines.append(f"  wall time {run.wall:.2f} s training, "
                 f"{1e3 * run.wall / run.iterations:.3f} ms per iteration"
                 + (f" ({epoch_ms:.3f} in the median epoch; {100 * run.slow_epoch_share:.0f} % "
                    f"of epochs over {SLOW_EPOCH:g}× the run's fast pace)"
                    if epoch_ms is not None else ""))
    rows = []
    for r in range(run.ranks):
        where = f" (block {r // run.replicas}, replica {r % run.replicas})" if run.replicas > 1 else ""
        rows.append([f"rank {r}{where}"] + [f"{t[k][r]:.2f}" if k in t and len(t[k]) > r else "-"
                                     for k, _ in TIME_KINDS]
                    + [f"{t['rank_peak_memory'][r] / 2**20:.0f}" if "rank_peak_memory" in t else "-"])
    lines.append(f"  seconds per rank ({int(run.attrs.get('blas_threads', 1))} BLAS thread(s) each):")
    peak = "process peak MiB" if run.emulated else "peak MiB"  # threads share one process
    lines.extend("    " + s for s in table([""] + [n for _, n in TIME_KINDS] + [peak],
                                           rows).splitlines())
    if "regression_rel" in h and h["regression_rel"].size:
        tail = h["regression_rel"][-min(100, len(h["regression_rel"])):]
        lines.append("  regression ‖Λ̂−Λ‖/‖Λ̂‖ over the last 100 iterations, per boundary: "
                     + " ".join(f"{v:.3f}" for v in np.nanmean(tail, axis=0)))
    lines.extend(traffic_lines(run))
    est = run.estimate(network=network)
    if est is not None:
        a = run.attrs
        exact, fills, sweeps = run.fallback_counts(run.iterations)
        on_exact = ""
        if "fallback" in a:
            on_exact = (f", {exact} iterations on exact co-states and {sweeps} monitor sweeps "
                        f"(monitor.fallback = {float(a['fallback']):g}) of "
                        f"{1e3 * float(a['estimate_exact_iteration_seconds']):.3f} ms, "
                        f"{fills} pipeline fills")
        sent = run.message_seconds(network) if network is not None else None
        messages = (f" + {sent:.2f} s of messages on the busiest rank at "
                    f"{network.bandwidth / 1e9:g} GB/s, {1e6 * network.latency:g} µs"
                    if sent is not None else "")
        lines.append(f"  estimate  (cost model, not measured) critical path {est[0]:.2f} s: coarse "
                     f"phase {float(a['estimate_coarse_seconds']):.2f} s + "
                     f"{run.iterations - exact} iterations of "
                     f"{1e3 * float(a['estimate_iteration_seconds']):.3f} ms on the "
                     f"busiest block{on_exact}{messages}; serial {est[1]:.2f} s; predicted "
                     f"speed-up {est[1] / est[0]:.2f} on {run.ranks} ranks"
                     + ("" if run.ranks == 1 or (network is not None and sent is not None) else
                        " (no messages: see report --bandwidth)" if network is None else
                        f" (no messages: {UNCOUNTED})"))
    lines.extend(monitor_lines(h))
    return "\n".join(lines)


def traffic_lines(run):
    """What the busiest rank sent (counted), in the coarse phase and per
    iteration; [] for one rank or a file without counts."""
    parts = run.traffic_parts()
    if parts is None or run.ranks == 1:
        return []
    setup, per_iter = parts
    words = lambda t, unit, scale: (f"{t[0] / scale:.1f} {unit} in {t[1]:g} messages, "
                                    f"{t[2] / scale:.1f} {unit} in {t[3]:g} all-reduce steps")
    busiest = lambda t: t[int(np.argmax(t[:, 0] + t[:, 2]))]
    return [f"  traffic   (counted, the rank that sent most) coarse phase "
            f"{words(busiest(setup), 'MB', 1e6)}; each iteration "
            f"{words(busiest(per_iter), 'kB', 1e3)}"]


def network_words(m):
    """``verlet ResNet, width 16``, or for a conv net ``conv verlet ResNet, 8
    channels, 3 x 3 kernels, opening stride 2``, from a config's model table."""
    if m.get("kind", "dense") == "conv":
        return (f"conv {m['scheme']} ResNet, {m['channels']} channels, {m['kernel']} x "
                f"{m['kernel']} kernels, opening stride {m['stride']}, {m['classifier']} classifier")
    return f"{m['scheme']} ResNet, width {m['width']}"


def monitor_lines(h, rows=5):
    """The exact-co-state monitor's table (``monitor.every``), at ``rows``
    points spread over the run; [] without it."""
    its = h.get("monitor_iteration")
    if its is None or not len(its):
        return []
    picks = sorted(set(np.linspace(0, len(its) - 1, min(rows, len(its))).round().astype(int)))
    rel, cos = h["monitor_costate_rel"], h["monitor_grad_cos"]
    header = ["at iteration"] + [str(int(its[i])) for i in picks] + ["mean"]
    body = []
    for name, values in ([(f"‖Λ̂−Λ‖/‖Λ‖ at s{b + 1}", rel[:, b]) for b in range(rel.shape[1])]
                         + [(f"cosine, block {b}", cos[:, b]) for b in range(cos.shape[1])]
                         + [("cosine, whole net", h["monitor_grad_cos_all"])]):
        body.append([name] + [f"{values[i]:.3f}" for i in picks] + [f"{np.nanmean(values):.3f}"])
    out = ["  exact-co-state monitor: each boundary's predicted co-state against the exact "
           "one, and the cosine of each block's gradient (and the whole net's) with the "
           "exact gradient:"]
    out.extend("    " + line for line in table(header, body).splitlines())
    return out


def baseline_of(run, runs):
    """The run ``run`` is compared with: the fastest serial run of the same dataset
    and depth with one BLAS thread, else any serial one, else the fastest 1-rank run."""
    same = [r for r in runs if r.dataset == run.dataset and r.layers == run.layers
            and r.ranks == 1 and not r.emulated]
    serial = [r for r in same if r.method == "serial"]
    single = [r for r in serial if int(r.attrs.get("blas_threads", 1)) <= 1]
    pool = single or serial or same
    return min(pool, key=lambda r: r.wall) if pool else None


def estimated_speedup(run, base, target, network=None):
    """The cost model's speed-up of ``run`` (a ``pit`` run) to ``target``
    against the baseline's iterations to it, as text ("-" where it has no
    estimate or either never gets there); with a :class:`Network`, the
    messages included."""
    k = run.iterations_to(target)
    kb = base.iterations_to(target) if base else None
    est = run.estimate(k, network) if k else None
    if est is None or not kb:
        return "-"
    return f"{run.estimate(kb)[1] / est[0]:.2f}"


def compare(paths, target=None, network=None):
    """The comparison table of several output files (with a :class:`Network`,
    the estimated speed-ups include the messages)."""
    runs = [load(p) for p in paths]
    header = ["file", "method", "ranks", "layers", "val %", "best %", "wall s", "ms/iter",
              "speed-up", "efficiency", "median-epoch ms/iter", "slow epochs %"]
    if target is not None:
        header += [f"t({100 * target:g}%) s", "speed-up", "est. speed-up"]
    rows = []
    for run in runs:
        base = baseline_of(run, runs)
        su = base.wall / run.wall if base and not run.emulated else None
        per_iter = 1e3 * run.wall / run.iterations
        epoch_ms, slow = run.median_epoch_ms, run.slow_epoch_share
        row = [os.path.basename(run.path), run.kind.split(" ×")[0],
               f"{run.ranks} emulated" if run.emulated else run.ranks, run.layers,
               f"{100 * run.history['val_acc'][-1]:.2f}", f"{100 * run.history['val_acc'].max():.2f}",
               f"{run.wall:.2f}", f"{per_iter:.3f}",
               f"{su:.2f}" if su else "-", f"{su / run.ranks:.2f}" if su else "-",
               f"{epoch_ms:.3f}" if epoch_ms is not None else "-",
               f"{100 * slow:.0f}" if slow is not None else "-"]
        if target is not None:
            t = run.time_to(target)
            tb = base.time_to(target) if base else None
            row += [f"{t:.2f}" if t is not None else "never",
                    f"{tb / t:.2f}" if t and tb and not run.emulated else "-",
                    estimated_speedup(run, base, target, network)]
        rows.append(row)
    note = ("speed-up = baseline wall / wall (none for emulated ranks: their timings mean nothing), against the serial run of the same dataset and "
            "depth (else the fastest 1-rank run); efficiency = speed-up / ranks; est. speed-up: the cost model's critical path "
            "(coarse phase + the busiest block's iterations) against the serial iterations, "
            "to the same target, an estimate without machine noise"
            + (f" and with the busiest rank's messages at {network.bandwidth / 1e9:g} GB/s, "
               f"{1e6 * network.latency:g} µs, not overlapped" if network is not None
               else " or messages (see --bandwidth)") + "; median-epoch "
            "ms/iter: from the median epoch's training time, which a slow spell of the "
            f"machine does not move; slow epochs: those over {SLOW_EPOCH:g}× the run's fast "
            "pace (its 10th-percentile epoch), slow spells of the machine")
    uncounted = [os.path.basename(r.path) for r in runs
                 if network is not None and r.estimate() is not None and r.traffic() is None]
    if uncounted:
        note += (f"; no messages in the est. speed-up of {', '.join(uncounted)}: "
                 f"{'each' if len(uncounted) > 1 else 'the'} file was written before pitmpi "
                 "counted its traffic")
    return table(header, rows) + "\n" + note
