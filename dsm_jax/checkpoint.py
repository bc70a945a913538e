"""Checkpoints with orbax: save every N steps, keep K, restore the latest good one.

A checkpoint of step ``s`` is one orbax step directory ``<directory>/<s>``
holding two items:

* ``state``: the training state pytree (any pytree, e.g.
  :class:`dsm_jax.train.TrainState`), saved with ``StandardSave``: host
  numpy arrays, or ``jax.Array`` s laid out over a device mesh (the
  sharding backend's replicated state; orbax writes each array once, from
  the process that owns it, also across hosts);
* ``meta``: JSON ``{"step": s, "data_state": ..., "config": ...}``: the
  step, the data position (whatever JSON the data source returns) and the
  run's configuration.

Writes are atomic: orbax writes into a temporary directory and renames it
when complete, and temporary directories left by a killed process are
removed when the manager opens.

Checksums: once orbax has committed a step, process 0 writes
``<directory>/<s>/dsm_jax_checksums.json`` (atomically), the SHA-256 of
every other file of the step directory. A restore first verifies it: a
changed, missing or extra file makes the checkpoint corrupt. The ``meta``
item records that a manifest is due (``"checksums": true``), so a
checkpoint whose writer was killed between orbax's commit and the manifest
is not trusted either. A checkpoint written before checksums existed (no
such flag, no manifest) is restored unverified. The cost is one read of
the step's files per save and per restore (see :meth:`Checkpointer.save`).

On restore, a latest checkpoint that cannot be read or verified (a damaged
file, a missing item, a checksum mismatch) is skipped with a
:class:`CorruptCheckpointWarning` and moved aside to
``<directory>/corrupt-<s>-<time>`` (kept for inspection, ignored by orbax),
and the previous one is tried, down to the oldest.

Device counts: the files do not depend on how the arrays were laid out.
A restore with a host ``target`` (numpy arrays) or without one gives numpy
arrays; a restore with a ``target`` of ``jax.ShapeDtypeStruct`` s (or
arrays) carrying a sharding places every array straight onto that sharding,
whatever mesh wrote it (a run saved on 4 devices resumes on 2, and a
checkpoint of either training backend resumes under the other).

Example:
    >>> with Checkpointer(workdir + "/checkpoints", keep=3) as ckpt:  # doctest: +SKIP
    ...     ckpt.save(100, state, data_state={"step": 100}, config={"lr": 1e-3})
    ...     restored = ckpt.restore_latest(target=state)  # (state, meta) or None
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dsm_jax._checks import check_positive_int
from dsm_jax.runlog import write_atomic

__all__ = ["Checkpointer", "CorruptCheckpointError", "CorruptCheckpointWarning", "DropClosedLoopErrors", "load_params"]

_STATE = "state"
_META = "meta"
_MANIFEST = "dsm_jax_checksums.json"
_CHECKSUMS_FLAG = "checksums"  # in the meta item: a manifest was due for this checkpoint


class CorruptCheckpointWarning(RuntimeWarning):
    """A checkpoint could not be read and was skipped."""


class CorruptCheckpointError(ValueError):
    """A checkpoint's files do not match the checksums written when it was committed."""


def _file_digests(step_dir: str) -> dict:
    """``{relative path: sha256 hex}`` of every file under ``step_dir`` except the manifest."""
    out = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir).replace(os.sep, "/")
            if rel == _MANIFEST:
                continue
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            out[rel] = digest.hexdigest()
    return out


def _write_manifest(step_dir: str) -> None:
    manifest = {"algorithm": "sha256", "files": _file_digests(step_dir)}
    write_atomic(
        os.path.join(step_dir, _MANIFEST), lambda p: p.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    )


def _verify_manifest(step_dir: str, step: int) -> bool:
    """Checks the files of ``step_dir`` against its manifest; False when there is none.

    Raises:
        CorruptCheckpointError: a file was changed, removed or added, or the
            manifest itself is unreadable.
    """
    path = os.path.join(step_dir, _MANIFEST)
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            expected = json.load(f)["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"checksum manifest of step {step} is unreadable ({err}).") from None
    actual = _file_digests(step_dir)
    if actual != expected:
        changed = sorted(k for k in expected.keys() & actual.keys() if expected[k] != actual[k])
        missing = sorted(expected.keys() - actual.keys())
        extra = sorted(actual.keys() - expected.keys())
        parts = [
            f"{what}: {', '.join(names)}"
            for what, names in (("changed", changed), ("missing", missing), ("unexpected", extra))
            if names
        ]
        raise CorruptCheckpointError(f"checksum mismatch in step {step} ({'; '.join(parts)}).")
    return True


def _quiet_orbax() -> None:
    """orbax logs every save and restore through absl at INFO/WARNING; keep only errors."""
    logging.getLogger("absl").setLevel(logging.ERROR)


class DropClosedLoopErrors:
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


def _is_placed(leaf: Any) -> bool:
    """A leaf orbax reads or writes with its sharding: a ``jax.Array`` or a ``jax.ShapeDtypeStruct``."""
    return isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct))


def _for_orbax(tree: Any) -> Any:
    """``tree`` with every leaf a ``jax.Array`` / ``jax.ShapeDtypeStruct`` (kept) or a numpy array.

    Sharded arrays are handed to orbax as they are: fetching them to one host
    would fail across hosts and cost a copy on one.
    """
    return jax.tree.map(lambda a: a if _is_placed(a) else np.asarray(a), tree)


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
        handlers = {_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._manager.close()

    def all_steps(self) -> list:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, *, data_state: Any = None, config: Any = None) -> None:
        """Writes ``state`` and its metadata as the checkpoint of ``step`` (blocking, atomic), then its checksums.

        The checksums cost one read of the step's files by process 0, measured
        on a loaded 2-core CPU: 3 ms for the default MLP (175k parameters,
        1.3 MB on disk with the EMA and Adam moments) against 180 ms for the
        orbax save, 17 ms for 1M parameters (7.4 MB) against 200 ms; verifying
        on restore, 1.5 and 12 ms.
        """
        step = check_positive_int("step", step, minimum=0)
        meta = {"step": step, "data_state": data_state, "config": config, _CHECKSUMS_FLAG: True}
        items = {_STATE: ocp.args.StandardSave(_for_orbax(state)), _META: ocp.args.JsonSave(meta)}
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            _write_manifest(self._step_dir(step))

    def restore(self, step: int, target: Any = None):
        """Reads and verifies the checkpoint of ``step``: ``(state, meta)``.

        ``state`` has ``target``'s structure if given, with ``jax.Array`` s
        on the sharding of each leaf of ``target`` that has one (a
        ``jax.ShapeDtypeStruct`` or array) and numpy arrays elsewhere (and
        everywhere without a ``target``); ``meta`` is ``{"step",
        "data_state", "config"}``.

        Raises:
            CorruptCheckpointError: the files do not match their checksums, or
                the manifest that was due is missing.
        """
        verified = _verify_manifest(self._step_dir(step), step)
        restore_state = ocp.args.StandardRestore(_for_orbax(target) if target is not None else self._host_target(step))
        out = self._manager.restore(
            step, args=ocp.args.Composite(**{_STATE: restore_state, _META: ocp.args.JsonRestore()})
        )
        meta = out[_META]
        if not isinstance(meta, dict) or meta.get("step") != step:
            raise ValueError(f"checkpoint metadata of step {step} is inconsistent: {meta!r}.")
        if meta.pop(_CHECKSUMS_FLAG, False) and not verified:
            raise CorruptCheckpointError(
                f"checkpoint of step {step} has no checksum manifest (its writer was stopped before writing it)."
            )
        state = out[_STATE]
        if target is None:
            return jax.tree.map(np.asarray, state), meta
        return jax.tree.map(lambda a: a if isinstance(a, jax.Array) else np.asarray(a), state), meta

    def _host_target(self, step: int) -> Any:
        """The saved shapes and dtypes on one local device: readable whatever mesh wrote the arrays.

        (Without a target orbax would place each array on the sharding it was
        saved with, which fails on another device count.)
        """
        metadata = self._manager.item_metadata(step)[_STATE]
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), getattr(metadata, "tree", metadata)
        )

    def restore_latest(self, target: Any = None):
        """The newest readable checkpoint as ``(state, meta)``, or None when there is none.

        Unreadable checkpoints are skipped newest-first with a
        :class:`CorruptCheckpointWarning` and moved aside (left in place
        when ``read_only``).
        """
        noise_filter, failed = DropClosedLoopErrors(), False
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

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _move_aside(self, step: int) -> str:
        src = self._step_dir(step)
        dst = os.path.join(self.directory, f"corrupt-{step}-{time.strftime('%Y%m%dT%H%M%S')}")
        if jax.process_index() == 0 and os.path.exists(src):
            os.replace(src, dst)
        self._manager.reload()
        return dst


def load_params(directory: str | os.PathLike, *, ema: bool = True, step: int | None = None) -> Any:
    """The (EMA) parameters of a training checkpoint, for sampling and evaluation.

    Args:
        directory: the checkpoint directory (``<workdir>/checkpoints`` of the driver).
        ema: return the EMA parameters (what evaluation and sampling use)
            rather than the raw ones.
        step: a specific step; default the latest readable one.

    The checkpoint is verified against its checksums; a corrupt latest one
    is skipped with a :class:`CorruptCheckpointWarning` (and left in place).

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
