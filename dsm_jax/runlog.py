"""The files of a run that are not checkpoints: atomic writes and the metrics log ``metrics.jsonl``.

The training driver appends one JSON object per line to ``metrics.jsonl``:
a *step record* ``{"step": s, "loss": ..., ...}`` every ``log_every`` steps,
or an *event* ``{"event": "start" | "resume" | "save" | ..., "step": s}``.
A process killed while appending leaves a partial last line, and a run
resumed from the checkpoint of step ``c`` replays the steps after ``c`` and
logs their records again. So:

* :func:`repair_metrics` runs before a (resumed) run appends: it drops a
  partial last line (with a :class:`MetricsLogWarning`) and the step records
  of steps after ``c`` (they are about to be logged again), rewriting the
  file atomically. Events are kept: they are the run's history.
* :func:`read_metrics` is the one reader: it skips unparsable lines with a
  warning and keeps one step record per step (the latest), so files written
  before the repair existed read back right too.

Example:
    >>> records = read_metrics("runs/default/metrics.jsonl")  # doctest: +SKIP
    >>> losses = [(r["step"], r["loss"]) for r in records if "event" not in r]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from dsm_jax._utils import PathLike
from dsm_jax.workdir import tmp_name

__all__ = ["MetricsLogWarning", "read_metrics", "repair_metrics", "write_atomic"]


class MetricsLogWarning(RuntimeWarning):
    """A line of ``metrics.jsonl`` was unreadable (a partial write) and was skipped or dropped."""


def write_atomic(path: PathLike, write: Callable[[Path], object]) -> None:
    """Writes ``path`` through ``write(tmp_path)``, flushes it to disk, then renames: never half-written.

    A reader (or a process killed at any moment) sees the old file or the
    new one, never a mixture; the temporary file is removed on failure.
    """
    path = Path(path)
    tmp = tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _is_step_record(record) -> bool:
    return isinstance(record, dict) and "event" not in record and isinstance(record.get("step"), int)


def _parse(line: str):
    """The JSON object of a line, or None when it is not one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_metrics(path: PathLike, *, events: bool = True) -> list[dict]:
    """The records of a ``metrics.jsonl`` file, in file order, one step record per step.

    Lines that are not a JSON object (a partial write of a killed process, or
    two records glued together by an older version) are skipped with one
    :class:`MetricsLogWarning` naming their line numbers. When a step has
    several step records (a resumed run replayed it, in files written before
    :func:`repair_metrics` existed), only the latest is kept, at its place.

    Args:
        path: the file.
        events: include the event records (``"event"`` key); False returns
            the step records only (what a loss plot wants).

    Returns:
        A list of dicts.

    Raises:
        ValueError: ``path`` is not an existing file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path must be an existing metrics file, got {path!r}.")
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    records, bad = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _parse(line)
        if record is None:
            bad.append(number)
        else:
            records.append(record)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        warnings.warn(f"{path}: skipped {len(bad)} unreadable line(s) (line {shown}).", MetricsLogWarning, stacklevel=2)
    latest = {r["step"]: i for i, r in enumerate(records) if _is_step_record(r)}
    return [r for i, r in enumerate(records) if (latest[r["step"]] == i if _is_step_record(r) else events)]


def repair_metrics(path: PathLike, *, resume_step: int | None = None) -> int:
    """Prepares ``metrics.jsonl`` for appending: drops a partial last line and the replayed step records.

    A last line without its newline is a write cut short by a kill: it is
    dropped with a :class:`MetricsLogWarning` (kept, newline added, in the
    rare case that it is a whole JSON object). With ``resume_step = c``, the
    step records of steps ``> c`` are dropped too: the run resumes from the
    checkpoint of step ``c`` and logs them again. Event records and lines
    that are not JSON are left as they are. The file is rewritten atomically
    (:func:`write_atomic`), and only when something changes.

    Args:
        path: the metrics file; nothing happens if it does not exist.
        resume_step: the step the run resumes from (0 for a fresh start over
            an old log), or None to keep every complete record.

    Returns:
        The number of lines dropped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    if not text:
        return 0
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline
    kept, dropped = [], 0
    if tail:
        if _parse(tail) is None:
            dropped += 1
            warnings.warn(
                f"{path}: dropped a partial last line (a write cut short): {tail[:80]!r}.",
                MetricsLogWarning,
                stacklevel=2,
            )
        else:
            lines.append(tail)
    for line in lines:
        record = _parse(line)
        if resume_step is not None and record is not None and _is_step_record(record) and record["step"] > resume_step:
            dropped += 1
        else:
            kept.append(line)
    if dropped or tail:
        write_atomic(path, lambda p: p.write_text("".join(line + "\n" for line in kept), encoding="utf-8"))
    return dropped
