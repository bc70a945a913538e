"""Training: the state, the optimizer, a pure train step, and the data-parallel driver.

The pieces, from the inside out:

* :class:`TrainState` ``(step, params, ema_params, opt_state)``, a pytree;
* :func:`make_optimizer`: optax Adam/AdamW, linear warmup + cosine decay,
  global-norm clipping;
* :func:`make_train_step`: a pure ``train_step(state, batch, key) ->
  (state, metrics)`` from any ``loss_fn(params, batch, key)``; with
  ``axis_name`` the gradients and metrics are ``lax.pmean``-ed;
* :func:`make_multi_step`: ``k`` such steps in one call (a ``lax.scan``,
  straight-line code for ``k = 1``), the loop of every training run;
* :func:`train`: the driver. It compiles the multi-step once for one of
  two data-parallel backends: ``parallel="pmap"`` (the default) ``pmap``-s
  it over ``jax.local_devices()`` with each global batch as
  ``[devices, per_device, ...]``; ``parallel="sharding"`` ``jit``-s it
  over a device ``Mesh`` with a ``"data"`` axis, the state replicated and
  the batch sharded ``P("data")`` (the same per-device step under
  ``jax.shard_map``). It keeps an EMA of the parameters, stops on
  non-finite values and shows a tqdm bar; with a work directory it also
  logs JSON lines, checkpoints with orbax (:mod:`dsm_jax.checkpoint`),
  resumes exactly and saves on SIGTERM/SIGINT (:class:`TrainingInterrupted`,
  :class:`TrainingTerminated`); without one it trains in memory.

The Flax wiring of the DSM loss, :func:`dsm_jax.models.make_dsm_loss_fn`,
lives with the model wrapper; ``dsm_jax.train.make_dsm_loss_fn`` still
imports it (lazily, so this module does not load the networks).

Randomness is a pure function of ``(seed, step)``: the key of step ``s`` is
``fold_in(key(seed), s)`` and, by default, example ``j`` of the global batch
uses ``fold_in(that key, j)`` (the device index fixes which ``j`` a device
holds). A resumed run therefore repeats exactly what an uninterrupted run
does, and the result does not depend on the number of devices.

Multi-host: call ``jax.distributed.initialize()`` (arguments or the
cluster's environment) before any other JAX call, then :func:`train` on
every process, each ``batch_at(step)`` returning that process's slice of
the global batch (process ``p`` holds examples ``[p B/P, (p+1) B/P)``).
Under ``parallel="sharding"`` the slices become one global array through
``jax.make_array_from_process_local_data`` and host copies of the
replicated state are read from each process's own device buffers, never by
indexing a global array.

References:
    The Flax ImageNet example (pmap + pmean train step); Song et al.,
    score_sde (EMA, several steps per device call).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import checkify
from tqdm.auto import tqdm

from dsm_jax._checks import check_choice, check_positive_int, check_positive_number, runtime_checks_enabled
from dsm_jax.checkpoint import Checkpointer
from dsm_jax.data import shard_batch
from dsm_jax.runlog import read_metrics, repair_metrics

__all__ = [
    "ConfigMismatchError",
    "DataSource",
    "NonFiniteError",
    "TrainState",
    "TrainingInterrupted",
    "TrainingTerminated",
    "create_train_state",
    "learning_rate_schedule",
    "make_multi_step",
    "make_optimizer",
    "make_train_step",
    "read_metrics",
    "train",
]

AXIS = "devices"
DATA_AXIS = "data"
PARALLEL = ("pmap", "sharding")
OPTIMIZERS = ("adam", "adamw")
_CHECKED_METRICS = ("loss", "grad_norm")

LossFn = Callable[[Any, Any, jax.Array], Any]


def __getattr__(name: str) -> Any:
    # make_dsm_loss_fn lives with the model wrapper (dsm_jax.models.apply); it is imported on first
    # use so that this module does not load the networks (flax.linen) for losses that need none.
    if name == "make_dsm_loss_fn":
        from dsm_jax.models.apply import make_dsm_loss_fn

        return make_dsm_loss_fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient norm during training."""


class ConfigMismatchError(ValueError):
    """The checkpoint being resumed was saved with another training ``config``.

    Resuming would mix two runs; the message names the keys that differ.
    """


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) stopped :func:`train` after the checkpoint of ``saved_step`` was written.

    Raised only once that checkpoint is committed, so re-running the same
    call resumes from it. Any other ``KeyboardInterrupt`` (e.g. a Ctrl-C
    before the training loop started, or with ``handle_signals=False``)
    means that no checkpoint was written for the interruption.

    Attributes:
        saved_step: the step reached and checkpointed.
        checkpoint_dir: the directory holding that checkpoint.
        message: ``"interrupted at step <saved_step>; checkpoint saved"``.
    """

    def __init__(self, saved_step: int, checkpoint_dir: str):
        self.saved_step, self.checkpoint_dir = saved_step, checkpoint_dir
        self.message = f"interrupted at step {saved_step}; checkpoint saved"
        super().__init__(self.message)


class TrainingTerminated(SystemExit):
    """SIGTERM (a preemption) stopped :func:`train` after the checkpoint of ``saved_step`` was written.

    A ``SystemExit`` with code 143 (128 + SIGTERM), so an uncaught one ends
    the process with the conventional status; the attributes are those of
    :class:`TrainingInterrupted`.
    """

    def __init__(self, saved_step: int, checkpoint_dir: str):
        self.saved_step, self.checkpoint_dir = saved_step, checkpoint_dir
        self.message = f"terminated at step {saved_step}; checkpoint saved"
        super().__init__(128 + signal.SIGTERM)


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree.

    Attributes:
        step: number of completed steps (int32 scalar).
        params: the model parameters being optimised.
        ema_params: exponential moving average of ``params`` (used for
            evaluation and sampling).
        opt_state: the optax state.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def create_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """The state at step 0: ``ema_params = params`` and ``optimizer.init(params)``."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=optimizer.init(params))


def learning_rate_schedule(
    learning_rate: float = 2e-4,
    *,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    final_lr_fraction: float = 0.0,
) -> optax.ScalarOrSchedule:
    """The learning rate of :func:`make_optimizer`: a constant, or ``schedule(step) -> rate``.

    Linear warmup from 0 over ``warmup_steps``; with ``total_steps`` a cosine
    from ``learning_rate`` down to ``final_lr_fraction * learning_rate``.
    Pass it to :func:`train` as ``learning_rate_fn`` to log the rate.
    """
    check_positive_number("learning_rate", learning_rate)
    warmup_steps = check_positive_int("warmup_steps", warmup_steps, minimum=0)
    if not 0.0 <= final_lr_fraction <= 1.0:
        raise ValueError(f"final_lr_fraction must be in [0, 1], got {final_lr_fraction!r}.")
    if total_steps is not None:
        total_steps = check_positive_int("total_steps", total_steps)
        if total_steps <= warmup_steps:
            raise ValueError(f"total_steps must exceed warmup_steps={warmup_steps}, got {total_steps}.")
        return optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, warmup_steps, total_steps, end_value=final_lr_fraction * learning_rate
        )
    if warmup_steps > 0:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)],
            [warmup_steps],
        )
    return learning_rate


def make_optimizer(
    learning_rate: float = 2e-4,
    *,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    final_lr_fraction: float = 0.0,
    grad_clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """Adam or AdamW with warmup, optional cosine decay and global-norm clipping.

    The learning rate rises linearly from 0 over ``warmup_steps``; with
    ``total_steps`` it then follows a cosine from ``learning_rate`` down to
    ``final_lr_fraction * learning_rate`` at ``total_steps``, else it stays
    constant. Gradients are clipped to global norm ``grad_clip_norm``
    (None: no clipping) before the Adam update.

    Returns:
        An ``optax.GradientTransformation``.
    """
    check_choice("optimizer", optimizer, OPTIMIZERS)
    schedule = learning_rate_schedule(
        learning_rate, warmup_steps=warmup_steps, total_steps=total_steps, final_lr_fraction=final_lr_fraction
    )
    if optimizer == "adam":
        if weight_decay:
            raise ValueError(f"weight_decay needs optimizer='adamw', got weight_decay={weight_decay!r} with 'adam'.")
        opt = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
    else:
        opt = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if grad_clip_norm is None:
        return opt
    check_positive_number("grad_clip_norm", grad_clip_norm)
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), opt)


def _with_aux(loss_fn: LossFn) -> Callable:
    """``loss_fn`` returning a scalar or ``(scalar, dict)`` -> always ``(scalar, dict)``."""

    def fn(params, batch, key):
        out = loss_fn(params, batch, key)
        if isinstance(out, tuple):
            loss, aux = out
            return loss, dict(aux)
        return out, {}

    return fn


def _global_norm(tree: Any) -> jax.Array:
    """sqrt of the sum of squares of all leaves."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))


def _check_ema_decay(ema_decay) -> float:
    if not (isinstance(ema_decay, (int, float)) and 0.0 <= ema_decay < 1.0):
        raise ValueError(f"ema_decay must be a number in [0, 1), got {ema_decay!r}.")
    return float(ema_decay)


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    ema_decay: float = 0.999,
    axis_name: str | None = None,
    per_example_keys: bool = True,
    loss_takes_key_batch: bool | None = None,
):
    """A pure ``train_step(state, batch, key) -> (state, metrics)``.

    One optimizer step on ``loss_fn(params, batch, key)`` (a scalar, or
    ``(scalar, aux_dict)`` whose entries become metrics), then
    ``ema <- ema_decay * ema + (1 - ema_decay) * params``.

    With ``per_example_keys`` (the default) the loss is evaluated example by
    example (``jax.vmap`` over batches of one) with the key
    ``fold_in(key, j)`` for global example index ``j`` (``j`` counts from
    ``axis_index * local_batch`` under ``axis_name``), and averaged; this
    needs a loss that is a mean over examples (all DSM losses are) and makes
    the update independent of how the batch is split over devices. Otherwise
    the loss sees the whole local batch with ``fold_in(key, axis_index)``.

    With ``loss_takes_key_batch=True`` (and ``per_example_keys``) the loss is
    not vmapped: it receives the whole batch and the ``[B]`` per-example keys
    and must draw example ``j``'s randomness from ``keys[j]`` (the losses of
    :func:`dsm_jax.models.make_dsm_loss_fn` do). The same draws as the vmap,
    with the model run on the batch at once rather than example by example
    (faster). Left at None it is read from the
    loss's ``accepts_key_batch`` attribute (False when absent), which
    ``make_dsm_loss_fn`` sets.

    Args:
        loss_fn: ``loss_fn(params, batch, key)``.
        optimizer: an optax transformation.
        ema_decay: EMA decay in ``[0, 1)`` (0 keeps ``ema_params = params``).
        axis_name: the ``pmap`` / ``shard_map`` axis; gradients and metrics are ``lax.pmean``-ed over it.
        per_example_keys: see above.
        loss_takes_key_batch: see above; an explicit value overrides the
            loss's ``accepts_key_batch`` attribute.

    Returns:
        ``train_step``; metrics hold "loss", "grad_norm" (of the averaged
        gradient) and the loss's aux entries.

    Example:
        >>> step = jax.jit(make_train_step(loss_fn, optax.adam(1e-3), ema_decay=0.99))  # doctest: +SKIP
        >>> state, metrics = step(create_train_state(params, optax.adam(1e-3)), batch, key)  # doctest: +SKIP
    """
    ema_decay = _check_ema_decay(ema_decay)
    loss_aux = _with_aux(loss_fn)
    if loss_takes_key_batch is None:
        loss_takes_key_batch = bool(getattr(loss_fn, "accepts_key_batch", False))
    elif not isinstance(loss_takes_key_batch, bool):
        raise ValueError(f"loss_takes_key_batch must be True, False or None, got {loss_takes_key_batch!r}.")
    batched_keys = per_example_keys and loss_takes_key_batch

    def objective(params, batch, key):
        if not per_example_keys:
            if axis_name is not None:
                key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
            return loss_aux(params, batch, key)
        n = jax.tree.leaves(batch)[0].shape[0]
        offset = jax.lax.axis_index(axis_name) * n if axis_name is not None else 0
        keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(offset + jnp.arange(n))
        if batched_keys:
            # The loss draws example j's randomness from keys[j] itself and runs the model on
            # the whole batch: the same update as the vmap below, without its per-example model calls.
            return loss_aux(params, batch, keys)
        one = lambda example, k: loss_aux(params, jax.tree.map(lambda a: a[None], example), k)
        losses, aux = jax.vmap(one)(batch, keys)
        # nanmean: an aux entry may be undefined for some examples (e.g. a noise level an example did not draw).
        return jnp.mean(losses), jax.tree.map(lambda a: jnp.nanmean(a, axis=0), aux)

    def train_step(state: TrainState, batch: Any, key: jax.Array):
        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params, batch, key)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
        metrics = {"loss": loss, "grad_norm": _global_norm(grads), **aux}
        if axis_name is not None:
            metrics = jax.lax.pmean(metrics, axis_name)
        new_state = TrainState(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_multi_step(train_step: Callable, *, unroll: int | bool = 1) -> Callable:
    """``run_steps(state, stacked_batches, base_key) -> (state, stacked_metrics)``: ``k`` train steps in one call.

    The loop that :func:`train`, the experiments and the benchmarks run in
    one device call. Every leaf of ``stacked_batches`` is ``[k, ...]``; the
    ``i``-th step runs ``train_step(state, stacked_batches[i], key)`` with
    ``key = fold_in(base_key, state.step)`` (so the key of a step is a
    function of the run's key and the step index alone), and the metrics come
    back stacked ``[k, ...]``.

    ``k > 1`` is a ``lax.scan`` with ``unroll``; ``k = 1`` is straight-line
    code without a loop: XLA's CPU backend runs a convolutional step inside a
    one-trip scan many times slower than outside one (the U-Net measurement is
    in ``experiments/benchmarks/RESULTS.md``), while MLPs gain from scanning
    ``k > 1`` steps. ``k`` is a static shape: each distinct ``k`` compiles once.

    ``run_steps`` is pure; jit it, or pmap it with ``in_axes=(0, 0, None)``
    when ``train_step`` has an ``axis_name``.

    Args:
        train_step: ``train_step(state, batch, key) -> (state, metrics)``
            (e.g. :func:`make_train_step`) on a state with a ``step`` field.
        unroll: ``lax.scan`` unrolling (an int >= 1, or True for a full unroll).

    Returns:
        ``run_steps``.

    Example:
        >>> loss_fn = lambda p, x, key: jnp.mean((x - p["mu"]) ** 2)
        >>> opt = optax.sgd(0.1)
        >>> run_steps = jax.jit(make_multi_step(make_train_step(loss_fn, opt)))
        >>> state = create_train_state({"mu": jnp.zeros(2)}, opt)
        >>> state, metrics = run_steps(state, jnp.ones((5, 4, 2)), jax.random.key(0))  # 5 steps, batch 4
        >>> int(state.step), metrics["loss"].shape
        (5, (5,))
    """
    if not isinstance(unroll, bool):
        check_positive_int("unroll", unroll)

    def run_steps(state, stacked_batches, base_key):
        def body(st, batch):
            return train_step(st, batch, jax.random.fold_in(base_key, st.step))

        if jax.tree.leaves(stacked_batches)[0].shape[0] == 1:
            st, metrics = body(state, jax.tree.map(lambda a: a[0], stacked_batches))
            return st, jax.tree.map(lambda a: a[None], metrics)
        return jax.lax.scan(body, state, stacked_batches, unroll=unroll)

    return run_steps


# ---------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------


@runtime_checkable
class DataSource(Protocol):
    """A stateful batch source whose position can be checkpointed.

    ``next_batch()`` returns the next global (process-local, multi-host)
    batch; ``state()`` a JSON-serialisable position; ``restore(state)``
    rewinds to it.
    """

    def next_batch(self) -> Any: ...

    def state(self) -> Any: ...

    def restore(self, state: Any) -> None: ...


class _Batches:
    """The driver's view of ``data``: batch of step ``s`` and a checkpointable position."""

    def __init__(self, data):
        self._source: DataSource | None = None
        if isinstance(data, DataSource):
            self._source = data
            self._batch_at: Callable[[int], Any] = lambda step: data.next_batch()
        elif callable(data):
            self._batch_at = data
        else:
            raise ValueError(
                "data must be a callable batch_at(step) -> batch or an object with next_batch(), "
                f"state() and restore(state), got {type(data).__name__}."
            )

    def get(self, step: int) -> Any:
        return self._batch_at(step)

    def state(self, step: int) -> Any:
        return {"step": step} if self._source is None else self._source.state()

    def restore(self, state: Any) -> None:
        if self._source is not None:
            self._source.restore(state)


def _shard(batch: Any, num_devices: int, step: int) -> Any:
    """``[B, ...] -> [devices, B / devices, ...]`` for every leaf, naming the step on error."""
    try:
        return shard_batch(batch, num_devices)
    except ValueError as err:
        raise ValueError(f"batch of step {step}: {err}") from None


def _chunk_length(step: int, steps_per_call: int, save_every: int, num_steps: int) -> int:
    """Steps in the next device call: up to the next multiple of k, of save_every, or the end.

    A function of ``step`` alone, so a resumed run makes the same calls as an
    uninterrupted one (same compiled programs on the same steps).
    """
    next_k = (step // steps_per_call + 1) * steps_per_call
    next_save = (step // save_every + 1) * save_every
    return min(next_k, next_save, num_steps) - step


class _SignalFlag:
    """Records SIGTERM/SIGINT instead of dying; the driver saves at the next step boundary."""

    def __init__(self, enabled: bool):
        self.signum: int | None = None
        self._previous = {}
        self._enabled = enabled and threading.current_thread() is threading.main_thread()

    def _handler(self, signum, frame):
        self.signum = signum

    def __enter__(self):
        if self._enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _finite_or_none(v):
    v = float(v)
    return v if math.isfinite(v) else None


def _summarise(history: list) -> dict:
    """Mean of each metric over the steps since the last log line (NaN-aware for aux arrays)."""
    out = {}
    for name in history[0]:
        values = np.stack([h[name] for h in history])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(values, axis=0)
        out[name] = _finite_or_none(mean) if mean.ndim == 0 else [_finite_or_none(m) for m in mean]
    return out


def _first_nonfinite(metrics: dict, first_step: int):
    """``(step, metric, value)`` of the first non-finite loss or gradient norm in a call, or None."""
    for i in range(len(metrics["loss"])):
        for name in _CHECKED_METRICS:
            value = float(metrics[name][i])
            if not math.isfinite(value):
                return first_step + i, name, value
    return None


def _replica(leaf: Any) -> np.ndarray:
    """The host copy of a replicated leaf (a numpy array, or a ``jax.Array`` whose every device holds all of it).

    Read from the first local device's buffer (``addressable_data(0)``),
    never by indexing the global array: that also works for an array that
    spans several hosts, and copies one buffer only.
    """
    return np.asarray(leaf.addressable_data(0)) if isinstance(leaf, jax.Array) else np.asarray(leaf)


def _first_replica(tree: Any) -> Any:
    """Host copies of the first device's slice of pmapped outputs (leaves ``[devices, ...]``)."""
    return jax.tree.map(lambda a: _replica(a)[0], tree)


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _config_differences(saved: Any, now: Any) -> str:
    """The differing keys of two configs, each with both values (short reprs)."""
    if not (isinstance(saved, dict) and isinstance(now, dict)):
        return f"saved {_short_repr(saved)}, now {_short_repr(now)}"
    parts = []
    for key in sorted(saved.keys() | now.keys()):
        if key not in now:
            parts.append(f"{key}: {_short_repr(saved[key])} saved, absent now")
        elif key not in saved:
            parts.append(f"{key}: absent from the checkpoint, {_short_repr(now[key])} now")
        elif saved[key] != now[key]:
            parts.append(f"{key}: {_short_repr(saved[key])} saved, {_short_repr(now[key])} now")
    return "; ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _progress_line(step: int, num_steps: int, loss: float | None, rate: float) -> str:
    """``step 200/3000  loss 0.4123  25.1 steps/s  ETA 0:01:51`` (the rate of the last log interval)."""
    loss_text = f"{loss:.4g}" if loss is not None else "nan"
    return (
        f"step {step}/{num_steps}  loss {loss_text}  {rate:.1f} steps/s  "
        f"ETA {_duration((num_steps - step) / max(rate, 1e-9))}"
    )


def _checked_call(compiled: Callable, base_key: jax.Array, host_metrics: Callable) -> Callable:
    """``call(state, stacked, step, n) -> (state, metrics)`` of a compiled multi-step; metrics on the host.

    With ``dsm_jax.debug_checks()`` / ``DSM_JAX_CHECKS=1`` the losses add
    checkify checks of traced values; they must be functionalised around the
    compiled call to be reported, and a failed one is a ValueError naming
    the steps.
    """
    if not runtime_checks_enabled():

        def call(state, stacked, step, n):
            state, metrics = compiled(state, stacked, base_key)
            return state, host_metrics(metrics)

        return call
    checked = checkify.checkify(compiled)

    def checked_call(state, stacked, step, n):
        err, (state, metrics) = checked(state, stacked, base_key)
        if err.get() is not None:
            raise ValueError(
                f"run-time check failed in steps {step}-{step + n - 1} (the batches of those steps): "
                f"{err.get()}; stopped before saving."
            )
        return state, host_metrics(metrics)

    return checked_call


class _PmapBackend:
    """``jax.pmap`` of the multi-step over local devices (the default backend).

    State leaves are ``[devices, ...]`` (a copy per device), the ``k``
    batches of a call ``[devices, k, B / devices, ...]``; the train step runs
    per device with ``axis_name=AXIS`` and ``lax.pmean`` averages gradients
    and metrics across devices (and hosts).
    """

    name, axis_name = "pmap", AXIS

    def __init__(self, run_steps: Callable, devices: list, base_key: jax.Array):
        self.devices, self.local_devices = devices, len(devices)
        p_run = jax.pmap(run_steps, axis_name=AXIS, in_axes=(0, 0, None), devices=devices, donate_argnums=(0,))
        self.call = _checked_call(p_run, base_key, _first_replica)

    def restore_target(self, initial: TrainState) -> TrainState:
        """The checkpoint is read into host arrays, then replicated by :meth:`put_state`."""
        return initial

    def put_state(self, state: Any) -> Any:
        """``state`` on every device (leaves ``[devices, ...]``).

        Placed by a pmap of the identity so that its arrays are laid out
        exactly like the pmapped step's outputs: the second call then hits
        the first call's compilation.
        """
        n = len(self.devices)
        stacked = jax.tree.map(lambda a: np.broadcast_to(_replica(a), (n,) + np.shape(a)), state)
        return jax.pmap(lambda t: t, axis_name=AXIS, devices=self.devices)(stacked)

    def put_batches(self, batches: list, first_step: int) -> Any:
        shards = [_shard(b, self.local_devices, first_step + i) for i, b in enumerate(batches)]
        return jax.tree.map(lambda *xs: np.stack(xs, axis=1), *shards)

    def host(self, state: Any) -> Any:
        return _first_replica(state)

    for_checkpoint = host


class _ShardingBackend:
    """``jax.jit`` of the multi-step over a one-axis device ``Mesh`` (``parallel="sharding"``).

    The parameters, EMA and optimizer state are replicated
    (``NamedSharding(mesh, P())``); the ``k`` batches of a call are one
    ``[k, B, ...]`` array sharded ``P(None, "data")`` over the global batch,
    assembled from each process's slice by
    ``jax.make_array_from_process_local_data`` (process ``p``'s devices
    receive its examples, in mesh order).

    The gradient mean: ``jax.shard_map`` of the same per-device
    ``make_train_step(..., axis_name="data")`` as pmap, so every device runs
    pmap's program on its shard and ``lax.pmean`` averages the gradients and
    metrics: the two backends agree to float rounding also for
    ``per_example_keys=False`` (a key per device), which the automatic
    partitioner of a global-batch step could not reproduce. ``check_vma`` is
    off because, with it on, the gradient of a replicated input comes back
    already summed over the devices (shard_map transposes the implicit
    broadcast into a psum), which the step's pmean would not expect.
    """

    name, axis_name = "sharding", DATA_AXIS

    def __init__(self, run_steps: Callable, devices: list, base_key: jax.Array):
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        mesh = jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices)
        self.devices, self.local_devices = devices, len(mesh.local_devices)
        self.replicated = NamedSharding(mesh, P())
        self._batches = NamedSharding(mesh, P(None, DATA_AXIS))
        mapped = jax.shard_map(
            run_steps, mesh=mesh, in_specs=(P(), P(None, DATA_AXIS), P()), out_specs=(P(), P()), check_vma=False
        )
        self.call = _checked_call(jax.jit(mapped, donate_argnums=(0,)), base_key, self.host)

    def restore_target(self, initial: TrainState) -> TrainState:
        """Shapes, dtypes and the replicated sharding: orbax reads the checkpoint straight onto this mesh."""
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=self.replicated), initial
        )

    def put_state(self, state: Any) -> Any:
        """``state`` replicated over the mesh (arrays restored onto it are kept as they are)."""

        def put(a):
            if isinstance(a, jax.Array) and a.sharding == self.replicated:
                return a
            return jax.make_array_from_process_local_data(self.replicated, _replica(a))

        return jax.tree.map(put, state)

    def put_batches(self, batches: list, first_step: int) -> Any:
        # _shard checks that this process's batch splits evenly over its devices (naming the step);
        # the global [k, B, ...] array is this process's [k, B_local, ...] placed on its devices.
        shards = [_shard(b, self.local_devices, first_step + i) for i, b in enumerate(batches)]
        stacked = jax.tree.map(lambda *xs: np.stack(xs).reshape((len(xs), -1) + xs[0].shape[2:]), *shards)
        return jax.tree.map(lambda a: jax.make_array_from_process_local_data(self._batches, a), stacked)

    def host(self, tree: Any) -> Any:
        return jax.tree.map(_replica, tree)

    def for_checkpoint(self, state: Any) -> Any:
        """The replicated arrays themselves: orbax writes each once."""
        return state


_BACKENDS = {"pmap": _PmapBackend, "sharding": _ShardingBackend}


def _nonfinite_error(step: int, name: str, value: float, ckpt: Checkpointer | None) -> NonFiniteError:
    """The error of a non-finite ``name`` at ``step``, saying what was kept."""
    last = None if ckpt is None else ckpt.latest_step()
    kept = (
        "training in memory, nothing was saved"
        if ckpt is None
        else "no checkpoint was written yet"
        if last is None
        else f"the last good checkpoint is step {last} in {ckpt.directory}"
    )
    return NonFiniteError(
        f"non-finite {name} ({value}) at step {step} (the update computed from the batch of "
        f"step {step}); stopped before saving, {kept}."
    )


def _restore_or_init(
    ckpt: Checkpointer | None, initial: TrainState, target: Any, batches: _Batches, config: Any, config_defaults=None
):
    """``(state, step, resumed)``: the latest readable checkpoint of ``ckpt``, or ``initial`` at step 0.

    The checkpoint is read into ``target``'s layout (host arrays, or arrays
    on a mesh). On resume the data position is restored and a ``config``
    differing from the checkpoint's is a :class:`ConfigMismatchError`; a key
    absent from the saved config (a field added after that run was written)
    counts as its value in ``config_defaults``, the value that reproduces the
    older behaviour.
    """
    restored = None if ckpt is None else ckpt.restore_latest(target=target)
    if ckpt is None or restored is None:
        return initial, 0, False
    host_state, meta = restored
    step = int(_replica(host_state.step))
    saved = meta.get("config")
    if isinstance(saved, dict) and config_defaults:
        saved = {**{k: v for k, v in config_defaults.items() if k in (config or {})}, **saved}
    if config is not None and saved not in (None, config):
        raise ConfigMismatchError(
            f"config differs from the one saved with the checkpoint of step {step} in {ckpt.directory} "
            f"({_config_differences(saved, config)}); resuming would mix two runs: pass the "
            "saved config or use another workdir."
        )
    batches.restore(meta["data_state"])
    return host_state, step, True


class _TensorBoard:
    """TensorBoard event files in the work directory, beside ``metrics.jsonl`` (tensorboardX).

    Every step record of ``metrics.jsonl`` becomes scalars at its step:
    ``loss``, ``grad_norm``, ``steps_per_sec``, each level of a list entry
    as ``per_sigma_loss/<i>`` (level ``i`` of the noise grid) and, given a
    ``learning_rate_fn``, ``learning_rate``. A resumed run opens a new event
    file with ``purge_step`` at the resumed step, so TensorBoard drops the
    earlier file's records of the steps that are replayed.
    """

    def __init__(self, logdir: str, *, resume_step: int, learning_rate_fn: optax.ScalarOrSchedule | None):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=logdir, purge_step=resume_step or None)
        self.learning_rate_fn = learning_rate_fn

    @staticmethod
    def open(logdir: str | None, *, enabled: bool, resume_step: int, learning_rate_fn: optax.ScalarOrSchedule | None):
        """A writer, or None when not ``enabled`` or when tensorboardX is missing (said once, as a warning)."""
        if not enabled or logdir is None:
            return None
        try:
            return _TensorBoard(logdir, resume_step=resume_step, learning_rate_fn=learning_rate_fn)
        except ImportError:
            warnings.warn(
                "tensorboard=True but tensorboardX is not installed (pip install 'dsm_jax[tensorboard]'); "
                "training without TensorBoard event files (metrics.jsonl has the same numbers).",
                RuntimeWarning,
                stacklevel=3,
            )
            return None

    def write(self, record: dict) -> None:
        step = record["step"]
        for name, value in record.items():
            if name in ("step", "elapsed_sec"):
                continue
            if isinstance(value, list):
                for i, v in enumerate(value):
                    if v is not None:
                        self.writer.add_scalar(f"{name}/{i}", v, step)
            elif value is not None:
                self.writer.add_scalar(name, value, step)
        if self.learning_rate_fn is not None:
            lr = self.learning_rate_fn
            self.writer.add_scalar("learning_rate", np.asarray(lr(step) if callable(lr) else lr).item(), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MetricsLog:
    """The run's records: ``metrics.jsonl`` (with a work directory), the tqdm bar and the progress lines.

    Only process 0 writes or shows anything. After :meth:`start_progress`,
    :meth:`steps` collects the metrics of each call and writes their means
    every ``log_every`` steps and at the end.
    """

    def __init__(self, path: str | None, *, is_main: bool):
        self.path = path if is_main else None
        self.is_main = is_main
        self.bar = tqdm(disable=True)  # replaced by the run's bar in start_progress
        self.tensorboard: _TensorBoard | None = None

    def start_progress(self, step: int, num_steps: int, *, log_every: int, quiet: bool) -> None:
        """Starts the clock and the bar at ``step`` (after the restore)."""
        self.num_steps, self.log_every = num_steps, log_every
        self.history: list = []
        self.start_time = time.perf_counter()
        self.last_log = (step, self.start_time)
        show_bar = self.is_main and not quiet and sys.stderr.isatty()
        self.show_lines = self.is_main and not quiet and not (show_bar and sys.stdout.isatty())
        self.bar.close()
        self.bar = tqdm(total=num_steps, initial=step, disable=not show_bar, dynamic_ncols=True, unit="step")

    def repair(self, resume_step: int) -> None:
        """Drops a partial last line and the step records after ``resume_step`` (they are replayed)."""
        if self.path is not None:
            repair_metrics(self.path, resume_step=resume_step)

    def event(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def steps(self, step: int, metrics: dict, n: int) -> None:
        """Records the ``n`` steps of a call ending at ``step`` (``metrics`` stacked ``[n, ...]``)."""
        self.history.extend({name: v[i] for name, v in metrics.items()} for i in range(n))
        self.bar.update(n)
        if not (step // self.log_every > self.last_log[0] // self.log_every or step == self.num_steps):
            return
        now = time.perf_counter()
        rate = (step - self.last_log[0]) / max(now - self.last_log[1], 1e-9)
        record = {"step": step, **_summarise(self.history), "steps_per_sec": rate, "elapsed_sec": now - self.start_time}
        self.event(record)
        if self.tensorboard is not None:
            self.tensorboard.write(record)
        self.bar.set_postfix(
            loss=f"{record['loss']:.4g}" if record["loss"] is not None else "nan", steps_per_sec=f"{rate:.1f}"
        )
        if self.show_lines:
            tqdm.write(_progress_line(step, self.num_steps, record["loss"], rate), file=sys.stdout)
            sys.stdout.flush()
        self.history, self.last_log = [], (step, now)

    def close(self) -> None:
        self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def train(
    loss_fn: LossFn,
    params: Any,
    data: Callable[[int], Any] | DataSource,
    *,
    num_steps: int,
    workdir: str | os.PathLike | None = None,
    optimizer: optax.GradientTransformation | None = None,
    seed: int = 0,
    ema_decay: float = 0.999,
    steps_per_call: int = 1,
    save_every: int = 1000,
    keep: int = 3,
    log_every: int = 100,
    config: dict | None = None,
    config_defaults: dict | None = None,
    quiet: bool = False,
    devices: Sequence[Any] | None = None,
    per_example_keys: bool = True,
    handle_signals: bool = True,
    unroll: int | bool = 1,
    loss_takes_key_batch: bool | None = None,
    parallel: str = "pmap",
    tensorboard: bool = False,
    learning_rate_fn: optax.ScalarOrSchedule | None = None,
) -> TrainState:
    """Trains ``params`` on ``loss_fn`` with data parallelism, EMA, checkpoints and exact resume.

    With a ``workdir``, starts from the latest readable checkpoint in
    ``workdir/checkpoints`` if there is one (state, step, data position),
    else from ``params``; runs until ``state.step == num_steps``. Without
    one (``workdir=None``) it trains in memory from ``params``: no
    checkpoints, no files, no signal handlers, the same steps and the same
    result. Step ``s`` uses the batch of step
    ``s`` and the key ``fold_in(jax.random.key(seed), s)``, so stopping and
    resuming changes nothing, bitwise.

    Each device call runs up to ``steps_per_call`` steps (``lax.scan``);
    calls end at multiples of ``steps_per_call`` and ``save_every`` and at
    ``num_steps``. Checkpoints are written every ``save_every`` steps and at
    the end; on SIGTERM or SIGINT the current step is saved, then SIGTERM
    raises :class:`TrainingTerminated` (a ``SystemExit(143)``) and SIGINT
    :class:`TrainingInterrupted` (a ``KeyboardInterrupt``), both carrying
    the ``saved_step``.
    A non-finite loss or gradient norm raises :class:`NonFiniteError`
    naming the step and the metric; no checkpoint is written after the last
    finite step.

    Files in ``workdir`` (none without one): ``checkpoints/`` (orbax) and ``metrics.jsonl``:
    one JSON object per line, either ``{"step", "loss", "grad_norm",
    "per_sigma_loss", ..., "steps_per_sec", "elapsed_sec"}`` (means over
    the steps since the previous line, every ``log_every`` steps) or an
    event ``{"event": "start" | "resume" | "save" | "interrupted" |
    "nonfinite" | "done", "step", ...}``. Before appending, a partial last
    line (a kill mid-write) and the step records of the steps after the
    resumed checkpoint (they are replayed) are dropped, so the file holds
    one step record per step; read it with :func:`dsm_jax.runlog.read_metrics`.

    Progress: a tqdm bar on stderr when it is a terminal; when there is no
    bar, or stdout is not a terminal (nohup, Slurm, ``| tee``), a line
    ``step s/num_steps  loss l  r steps/s  ETA h:mm:ss`` on stdout every
    ``log_every`` steps. Both come from process 0 only and neither with
    ``quiet=True``.

    Args:
        loss_fn: ``loss_fn(params, batch, key) -> loss`` or ``(loss, aux)``
            (e.g. :func:`dsm_jax.models.make_dsm_loss_fn`); see
            :func:`make_train_step` for ``per_example_keys``.
        params: initial parameters (ignored when resuming).
        data: ``batch_at(step) -> batch`` (a pure function of the step index,
            so the data position is the step; preferred), or a
            :class:`DataSource` whose ``state()`` is checkpointed. A batch is
            a pytree of arrays with the global batch leading, divisible by
            the number of devices.
        workdir: run directory (created), or None to train in memory.
        num_steps: total number of steps of the run.
        optimizer: optax transformation; default :func:`make_optimizer()`.
        seed: the run's seed.
        ema_decay: EMA decay in ``[0, 1)``.
        steps_per_call: steps per device call (``lax.scan``).
        save_every: checkpoint period in steps.
        keep: checkpoints kept.
        log_every: metrics period in steps (rounded up to call boundaries).
        config: JSON-serialisable run configuration, saved with every
            checkpoint; resuming from a checkpoint saved with a different
            one is a ValueError (a checkpoint saved without one is accepted).
        config_defaults: for keys of ``config`` that an older checkpoint's
            config lacks, the value that run had implicitly (so adding a
            field with a backward-compatible default does not block resuming).
        quiet: no progress bar or progress lines.
        devices: devices to train on; default ``jax.local_devices()`` for
            ``"pmap"`` and ``jax.devices()`` (every process's) for ``"sharding"``.
        per_example_keys: see :func:`make_train_step`.
        handle_signals: install the SIGTERM/SIGINT handlers (main thread
            only; never without a ``workdir``).
        unroll: ``lax.scan`` unrolling of the ``steps_per_call`` steps of a
            call (:func:`make_multi_step`). Convolutional models on the CPU
            want ``steps_per_call=1`` (no loop) or ``unroll >= 2``, as XLA's
            CPU backend runs them much slower inside a rolled loop; MLPs gain
            from scanning (numbers in ``experiments/benchmarks/RESULTS.md``).
        loss_takes_key_batch: see :func:`make_train_step`.
        parallel: the data-parallel backend, ``"pmap"`` (``jax.pmap`` over
            the local devices) or ``"sharding"`` (``jax.jit`` over a device
            ``Mesh``, state replicated, batches sharded ``P("data")``; see
            ``_ShardingBackend``). Both run the same per-device step and give
            the same parameters to float rounding (measured within 1e-6
            after 10 steps on 1, 2 and 4 devices, ``tests/test_sharding.py``);
            checkpoints do not depend on the backend or the device count, so
            a run may resume under the other backend or on other devices.
            pmap is in maintenance mode since JAX 0.8; "sharding" is the one
            that extends to sharded parameters and multi-host meshes.
        tensorboard: also write TensorBoard event files into ``workdir``
            (needs a ``workdir`` and the optional ``tensorboardX``, the extra
            ``dsm_jax[tensorboard]``; without it a warning says so once and
            training goes on): the scalars of every ``metrics.jsonl`` step
            record, see ``_TensorBoard``.
        learning_rate_fn: the optimizer's learning rate (a number or
            ``schedule(step)``, e.g. :func:`learning_rate_schedule`), logged
            to TensorBoard as ``learning_rate``.

    Returns:
        The final :class:`TrainState` (numpy arrays on the host).

    Raises:
        ValueError: bad arguments, or ``config`` differs from the resumed
            checkpoint's (the message names the differing keys).
        NonFiniteError: a non-finite loss or gradient norm.
        TrainingInterrupted, TrainingTerminated: SIGINT, SIGTERM (see above).

    Example:
        >>> loss_fn = make_dsm_loss_fn(NoiseConditionalMLP(), geometric_sigmas(3.0, 0.05, 10))  # doctest: +SKIP
        >>> state = train(loss_fn, params, lambda s: data[s % 100], workdir="runs/a", num_steps=5000)  # doctest: +SKIP
        >>> state = train(loss_fn, params, lambda s: data[s % 100], num_steps=500)  # in memory  # doctest: +SKIP
    """
    num_steps = check_positive_int("num_steps", num_steps, minimum=0)
    steps_per_call = check_positive_int("steps_per_call", steps_per_call)
    save_every = check_positive_int("save_every", save_every)
    log_every = check_positive_int("log_every", log_every)
    check_positive_int("seed", seed, minimum=0)
    ema_decay = _check_ema_decay(ema_decay)
    if config is not None:
        try:
            config = json.loads(json.dumps(config))
            config_defaults = json.loads(json.dumps(config_defaults))
        except (TypeError, ValueError) as err:
            raise ValueError(f"config must be JSON-serialisable, got {config!r} ({err}).") from None
    check_choice("parallel", parallel, PARALLEL)
    if not isinstance(tensorboard, bool):
        raise ValueError(f"tensorboard must be True or False, got {tensorboard!r}.")
    if tensorboard and workdir is None:
        raise ValueError("tensorboard=True needs a workdir to write the event files to, got workdir=None.")
    batches = _Batches(data)
    default_devices = jax.local_devices() if parallel == "pmap" else jax.devices()
    devices = list(devices) if devices is not None else default_devices
    if not devices:
        raise ValueError(f"devices must be a non-empty sequence, got {devices!r}.")
    optimizer = make_optimizer() if optimizer is None else optimizer
    is_main = jax.process_index() == 0
    if workdir is not None:
        workdir = os.path.abspath(os.fspath(workdir))
        if is_main:
            os.makedirs(workdir, exist_ok=True)

    train_step = make_train_step(
        loss_fn,
        optimizer,
        ema_decay=ema_decay,
        axis_name=_BACKENDS[parallel].axis_name,
        per_example_keys=per_example_keys,
        loss_takes_key_batch=loss_takes_key_batch,
    )
    backend = _BACKENDS[parallel](make_multi_step(train_step, unroll=unroll), devices, jax.random.key(seed))
    initial = jax.device_get(create_train_state(params, optimizer))

    with contextlib.ExitStack() as stack:
        ckpt = (
            None
            if workdir is None
            else stack.enter_context(Checkpointer(os.path.join(workdir, "checkpoints"), keep=keep))
        )
        state, step, resumed = _restore_or_init(
            ckpt, initial, backend.restore_target(initial), batches, config, config_defaults
        )
        log = _MetricsLog(None if workdir is None else os.path.join(workdir, "metrics.jsonl"), is_main=is_main)
        log.repair(resume_step=step)
        log.tensorboard = _TensorBoard.open(
            workdir if is_main else None, enabled=tensorboard, resume_step=step, learning_rate_fn=learning_rate_fn
        )
        stack.callback(log.close)
        log.event(
            {"event": "resume" if resumed else "start", "step": step, "num_devices": len(devices), "parallel": parallel}
        )
        if step >= num_steps:
            return jax.tree.map(_replica, state)

        state = backend.put_state(state)
        # Without a work directory there is nothing to save: a signal keeps its usual effect.
        flag = stack.enter_context(_SignalFlag(handle_signals and ckpt is not None))
        log.start_progress(step, num_steps, log_every=log_every, quiet=quiet)
        while step < num_steps:
            n = _chunk_length(step, steps_per_call, save_every, num_steps)
            stacked = backend.put_batches([batches.get(s) for s in range(step, step + n)], step)
            state, metrics = backend.call(state, stacked, step, n)
            bad = _first_nonfinite(metrics, step)
            if bad is not None:
                bad_step, name, value = bad
                log.event({"event": "nonfinite", "step": bad_step, "metric": name, "value": repr(value)})
                raise _nonfinite_error(bad_step, name, value, ckpt)
            step += n
            log.steps(step, metrics, n)

            if ckpt is not None and (step % save_every == 0 or step == num_steps or flag.signum is not None):
                ckpt.save(step, backend.for_checkpoint(state), data_state=batches.state(step), config=config)
                log.event({"event": "save", "step": step})
            if flag.signum is not None and ckpt is not None:  # the flag is only set with a work directory
                log.event({"event": "interrupted", "step": step, "signal": signal.Signals(flag.signum).name})
                if flag.signum == signal.SIGINT:
                    raise TrainingInterrupted(step, ckpt.directory)
                raise TrainingTerminated(step, ckpt.directory)
        log.event({"event": "done", "step": step, "elapsed_sec": time.perf_counter() - log.start_time})
        return backend.host(state)
