"""Checkpoints with orbax: save every N steps, keep K, restore the latest good one.

A checkpoint of step ``s`` is one orbax step directory ``<directory>/<s>``
holding two items:

* ``state``: the training state pytree (host numpy arrays; any pytree, e.g.
  :class:`dsm_jax.train.TrainState`), saved with ``StandardSave``;
* ``meta``: JSON ``{"step": s, "data_state": ..., "config": ...}``: the
  step, the data position (whatever JSON the data source returns) and the
  run's configuration.

Writes are atomic: orbax writes into a temporary directory and renames it
when complete, and temporary directories left by a killed process are
removed when the manager opens. On restore, a latest checkpoint that cannot
be read (a damaged file, a missing item) is skipped with a warning and moved
aside to ``<directory>/corrupt-<s>-<time>`` (kept for inspection, ignored by
orbax), and the previous one is tried, down to the oldest.

Example:
    >>> with Checkpointer(workdir + "/checkpoints", keep=3) as ckpt:  # doctest: +SKIP
    ...     ckpt.save(100, state, data_state={"step": 100}, config={"lr": 1e-3})
    ...     restored = ckpt.restore_latest(target=state)  # (state, meta) or None
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from dsm_jax._checks import check_positive_int

__all__ = ["Checkpointer", "CorruptCheckpointWarning", "load_params"]

_STATE = "state"
_META = "meta"


class CorruptCheckpointWarning(RuntimeWarning):
    """A checkpoint could not be read and was skipped."""


def _quiet_orbax() -> None:
    """orbax logs every save and restore through absl at INFO/WARNING; keep only errors."""
    logging.getLogger("absl").setLevel(logging.ERROR)


class _DropClosedLoopErrors:
    """Scoped ``sys.unraisablehook`` that drops orbax's late callbacks after a failed restore.

    When a restore fails, orbax's event loop closes while tensorstore still
    completes the other reads in flight; each completion reports a
    "RuntimeError: Event loop is closed" as an unraisable exception from a
    background thread. They are noise (the failure itself was raised and
    handled), so they are dropped while the fallback runs.
    """

    def __init__(self):
        self._previous = sys.unraisablehook
        sys.unraisablehook = self

    def __call__(self, unraisable):
        exc = unraisable.exc_value
        while exc is not None:
            if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
                return
            exc = exc.__cause__
        self._previous(unraisable)

    def remove(self, grace_seconds: float) -> None:
        time.sleep(grace_seconds)  # let the reads still in flight finish first
        if sys.unraisablehook is self:
            sys.unraisablehook = self._previous


def _to_host(tree: Any) -> Any:
    """A pytree of numpy arrays (fetched from the devices)."""
    return jax.tree.map(np.asarray, jax.device_get(tree))


class Checkpointer:
    """A thin wrapper of ``orbax.checkpoint.CheckpointManager`` for the training driver.

    Args:
        directory: where step directories are written (created if missing).
        keep: number of most recent checkpoints kept.
        quiet: silence orbax's per-save log messages.
        read_only: only restore: nothing is written, deleted or moved (safe
            to use on the directory of a run in progress).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, quiet: bool = True, read_only: bool = False):
        keep = check_positive_int("keep", keep)
        if quiet:
            _quiet_orbax()
        self.directory = os.path.abspath(os.fspath(directory))
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            save_interval_steps=0 if read_only else 1,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=False,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._manager.close()

    def all_steps(self) -> list:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, *, data_state: Any = None, config: Any = None) -> None:
        """Writes ``state`` and its metadata as the checkpoint of ``step`` (blocking, atomic)."""
        step = check_positive_int("step", step, minimum=0)
        meta = {"step": step, "data_state": data_state, "config": config}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(_to_host(state)), _META: ocp.args.JsonSave(meta)}
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, step: int, target: Any = None):
        """Reads the checkpoint of ``step``: ``(state, meta)``; ``state`` has ``target``'s structure if given."""
        restore_state = ocp.args.StandardRestore(_to_host(target) if target is not None else None)
        out = self._manager.restore(
            step, args=ocp.args.Composite(**{_STATE: restore_state, _META: ocp.args.JsonRestore()})
        )
        meta = out[_META]
        if not isinstance(meta, dict) or meta.get("step") != step:
            raise ValueError(f"checkpoint metadata of step {step} is inconsistent: {meta!r}.")
        return _to_host(out[_STATE]), meta

    def restore_latest(self, target: Any = None):
        """The newest readable checkpoint as ``(state, meta)``, or None when there is none.

        Unreadable checkpoints are skipped newest-first with a
        :class:`CorruptCheckpointWarning` and moved aside (left in place
        when ``read_only``).
        """
        noise_filter, failed = _DropClosedLoopErrors(), False
        try:
            for step in reversed(self.all_steps()):
                try:
                    return self.restore(step, target)
                except Exception as err:  # any failure to read means this step is unusable
                    failed = True
                    where = "left it in place" if self.read_only else f"moved it to {self._move_aside(step)}"
                    warnings.warn(
                        f"checkpoint of step {step} in {self.directory} could not be restored "
                        f"({type(err).__name__}: {str(err)[:300]}); {where}, falling back "
                        "to the previous checkpoint.",
                        CorruptCheckpointWarning,
                        stacklevel=2,
                    )
            return None
        finally:
            noise_filter.remove(grace_seconds=0.2 if failed else 0.0)

    def _move_aside(self, step: int) -> str:
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.directory, f"corrupt-{step}-{time.strftime('%Y%m%dT%H%M%S')}")
        if jax.process_index() == 0 and os.path.exists(src):
            os.replace(src, dst)
        self._manager.reload()
        return dst


def load_params(directory: str | os.PathLike, *, ema: bool = True, step: Optional[int] = None) -> Any:
    """The (EMA) parameters of a training checkpoint, for sampling and evaluation.

    Args:
        directory: the checkpoint directory (``<workdir>/checkpoints`` of the driver).
        ema: return the EMA parameters (what evaluation and sampling use)
            rather than the raw ones.
        step: a specific step; default the latest readable one.

    Returns:
        The parameter pytree (numpy arrays).
    """
    if not os.path.isdir(directory):
        raise ValueError(f"directory must be an existing checkpoint directory, got {os.fspath(directory)!r}.")
    with Checkpointer(directory, read_only=True) as ckpt:
        restored = ckpt.restore_latest() if step is None else ckpt.restore(step)
    if restored is None:
        raise ValueError(f"directory {os.fspath(directory)!r} holds no checkpoint.")
    state = restored[0]
    return state["ema_params" if ema else "params"]
