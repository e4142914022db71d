"""Logging: rank 0 speaks, other ranks only warn; ``rank/size`` in each line."""
import logging
import sys


def setup_logging(rank, size, quiet=False):
    """Configure this rank's logger and return it: ``pitmpi`` on rank 0,
    ``pitmpi.rank<r>`` elsewhere (emulated ranks, threads of one process,
    then do not reconfigure each other's)."""
    log = logging.getLogger("pitmpi" if rank == 0 else f"pitmpi.rank{rank}")
    log.handlers.clear()
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    prefix = f"[{rank}/{size}] " if size > 1 else ""
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.WARNING if (rank != 0 or quiet) else logging.INFO)
    return log
