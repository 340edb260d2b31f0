"""Errors that mean "the user's input is wrong" (exit code 2), as opposed to bugs (exit code 1)."""


class SgdscopeError(Exception):
    """Base class: a one-line, user-facing message."""


class ConfigError(SgdscopeError):
    """A config key, value or command-line option is invalid."""


class DataError(SgdscopeError):
    """A dataset file is missing, truncated or not in the expected format."""


class RunStoreError(SgdscopeError):
    """A run directory is not a run, is another version's run, or does not match the config."""


class StoreDamagedError(RunStoreError):
    """A run directory's ``metrics.db`` is not a whole SQLite database (truncated, zero-length, foreign).

    ``reason`` is what was found, without the advice around it, for ``sgdscope check`` to report.
    """

    def __init__(self, db: object, reason: str) -> None:
        from pathlib import Path

        self.db, self.reason = Path(str(db)), reason
        super().__init__(f"{self.db}: the store is damaged ({reason}); run `sgdscope check {self.db.parent}`")


class DivergenceError(Exception):
    """Training produced a non-finite loss or gradient (exit code 1, status 'failed')."""


def _key(p: object) -> str:
    """A key as shown in a message: itself, or its repr when it would break the one-line message."""
    return str(p) if str(p).isprintable() else repr(p)


def format_validation_error(err, prefix: str = "") -> str:
    """One line for a pydantic ``ValidationError``: ``loc: what is allowed; got value`` (+ how many more)."""
    e = err.errors()[0]
    loc = ".".join(_key(p) for p in ((prefix,) if prefix else ()) + tuple(e["loc"])) or "config"
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "literal_error":
        msg = "must be one of " + msg.split("Input should be ", 1)[-1]
    elif e["type"] == "finite_number":
        msg = "must be a finite number"
    msg = msg.removeprefix("Value error, ")
    extra = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{loc}: {msg}; got {e.get('input')!r}{extra}"


class PeerFailed(RuntimeError):
    """Under torch.distributed, a collective failed: another rank died or stopped answering within the
    timeout (exit code 1, status 'failed'; the run resumes with --resume)."""
