"""Training: the state, the optimizer, a pure train step, and the data-parallel driver.

The pieces, from the inside out:

* :class:`TrainState` ``(step, params, ema_params, opt_state)``, a pytree;
* :func:`make_optimizer`: optax Adam/AdamW, linear warmup + cosine decay,
  global-norm clipping;
* :func:`make_train_step`: a pure ``train_step(state, batch, key) ->
  (state, metrics)`` from any ``loss_fn(params, batch, key)``; with
  ``axis_name`` the gradients and metrics are ``lax.pmean``-ed;
* :func:`make_dsm_loss_fn`: multi-scale DSM for a Flax module, as such a
  ``loss_fn`` (with per-sigma diagnostics);
* :func:`train`: the driver. It ``pmap``-s the step once over
  ``jax.local_devices()``, shards each global batch as
  ``[devices, per_device, ...]``, optionally scans ``k`` steps per device
  call, keeps an EMA of the parameters, logs JSON lines and a tqdm bar,
  checkpoints with orbax (:mod:`dsm_jax.checkpoint`), resumes exactly,
  stops on non-finite values and saves on SIGTERM/SIGINT
  (:class:`TrainingInterrupted`, :class:`TrainingTerminated`).

Randomness is a pure function of ``(seed, step)``: the key of step ``s`` is
``fold_in(key(seed), s)`` and, by default, example ``j`` of the global batch
uses ``fold_in(that key, j)`` (the device index fixes which ``j`` a device
holds). A resumed run therefore repeats exactly what an uninterrupted run
does, and the result does not depend on the number of devices.

Multi-host: call ``jax.distributed.initialize()`` (arguments or the
cluster's environment) before any other JAX call, then :func:`train` on
every process, each ``batch_at(step)`` returning that process's slice of
the global batch (process ``p`` holds examples ``[p B/P, (p+1) B/P)``).

References:
    The Flax ImageNet example (pmap + pmean train step); Song et al.,
    score_sde (EMA, several steps per device call).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from typing import Any, Callable, Optional, Protocol, Sequence, Union, runtime_checkable

import flax.struct
import jax
import jax.numpy as jnp
from jax.experimental import checkify
import numpy as np
import optax
from tqdm.auto import tqdm

from dsm_jax._checks import (
    check_choice,
    check_positive_int,
    check_positive_number,
    check_sigma_schedule,
    runtime_checks_enabled,
)
from dsm_jax.checkpoint import Checkpointer
from dsm_jax.data import shard_batch
from dsm_jax.losses import SIGMA_SAMPLING, multiscale_dsm_loss
from dsm_jax.models.apply import make_model_fn
from dsm_jax.noise import Weighting, get_weighting
from dsm_jax.parameterization import check_parameterization
from dsm_jax.runlog import read_metrics, repair_metrics

__all__ = [
    "ConfigMismatchError",
    "DataSource",
    "NonFiniteError",
    "TrainState",
    "TrainingInterrupted",
    "TrainingTerminated",
    "create_train_state",
    "make_dsm_loss_fn",
    "make_optimizer",
    "make_train_step",
    "read_metrics",
    "train",
]

AXIS = "devices"
OPTIMIZERS = ("adam", "adamw")
_CHECKED_METRICS = ("loss", "grad_norm")

LossFn = Callable[[Any, Any, jax.Array], Any]


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
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=optimizer.init(params)
    )


def make_optimizer(
    learning_rate: float = 2e-4,
    *,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    warmup_steps: int = 0,
    total_steps: Optional[int] = None,
    final_lr_fraction: float = 0.0,
    grad_clip_norm: Optional[float] = 1.0,
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
    check_positive_number("learning_rate", learning_rate)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    warmup_steps = check_positive_int("warmup_steps", warmup_steps, minimum=0)
    if not 0.0 <= final_lr_fraction <= 1.0:
        raise ValueError(f"final_lr_fraction must be in [0, 1], got {final_lr_fraction!r}.")
    if total_steps is not None:
        total_steps = check_positive_int("total_steps", total_steps)
        if total_steps <= warmup_steps:
            raise ValueError(f"total_steps must exceed warmup_steps={warmup_steps}, got {total_steps}.")
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, warmup_steps, total_steps, end_value=final_lr_fraction * learning_rate
        )
    elif warmup_steps > 0:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)],
            [warmup_steps],
        )
    else:
        schedule = learning_rate
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
    axis_name: Optional[str] = None,
    per_example_keys: bool = True,
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
    A loss marked ``loss_fn.accepts_key_batch = True`` (those of
    :func:`make_dsm_loss_fn`) receives the ``[B]`` per-example keys and the
    whole batch instead of being vmapped: the same draws, the model run on the
    batch at once (about 20% faster for an MLP at batch 2048 on a CPU).

    Args:
        loss_fn: ``loss_fn(params, batch, key)``.
        optimizer: an optax transformation.
        ema_decay: EMA decay in ``[0, 1)`` (0 keeps ``ema_params = params``).
        axis_name: the ``pmap`` axis; gradients and metrics are ``lax.pmean``-ed over it.
        per_example_keys: see above.

    Returns:
        ``train_step``; metrics hold "loss", "grad_norm" (of the averaged
        gradient) and the loss's aux entries.

    Example:
        >>> step = jax.jit(make_train_step(loss_fn, optax.adam(1e-3), ema_decay=0.99))  # doctest: +SKIP
        >>> state, metrics = step(create_train_state(params, optax.adam(1e-3)), batch, key)  # doctest: +SKIP
    """
    ema_decay = _check_ema_decay(ema_decay)
    loss_aux = _with_aux(loss_fn)
    batched_keys = per_example_keys and getattr(loss_fn, "accepts_key_batch", False)

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


def make_dsm_loss_fn(
    model,
    sigmas,
    *,
    weighting: Weighting = "sigma2",
    parameterization: str = "score",
    sigma_sampling: str = "stratified",
    scale_by_sigma: bool = False,
) -> LossFn:
    """Multi-scale DSM of a Flax module as ``loss_fn(params, x, key) -> (loss, {"per_sigma_loss": [L]})``.

    ``loss = sum_i lambda(sigma_i) L(sigma_i) / L`` by
    :func:`dsm_jax.losses.multiscale_dsm_loss` on
    ``make_model_fn(model, params, scale_by_sigma=...)``.

    ``sigma_sampling`` defaults to "stratified", as the CLI: every example
    at every level, each level jittered log-uniformly inside its cell of the
    grid, so the model is also trained between the levels, where the
    reverse-SDE and probability-flow ODE samplers query it. "all" (the
    exact levels) suffices for annealed Langevin, which only queries the
    grid, but not for the ODE: on a 3-D, 4-component mixture (weights
    0.4/0.3/0.2/0.1, 1000 steps) the ODE's samples were 68-102 MMD floors
    away with mode weights flattened to 0.25-0.27 for 0.4 (at
    ``fourier_scale=16`` while every per-sigma Fisher divergence at the grid
    levels was below 0.09); with "stratified", 2.7 floors and 0.37 (the
    exact score gives 0.37 from this prior). Both cost L model evaluations per example; "random" (one
    level per example) costs 1 and suits models whose step is expensive
    (the digits U-Net). Stratified levels want a smooth sigma embedding:
    see ``fourier_scale`` of :class:`dsm_jax.models.NoiseConditionalMLP`.
    """
    check_sigma_schedule(sigmas, decreasing=False, monotone=sigma_sampling == "stratified")
    check_parameterization(parameterization)
    check_choice("sigma_sampling", sigma_sampling, SIGMA_SAMPLING)
    get_weighting(weighting)
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def loss_fn(params, x, key):
        model_fn = make_model_fn(model, params, scale_by_sigma=scale_by_sigma)
        loss, per_sigma = multiscale_dsm_loss(
            model_fn,
            x,
            sigmas,
            key,
            weighting=weighting,
            parameterization=parameterization,
            sigma_sampling=sigma_sampling,
            return_per_sigma=True,
        )
        return loss, {"per_sigma_loss": per_sigma}

    loss_fn.accepts_key_batch = True  # multiscale_dsm_loss takes one key per example
    return loss_fn


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
        if isinstance(data, DataSource):
            self._source, self._batch_at = data, None
        elif callable(data):
            self._source, self._batch_at = None, data
        else:
            raise ValueError(
                "data must be a callable batch_at(step) -> batch or an object with next_batch(), "
                f"state() and restore(state), got {type(data).__name__}."
            )

    def get(self, step: int) -> Any:
        return self._batch_at(step) if self._source is None else self._source.next_batch()

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
        self.signum: Optional[int] = None
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


def _unreplicate(tree: Any) -> Any:
    return jax.tree.map(lambda a: np.asarray(a[0]), tree)


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


def _progress_line(step: int, num_steps: int, loss: Optional[float], rate: float) -> str:
    """``step 200/3000  loss 0.4123  25.1 steps/s  ETA 0:01:51`` (the rate of the last log interval)."""
    loss_text = f"{loss:.4g}" if loss is not None else "nan"
    return (f"step {step}/{num_steps}  loss {loss_text}  {rate:.1f} steps/s  "
            f"ETA {_duration((num_steps - step) / max(rate, 1e-9))}")


def train(
    loss_fn: LossFn,
    params: Any,
    data: Union[Callable[[int], Any], DataSource],
    *,
    workdir: Union[str, os.PathLike],
    num_steps: int,
    optimizer: Optional[optax.GradientTransformation] = None,
    seed: int = 0,
    ema_decay: float = 0.999,
    steps_per_call: int = 1,
    save_every: int = 1000,
    keep: int = 3,
    log_every: int = 100,
    config: Optional[dict] = None,
    quiet: bool = False,
    devices: Optional[Sequence[jax.Device]] = None,
    per_example_keys: bool = True,
    handle_signals: bool = True,
    unroll: Union[int, bool] = 1,
) -> TrainState:
    """Trains ``params`` on ``loss_fn`` with data parallelism, EMA, checkpoints and exact resume.

    Starts from the latest readable checkpoint in ``workdir/checkpoints`` if
    there is one (state, step, data position), else from ``params``; runs
    until ``state.step == num_steps``. Step ``s`` uses the batch of step
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

    Files in ``workdir``: ``checkpoints/`` (orbax) and ``metrics.jsonl``:
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
            (e.g. :func:`make_dsm_loss_fn`); see :func:`make_train_step` for
            ``per_example_keys``.
        params: initial parameters (ignored when resuming).
        data: ``batch_at(step) -> batch`` (a pure function of the step index,
            so the data position is the step; preferred), or a
            :class:`DataSource` whose ``state()`` is checkpointed. A batch is
            a pytree of arrays with the global batch leading, divisible by
            the number of devices.
        workdir: run directory (created).
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
        quiet: no progress bar or progress lines.
        devices: devices to pmap over; default ``jax.local_devices()``.
        per_example_keys: see :func:`make_train_step`.
        handle_signals: install the SIGTERM/SIGINT handlers (main thread only).
        unroll: ``lax.scan`` unrolling of the ``steps_per_call`` steps of a
            call. Convolutional models on the CPU want ``steps_per_call=1``
            (no loop) or ``unroll >= 2``: with jaxlib 0.10.2 the digits U-Net
            ran ~35x slower per step inside a rolled scan (3.6 s against
            0.1 s), while MLPs gain from scanning (about 1.5x at k = 10).

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
        except (TypeError, ValueError) as err:
            raise ValueError(f"config must be JSON-serialisable, got {config!r} ({err}).") from None
    batches = _Batches(data)
    devices = list(devices) if devices is not None else jax.local_devices()
    if not devices:
        raise ValueError(f"devices must be a non-empty sequence, got {devices!r}.")
    optimizer = make_optimizer() if optimizer is None else optimizer
    workdir = os.path.abspath(os.fspath(workdir))
    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(workdir, exist_ok=True)

    train_step = make_train_step(
        loss_fn, optimizer, ema_decay=ema_decay, axis_name=AXIS, per_example_keys=per_example_keys
    )

    def run_steps(state, stacked_batches, base_key):
        def body(st, batch):
            st, metrics = train_step(st, batch, jax.random.fold_in(base_key, st.step))
            return st, metrics

        if jax.tree.leaves(stacked_batches)[0].shape[0] == 1:
            # A one-step call is straight-line code, no while loop: on the CPU a U-Net step
            # inside a one-trip scan ran at 3.6 s against 0.1 s outside one (digits, batch 128).
            st, metrics = body(state, jax.tree.map(lambda a: a[0], stacked_batches))
            return st, jax.tree.map(lambda a: a[None], metrics)
        return jax.lax.scan(body, state, stacked_batches, unroll=unroll)

    p_run = jax.pmap(run_steps, axis_name=AXIS, in_axes=(0, 0, None), devices=devices, donate_argnums=(0,))
    # With dsm_jax.debug_checks() / DSM_JAX_CHECKS=1 the losses add checkify checks of traced
    # values; they must be functionalised around the compiled step to be reported.
    checked = runtime_checks_enabled()
    if checked:
        p_run = checkify.checkify(p_run)
    base_key = jax.random.key(seed)

    log_path = os.path.join(workdir, "metrics.jsonl")

    def log(record: dict) -> None:
        if is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    initial = jax.device_get(create_train_state(params, optimizer))
    with Checkpointer(os.path.join(workdir, "checkpoints"), keep=keep) as ckpt:
        restored = ckpt.restore_latest(target=initial)
        if restored is None:
            host_state, step = initial, 0
            if is_main:
                repair_metrics(log_path, resume_step=0)
            log({"event": "start", "step": 0, "num_devices": len(devices)})
        else:
            host_state, meta = restored
            step = int(host_state.step)
            if config is not None and meta.get("config") not in (None, config):
                raise ConfigMismatchError(
                    f"config differs from the one saved with the checkpoint of step {step} in {ckpt.directory} "
                    f"({_config_differences(meta['config'], config)}); resuming would mix two runs: pass the "
                    "saved config or use another workdir."
                )
            batches.restore(meta["data_state"])
            if is_main:
                repair_metrics(log_path, resume_step=step)
            log({"event": "resume", "step": step, "num_devices": len(devices)})

        def save(state_host, at_step):
            ckpt.save(at_step, state_host, data_state=batches.state(at_step), config=config)
            log({"event": "save", "step": at_step})

        if step >= num_steps:
            return host_state

        # Placed by a pmap of the identity so that its arrays are laid out exactly like
        # p_run's outputs: the second call then hits the first call's compilation.
        state = jax.pmap(lambda t: t, axis_name=AXIS, devices=devices)(
            jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (len(devices),) + np.shape(a)), host_state)
        )
        history: list = []
        last_log = (step, time.perf_counter())
        start_time = time.perf_counter()
        show_bar = is_main and not quiet and sys.stderr.isatty()
        show_lines = is_main and not quiet and not (show_bar and sys.stdout.isatty())
        with _SignalFlag(handle_signals) as flag, tqdm(
            total=num_steps, initial=step, disable=not show_bar, dynamic_ncols=True, unit="step"
        ) as bar:
            while step < num_steps:
                n = _chunk_length(step, steps_per_call, save_every, num_steps)
                shards = [_shard(batches.get(s), len(devices), s) for s in range(step, step + n)]
                stacked = jax.tree.map(lambda *xs: np.stack(xs, axis=1), *shards)
                if checked:
                    err, (state, metrics) = p_run(state, stacked, base_key)
                    if err.get() is not None:
                        raise ValueError(
                            f"run-time check failed in steps {step}-{step + n - 1} (the batches of those steps): "
                            f"{err.get()}; stopped before saving."
                        )
                else:
                    state, metrics = p_run(state, stacked, base_key)
                metrics = jax.device_get(_unreplicate(metrics))
                bad = _first_nonfinite(metrics, step)
                if bad is not None:
                    bad_step, name, value = bad
                    log({"event": "nonfinite", "step": bad_step, "metric": name, "value": repr(value)})
                    last = ckpt.latest_step()
                    kept = ("no checkpoint was written yet" if last is None
                            else f"the last good checkpoint is step {last} in {ckpt.directory}")
                    raise NonFiniteError(
                        f"non-finite {name} ({value}) at step {bad_step} (the update computed from the batch of "
                        f"step {bad_step}); stopped before saving, {kept}."
                    )
                history.extend({name: v[i] for name, v in metrics.items()} for i in range(n))
                step += n
                bar.update(n)

                if step // log_every > last_log[0] // log_every or step == num_steps:
                    now = time.perf_counter()
                    rate = (step - last_log[0]) / max(now - last_log[1], 1e-9)
                    record = {"step": step, **_summarise(history), "steps_per_sec": rate,
                              "elapsed_sec": now - start_time}
                    log(record)
                    bar.set_postfix(loss=f"{record['loss']:.4g}" if record["loss"] is not None else "nan",
                                    steps_per_sec=f"{rate:.1f}")
                    if show_lines:
                        tqdm.write(_progress_line(step, num_steps, record["loss"], rate), file=sys.stdout)
                        sys.stdout.flush()
                    history, last_log = [], (step, now)

                if step % save_every == 0 or step == num_steps or flag.signum is not None:
                    host_state = _unreplicate(state)
                    save(host_state, step)
                if flag.signum is not None:
                    log({"event": "interrupted", "step": step, "signal": signal.Signals(flag.signum).name})
                    if flag.signum == signal.SIGINT:
                        raise TrainingInterrupted(step, ckpt.directory)
                    raise TrainingTerminated(step, ckpt.directory)
        log({"event": "done", "step": step, "elapsed_sec": time.perf_counter() - start_time})
        return host_state
