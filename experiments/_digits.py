"""The digits U-Net shared by studies 10-12: the ``dsm-jax train --preset digits`` run.

Reused from ``experiments/results/_cache/digits`` when present (gitignored),
trained there with the command's own code otherwise (quick mode: a few steps
into a temporary directory).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import RESULTS_DIR
from dsm_jax import cli


def digits_run(quick: bool):
    """``(run, ema_params, workdir)`` of the digits preset."""
    if quick:
        workdir = Path(tempfile.mkdtemp(prefix="dsm_jax_digits_")) / "run"
        argv = ["train", "--preset", "digits", "--workdir", str(workdir), "--num-steps", "3", "--no-sample",
                "--quiet", "--set", "channels=8", "--set", "save_every=3"]
    else:
        workdir = RESULTS_DIR / "_cache" / "digits"
        argv = ["train", "--preset", "digits", "--workdir", str(workdir), "--no-sample", "--quiet"]
    if not (workdir / "checkpoints").is_dir() or quick:
        if cli.main(argv) != 0:
            raise RuntimeError(f"training the digits model failed: {argv}")
    run, params = cli.load_trained(workdir)
    return run, params, workdir
