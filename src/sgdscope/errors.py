"""Errors that mean "the user's input is wrong" (exit code 2), as opposed to bugs (exit code 1)."""


class SgdscopeError(Exception):
    """Base class: a one-line, user-facing message."""


class ConfigError(SgdscopeError):
    """A config key, value or command-line option is invalid."""


class DataError(SgdscopeError):
    """A dataset file is missing, truncated or not in the expected format."""


class RunStoreError(SgdscopeError):
    """A run directory is not a run, is another version's run, or does not match the config."""


class DivergenceError(Exception):
    """Training produced a non-finite loss or gradient (exit code 1, status 'failed')."""
