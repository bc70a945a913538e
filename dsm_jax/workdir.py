"""The work directory of a run: what a run writes, an exclusive lock, and safe clearing.

A work directory ``W`` is the user's data. Three rules keep it so:

* **One writer at a time.** :class:`WorkdirLock` takes an exclusive
  ``fcntl.flock`` on ``W/.dsm-jax.lock`` and writes the holder's pid, host
  and command into it. The kernel releases a flock when its process dies
  (even by ``kill -9``), so a lock file left by a dead process never blocks;
  its content only serves the message naming a live holder. A second writer
  gets a :class:`WorkdirLocked` error at once (no waiting). ``flock`` is
  reliable on local file systems; on NFS Linux maps it to POSIX byte-range
  locks, which work when the server supports locking.
* **Only run files are ever deleted.** :data:`RUN_FILES` lists, as glob
  patterns, everything a run writes into ``W``; :func:`clear_run_files`
  removes those entries and nothing else, refuses when ``W`` holds anything
  else (naming it, before deleting anything), never removes ``W`` itself,
  and never removes a directory that holds the current working directory.
* **Writes are atomic.** Files are written to a hidden temporary name next
  to their destination and renamed (:func:`dsm_jax.runlog.write_atomic`);
  :func:`remove_tmp_files` deletes the temporaries a process interrupted
  mid-write leaves behind.

Example:
    >>> with WorkdirLock("runs/a", command="train"):  # doctest: +SKIP
    ...     clear_run_files("runs/a")  # checkpoints/, config.json, metrics... only
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import shutil
import socket
import time
from pathlib import Path

from dsm_jax._utils import PathLike

__all__ = [
    "LOCK_NAME",
    "RUN_FILES",
    "WorkdirLock",
    "WorkdirLocked",
    "clear_run_files",
    "foreign_entries",
    "is_run_file",
    "remove_tmp_files",
    "tmp_name",
]


LOCK_NAME = ".dsm-jax.lock"

RUN_FILES = (
    "checkpoints",
    "config.json",
    "metrics.jsonl",
    "metrics.json",
    "samples*.npz",
    "samples*.png",
    "samples*_metrics.json",
    "eval_*.json",
    "eval_*.npz",
    "eval_*.png",
    "score_field.png",
    "losses.png",
    LOCK_NAME,
    ".*.tmp*",
)
"""Glob patterns of every entry a run writes into its work directory (``checkpoints`` is a
directory, the rest are files; ``.*.tmp*`` are the temporaries of atomic writes)."""


class WorkdirLocked(ValueError):
    """Another live process holds the lock of the work directory (a user mistake, exit 2)."""


def tmp_name(path: PathLike) -> Path:
    """The temporary path an atomic write of ``path`` goes through: ``.<name>.tmp<pid><suffix>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")


def is_run_file(name: str) -> bool:
    """True when an entry called ``name`` (directly in a work directory) is one a run writes."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_FILES)


def _is_dsm_jax_config(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()).get("config"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def foreign_entries(workdir: PathLike) -> list[str]:
    """Sorted names of the entries of ``workdir`` that no run wrote (a ``config.json`` that is
    not a dsm-jax config counts as foreign, and so does a ``checkpoints`` that is not a directory)."""
    workdir = Path(workdir)
    out = []
    for entry in workdir.iterdir():
        name = entry.name
        if not is_run_file(name):
            out.append(name)
        elif name == "config.json" and not _is_dsm_jax_config(entry):
            out.append(name)
        elif name == "checkpoints" and (entry.is_symlink() or not entry.is_dir()):
            out.append(name)
    return sorted(out)


def _contains(parent: Path, child: Path) -> bool:
    return child == parent or parent in child.parents


def clear_run_files(workdir: PathLike, *, keep: PathLike | None = None) -> list[str]:
    """Deletes what a run wrote in ``workdir`` (:data:`RUN_FILES`) and nothing else.

    Nothing is deleted when ``workdir`` holds any other entry, or when a run
    directory to delete holds the current working directory: a
    ``ValueError`` names them instead. ``workdir`` itself is never removed,
    so a work directory that is the current directory, a parent of it, the
    home directory or ``/`` is left in place (emptied of run files only).

    Args:
        workdir: the work directory.
        keep: a path inside ``workdir`` not to delete (the lock file of the caller).

    Returns:
        The names deleted, sorted.

    Raises:
        ValueError: ``workdir`` holds entries no run wrote (named), or the
            current directory lies inside one to delete.
    """
    workdir = Path(workdir).resolve()
    foreign = foreign_entries(workdir)
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise ValueError(
            f"--workdir {os.fspath(workdir)!r} also holds files no dsm-jax run wrote ({shown}); nothing was "
            "deleted: move them away or choose another --workdir."
        )
    keep_path = Path(keep).resolve() if keep is not None else None
    doomed = sorted(e for e in workdir.iterdir() if e.resolve() != keep_path)
    cwd = Path.cwd().resolve()
    for entry in doomed:
        if entry.is_dir() and not entry.is_symlink() and _contains(entry.resolve(), cwd):
            raise ValueError(
                f"the current directory {os.fspath(cwd)!r} is inside {os.fspath(entry)!r}, which --overwrite "
                "would delete; nothing was deleted: run from another directory."
            )
    for entry in doomed:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return [e.name for e in doomed]


def remove_tmp_files(workdir: PathLike, pid: int | None = None) -> list[str]:
    """Deletes the temporaries of atomic writes made by process ``pid`` (default: this one) in ``workdir``."""
    workdir = Path(workdir)
    pid = os.getpid() if pid is None else pid
    removed = []
    try:
        entries = list(workdir.glob(f".*.tmp{pid}*"))
    except OSError:
        return removed
    for entry in entries:
        try:
            entry.unlink()
            removed.append(entry.name)
        except OSError:
            pass  # already renamed into place, or not ours to remove
    return removed


class WorkdirLock:
    """An exclusive, non-blocking lock on a work directory, held by this process.

    ``acquire()`` opens ``<workdir>/.dsm-jax.lock``, takes ``fcntl.flock(LOCK_EX
    | LOCK_NB)`` and, once it holds it, writes ``{"pid", "host", "command",
    "since"}`` into the file. ``release()`` deletes the file then drops the
    lock. Because a releasing process deletes the file, a process that opened
    the old file just before may lock a file no longer on disk; acquire
    therefore checks that the file it locked is still the one at the path,
    and retries otherwise.

    Args:
        workdir: an existing directory.
        command: what holds the lock, shown to a second writer ("train", ...).

    Raises (from ``acquire``):
        WorkdirLocked: another live process holds the lock (its pid, host,
            command and start time are in the message).
        OSError: the lock file cannot be created (read-only directory, full disk).
    """

    def __init__(self, workdir: PathLike, *, command: str):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self.command = command
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> WorkdirLock:
        if self._fd is not None:
            return self
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise OSError(
                    err.errno, f"cannot lock the work directory ({err.strerror})", os.fspath(self.workdir)
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._describe_holder(fd)
                os.close(fd)
                raise WorkdirLocked(
                    f"--workdir {os.fspath(self.workdir)!r} is in use by {holder}; wait for it to finish or "
                    "stop it (a lock of a process that has died does not block)."
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                try:
                    self._write_holder(fd)
                except BaseException:
                    self.release()
                    raise
                return self
            os.close(fd)  # the holder released and deleted it meanwhile: lock the new file
        raise RuntimeError(f"could not lock {os.fspath(self.path)!r}: it keeps being replaced.")

    def _write_holder(self, fd: int) -> None:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        data = (json.dumps(info) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    @staticmethod
    def _describe_holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return f"pid {info['pid']} on host {info['host']} (dsm-jax {info['command']}, since {info['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process (it holds the lock but has not written its pid yet)"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass  # read-only or already gone: the flock below is what matters
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
