"""Errors that reach the user as one clear line (never a traceback).

Exit codes (documented in the README):
  1  operation failed (S3, mount, daemon error)
  2  bad input: configuration, flags, file list
  3  no daemon / not a cachefs mount
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_DAEMON = 3
EXIT_INTERRUPTED = 130  # Ctrl-C, or a SIGTERM, before the work was done


class QuietError(Exception):
    """A user-facing error: printed as one line, exits with ``exitcode``."""

    def __init__(self, msg: str, exitcode: int = EXIT_FAILED) -> None:
        super().__init__(msg)
        self.msg = msg
        self.exitcode = exitcode

    def __str__(self) -> str:
        return self.msg


class ConfigError(QuietError):
    def __init__(self, msg: str) -> None:
        super().__init__(msg, EXIT_USAGE)


class S3Error(Exception):
    """An object store failure after retries (maps to EIO at the FUSE boundary)."""

    def __init__(self, msg: str, *, code: str = "", status: int = 0, transient: bool = False):
        super().__init__(msg)
        self.code = code
        self.status = status
        self.transient = transient


class ObjectChanged(S3Error):
    """The object's ETag no longer matches the one the file was opened with (HTTP 412)."""


class NoSuchObject(S3Error):
    pass


def leaves(e: BaseException) -> list[BaseException]:
    """The exceptions inside trio's (nested) exception groups; ``[e]`` for one that is
    not a group."""
    if not isinstance(e, BaseExceptionGroup):
        return [e]
    return [x for sub in e.exceptions for x in leaves(sub)]


def chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and every exception it was raised from or during (its causes and contexts),
    each once."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__]


def tls_failure(e: BaseException) -> str | None:
    """What went wrong in TLS, when an ssl.SSLError is somewhere in ``e``'s chain (HTTP
    clients wrap it, sometimes in an exception with no message of its own)."""
    for x in chain(e):
        if isinstance(x, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {x.verify_message}"
        if isinstance(x, ssl.SSLError):
            return (x.reason or str(x)).replace("_", " ").lower()
    return None


class OutputClosed(Exception):
    """The command's own output went away while it showed a daemon's events (``cachefs
    trace --follow | head -1``): not the daemon's doing, and nobody left to tell."""
