"""Command line: ``python -m pitmpi [train|report|keys] ...``.

Exit codes: 0 success, 2 bad input (one-line message, no traceback unless
``--debug``), 3 training diverged (NaN/Inf or exploding loss; the last
checkpoint is kept), 1 anything else.  Under MPI a failure on one rank ends the
whole job (``Abort``) with a message that names the rank.
"""
import argparse
import contextlib
import os
import sys
import traceback

import numpy as np

from . import __version__
from . import config as config_mod
from . import data as data_mod
from .checkpoint import Checkpoint
from .errors import Diverged, UserError
from .io import check_writable, write_result
from .logs import setup_logging
from .parallel.comm import EmulationAborted, LoneComm

DESCRIPTION = """Layer-parallel (parallel-in-time) training of residual networks with MPI.
Without a command, trains the default problem (Verlet ResNet, Swiss roll):
    python -m pitmpi            (1 rank)
    mpirun -n 2 python -m pitmpi   (layer-parallel)"""


def build_parser():
    p = argparse.ArgumentParser(prog="python -m pitmpi", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"pitmpi {__version__}")
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser("train", help="train a network (the default command)",
                       description="Train a network from a TOML config; see "
                                   "'python -m pitmpi keys' for every key.")
    add_train_arguments(t)
    r = sub.add_parser("report", help="summarise, compare and plot output files",
                       description="One file: a summary.  Several: a comparison table with "
                                   "speed-up and efficiency against the serial run of the same "
                                   "dataset and depth among them.")
    r.add_argument("files", nargs="+", metavar="FILE.h5")
    r.add_argument("--target", type=float, metavar="ACC",
                   help="also report the training time to reach this validation accuracy "
                        "(a fraction, e.g. 0.99)")
    r.add_argument("--bandwidth", type=float, metavar="GB/S",
                   help="add the counted messages to the cost model's estimates, at this "
                        "network bandwidth in GB/s (e.g. 12.5 for 100 Gb/s InfiniBand)")
    r.add_argument("--latency", type=float, metavar="US",
                   help="with --bandwidth: the network's latency per message in "
                        "microseconds (default 2)")
    r.add_argument("--plots", metavar="DIR", help="write PNG figures into DIR (needs matplotlib)")
    r.add_argument("--debug", action="store_true", help="full tracebacks for errors")
    sub.add_parser("keys", help="list every configuration key with default and allowed values",
                   description="List every configuration key with default and allowed values.")
    return p


def add_train_arguments(t):
    t.add_argument("config", nargs="?", metavar="CONFIG.toml",
                   help="TOML config (sections data, model, train, coarse, regression, monitor, output)")
    t.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one key (repeatable)")
    t.add_argument("--out", metavar="PATH.h5", help="output file (same as --set output.path=...)")
    t.add_argument("--resume", metavar="FILE.h5",
                   help="continue the run saved in FILE.h5 (its config, then --set overrides; "
                        "raise train.epochs to train longer); writes to FILE.h5 unless --out")
    t.add_argument("--emulate", type=int, metavar="N",
                   help="run N ranks as threads of this one process (no mpirun): the "
                        "iterates, accuracy and output of an N-rank job, for accuracy "
                        "studies on a workstation; its timings mean nothing")
    t.add_argument("--quiet", action="store_true", help="no progress lines")
    t.add_argument("--debug", action="store_true", help="full tracebacks for errors")


def collective(comm, fn):
    """Run ``fn`` on every rank; if it raises UserError on any rank, raise it on all.

    This is how setup errors (config, data, partition) end every rank with
    exit code 2 instead of leaving some ranks waiting.
    """
    try:
        out, err = fn(), None
    except UserError as e:
        out, err = None, str(e)
    errors = comm.allgather(err) if comm.size > 1 else [err]
    for r, e in enumerate(errors):
        if e is not None:
            agreed = UserError(e if r == 0 else f"{e} (on rank {r})")
            agreed.collective = True
            raise agreed
    return out


def prepare(args, comm, log):
    """Resolve the config, load the data and build this rank's trainer."""
    from .parallel.methods import make_trainer, reads_features
    ckpt = None
    if args.resume:
        if args.config:
            raise UserError(f"give either a config file ({args.config}) or --resume "
                            f"{args.resume}, not both: a resumed run takes its config from the "
                            "checkpoint, changed only by --set")
        ckpt = Checkpoint(args.resume)
        cfg = ckpt.resume_config(args.overrides)
    else:
        cfg = config_mod.load(args.config, args.overrides, ranks=comm.size)
    if args.out:
        cfg["output"]["path"] = args.out
    if args.quiet:
        cfg["output"]["progress"] = False
    if comm.rank == 0:
        check_writable(cfg["output"]["path"])
    d = cfg["data"]
    # the features standardised straight into the network's dtype, and only
    # on the ranks that read them (pit, model-parallel: rank 0)
    data = data_mod.load(d["name"], d["path"], seed=d["seed"], n_train=d["n_train"],
                         n_val=d["n_val"], dtype=cfg["model"]["dtype"],
                         features=reads_features(cfg, comm.rank, comm.size))
    trainer = make_trainer(comm, cfg, data, log)
    return cfg, data, trainer, ckpt


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "BLIS_NUM_THREADS")


def share_cores(comm, log):
    """With several ranks and no thread count in the environment, give each
    rank's BLAS its share of the node's cores: left alone, every rank's
    OpenBLAS starts a thread per core, and oversubscribed threads ran the
    default problem 8× slower on 2 cores.  Returns the threadpoolctl limiter
    (None when nothing was changed)."""
    if comm.size == 1:
        return None
    local = comm.local_size()  # collective: every rank calls it
    if any(os.environ.get(v) for v in THREAD_VARIABLES):
        return None
    cores = os.cpu_count() or 1
    mine = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    # a rank bound to some cores uses those; an unbound one a share of the node
    threads = mine if mine < cores else max(1, cores // local)
    from threadpoolctl import threadpool_limits
    limiter = threadpool_limits(threads, user_api="blas")
    log.info("BLAS: %d thread(s) per rank (%d rank(s) on this node's %d cores; set "
             "OMP_NUM_THREADS to choose)", threads, local, cores)
    return limiter


def say_many_blocks(cfg, comm, log, resumed):
    """Name the ``[many_blocks]`` values a ``pit`` run on many blocks took
    (as resolved: a ``--set`` of the same key wins), and, where the run
    still learns from the neighbours' co-states, that its accuracy falls
    with the blocks."""
    if not config_mod.overlay_applies(cfg, comm.size):
        return
    blocks = config_mod.blocks_of(cfg, comm.size)
    taken = ", ".join(f"{s}.{k} = {cfg[s][k]!r}"
                      for s, keys in cfg[config_mod.OVERLAY].items() for k in keys)
    if taken and not resumed:
        log.info("pit on %d blocks: the [%s] values apply (%s; docs/many-ranks.md)", blocks,
                 config_mod.OVERLAY, taken)
    if cfg["regression"]["target"] == "relayed":
        return
    log.info("hint: pit on %d blocks with regression.target = '%s': its accuracy falls as "
             "blocks are added (Swiss roll, L = 256: 99.8 %% on 2, 71.5 %% on 16). Measure "
             "yours with --emulate and monitor.every; the options that kept serial's accuracy "
             "on 4-16 blocks (regression.target = 'relayed', regression.damping = 'error', a "
             "longer coarse phase shared by all ranks, coarse.levels = 3 or 4, fewer blocks "
             "replicated on the ranks by train.max_blocks or train.data_parallel_size) are in "
             "docs/many-ranks.md",
             blocks, cfg["regression"]["target"])


def train(args, comm, log):
    cfg, data, trainer, ckpt = collective(comm, lambda: prepare(args, comm, log))
    log.info("pitmpi %s: %s on %d %srank(s); %s", __version__, cfg["train"]["method"], comm.size,
             "emulated " if comm.emulated else "", data.summary())
    log.info("network: %r", trainer.net)
    say_many_blocks(cfg, comm, log, resumed=ckpt is not None)
    path = cfg["output"]["path"]
    if ckpt is not None:
        log.info("resuming %s after epoch %d of %d (%s on %d rank(s) before)", ckpt.path,
                 ckpt.epochs_done, cfg["train"]["epochs"], ckpt.method, ckpt.ranks)

    def save(result):
        write_result(path, result, cfg)
        log.info("checkpoint: wrote %s after epoch %d", path, result.attrs["epochs_done"])

    limiter = share_cores(comm, log)
    try:
        result = trainer.run(ckpt, save=save)
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
    if comm.rank == 0:
        write_result(path, result, cfg)
        h, tm = result.history, result.timing
        log.info("done: val accuracy %.2f%%, train loss %.4f, %.1f s training; wrote %s",
                 100 * h["val_acc"][-1], h["train_loss"][-1], tm["train_wall"], path)
    comm.barrier()  # the file exists on every rank's return
    return 0


def report(args, log):
    from .report import Network, compare, summarise
    if args.target is not None and not 0 < args.target <= 1:
        raise UserError(f"--target {args.target}: expected a validation accuracy in (0, 1]")
    network = Network.from_options(args.bandwidth, args.latency)
    if len(args.files) == 1:
        print(summarise(args.files[0], network))
        if args.target is not None:
            print(compare(args.files, args.target, network))
    else:
        print(compare(args.files, args.target, network))
    if args.plots:
        from .plots import write_plots
        for path in write_plots(args.files, args.plots):
            print(f"wrote {path}")
    return 0


def until_the_reader_stops(fn):
    """``fn()`` (a command that only prints), ending quietly with 0 when the
    reader of its output stops early, as ``report FILE.h5 | head`` does."""
    try:
        return fn()
    except BrokenPipeError:
        # nothing more reaches the reader; the interpreter's final flush must not fail either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def floating_point_quiet(debug):
    """NumPy's overflow / invalid-value warnings off during training (a
    diverging run is stopped with its own message, which says more), on
    under ``--debug``."""
    return contextlib.nullcontext() if debug else np.errstate(all="ignore")


def main(argv=None, comm=None):
    """Entry point; returns the exit code.  ``comm`` defaults to COMM_WORLD."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0] not in ("train", "report", "keys", "-h", "--help", "--version"):
        argv = ["train"] + argv  # the default command
    args = parser.parse_args(argv)
    if args.command == "keys":
        return until_the_reader_stops(lambda: print(config_mod.describe()) or 0)
    if comm is None:
        if args.command == "report":
            comm = LoneComm()
        else:
            from .parallel.comm import world_comm
            comm = world_comm()
    if getattr(args, "emulate", None) is not None:
        return emulate(args, comm)
    return run(args, comm)


EMULATED_TIMEOUT = 86400.0  # seconds an emulated rank waits for a message (a long coarse phase)


def emulate(args, world):
    """``train --emulate N``: N ranks as threads of this process (the thread
    communicator, which gives the iterates of ``mpirun -n N``), for accuracy
    studies on a workstation; their timings mean nothing.  Returns the exit
    code."""
    from .parallel.comm import run_emulated
    if world.size > 1:
        if world.rank == 0:
            print(f"pitmpi: error: --emulate {args.emulate} runs its ranks as threads of one "
                  f"process, but this job has {world.size} MPI processes; start it without "
                  "mpirun, or drop --emulate", file=sys.stderr)
        return 2
    if args.emulate < 1:
        print(f"pitmpi: error: --emulate {args.emulate} is not allowed; expected a number of "
              "ranks >= 1", file=sys.stderr)
        return 2
    try:
        with data_mod.sharing():  # the ranks hold one copy of the data
            return max(run_emulated(args.emulate, lambda comm: run(args, comm),
                                    timeout=EMULATED_TIMEOUT))
    except EmulationAborted as e:  # a rank ended the job; it has said why
        return getattr(e, "code", 1)


def run(args, comm):
    """The command of ``args`` on this rank; returns the exit code."""
    log = setup_logging(comm.rank, comm.size, getattr(args, "quiet", False))
    debug = getattr(args, "debug", False)
    try:
        if args.command == "report":
            return until_the_reader_stops(lambda: report(args, log))
        with floating_point_quiet(debug):
            return train(args, comm, log)
    except UserError as e:
        agreed = comm.size == 1 or getattr(e, "collective", False)
        if comm.rank == 0 or not agreed:
            where = "" if agreed else f" (rank {comm.rank} of {comm.size})"
            print(f"pitmpi: error{where}: {e}", file=sys.stderr)
            if debug:
                traceback.print_exc()
        if not agreed:
            comm.abort(2)
        return 2
    except Diverged as e:
        sys.stderr.write(f"pitmpi: {e}\n")  # one write: ranks' lines do not interleave
        if debug:
            traceback.print_exc()
        if comm.size > 1:
            comm.abort(3)
        return 3
    except EmulationAborted:  # stopped because another emulated rank failed; it has said why
        raise
    except Exception as e:  # noqa: BLE001 - any failure must end every rank
        if comm.size > 1:
            sys.stderr.write(f"pitmpi: rank {comm.rank} of {comm.size} failed: "
                             f"{type(e).__name__}: {e}\n{traceback.format_exc()}\n")
            comm.abort(1)
        raise

