"""The ``dsm-jax`` command: ``train | sample | evaluate | denoise``.

``dsm-jax train`` with no arguments trains the default run (8 Gaussians in
2-D, a noise-conditional MLP, multi-scale DSM over 10 noise levels) on the
CPU in about a minute, then samples with annealed Langevin dynamics,
evaluates and writes into ``runs/default``:

* ``checkpoints/`` (orbax; re-running resumes), ``config.json``, ``metrics.jsonl``;
* ``samples.npz``, ``samples.png``, ``score_field.png`` (2-D), ``losses.png``;
* ``metrics.json``: MMD^2 between samples and held-out data next to the
  two-sample floor, sliced Wasserstein distance, and the relative Fisher
  divergence per noise level when the exact score is known.

The work directory is the user's data (:mod:`dsm_jax.workdir`): ``train``,
``sample`` and ``evaluate`` hold an exclusive lock on it (``denoise`` too when
its ``--output`` lies inside it), so a second writer is refused with the pid
and host of the first; ``--overwrite`` deletes only the files a run writes,
after every check has passed, and refuses when the directory holds anything
else; with an unchanged training config it resumes instead.

Exit status: 0 success; 1 a non-finite loss or gradient (the message names
the step) or an internal error (shown with its traceback); 2 a user mistake,
printed as one line: a ``UserError``, a ``ValueError`` raised while the
command validates its inputs (before it changes anything), or an ``OSError``
naming the path it could not read or write (read-only, full disk, not a
directory); 130 on Ctrl-C (SIGINT) and 143 on SIGTERM, after one line saying
what was kept. During training the current step is checkpointed first; during
sampling the process ends at once, and as every file is written atomically
(temporary file, then rename) each is either complete or absent.
``--debug`` (or ``DSM_JAX_DEBUG=1``) shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import math
import os
import re
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax import config as config_lib
from dsm_jax import workdir as workdir_lib
from dsm_jax.config import Config
from dsm_jax.interrupt import call_interruptibly, raise_on_sigterm
from dsm_jax.runlog import write_atomic as _write_atomic

EXIT_USER_ERROR = 2
EXIT_NONFINITE = 1
EXIT_INTERRUPTED = 130


class UserError(ValueError):
    """A mistake in the command line or its inputs: reported in one line."""


def _say(*args) -> None:
    if jax.process_index() == 0:
        print(*args, flush=True)


def _write_json(path: Path, obj) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


# ---------------------------------------------------------------------------
# The run: data, model, noise levels
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """Everything derived from a config: data, model and resolved settings."""

    config: Config
    dataset: object
    model: object
    sigmas: np.ndarray
    step_lr: float
    chosen: tuple = ()  # what build_run chose for the data (fit_to_data), one sentence each

    @property
    def resolved(self) -> dict:
        return {
            "sigmas": [float(s) for s in self.sigmas],
            "step_lr": float(self.step_lr),
            "data_shape": list(self.dataset.shape),
            "num_train": int(self.dataset.train.shape[0]),
            "num_test": int(self.dataset.test.shape[0]),
            "exact_score_known": self.dataset.distribution is not None,
        }

    def model_fn(self, params):
        from dsm_jax.models import make_model_fn

        return make_model_fn(self.model, params, scale_by_sigma=self.config.scale_by_sigma)


def fit_to_data(cfg: Config, shape: Sequence[int], user_set=frozenset()) -> tuple:
    """``(config, chosen)``: the model and its sigma sampling chosen by the data's example ``shape``.

    Fields in ``user_set`` (given on the command line or in a config file)
    are kept. Otherwise images ``[H, W, C]`` get the U-Net and vectors the
    MLP (which flattens any shape), and a chosen U-Net trains one noise level
    per image (``sigma_sampling="random"``, as the digits preset: "all" and
    "stratified" evaluate the network at every level for every example, so a
    step costs ``num_sigmas`` times as much) one step per compiled call
    (``steps_per_call=1``: XLA's CPU convolutions inside a loop of several
    steps were measured 25x slower per step). ``chosen`` says, one sentence
    each, what was chosen and why, or what a kept setting costs (nothing
    for vectors, where the MLP is the only choice).
    """
    shape = tuple(shape)
    chosen = []
    model = cfg.model
    if "model" not in user_set:
        model = "unet" if len(shape) == 3 else "mlp"
        if model == "unet":
            chosen.append(f"model 'unet' chosen for images [H, W, C] of shape {shape} (--set model=mlp flattens them)")
        elif len(shape) == 2:
            chosen.append(f"model 'mlp' chosen for examples of shape {shape}; give images as [N, H, W, C] for the U-Net")
    sigma_sampling = cfg.sigma_sampling
    if model == "unet" and sigma_sampling in ("all", "stratified"):
        cost = (f"sigma_sampling={sigma_sampling!r} evaluates the U-Net at all {cfg.num_sigmas} levels for every "
                f"image, {cfg.num_sigmas}x the cost of a step with 'random'")
        if "model" in user_set or "sigma_sampling" in user_set:
            chosen.append(f"note: {cost}; --set sigma_sampling=random trains one level per image")
        else:
            sigma_sampling = "random"
            chosen.append(f"sigma_sampling='random' (one level per image, as the digits preset): {cost} "
                          f"(--set sigma_sampling={cfg.sigma_sampling} to keep it)")
    steps_per_call = cfg.steps_per_call
    if model == "unet" and steps_per_call > 1 and "steps_per_call" not in user_set:
        cost = (f"on a CPU, convolutions inside a compiled loop of {steps_per_call} steps ran 25x slower per step "
                f"(digits: 0.06 against 1.5 steps/s)")
        if "model" in user_set:
            chosen.append(f"note: {cost}; --set steps_per_call=1 there")
        else:
            steps_per_call = 1
            chosen.append(f"steps_per_call=1 (as the digits preset): {cost}; --set steps_per_call=N on a GPU")
    return (dataclasses.replace(cfg, model=model, sigma_sampling=sigma_sampling, steps_per_call=steps_per_call),
            tuple(chosen))


def build_run(cfg: Config, *, user_set=None) -> Run:
    """Loads the data, builds the model, resolves sigma_max and the Langevin step.

    With ``user_set`` (the fields the user gave), the model and its sigma
    sampling are first chosen by the data's shape (:func:`fit_to_data`);
    ``Run.config`` is then the config that was used and ``Run.chosen`` says why.
    """
    from dsm_jax import data as data_lib
    from dsm_jax import noise
    from dsm_jax.models import NoiseConditionalMLP, UNet

    dataset = data_lib.load_dataset(cfg.dataset, num_train=cfg.num_train, num_test=cfg.num_test, seed=cfg.seed)
    chosen = ()
    if user_set is not None:
        cfg, chosen = fit_to_data(cfg, dataset.shape, user_set)
    if dataset.train.shape[0] < cfg.batch_size:
        raise UserError(
            f"batch_size={cfg.batch_size} exceeds the {dataset.train.shape[0]} training examples of "
            f"{cfg.dataset!r}; pass --set batch_size=N with a smaller N."
        )
    if cfg.model == "unet":
        if len(dataset.shape) != 3:
            raise UserError(f"model='unet' needs images [N, H, W, C]; {cfg.dataset!r} has examples of shape {dataset.shape}.")
        levels = len(cfg.channel_mults) - 1
        if dataset.shape[0] % 2**levels or dataset.shape[1] % 2**levels:
            alternative = " or --set model=mlp" if chosen else ""
            raise UserError(
                f"channel_mults={cfg.channel_mults} downsamples {levels} times; image size {dataset.shape[:2]} "
                f"must be divisible by {2 ** levels}; --set channel_mults=...{alternative}."
            )
        model = UNet(channels=cfg.channels, channel_mults=cfg.channel_mults, embedding=cfg.embedding)
    else:
        model = NoiseConditionalMLP(width=cfg.width, depth=cfg.depth, embedding=cfg.embedding,
                                    fourier_scale=cfg.fourier_scale)
    sigma_max = cfg.sigma_max if cfg.sigma_max is not None else float(noise.ncsnv2_sigma_max(dataset.train))
    if sigma_max <= cfg.sigma_min:
        raise UserError(f"sigma_max={sigma_max:g} (from the data) must exceed sigma_min={cfg.sigma_min:g}.")
    sigmas = np.asarray(noise.geometric_sigmas(sigma_max, cfg.sigma_min, cfg.num_sigmas), dtype=np.float32)
    if cfg.step_lr is not None:
        step_lr = cfg.step_lr
    elif cfg.num_sigmas < 2:
        raise UserError("step_lr=None (technique 4) needs num_sigmas >= 2; set step_lr.")
    else:
        step_lr = 2.0 * noise.ncsnv2_step_size(sigmas, cfg.steps_per_sigma)
    return Run(cfg, dataset, model, sigmas, float(step_lr), chosen)


def _load_saved_config(workdir: Path) -> Optional[Config]:
    path = Path(workdir) / "config.json"
    if not path.exists():
        return None
    try:
        return Config.from_dict(json.loads(path.read_text())["config"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a dsm-jax config ({err}).") from None


def _require_run(workdir) -> Config:
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UserError(f"--workdir {os.fspath(workdir)!r} does not exist; train a model first (dsm-jax train --workdir ...).")
    cfg = _load_saved_config(workdir)
    if cfg is None:
        raise UserError(f"--workdir {os.fspath(workdir)!r} holds no config.json; it is not a dsm-jax run.")
    if not (workdir / "checkpoints").is_dir():
        raise UserError(f"--workdir {os.fspath(workdir)!r} holds no checkpoints; train first.")
    return cfg


def load_trained(workdir):
    """``(run, ema_params)`` of a trained work directory (a ``str`` or ``os.PathLike``)."""
    from dsm_jax.checkpoint import load_params

    cfg = _require_run(workdir)
    run = build_run(cfg)
    params = load_params(Path(workdir) / "checkpoints", ema=True)
    _check_params_match(run, params, Path(workdir))
    return run, jax.tree.map(jnp.asarray, params)


def _check_params_match(run: Run, params, workdir: Path) -> None:
    """A UserError when the checkpoint's parameters do not fit the model of config.json (a hand edit)."""
    x = jnp.zeros((1,) + run.dataset.shape, jnp.float32)
    expected = jax.eval_shape(lambda k: run.model.init(k, x, jnp.ones((1,)))["params"], jax.random.key(0))
    want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    if want == got:
        return
    diff = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
    name = diff[0]
    raise UserError(
        f"{os.fspath(workdir / 'config.json')!r} does not match the run's checkpoint (parameter {name}: "
        f"{got.get(name, 'absent')} in the checkpoint, {want.get(name, 'absent')} from config.json); "
        "was it edited? Restore the model settings the run was trained with."
    )


# ---------------------------------------------------------------------------
# Sampling and evaluation
# ---------------------------------------------------------------------------


def draw_samples(run: Run, params, key: jax.Array, num: int, sampler: str):
    """``(samples [num, *D] numpy, nfe)`` with the run's model and the chosen sampler."""
    from dsm_jax import samplers
    from dsm_jax.sde import VESDE

    cfg = run.config
    model_fn = run.model_fn(params)
    shape = (num,) + run.dataset.shape
    k_init, k_run = jax.random.split(key)
    sigma_max, sigma_min = float(run.sigmas[0]), float(run.sigmas[-1])
    if sampler == "ald":
        x0 = sigma_max * jax.random.normal(k_init, shape)
        fn = lambda x0, k: samplers.annealed_langevin(
            model_fn, x0, k, jnp.asarray(run.sigmas), steps_per_sigma=cfg.steps_per_sigma, step_lr=run.step_lr,
            final_denoise=cfg.final_denoise, parameterization=cfg.parameterization,
        )
        samples = jax.block_until_ready(jax.jit(fn)(x0, k_run))
        nfe = len(run.sigmas) * cfg.steps_per_sigma + int(cfg.final_denoise)
        return np.asarray(samples), nfe
    else:
        sde = VESDE(sigma_min=sigma_min, sigma_max=sigma_max)
        x0 = sde.prior_sample(k_init, shape)
        common = dict(final_denoise=cfg.final_denoise, parameterization=cfg.parameterization)
        if sampler == "em":
            fn = lambda x0, k: samplers.euler_maruyama(model_fn, sde, x0, k, num_steps=cfg.sde_steps, **common)
        elif sampler == "pc":
            fn = lambda x0, k: samplers.predictor_corrector(
                model_fn, sde, x0, k, num_steps=cfg.sde_steps, snr=cfg.snr, **common
            )
        else:
            fn = lambda x0, k: samplers.probability_flow_ode(model_fn, sde, x0, **common)
        result = jax.jit(fn)(x0, k_run)
    samples = np.asarray(jax.block_until_ready(result.samples))
    return samples, int(result.nfe)


def evaluate(run: Run, params, samples: np.ndarray, key: jax.Array) -> dict:
    """Sample-quality metrics against held-out data, and the Fisher divergence when the score is known."""
    from dsm_jax import metrics

    test = run.dataset.test
    out: dict = {"num_samples": int(samples.shape[0])}
    finite = np.isfinite(samples.reshape(samples.shape[0], -1)).all(axis=1)
    out["fraction_finite"] = float(finite.mean())
    n = min(samples.shape[0], test.shape[0])
    k_floor, k_sw, k_fisher = jax.random.split(key, 3)
    if n >= 2 and finite.all():
        x, y = jnp.asarray(samples[:n].reshape(n, -1)), jnp.asarray(test[:n].reshape(n, -1))
        train_flat = run.dataset.train.reshape(run.dataset.train.shape[0], -1)
        floor = metrics.mmd2_floor(train_flat, k_floor, n, against=y)
        out["mmd2"] = float(metrics.mmd2(x, y, bandwidth=floor.bandwidth))
        out["mmd2_floor"] = float(floor.floor)
        out["mmd2_over_floor"] = out["mmd2"] / out["mmd2_floor"]
        out["mmd_bandwidth"] = float(floor.bandwidth)
        out["mmd_n"] = int(n)
        out["sliced_wasserstein"] = float(metrics.sliced_wasserstein(x, y, k_sw))
        out["sliced_wasserstein_data_floor"] = float(
            metrics.sliced_wasserstein(jnp.asarray(train_flat[:n]), y, k_sw)
        )
    dist = run.dataset.distribution
    if dist is not None:
        fd = metrics.per_sigma_fisher_divergence(
            run.model_fn(params), dist, jnp.asarray(run.sigmas), k_fisher,
            num_samples=run.config.fisher_samples, parameterization=run.config.parameterization,
        )
        rel = np.asarray(fd.relative, dtype=np.float64)
        out["relative_fisher"] = {f"{s:.4g}": float(r) for s, r in zip(run.sigmas, rel)}
        out["relative_fisher_mean"] = float(rel.mean())
        if finite.all():
            mw = metrics.mode_weights(jnp.asarray(samples), dist)
            out["mode_weights"] = [float(w) for w in np.asarray(mw.weights)]
            out["true_weights"] = [float(w) for w in np.asarray(dist.weights)]
    return out


def _plot_outputs(run: Run, params, samples: np.ndarray, workdir, *, sampler: str, stem: str = "samples") -> list:
    """PNG figures titled by the ``sampler`` that drew ``samples``; skipped with a notice without matplotlib.

    ``stem="samples"`` (the training run's record) also draws the score field
    (2-D) and the loss curves.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _say("  (matplotlib not installed: no figures; pip install 'dsm_jax[plots]')")
        return []
    from dsm_jax import plotting
    from dsm_jax.parameterization import score_from_model

    workdir = Path(workdir)
    written = []
    lo, hi = run.dataset.data_range or (-1.0, 1.0)
    if run.dataset.shape == (2,):
        plotting.plot_samples(samples[np.isfinite(samples).all(axis=1)], run.dataset.test,
                              titles=("held-out data", f"samples ({sampler})"), path=workdir / f"{stem}.png")
        written.append(f"{stem}.png")
        if stem == "samples":
            sigma = float(run.sigmas[-1])
            model_fn = run.model_fn(params)
            score = jax.jit(lambda x: score_from_model(model_fn, x, sigma, parameterization=run.config.parameterization))
            dist = run.dataset.distribution
            plotting.plot_score_field(
                score, log_prob_fn=None if dist is None else jax.jit(dist.convolve(sigma).log_prob),
                data=None if dist is not None else run.dataset.test[:2000],
                title=f"learned score at sigma={sigma:.3g}", path=workdir / "score_field.png",
            )
            written.append("score_field.png")
    elif len(run.dataset.shape) == 3:
        num = min(64, samples.shape[0])
        plotting.plot_image_grid(np.clip(samples[:num], lo, hi), data_range=(lo, hi),
                                 title=f"samples ({sampler})", path=workdir / f"{stem}.png")
        written.append(f"{stem}.png")
    if stem == "samples" and (workdir / "metrics.jsonl").exists():
        try:
            plotting.plot_losses(workdir / "metrics.jsonl", sigmas=list(run.sigmas), path=workdir / "losses.png")
            written.append("losses.png")
        except ValueError:
            pass  # no loss records yet
    import matplotlib.pyplot as plt  # close whatever the helpers left open

    plt.close("all")
    return written


def _sample_and_evaluate(run: Run, params, workdir, *, num: int, sampler: str, seed: int,
                         stem: str = "samples", metrics_name: str = "metrics.json") -> dict:
    """Samples, evaluates and writes ``<stem>.npz``, ``metrics_name`` and the figures.

    Returns the metrics, with ``"files"``: the names of the files written.
    """
    workdir = Path(workdir)
    key = jax.random.fold_in(jax.random.key(seed), 1_000_003)  # sampling stream, disjoint from training steps
    k_sample, k_eval = jax.random.split(key)
    desc = (f"{len(run.sigmas)} levels x {run.config.steps_per_sigma} steps" if sampler == "ald"
            else f"{run.config.sde_steps} steps" if sampler in ("em", "pc") else "adaptive Tsit5")
    _say(f"sampling {num} examples with {sampler} ({desc}) ...")
    t0 = time.perf_counter()
    samples, nfe = draw_samples(run, params, k_sample, num, sampler)
    seconds = time.perf_counter() - t0
    if not np.isfinite(samples).any():
        hint = "a smaller --set step_lr=..." if sampler == "ald" else "another sampler"
        raise UserError(f"the {sampler} sampler diverged: all {num} samples are NaN or Inf; nothing was written; "
                        f"try {hint}.")
    results = evaluate(run, params, samples, k_eval)
    results.update(sampler=sampler, nfe=nfe, sampling_seconds=round(seconds, 3), seed=seed)
    files = []
    if jax.process_index() == 0:
        _write_atomic(workdir / f"{stem}.npz",
                      lambda p: np.savez(open(p, "wb"), samples=samples, nfe=nfe, sampler=sampler, seed=seed))
        _write_json(workdir / metrics_name, results)
        files = [f"{stem}.npz", metrics_name] + _plot_outputs(run, params, samples, workdir, sampler=sampler, stem=stem)
    results["files"] = files
    return results


def _print_metrics(results: dict) -> None:
    """One line per metric, each with what its value means."""
    parts = []
    if "mmd2" in results:
        ratio, n = results["mmd2_over_floor"], results["mmd_n"]
        if ratio < 0:
            verdict = "at the floor: the unbiased estimate is below zero, the samples cannot be told from the data"
        elif ratio <= 3:
            verdict = f"within 3 floors: the samples cannot be told from held-out data at n={n}"
        else:
            verdict = (f"{ratio:.0f} times the spread between two data samples of this size: the samples differ "
                       f"detectably; a fixed error's ratio grows in proportion to n, so compare at equal n")
        parts.append(f"MMD^2 {results['mmd2']:.2e} (two-sample floor {results['mmd2_floor']:.1e}, "
                     f"ratio {ratio:.2f}: {verdict})")
        sw, floor = results["sliced_wasserstein"], results["sliced_wasserstein_data_floor"]
        times = f"{sw / floor:.1f}x " if floor > 0 else ""
        parts.append(f"sliced Wasserstein {sw:.4f} ({times}its floor {floor:.4f}, the distance between two data "
                     f"samples of this size, what a perfect model gives)")
    if "relative_fisher_mean" in results:
        parts.append(f"relative Fisher divergence {results['relative_fisher_mean']:.4f} (mean over the "
                     f"{len(results['relative_fisher'])} levels of E|s_model - s|^2 / E|s|^2 on the noised data: "
                     f"0 is the exact score, 1 as far off as a zero score)")
    if "mode_weights" in results:
        got, truth = results["mode_weights"], results["true_weights"]
        err = max(abs(a - b) for a, b in zip(got, truth))
        shown = (f"{' '.join(f'{w:.3f}' for w in got)} (truth {' '.join(f'{w:.3f}' for w in truth)}; "
                 if len(got) <= 8 else f"of {len(got)} modes (")
        parts.append(f"mode weights {shown}largest error {err:.3f}; each sample counted for its likeliest mode)")
    if results.get("fraction_finite", 1.0) < 1.0:
        parts.append(f"WARNING: only {100 * results['fraction_finite']:.1f}% of samples are finite")
    for p in parts:
        _say("  " + p)


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def _parse_sets(items: Sequence[str]) -> dict:
    out = {}
    for item in items or ():
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}.")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _config_sources(args) -> tuple:
    """``(fields of --config, {field: text} of --set and the --dataset/--num-steps/--seed/--sampler flags)``."""
    path = getattr(args, "config", None)
    file_fields = config_lib.read_config_file(path) if path else {}
    overrides = _parse_sets(args.set)
    for flag, field in (("dataset", "dataset"), ("num_steps", "num_steps"), ("seed", "seed"), ("sampler", "sampler")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[field] = str(value)
    return file_fields, overrides


def resolve_config(args) -> Config:
    """The preset, then the fields of ``--config FILE``, then the flags and ``--set`` (the last one wins)."""
    file_fields, overrides = _config_sources(args)
    cfg = config_lib.get_preset(args.preset)
    if file_fields:
        try:
            cfg = Config.from_dict({**cfg.to_dict(), **file_fields})
        except ValueError as err:
            raise UserError(f"--config {os.fspath(args.config)!r}: {err}") from None
    return config_lib.apply_overrides(cfg, overrides)


def _user_set(args) -> frozenset:
    """The config fields the user gave (in ``--config`` or on the command line), not taken from a preset."""
    file_fields, overrides = _config_sources(args)
    return frozenset(file_fields) | frozenset(overrides)


def _default_workdir(preset: str, cfg: Config) -> Path:
    """``runs/<preset>`` for the preset's own dataset, ``runs/<preset>-<dataset name or file stem>`` otherwise."""
    if cfg.dataset == config_lib.get_preset(preset).dataset:
        return Path("runs", preset)
    return Path("runs", f"{preset}-{Path(cfg.dataset).stem}")


# ---------------------------------------------------------------------------
# The work directory, phases and interrupts
# ---------------------------------------------------------------------------

# What a command is doing, kept in ``args.phase``: a ValueError is a user mistake only while
# "checking" (nothing has been changed yet); later, only a UserError is (anything else is a bug).
_CHECKING, _PREPARING, _TRAINING, _SAMPLING = "checking", "preparing", "training", "sampling"


class _Interrupted(KeyboardInterrupt):
    """A signal ended the command; ``line`` says what was kept."""

    def __init__(self, line: str, signum: int):
        super().__init__(line)
        self.line, self.signum = line, int(signum)


def _signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _names(names: Sequence[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _lock_workdir(stack: ExitStack, workdir: Path, command: str) -> Optional[workdir_lib.WorkdirLock]:
    """Locks ``workdir`` until ``stack`` closes (process 0 of a multi-host run only; others get None)."""
    if jax.process_index() != 0:
        return None
    try:
        return stack.enter_context(workdir_lib.WorkdirLock(workdir, command=command))
    except workdir_lib.WorkdirLocked as err:
        raise UserError(str(err)) from None


def _interrupt_cleanups(workdir: Path, lock: Optional[workdir_lib.WorkdirLock]) -> list:
    """What to undo before exiting on a signal: this process's temporaries, then the lock."""
    out = [lambda: workdir_lib.remove_tmp_files(workdir)]
    if lock is not None:
        out.append(lock.release)
    return out


def _checkpoint_steps(workdir: Path) -> list:
    """The steps of the checkpoints in ``workdir/checkpoints``, ascending (orbax names them by step)."""
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def _check_not_a_file(workdir: Path) -> None:
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {os.fspath(workdir)!r} is a file, not a directory; choose another --workdir.")


def _plan_workdir(workdir: Path, cfg: Config, overwrite: bool) -> tuple:
    """What ``train`` would do with ``workdir``, changing nothing: ``(action, note)``.

    ``action`` is "new" (absent or empty), "resume" (a run with the same
    training config, also under ``--overwrite``) or "clear" (delete the run
    files, :data:`dsm_jax.workdir.RUN_FILES`: a run with another config under
    ``--overwrite``, or one that never wrote a checkpoint). ``note`` is a line
    to print, or None.

    Raises:
        UserError: ``workdir`` is a file; holds no run but other files; holds a
            run with another config and checkpoints without ``--overwrite``; or
            would have to be cleared while it holds files no run wrote (named).
    """
    where = f"--workdir {os.fspath(workdir)!r}"
    _check_not_a_file(workdir)
    if not workdir.is_dir() or not [e for e in workdir.iterdir() if e.name != workdir_lib.LOCK_NAME]:
        return "new", None
    foreign = workdir_lib.foreign_entries(workdir)
    saved = None if "config.json" in foreign else _load_saved_config(workdir)
    if saved is None:
        if foreign:
            raise UserError(f"{where} exists, is not empty and holds no dsm-jax run ({_names(foreign)}); "
                            "choose another --workdir (nothing was changed).")
        if not overwrite:
            raise UserError(f"{where} holds files of a dsm-jax run but no config.json; pass --overwrite to delete "
                            "them or choose another --workdir.")
        return "clear", "deleting the files of a run without config.json (--overwrite)"
    diffs = config_lib.training_differences(saved, cfg)
    if not diffs:
        return "resume", ("--overwrite: the run there has the same training config; resuming it (nothing deleted)"
                          if overwrite else None)
    shown = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, a, b in diffs[:4])
    steps = _checkpoint_steps(workdir)
    if steps and not overwrite:
        raise UserError(f"{where} holds a run with a different config ({shown}); "
                        "pass --overwrite to start over or choose another --workdir.")
    if foreign:
        raise UserError(f"{where} holds a run with a different config ({shown}) and also files no dsm-jax run "
                        f"wrote ({_names(foreign)}); nothing was deleted: move them away or choose another --workdir.")
    return "clear", (f"deleting the run there, whose config differs ({shown}; --overwrite)" if steps else
                     "replacing the run there, which has a different config and no checkpoint")


def _prepare_workdir(workdir: Path, cfg: Config, overwrite: bool,
                     lock: Optional[workdir_lib.WorkdirLock] = None) -> str:
    """Under the lock, resumes or starts ``workdir``, clearing only run files; returns "new" or "resume".

    The plan is made again here, under the lock, so that it matches what is
    on disk now. The directory itself is never removed (it may be the
    current directory, a parent of it, or the home directory).
    """
    action, note = _plan_workdir(workdir, cfg, overwrite)
    if note:
        _say(f"{workdir}: {note}")
    if action == "clear" and jax.process_index() == 0:
        try:
            workdir_lib.clear_run_files(workdir, keep=None if lock is None else lock.path)
        except ValueError as err:  # refused before deleting anything
            raise UserError(str(err)) from None
    workdir.mkdir(parents=True, exist_ok=True)
    return "resume" if action == "resume" else "new"


def _check_config(cfg: Config) -> None:
    """What a config alone shows cannot train: checked before any data is loaded."""
    if cfg.num_sigmas < 2:
        raise UserError(f"num_sigmas={cfg.num_sigmas} cannot work: the noise grid runs from sigma_max to sigma_min "
                        "and needs at least 2 levels; pass --set num_sigmas=N with N >= 2.")


def _check_trainable(run: Run, *, sample: bool) -> None:
    """The checks of what would otherwise fail late: the devices, the held-out data to evaluate against."""
    cfg = run.config
    if cfg.batch_size % jax.device_count():
        raise UserError(f"batch_size={cfg.batch_size} must be divisible by the {jax.device_count()} devices.")
    num_test = run.dataset.test.shape[0]
    if sample and num_test < 2:
        total = num_test + run.dataset.train.shape[0]
        how = f"num_test={cfg.num_test}" if cfg.num_test is not None else "by default 10% of a user array's rows"
        raise UserError(f"{cfg.dataset!r} leaves {num_test} held-out examples of {total} ({how}); evaluation after "
                        "training needs at least 2: pass --set num_test=N with N >= 2, or --no-sample.")


def _training_interrupted(err: BaseException, workdir: Path) -> BaseException:
    """The one-line report of a signal during ``train()``: whether and at which step it checkpointed.

    ``train()`` checkpoints the current step, then raises ``TrainingInterrupted``
    (SIGINT) or ``TrainingTerminated`` (SIGTERM, a ``SystemExit(143)``); a signal
    before its loop (during the restore or the first compilation) arrives as a
    bare interrupt, and nothing was saved for it.
    """
    from dsm_jax.train import TrainingInterrupted, TrainingTerminated

    if isinstance(err, (TrainingInterrupted, TrainingTerminated)):
        signum = signal.SIGINT if isinstance(err, TrainingInterrupted) else signal.SIGTERM
        return _Interrupted(f"interrupted ({_signal_name(signum)}) at step {err.saved_step}, which was checkpointed; "
                            "re-run the same command to resume.", signum)
    if isinstance(err, SystemExit):
        return err
    signum = getattr(err, "signum", signal.SIGINT)
    steps = _checkpoint_steps(workdir)
    if steps:
        line = (f"interrupted ({_signal_name(signum)}) before this session's first checkpoint; the checkpoint of "
                f"step {steps[-1]} is kept; re-run the same command to resume.")
    else:
        line = f"interrupted ({_signal_name(signum)}) before the first checkpoint; re-run the same command to start again."
    return _Interrupted(line, signum)


def _sampling_interrupted_line(command: str, workdir: Path) -> str:
    kept = ("the trained checkpoints are kept; 'dsm-jax evaluate --workdir " + os.fspath(workdir) + "' samples again"
            if command == "train" else "every file already in the work directory is intact")
    return f"dsm-jax {command}: interrupted while sampling; nothing of this sampling was written, {kept}."


def cmd_train(args) -> int:
    from dsm_jax.data import BatchSource
    from dsm_jax.models import init_params
    from dsm_jax.train import ConfigMismatchError, make_dsm_loss_fn, make_optimizer, train

    if args.list_keys:
        return _list_keys()
    cfg = resolve_config(args)
    workdir = Path(args.workdir) if args.workdir else _default_workdir(args.preset, cfg)
    with ExitStack() as stack:
        # An existing directory is locked before it is inspected, so that it cannot change between the
        # checks and the writes; a new one is only created once every check has passed.
        lock = _lock_workdir(stack, workdir, "train") if workdir.is_dir() else None
        _check_not_a_file(workdir)
        _check_config(cfg)
        run = build_run(cfg, user_set=_user_set(args))
        cfg = run.config
        _plan_workdir(workdir, cfg, args.overwrite)
        _check_trainable(run, sample=not args.no_sample)
        params = init_params(run.model, jax.random.key(cfg.seed), jnp.asarray(run.dataset.train[:1]))
        n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
        loss_fn = make_dsm_loss_fn(
            run.model, jnp.asarray(run.sigmas), weighting=cfg.weighting, parameterization=cfg.parameterization,
            sigma_sampling=cfg.sigma_sampling, scale_by_sigma=cfg.scale_by_sigma,
        )
        optimizer = make_optimizer(cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                                   grad_clip_norm=cfg.grad_clip_norm)
        batches = BatchSource(run.dataset.train, cfg.batch_size, seed=cfg.seed)
        args.phase = _PREPARING
        if lock is None:
            workdir.mkdir(parents=True, exist_ok=True)
            lock = _lock_workdir(stack, workdir, "train")
        what = _prepare_workdir(workdir, cfg, args.overwrite, lock)
        # config.json is written once the run really starts: a failed check above leaves none behind.
        if jax.process_index() == 0:
            _write_atomic(workdir / "config.json", lambda p: p.write_text(config_lib.dumps(cfg, run.resolved)))
        args.phase = _TRAINING
        _say(f"{'resuming' if what == 'resume' else 'training'} in {workdir}: "
             f"{run.dataset.description or cfg.dataset}; {cfg.model} ({n_params:,} parameters); "
             f"{len(run.sigmas)} sigmas {run.sigmas[0]:.3g} -> {run.sigmas[-1]:.3g}; {cfg.num_steps} steps of "
             f"batch {cfg.batch_size} on {jax.local_device_count()} {jax.default_backend()} device(s)")
        for sentence in run.chosen:
            _say(f"  {sentence}")
        t0 = time.perf_counter()
        try:
            state = train(
                loss_fn, params, batches, workdir=workdir,
                num_steps=cfg.num_steps, optimizer=optimizer, seed=cfg.seed, ema_decay=cfg.ema_decay,
                steps_per_call=cfg.steps_per_call, save_every=cfg.save_every, keep=cfg.keep,
                log_every=cfg.log_every, config=config_lib.training_fields(cfg), quiet=args.quiet,
            )
        except (KeyboardInterrupt, SystemExit) as err:
            raise _training_interrupted(err, workdir) from None
        except ConfigMismatchError as err:
            # The checkpoint was saved with another training config than config.json's (a hand edit,
            # or a directory replaced under a live run): the user's to sort out, not a bug.
            raise UserError(str(err)) from None
        _say(f"trained to step {int(state.step)} in {time.perf_counter() - t0:.1f} s")
        if args.no_sample:
            return 0
        args.phase = _SAMPLING
        params = jax.tree.map(jnp.asarray, state.ema_params)
        results = call_interruptibly(
            lambda: _sample_and_evaluate(run, params, workdir, num=cfg.num_samples, sampler=cfg.sampler,
                                         seed=cfg.seed),
            message=_sampling_interrupted_line("train", workdir), cleanups=_interrupt_cleanups(workdir, lock),
        )
    _print_metrics(results)
    _say(f"wrote {workdir}/: checkpoints/, config.json, metrics.jsonl, {', '.join(results['files'])}")
    return 0


def _sample_command(args, *, evaluate_run: bool) -> int:
    """``sample`` and ``evaluate``: files named after what drew them, the training run's record kept.

    * ``sample``: ``samples_<sampler>_n<num>_seed<seed>.npz``, ``..._metrics.json`` and ``.png``.
    * ``evaluate`` with the training run's sampler, size and seed: recomputes
      ``metrics.json``, ``samples.npz`` and the figures, and says whether the
      metrics changed; with any other: ``eval_<sampler>_n<num>_seed<seed>.json``,
      ``.npz`` and ``.png``, leaving the training run's files alone.
    """
    workdir = Path(args.workdir)
    with ExitStack() as stack:
        # sample and evaluate write into the run directory: one writer at a time.
        lock = _lock_workdir(stack, workdir, args.command) if workdir.is_dir() else None
        run, params = load_trained(workdir)
        cfg = run.config
        sampler = args.sampler or cfg.sampler
        num = cfg.num_samples if args.num is None else args.num
        seed = cfg.seed if args.seed is None else args.seed
        tag = f"{sampler}_n{num}_seed{seed}"
        previous = None
        if not evaluate_run:
            names = {"stem": f"samples_{tag}", "metrics_name": f"samples_{tag}_metrics.json"}
        elif (sampler, num, seed) != (cfg.sampler, cfg.num_samples, cfg.seed):
            names = {"stem": f"eval_{tag}", "metrics_name": f"eval_{tag}.json"}
            _say(f"{sampler}, {num} samples, seed {seed} differ from the training run's {cfg.sampler}, "
                 f"{cfg.num_samples} samples, seed {cfg.seed}: its metrics.json and samples are kept")
        else:
            names = {}
            if (workdir / "metrics.json").exists():
                previous = json.loads((workdir / "metrics.json").read_text())
        args.phase = _SAMPLING
        results = call_interruptibly(
            lambda: _sample_and_evaluate(run, params, workdir, num=num, sampler=sampler, seed=seed, **names),
            message=_sampling_interrupted_line(args.command, workdir), cleanups=_interrupt_cleanups(workdir, lock),
        )
    _print_metrics(results)
    if previous is not None:
        changed = [k for k in sorted(set(previous) | set(results))
                   if k not in ("sampling_seconds", "files") and previous.get(k) != results.get(k)]
        _say("  metrics.json: the same values as before (same sampler, size and seed as training)" if not changed
             else f"  metrics.json: recomputed with the training run's sampler, size and seed; changed: "
             + ", ".join(f"{k} {previous.get(k)!r} -> {results.get(k)!r}" for k in changed[:6]))
    _say(f"wrote {workdir}/: {', '.join(results['files'])} ({results['nfe']} model evaluations per sample)")
    return 0


def cmd_sample(args) -> int:
    return _sample_command(args, evaluate_run=False)


def cmd_evaluate(args) -> int:
    return _sample_command(args, evaluate_run=True)


def cmd_denoise(args) -> int:
    from dsm_jax.data import load_array
    from dsm_jax.tweedie import denoise

    workdir = Path(args.workdir)
    if not (isinstance(args.sigma, float) and math.isfinite(args.sigma) and args.sigma > 0):
        raise UserError(f"--sigma must be a positive number, got {args.sigma!r}.")
    inp, outp = Path(args.input), Path(args.output)
    if outp.suffix != ".npy":
        raise UserError(f"--output must be a .npy path, got {args.output!r}.")
    if outp.is_dir():
        raise UserError(f"--output {args.output!r} is a directory; give the path of a .npy file to write.")
    if outp.exists() and inp.exists() and outp.resolve() == inp.resolve():
        raise UserError(f"--output {args.output!r} is the input file; choose another path.")
    if not outp.parent.is_dir():
        raise UserError(f"--output directory {os.fspath(outp.parent)!r} does not exist.")
    y = load_array(inp)
    with ExitStack() as stack:
        # denoise only reads the run (read-only restore, safe beside a live run); it locks the
        # run directory only when it writes its output there.
        inside = workdir.is_dir() and workdir.resolve() in outp.resolve().parents
        lock = _lock_workdir(stack, workdir, "denoise") if inside else None
        run, params = load_trained(workdir)
        shape = run.dataset.shape
        single = tuple(y.shape) == shape
        if single:
            y = y[None]
        if tuple(y.shape[1:]) != shape:
            dims = ", ".join(map(str, shape))
            raise UserError(f"--input has shape {tuple(y.shape)}; the model expects [N, {dims}].")
        model_fn = run.model_fn(params)
        fn = jax.jit(lambda y: denoise(model_fn, y, args.sigma, parameterization=run.config.parameterization))
        chunk = 1024

        def work():
            out = np.concatenate([np.asarray(fn(jnp.asarray(y[i:i + chunk]))) for i in range(0, y.shape[0], chunk)])
            _write_atomic(outp, lambda p: np.save(open(p, "wb"), (out[0] if single else out).astype(np.float32)))

        args.phase = _SAMPLING
        call_interruptibly(work, message=f"dsm-jax denoise: interrupted; {outp} was not written (nor changed).",
                           cleanups=_interrupt_cleanups(outp.parent, lock))
    _say(f"denoised {y.shape[0]} example(s) at sigma={args.sigma:g} (Tweedie: x + sigma^2 s(x, sigma)); wrote {outp}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (no usage block), exit status 2 as usual."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int, what: str):
    """An argparse ``type=`` for integers >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def build_parser() -> argparse.ArgumentParser:
    presets = ", ".join(config_lib.PRESETS)
    parser = _Parser(
        prog="dsm-jax",
        description="Score-based generative modelling with denoising score matching (JAX).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--distributed", action="store_true",
                        help="multi-host: call jax.distributed.initialize() first (arguments detected on TPU pods, "
                        "Slurm and Open MPI, or given below)")
    parser.add_argument("--coordinator-address", dest="coordinator_address", help="host:port of process 0")
    parser.add_argument("--num-processes", dest="num_processes", type=int)
    parser.add_argument("--process-id", dest="process_id", type=int)
    sub = parser.add_subparsers(dest="command", metavar="{train,sample,evaluate,denoise}")
    sub.required = True

    t = sub.add_parser("train", help="train (or resume) a score model, then sample and evaluate",
                       description="Train a noise-conditional score model with multi-scale DSM, then sample, "
                       "evaluate and plot. Re-running on the same --workdir resumes. Every config field can be "
                       "set with --set key=value or a --config file; --list-keys lists them. Unless set, the "
                       "model is chosen by the data's shape: images [N, H, W, C] get the U-Net, vectors the MLP.")
    t.add_argument("--preset", default="default", help=f"named config: {presets} (default: default)")
    t.add_argument("--dataset", help="a built-in dataset or a path to a .npy/.npz array [N, ...]")
    t.add_argument("--workdir", help="run directory (default: runs/<preset> for the preset's dataset, "
                   "runs/<preset>-<dataset> for another)")
    t.add_argument("--num-steps", type=_non_negative_int, dest="num_steps", help="training steps")
    t.add_argument("--seed", type=_non_negative_int, help="run seed")
    t.add_argument("--sampler", choices=config_lib.SAMPLERS, help="sampler for the final samples")
    t.add_argument("--config", metavar="FILE",
                   help="JSON config fields, applied after --preset and before --set: a run's config.json "
                   "(reproduces it) or {\"key\": value, ...}")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a config field (repeatable), e.g. --set learning_rate=3e-4; --list-keys lists them")
    t.add_argument("--overwrite", action="store_true",
                   help="if the run in --workdir has another training config, delete its files (only those "
                   "a run writes; refused if the directory holds others); with the same config, resume")
    t.add_argument("--no-sample", action="store_true", dest="no_sample", help="train only")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--list", action="store_true", help="list presets and datasets, then exit")
    t.add_argument("--list-keys", action="store_true", dest="list_keys",
                   help="list every config key with its type, default and meaning, then exit")

    for name, help_ in (("sample", "draw samples from a trained run into samples_<sampler>_n<num>_seed<seed>.*"),
                        ("evaluate", "sample and evaluate a trained run: with its own sampler, --num and --seed "
                         "recompute metrics.json, with others write eval_<sampler>_n<num>_seed<seed>.*")):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--workdir", required=True)
        p.add_argument("--num", type=_positive_int, help="number of samples (default: the run's num_samples)")
        p.add_argument("--sampler", choices=config_lib.SAMPLERS,
                       help="ald (annealed Langevin), em (reverse SDE), pc (predictor-corrector), ode (probability flow)")
        p.add_argument("--seed", type=_non_negative_int, help="sampling seed (default: the run's seed)")

    d = sub.add_parser("denoise", help="Tweedie-denoise noisy arrays with a trained run",
                       description="E[x | y] = y + sigma^2 s(y, sigma) for y = x + sigma * noise.")
    d.add_argument("--workdir", required=True)
    d.add_argument("--input", required=True, help=".npy/.npz float array [N, *D] (or one image [H, W, C])")
    d.add_argument("--sigma", type=float, required=True, help="noise standard deviation of the input")
    d.add_argument("--output", required=True, help=".npy path to write")
    return parser


def _list() -> int:
    from dsm_jax.data import DATASETS

    print("presets:")
    for name, cfg in config_lib.PRESETS.items():
        print(f"  {name:14s} dataset={cfg.dataset}, model={cfg.model}, {cfg.num_steps} steps")
    print("datasets:")
    for name, desc in DATASETS.items():
        print(f"  {name:14s} {desc}")
    print("  PATH.npy/.npz  your own float array: vectors [N, d] (MLP) or images [N, H, W, C] in [-1, 1] (U-Net)")
    print("config keys: dsm-jax train --list-keys")
    return 0


def _list_keys() -> int:
    print("config keys (--set key=value, or a --config JSON file); name, type, default, meaning:")
    for name, type_name, default, meaning in config_lib.describe_fields():
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
        print(f"  {name:17s} {type_name:14s} {shown:16s} {meaning}")
    return 0


def _os_error_line(err: OSError) -> str:
    """``<reason>: <path>`` of an OSError, naming the destination of an atomic write, not its temporary."""
    path = err.filename if err.filename is not None else err.filename2
    if path is None:
        return str(err)
    path = Path(os.fsdecode(path))
    if path.name.startswith(".") and f".tmp{os.getpid()}" in path.name:
        path = path.with_name(path.name[1:].split(f".tmp{os.getpid()}")[0])
    return f"{err.strerror or type(err).__name__}: {os.fspath(path)!r}"


_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG)


def _storage_error_line(err: BaseException) -> Optional[str]:
    """The one line of a failed write reported by a library as another exception, or None.

    orbax (through tensorstore) reports a full disk or a read-only file system
    as ``ValueError: RESOURCE_EXHAUSTED: ... at local file "<path>" ...
    [os_error_code='28']``; the operating system's errno and the path are
    taken from the message (and from chained exceptions).
    """
    while err is not None:
        if isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS:
            return _os_error_line(err)
        match = re.search(r"os_error_code='?(\d+)", str(err))
        if match:
            where = re.search(r'local file "([^"]+)"', str(err))
            path = where.group(1) if where else None
            if path and "/checkpoints/" in path:
                path = path[: path.index("/checkpoints/") + len("/checkpoints")]
            return f"{os.strerror(int(match.group(1)))} while writing {path!r}" if path else os.strerror(
                int(match.group(1)))
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return None


def _interrupt_line(args, err: KeyboardInterrupt) -> tuple:
    """``(line, exit status)`` for a signal that ended the command outside the sections that report it."""
    if isinstance(err, _Interrupted):
        return err.line, 128 + err.signum
    signum = getattr(err, "signum", signal.SIGINT)
    phase = getattr(args, "phase", _CHECKING)
    what = {_CHECKING: "before anything was changed", _PREPARING: "while preparing the work directory; re-run the "
            "same command", _TRAINING: "during training; re-run the same command to resume from the last checkpoint",
            _SAMPLING: "while sampling; every file already written is intact"}[phase]
    return f"interrupted ({_signal_name(signum)}) {what}.", 128 + signum


class _QuietLibraryErrors:
    """Drops orbax's background reports of a failed write while a command runs (not under ``--debug``).

    When a checkpoint write fails (a full disk), orbax logs the error from each
    of its writer threads through absl, and tensorstore's late completions
    report "Event loop is closed" as unraisable exceptions; the same error is
    raised to the command, which reports it in one line, so both are noise.
    """

    def __init__(self, enabled: bool):
        self.enabled, self.failed = enabled, False

    @staticmethod
    def filter(record) -> bool:
        return False

    def __enter__(self):
        if self.enabled:
            from dsm_jax.checkpoint import _DropClosedLoopErrors

            self._closed_loop = _DropClosedLoopErrors()
            logging.getLogger("absl").addFilter(self.filter)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._closed_loop.remove(grace_seconds=0.2 if self.failed else 0.0)
            logging.getLogger("absl").removeFilter(self.filter)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status.

    0 success; 1 a non-finite loss (or an internal error, raised with its
    traceback); 2 a user mistake in one line: a :class:`UserError` at any
    time, a ``ValueError`` raised while the command checks its inputs (before
    it changes anything; later ones are bugs and keep their traceback), or an
    ``OSError`` naming the path (read-only, disk full, not a directory...);
    130 SIGINT, 143 SIGTERM.
    """
    parser = build_parser()
    if argv is None:
        argv = sys.argv[1:]
    if not argv:
        argv = ["--help"]
    args = parser.parse_args(argv)
    args.phase = _CHECKING
    debug = args.debug or os.environ.get("DSM_JAX_DEBUG", "") not in ("", "0")
    from dsm_jax.train import NonFiniteError

    def fail(kind: str, msg: str, status: int) -> int:
        quiet.failed = True
        print(f"dsm-jax {args.command}: {kind}: {msg}", file=sys.stderr)
        return status

    with raise_on_sigterm(), _QuietLibraryErrors(enabled=not debug) as quiet:
        try:
            if args.distributed:
                jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                           num_processes=args.num_processes, process_id=args.process_id)
            if args.command == "train" and args.list:
                return _list()
            return {"train": cmd_train, "sample": cmd_sample, "evaluate": cmd_evaluate, "denoise": cmd_denoise}[
                args.command](args)
        except ValueError as err:
            if debug:
                raise
            storage = _storage_error_line(err)
            if storage is not None:
                return fail("error", storage, EXIT_USER_ERROR)
            if not (isinstance(err, UserError) or args.phase == _CHECKING):
                raise
            return fail("error", str(err).splitlines()[0] if str(err) else type(err).__name__, EXIT_USER_ERROR)
        except OSError as err:
            if debug:
                raise
            return fail("error", _os_error_line(err), EXIT_USER_ERROR)
        except NonFiniteError as err:
            if debug:
                raise
            return fail("training stopped", str(err), EXIT_NONFINITE)
        except KeyboardInterrupt as err:
            line, status = _interrupt_line(args, err)
            print(f"dsm-jax {args.command}: {line}", file=sys.stderr)
            return status


def entry_point() -> None:
    sys.exit(main())


__all__ = ["main", "build_run", "draw_samples", "evaluate", "load_trained"]
