"""Errors that are the user's to fix: reported in one line, exit code 2."""


class UserError(Exception):
    """Bad input (config, data file, launch).  The message names the key or
    file and what is allowed; the CLI prints it without a traceback."""


class ConfigError(UserError):
    """A bad configuration key or value."""


class DataError(UserError):
    """A missing, unreadable or malformed data file."""


class Diverged(RuntimeError):
    """Training produced NaN/Inf or an exploding loss; exit code 3.  The message
    says where (rank, layer block, iteration) and what to try."""
