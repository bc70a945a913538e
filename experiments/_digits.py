"""The digits U-Net shared by studies 10-12: the ``dsm-jax train --preset digits`` run.

Reused from ``experiments/results/_cache/digits`` when present (gitignored),
trained there with the command's own code otherwise. Quick mode builds the
same kind of run with a tiny U-Net and few levels and does not train it (its
numbers test the harness, not the model).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from _common import RESULTS_DIR
from dsm_jax import cli
from dsm_jax.config import get_preset
from dsm_jax.models import init_params


def digits_run(quick: bool):
    """``(run, ema_params)`` of the digits preset."""
    if quick:
        config = dataclasses.replace(get_preset("digits"), channels=8, channel_mults=(1,), num_sigmas=4,
                                     steps_per_sigma=2)
        run = cli.build_run(config)
        return run, init_params(run.model, jax.random.key(0), jnp.asarray(run.dataset.train[:1]))
    workdir = RESULTS_DIR / "_cache" / "digits"
    if not (workdir / "checkpoints").is_dir():
        argv = ["train", "--preset", "digits", "--workdir", str(workdir), "--no-sample", "--quiet"]
        if cli.main(argv) != 0:
            raise RuntimeError(f"training the digits model failed: {argv}")
    return cli.load_trained(workdir)
