"""What a user is told of a failure of ``dsm-jax``: the exceptions of the application layer and one-line reports.

* :class:`UserError`: a mistake in the command line or its inputs (exit status 2).
* :class:`Interrupted`: a signal ended a command; it carries the line saying what was kept.
* :func:`os_error_line` and :func:`storage_error_line`: the one line of a failed read or write, naming
  the path (a full disk, a read-only file system), also when a library reports it as another exception.

Example:
    >>> os_error_line(FileNotFoundError(2, "No such file or directory", "/no/such/run"))
    "No such file or directory: '/no/such/run'"
"""

from __future__ import annotations

import errno
import os
import re
import signal
from pathlib import Path

__all__ = ["Interrupted", "UserError", "os_error_line", "signal_name", "storage_error_line"]


class UserError(ValueError):
    """A mistake in the command line or its inputs: reported in one line."""


class Interrupted(KeyboardInterrupt):
    """A signal ended the command; ``line`` says what was kept, ``signum`` which signal it was."""

    def __init__(self, line: str, signum: int):
        super().__init__(line)
        self.line, self.signum = line, int(signum)


def signal_name(signum: int) -> str:
    """``"SIGINT"`` for ``signal.SIGINT``, and so on."""
    return signal.Signals(signum).name


def os_error_line(err: OSError) -> str:
    """``<reason>: <path>`` of an OSError, naming the destination of an atomic write, not its temporary."""
    path = err.filename if err.filename is not None else err.filename2
    if path is None:
        return str(err)
    path = Path(os.fsdecode(path))
    if path.name.startswith(".") and f".tmp{os.getpid()}" in path.name:
        path = path.with_name(path.name[1:].split(f".tmp{os.getpid()}")[0])
    return f"{err.strerror or type(err).__name__}: {os.fspath(path)!r}"


_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG)


def storage_error_line(err: BaseException | None) -> str | None:
    """The one line of a failed write reported by a library as another exception, or None.

    orbax (through tensorstore) reports a full disk or a read-only file system
    as ``ValueError: RESOURCE_EXHAUSTED: ... at local file "<path>" ...
    [os_error_code='28']``; the operating system's errno and the path are
    taken from the message (and from chained exceptions).
    """
    while err is not None:
        if isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS:
            return os_error_line(err)
        match = re.search(r"os_error_code='?(\d+)", str(err))
        if match:
            where = re.search(r'local file "([^"]+)"', str(err))
            path = where.group(1) if where else None
            if path and "/checkpoints/" in path:
                path = path[: path.index("/checkpoints/") + len("/checkpoints")]
            reason = os.strerror(int(match.group(1)))
            return f"{reason} while writing {path!r}" if path else reason
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return None
