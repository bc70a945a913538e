"""What every sampler returns, the thinned scan that records its trajectory, the projection hook.

Trajectories are thinned: with ``trajectory_every=k`` the trajectory holds the
initial state, the state after every ``k`` steps and the final state (before
the optional Tweedie step), so memory is ``O(num_steps / k)``. By default
``k = ceil(num_steps / 100)`` (at most about 100 snapshots).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsm_jax._checks import check_positive_int

__all__ = ["Projection", "SampleResult", "scan", "snapshot_every", "with_start"]

Projection = Callable[[jax.Array, jax.Array | None, jax.Array], jax.Array]
"""``project(x, level, key) -> x``, run after every update of a sampler at ``level`` (a time or a
noise level), and once more with ``level=None`` after the final Tweedie step (inverse problems)."""


class SampleResult(NamedTuple):
    """What the samplers return (the Langevin ones with ``return_result=True``).

    Attributes:
        samples: ``[B, *D]``.
        nfe: number of model evaluations (an integer scalar array; each
            evaluation is one call on the whole batch).
        trajectory: ``[S, B, *D]`` snapshots, or ``None``.
    """

    samples: jax.Array
    nfe: jax.Array
    trajectory: jax.Array | None = None


def snapshot_every(return_trajectory: bool, every, num_steps: int, *, default: int | None = None) -> int | None:
    """The snapshot spacing: None without a trajectory, else ``every`` (default ``ceil(num_steps / 100)``)."""
    if not return_trajectory:
        return None
    if every is None:
        return max(1, math.ceil(num_steps / 100)) if default is None else default
    return check_positive_int("trajectory_every", every)


def scan(step, carry, xs, every: int | None):
    """``lax.scan(step, carry, xs)``; with ``every``, also returns snapshots of the carry.

    The snapshots are taken after every ``every`` steps and after the last one,
    by an outer scan over chunks of ``every`` steps (plus a scan over the
    remaining steps), so only ``O(n / every)`` states are stored.
    """
    if every is None:
        return jax.lax.scan(step, carry, xs)[0], None
    n = jax.tree.leaves(xs)[0].shape[0]
    chunks, rest = divmod(n, every)
    snaps = []
    if chunks:
        head = jax.tree.map(lambda a: a[: chunks * every].reshape((chunks, every) + a.shape[1:]), xs)

        def chunk(c, xs_chunk):
            c = jax.lax.scan(step, c, xs_chunk)[0]
            return c, c

        carry, traj = jax.lax.scan(chunk, carry, head)
        snaps.append(traj)
    if rest:
        carry = jax.lax.scan(step, carry, jax.tree.map(lambda a: a[chunks * every :], xs))[0]
        snaps.append(carry[None])
    return carry, jnp.concatenate(snaps, axis=0)


def with_start(x0: jax.Array, traj: jax.Array | None) -> jax.Array | None:
    """The trajectory with the initial state first (None stays None)."""
    return None if traj is None else jnp.concatenate([x0[None], traj], axis=0)
