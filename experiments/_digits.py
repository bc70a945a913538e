"""The digits U-Net shared by studies 10-12: the run of ``dsm-jax train --preset digits``.

Reused from ``experiments/results/_cache/digits`` when present (gitignored),
trained there otherwise by the command's own application layer
(:func:`dsm_jax.run.train_and_sample`, as ``dsm-jax train --preset digits
--no-sample`` would), so the cached run is the command's. Quick mode builds
the same kind of run with a tiny U-Net and few levels and does not train it
(its numbers test the harness, not the model).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from _common import RESULTS_DIR

from dsm_jax.config import get_preset
from dsm_jax.models import init_params
from dsm_jax.run import build_run, load_trained, train_and_sample


def digits_run(quick: bool):
    """``(run, ema_params)`` of the digits preset."""
    if quick:
        config = dataclasses.replace(
            get_preset("digits"), channels=8, channel_mults=(1,), num_sigmas=4, steps_per_sigma=2
        )
        run = build_run(config)
        return run, init_params(run.model, jax.random.key(0), jnp.asarray(run.dataset.train[:1]))
    workdir = RESULTS_DIR / "_cache" / "digits"
    if not (workdir / "checkpoints").is_dir():
        # user_set=frozenset(): nothing given beyond the preset, as on the command line above.
        train_and_sample(get_preset("digits"), workdir, user_set=frozenset(), sample=False, quiet=True)
    return load_trained(workdir)
