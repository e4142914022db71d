"""Logging: rank 0 speaks, other ranks only warn; ``rank/size`` in each line."""
import logging
import sys


def setup_logging(rank, size, quiet=False):
    """Configure the ``pitmpi`` logger for this rank and return it."""
    log = logging.getLogger("pitmpi")
    log.handlers.clear()
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    prefix = f"[{rank}/{size}] " if size > 1 else ""
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.WARNING if (rank != 0 or quiet) else logging.INFO)
    return log
