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

User mistakes (an unknown preset or dataset, a bad path or value) print one
line and exit with status 2; ``--debug`` (or ``DSM_JAX_DEBUG=1``) shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax import config as config_lib
from dsm_jax.config import Config

EXIT_USER_ERROR = 2
EXIT_NONFINITE = 1
EXIT_INTERRUPTED = 130


class UserError(ValueError):
    """A mistake in the command line or its inputs: reported in one line."""


def _say(*args) -> None:
    if jax.process_index() == 0:
        print(*args, flush=True)


def _write_atomic(path: Path, write) -> None:
    """Writes through ``write(tmp_path)`` then renames, so ``path`` is never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
    return run, jax.tree.map(jnp.asarray, params)


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


def _prepare_workdir(workdir: Path, cfg: Config, overwrite: bool) -> str:
    """Creates, resumes or (with ``--overwrite``) clears the work directory; returns what happened."""
    saved = _load_saved_config(workdir) if workdir.is_dir() else None
    if workdir.is_dir() and saved is None and any(workdir.iterdir()):
        raise UserError(
            f"--workdir {os.fspath(workdir)!r} exists, is not empty and holds no dsm-jax run; "
            "choose another --workdir (nothing was changed)."
        )
    if saved is not None:
        diffs = config_lib.training_differences(saved, cfg)
        if diffs and not overwrite:
            shown = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, a, b in diffs[:4])
            raise UserError(
                f"--workdir {os.fspath(workdir)!r} holds a run with a different config ({shown}); "
                "pass --overwrite to start over or choose another --workdir."
            )
        if diffs or overwrite:
            if jax.process_index() == 0:
                shutil.rmtree(workdir)
            saved = None
    workdir.mkdir(parents=True, exist_ok=True)
    return "resume" if saved is not None else "new"


def cmd_train(args) -> int:
    from dsm_jax.models import init_params
    from dsm_jax.data import BatchSource
    from dsm_jax.train import make_dsm_loss_fn, make_optimizer, train

    if args.list_keys:
        return _list_keys()
    cfg = resolve_config(args)
    workdir = Path(args.workdir) if args.workdir else _default_workdir(args.preset, cfg)
    run = build_run(cfg, user_set=_user_set(args))
    cfg = run.config
    what = _prepare_workdir(workdir, cfg, args.overwrite)
    if jax.process_index() == 0:
        _write_atomic(workdir / "config.json", lambda p: p.write_text(config_lib.dumps(cfg, run.resolved)))
    n_params = None
    params = init_params(run.model, jax.random.key(cfg.seed), jnp.asarray(run.dataset.train[:1]))
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    _say(f"{'resuming' if what == 'resume' else 'training'} in {workdir}: {run.dataset.description or cfg.dataset}; "
         f"{cfg.model} ({n_params:,} parameters); {len(run.sigmas)} sigmas "
         f"{run.sigmas[0]:.3g} -> {run.sigmas[-1]:.3g}; {cfg.num_steps} steps of batch {cfg.batch_size} "
         f"on {jax.local_device_count()} {jax.default_backend()} device(s)")
    for sentence in run.chosen:
        _say(f"  {sentence}")
    loss_fn = make_dsm_loss_fn(
        run.model, jnp.asarray(run.sigmas), weighting=cfg.weighting, parameterization=cfg.parameterization,
        sigma_sampling=cfg.sigma_sampling, scale_by_sigma=cfg.scale_by_sigma,
    )
    if cfg.batch_size % jax.device_count():
        raise UserError(f"batch_size={cfg.batch_size} must be divisible by the {jax.device_count()} devices.")
    optimizer = make_optimizer(cfg.learning_rate, warmup_steps=cfg.warmup_steps, grad_clip_norm=cfg.grad_clip_norm)
    t0 = time.perf_counter()
    state = train(
        loss_fn, params, BatchSource(run.dataset.train, cfg.batch_size, seed=cfg.seed), workdir=workdir,
        num_steps=cfg.num_steps, optimizer=optimizer, seed=cfg.seed, ema_decay=cfg.ema_decay,
        steps_per_call=cfg.steps_per_call, save_every=cfg.save_every, keep=cfg.keep, log_every=cfg.log_every,
        config=config_lib.training_fields(cfg), quiet=args.quiet,
    )
    _say(f"trained to step {int(state.step)} in {time.perf_counter() - t0:.1f} s")
    if args.no_sample:
        return 0
    params = jax.tree.map(jnp.asarray, state.ema_params)
    results = _sample_and_evaluate(run, params, workdir, num=cfg.num_samples, sampler=cfg.sampler, seed=cfg.seed)
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
    run, params = load_trained(workdir)
    cfg = run.config
    sampler = args.sampler or cfg.sampler
    num = args.num or cfg.num_samples
    seed = cfg.seed if args.seed is None else args.seed
    tag = f"{sampler}_n{num}_seed{seed}"
    previous = None
    if not evaluate_run:
        names = {"stem": f"samples_{tag}", "metrics_name": f"samples_{tag}_metrics.json"}
    elif (sampler, num, seed) != (cfg.sampler, cfg.num_samples, cfg.seed):
        names = {"stem": f"eval_{tag}", "metrics_name": f"eval_{tag}.json"}
        _say(f"{sampler}, {num} samples, seed {seed} differ from the training run's {cfg.sampler}, {cfg.num_samples} "
             f"samples, seed {cfg.seed}: its metrics.json and samples are kept")
    else:
        names = {}
        if (workdir / "metrics.json").exists():
            previous = json.loads((workdir / "metrics.json").read_text())
    results = _sample_and_evaluate(run, params, workdir, num=num, sampler=sampler, seed=seed, **names)
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
    if outp.exists() and inp.exists() and outp.resolve() == inp.resolve():
        raise UserError(f"--output {args.output!r} is the input file; choose another path.")
    if not outp.parent.is_dir():
        raise UserError(f"--output directory {os.fspath(outp.parent)!r} does not exist.")
    y = load_array(inp)
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
    out = np.concatenate([np.asarray(fn(jnp.asarray(y[i:i + chunk]))) for i in range(0, y.shape[0], chunk)])
    if single:
        out = out[0]
    _write_atomic(outp, lambda p: np.save(open(p, "wb"), out.astype(np.float32)))
    _say(f"denoised {y.shape[0]} example(s) at sigma={args.sigma:g} (Tweedie: x + sigma^2 s(x, sigma)); wrote {outp}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    presets = ", ".join(config_lib.PRESETS)
    parser = argparse.ArgumentParser(
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
    t.add_argument("--num-steps", type=int, dest="num_steps", help="training steps")
    t.add_argument("--seed", type=int, help="run seed")
    t.add_argument("--sampler", choices=config_lib.SAMPLERS, help="sampler for the final samples")
    t.add_argument("--config", metavar="FILE",
                   help="JSON config fields, applied after --preset and before --set: a run's config.json "
                   "(reproduces it) or {\"key\": value, ...}")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a config field (repeatable), e.g. --set learning_rate=3e-4; --list-keys lists them")
    t.add_argument("--overwrite", action="store_true", help="delete the run in --workdir if its config differs")
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
        p.add_argument("--num", type=int, help="number of samples (default: the run's num_samples)")
        p.add_argument("--sampler", choices=config_lib.SAMPLERS,
                       help="ald (annealed Langevin), em (reverse SDE), pc (predictor-corrector), ode (probability flow)")
        p.add_argument("--seed", type=int, help="sampling seed (default: the run's seed)")

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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (0 success, 1 non-finite training, 2 user error, 130 interrupted)."""
    parser = build_parser()
    if argv is None:
        argv = sys.argv[1:]
    if not argv:
        argv = ["--help"]
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("DSM_JAX_DEBUG", "") not in ("", "0")
    from dsm_jax.train import NonFiniteError

    try:
        if args.distributed:
            jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                       num_processes=args.num_processes, process_id=args.process_id)
        if args.command == "train" and args.list:
            return _list()
        return {"train": cmd_train, "sample": cmd_sample, "evaluate": cmd_evaluate, "denoise": cmd_denoise}[
            args.command](args)
    except (ValueError, FileNotFoundError) as err:
        if debug:
            raise
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"dsm-jax {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR
    except NonFiniteError as err:
        if debug:
            raise
        print(f"dsm-jax {args.command}: training stopped: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except KeyboardInterrupt:
        print("\ndsm-jax: interrupted; the current step was checkpointed, re-run the same command to resume.",
              file=sys.stderr)
        return EXIT_INTERRUPTED


def entry_point() -> None:
    sys.exit(main())


__all__ = ["main", "build_run", "draw_samples", "evaluate", "load_trained"]
