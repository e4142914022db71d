"""Errors that are the user's to fix: reported in one line, exit code 2."""


class UserError(Exception):
    """Bad input (config, data file, launch).  The message names the key or
    file and what is allowed; the CLI prints it without a traceback."""


class ConfigError(UserError):
    """A bad configuration key or value."""


class DataError(UserError):
    """A missing, unreadable or malformed data file."""
