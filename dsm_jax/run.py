"""The application layer of ``dsm-jax``: build, train, load, sample and evaluate a run.

A *run* is a :class:`~dsm_jax.config.Config` made concrete: the data, the
model, the noise grid and the Langevin step (:class:`Run`, :func:`build_run`).
Trained into a work directory it holds ``checkpoints/``, ``config.json``,
``metrics.jsonl`` and the record of its samples:

* ``samples.npz``, ``samples.png``, ``score_field.png`` (2-D), ``losses.png``;
* ``metrics.json``: MMD^2 between samples and held-out data next to the
  two-sample floor, sliced Wasserstein distance, the relative Fisher
  divergence per noise level when the exact score is known, and for the
  digits the Frechet distance in digits-classifier features next to its
  floor and a Gaussian fit's (``frechet``, ``frechet_floor``,
  ``frechet_gaussian``, ``frechet_n``; :func:`dsm_jax.metrics.frechet_with_baselines`).

The functions take explicit arguments (the command line is
:mod:`dsm_jax.cli`'s business), so scripts and experiments call them directly:

* :func:`build_run`, :func:`load_trained`, :func:`draw_samples` with one of
  :data:`SAMPLERS`, :func:`evaluate`, :func:`sample_and_evaluate` (named outputs
  and figures);
* the work directory (:mod:`dsm_jax.workdir` holds its rules): :func:`plan_workdir`
  says what training would do with it, :func:`prepare_workdir` does it under the lock;
* the commands' work: :func:`train_and_sample`, :func:`sample_workdir`, :func:`denoise_file`.

A command moves through phases (:data:`CHECKING`, :data:`PREPARING`,
:data:`TRAINING`, :data:`SAMPLING`) and reports each one to its ``on_phase``
callback: a ``ValueError`` is the user's mistake only while checking (nothing
has been changed yet); later only a :class:`~dsm_jax.errors.UserError` is.

Example:
    >>> from dsm_jax.config import Config
    >>> run, state, _ = train_and_sample(Config(num_steps=100), "runs/mine", sample=False)  # doctest: +SKIP
    >>> run, params = load_trained("runs/mine")  # doctest: +SKIP
    >>> samples, nfe = draw_samples(run, params, jax.random.key(0), 500, "ode")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax import workdir as workdir_lib
from dsm_jax.errors import Interrupted, UserError, signal_name
from dsm_jax.interrupt import call_interruptibly
from dsm_jax.runlog import write_atomic

if TYPE_CHECKING:  # config.py imports SAMPLERS from here, so this module reads it inside its functions
    import flax.linen as nn

    from dsm_jax.config import Config
    from dsm_jax.data import Dataset

__all__ = [
    "CHECKING",
    "INTERRUPTED_WHILE",
    "PREPARING",
    "SAMPLERS",
    "SAMPLING",
    "TRAINING",
    "Run",
    "Sampler",
    "UserError",
    "build_run",
    "default_workdir",
    "denoise_file",
    "describe_samplers",
    "draw_samples",
    "evaluate",
    "fit_to_data",
    "karras_grid",
    "load_trained",
    "lock_workdir",
    "output_names",
    "plan_workdir",
    "prepare_workdir",
    "print_metrics",
    "quiet_library_errors",
    "sample_and_evaluate",
    "sample_workdir",
    "say",
    "train_and_sample",
    "vesde_of_grid",
    "write_figures",
]

CHECKING, PREPARING, TRAINING, SAMPLING = "checking", "preparing", "training", "sampling"
INTERRUPTED_WHILE = {
    CHECKING: "before anything was changed",
    PREPARING: "while preparing the work directory; re-run the same command",
    TRAINING: "during training; re-run the same command to resume from the last checkpoint",
    SAMPLING: "while sampling; every file already written is intact",
}
"""What a signal outside the sections that report it leaves, by phase (the end of a one-line message)."""


def _ignore(phase: str) -> None:
    """The default ``on_phase``: a caller that maps no errors by phase."""


def say(*args) -> None:
    """``print`` on process 0 of a multi-host run (flushed: progress lines)."""
    if jax.process_index() == 0:
        print(*args, flush=True)


def _write_json(path: Path, obj) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


# ---------------------------------------------------------------------------
# The run: data, model, noise levels
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """Everything derived from a config: data, model and resolved settings."""

    config: Config
    dataset: Dataset
    model: nn.Module
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

    def model_fn(self, params, labels=None):
        """The trained model ``model_fn(x, sigma)``, whose outputs mean ``config.parameterization``.

        A conditional run (``config.num_classes`` set) reads ``labels [B]``
        (closed over), or the null label when ``labels`` is None: the
        unconditional model its label dropout trained.
        """
        return LOSSES[self.config.loss].model_fn(self, params, labels)

    def conditional_model_fn(self, params):
        """``model_fn(x, sigma, labels)`` of a conditional run, for :mod:`dsm_jax.guidance`."""
        return lambda x, sigma, labels: self.model_fn(params, labels)(x, sigma)


# ---------------------------------------------------------------------------
# The training losses of the command line
# ---------------------------------------------------------------------------


def _label_dropout(cfg: Config) -> float:
    return cfg.label_dropout if cfg.num_classes is not None else 0.0


def _dsm_model_fn(run: Run, params, labels=None):
    from dsm_jax.models import make_model_fn

    return make_model_fn(run.model, params, scale_by_sigma=run.config.scale_by_sigma, labels=labels)


def _dsm_loss_fn(run: Run):
    from dsm_jax.models import make_dsm_loss_fn

    cfg = run.config
    return make_dsm_loss_fn(
        run.model,
        jnp.asarray(run.sigmas),
        weighting=cfg.weighting,
        parameterization=cfg.parameterization,
        sigma_sampling=cfg.sigma_sampling,
        scale_by_sigma=cfg.scale_by_sigma,
        label_dropout=_label_dropout(cfg),
    )


def _edm_model_fn(run: Run, params, labels=None):
    from dsm_jax.models import edm_model_fn

    return edm_model_fn(run.model, params, sigma_data=run.config.sigma_data, labels=labels)


def _edm_loss_fn(run: Run):
    from dsm_jax.models import make_edm_loss_fn

    cfg = run.config
    return make_edm_loss_fn(
        run.model,
        jnp.asarray(run.sigmas),
        sigma_data=cfg.sigma_data,
        p_mean=cfg.p_mean,
        p_std=cfg.p_std,
        label_dropout=_label_dropout(cfg),
    )


def _flow_path(run: Run):
    from dsm_jax.flows import get_path

    return get_path(run.config.path)


def _flow_model_fn(run: Run, params, labels=None):
    from dsm_jax.models import flow_model_fn

    if labels is not None:
        raise UserError("loss='flow_matching' trains unconditional velocity models; --labels needs loss=dsm or edm.")
    return flow_model_fn(run.model, params, _flow_path(run))


def _flow_loss_fn(run: Run):
    from dsm_jax.models import make_flow_matching_loss_fn

    return make_flow_matching_loss_fn(run.model, jnp.asarray(run.sigmas), path=_flow_path(run))


class TrainingLoss(NamedTuple):
    """An entry of :data:`LOSSES`.

    Attributes:
        meaning: what the name stands for (``--list-keys``).
        make: ``make(run) -> loss_fn(params, x, keys) -> (loss, {"per_sigma_loss": [L]})``, the
            training loss of :func:`dsm_jax.train.train`, reporting the unweighted DSM loss per grid level.
        model_fn: ``model_fn(run, params, labels) -> model_fn(x, sigma)``: the trained network as a model
            (``labels``: a conditional network's ``[B]`` labels, or None).
        parameterization: what that model outputs whatever the config says (None: ``config.parameterization``).
    """

    meaning: str
    make: Callable
    model_fn: Callable
    parameterization: str | None = None


LOSSES = {
    "dsm": TrainingLoss("multi-scale denoising score matching on the sigma grid", _dsm_loss_fn, _dsm_model_fn),
    "edm": TrainingLoss(
        "EDM: a preconditioned denoiser, log-normal sigma (sigma_data, p_mean, p_std)",
        _edm_loss_fn,
        _edm_model_fn,
        parameterization="x0",
    ),
    # The network outputs a velocity v(x_t, t), conditioned on the path's VE noise level sigma(t) / alpha(t)
    # (dsm_jax.models.make_velocity_fn) for t in the run's sigma range; Run.model_fn is its exact VE score
    # (dsm_jax.flows.score_model_from_velocity), so every sampler and the likelihood run it.
    "flow_matching": TrainingLoss(
        "conditional flow matching: the network is a velocity on a Gaussian path (path), sampled as a VE score",
        _flow_loss_fn,
        _flow_model_fn,
        parameterization="score",
    ),
}
"""The training losses of ``Config.loss``, by name: the one table of their names."""


def describe_losses() -> str:
    """``"dsm (multi-scale ...), edm (...)"``: the names of :data:`LOSSES` and their meaning."""
    return ", ".join(f"{name} ({loss.meaning})" for name, loss in LOSSES.items())


def _fit_to_loss(cfg: Config, user_set) -> tuple:
    """``(config, chosen)``: the parameterization a loss fixes (EDM's denoiser is "x0", flow matching's
    converted velocity a "score"), NCSNv2's scaling off.

    A conflicting value the user gave (``user_set``) is an error; one from a
    preset or the defaults is replaced, and ``chosen`` says so.
    """
    fixed = LOSSES[cfg.loss].parameterization
    if fixed is None:
        return cfg, ()
    user_set = user_set or frozenset()
    chosen = []
    what = "a preconditioned denoiser" if fixed == "x0" else "a velocity, sampled as its exact score"
    for name, value in (("parameterization", fixed), ("scale_by_sigma", False)):
        if getattr(cfg, name) == value:
            continue
        if name in user_set:
            raise UserError(
                f"loss={cfg.loss!r} trains {what} (parameterization={fixed!r}, no scale_by_sigma); "
                f"{name}={getattr(cfg, name)!r} cannot be used with it."
            )
        chosen.append(f"{name}={value!r}: loss={cfg.loss!r} trains {what}")
        cfg = dataclasses.replace(cfg, **{name: value})
    return cfg, tuple(chosen)


def fit_to_data(cfg: Config, shape: Sequence[int], user_set=frozenset()) -> tuple:
    """``(config, chosen)``: the model and its sigma sampling chosen by the data's example ``shape``.

    Fields in ``user_set`` (given on the command line or in a config file)
    are kept. Otherwise images ``[H, W, C]`` get the U-Net and vectors the
    MLP (which flattens any shape), and a chosen U-Net trains one noise level
    per image (``sigma_sampling="random"``; the digits preset draws one
    "log_uniform" level per image, right between the grid levels too: "all" and
    "stratified" evaluate the network at every level for every example, so a
    step costs ``num_sigmas`` times as much) one step per compiled call
    (``steps_per_call=1``: XLA's CPU convolutions run far slower inside a
    compiled loop of several steps; the message gives the measured numbers).
    ``chosen`` says, one sentence each, what was chosen and why, or what a
    kept setting costs (nothing for vectors, where the MLP is the only choice).
    """
    shape = tuple(shape)
    chosen = []
    model = cfg.model
    if "model" not in user_set:
        model = "unet" if len(shape) == 3 else "mlp"
        if model == "unet":
            chosen.append(f"model 'unet' chosen for images [H, W, C] of shape {shape} (--set model=mlp flattens them)")
        elif len(shape) == 2:
            chosen.append(
                f"model 'mlp' chosen for examples of shape {shape}; give images as [N, H, W, C] for the U-Net"
            )
    sigma_sampling = cfg.sigma_sampling
    if model == "unet" and cfg.loss == "dsm" and sigma_sampling in ("all", "stratified"):
        cost = (
            f"sigma_sampling={sigma_sampling!r} evaluates the U-Net at all {cfg.num_sigmas} levels for every "
            f"image, {cfg.num_sigmas}x the cost of a step with 'random'"
        )
        if "model" in user_set or "sigma_sampling" in user_set:
            chosen.append(f"note: {cost}; --set sigma_sampling=random trains one level per image")
        else:
            sigma_sampling = "random"
            chosen.append(
                f"sigma_sampling='random' (one grid level per image; the digits preset draws log_uniform ones): {cost} "
                f"(--set sigma_sampling={cfg.sigma_sampling} to keep it)"
            )
    steps_per_call = cfg.steps_per_call
    if model == "unet" and steps_per_call > 1 and "steps_per_call" not in user_set:
        cost = (
            f"on a CPU, convolutions inside a compiled loop of {steps_per_call} steps ran 25x slower per step "
            f"(digits: 0.06 against 1.5 steps/s)"
        )
        if "model" in user_set:
            chosen.append(f"note: {cost}; --set steps_per_call=1 there")
        else:
            steps_per_call = 1
            chosen.append(f"steps_per_call=1 (as the digits preset): {cost}; --set steps_per_call=N on a GPU")
    return (
        dataclasses.replace(cfg, model=model, sigma_sampling=sigma_sampling, steps_per_call=steps_per_call),
        tuple(chosen),
    )


def _check_num_classes(cfg: Config, dataset: Dataset) -> None:
    """``num_classes`` set needs labels ``0..num_classes-1`` in the training set; a UserError otherwise."""
    if cfg.num_classes is None:
        return
    labels = dataset.train_labels
    if labels is None:
        raise UserError(
            f"num_classes={cfg.num_classes} needs a labelled dataset; {cfg.dataset!r} has no labels (labelled: "
            "digits, the Gaussian-mixture toys, image class folders, CIFAR, an .npz with a 'labels' array)."
        )
    low, high = int(np.min(labels)), int(np.max(labels))
    if low < 0 or high + 1 != cfg.num_classes:
        raise UserError(
            f"num_classes={cfg.num_classes} does not match the labels of {cfg.dataset!r}, which run from {low} "
            f"to {high}: pass --set num_classes={high + 1}."
        )


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
    cfg, chosen_for_loss = _fit_to_loss(cfg, user_set)
    chosen = chosen + chosen_for_loss
    if dataset.train.shape[0] < cfg.batch_size:
        raise UserError(
            f"batch_size={cfg.batch_size} exceeds the {dataset.train.shape[0]} training examples of "
            f"{cfg.dataset!r}; pass --set batch_size=N with a smaller N."
        )
    _check_num_classes(cfg, dataset)
    if cfg.model == "unet":
        if len(dataset.shape) != 3:
            raise UserError(
                f"model='unet' needs images [N, H, W, C]; {cfg.dataset!r} has examples of shape {dataset.shape}."
            )
        levels = len(cfg.channel_mults) - 1
        if dataset.shape[0] % 2**levels or dataset.shape[1] % 2**levels:
            alternative = " or --set model=mlp" if chosen else ""
            raise UserError(
                f"channel_mults={cfg.channel_mults} downsamples {levels} times; image size {dataset.shape[:2]} "
                f"must be divisible by {2**levels}; --set channel_mults=...{alternative}."
            )
        model = UNet(
            channels=cfg.channels,
            channel_mults=cfg.channel_mults,
            num_res_blocks=cfg.num_res_blocks,
            attention_resolutions=cfg.attention_resolutions,
            embedding=cfg.embedding,
            dtype=cfg.dtype,
            num_classes=cfg.num_classes,
            dropout=cfg.dropout,
        )
    elif cfg.dropout > 0:
        raise UserError(f"dropout={cfg.dropout:g} needs model='unet' (the MLP has no dropout); --set dropout=0.")
    else:
        model = NoiseConditionalMLP(
            width=cfg.width,
            depth=cfg.depth,
            embedding=cfg.embedding,
            fourier_scale=cfg.fourier_scale,
            dtype=cfg.dtype,
            num_classes=cfg.num_classes,
        )
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


def _load_saved_config(workdir: Path) -> Config | None:
    from dsm_jax.config import Config

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
        raise UserError(
            f"--workdir {os.fspath(workdir)!r} does not exist; train a model first (dsm-jax train --workdir ...)."
        )
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
# The samplers of the command line
# ---------------------------------------------------------------------------


def vesde_of_grid(sigmas):
    """The variance-exploding SDE whose marginal noise spans a run's grid: ``VESDE(sigmas[-1], sigmas[0])``.

    A run's model is trained on the geometric grid ``sigma_max = sigmas[0] >
    ... > sigmas[-1] = sigma_min`` (NCSN). The reverse-SDE and probability-flow
    samplers integrate the VE SDE ``dx = sqrt(d sigma^2(t) / dt) dw`` with
    ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``, the continuous limit of
    that grid (Song et al. 2021, Sec. 3.4), from its prior ``N(0, sigma_max^2 I)``;
    they query the model between the grid's levels, which the default
    ``sigma_sampling="stratified"`` trains.
    """
    from dsm_jax.sde import VESDE

    return VESDE(sigma_min=float(sigmas[-1]), sigma_max=float(sigmas[0]))


class Sampler(NamedTuple):
    """An entry of :data:`SAMPLERS`.

    Attributes:
        meaning: what the name stands for (``--help``, ``--list-keys``).
        draw: ``draw(run, model_fn, key, shape) -> (samples, nfe)``, ``nfe`` the
            model evaluations per sample; ``model_fn`` is the run's model with its parameters.
        describe: ``describe(run) -> str``, its settings for the progress line.
        hint: what to try when every sample diverged.
    """

    meaning: str
    draw: Callable
    describe: Callable
    hint: str


def _annealed_langevin(run: Run, model_fn, key, shape):
    from dsm_jax import samplers

    cfg = run.config
    k_init, k_run = jax.random.split(key)
    x0 = float(run.sigmas[0]) * jax.random.normal(k_init, shape)
    result = jax.jit(
        lambda x0, k: samplers.annealed_langevin(
            model_fn,
            x0,
            k,
            jnp.asarray(run.sigmas),
            steps_per_sigma=cfg.steps_per_sigma,
            step_lr=run.step_lr,
            final_denoise=cfg.final_denoise,
            parameterization=cfg.parameterization,
            return_result=True,
        )
    )(x0, k_run)
    return result.samples, int(result.nfe)


def _from_the_ve_prior(solve: Callable) -> Callable:
    """A ``draw`` that runs ``solve(model_fn, sde, x0, key, cfg) -> SampleResult`` on :func:`vesde_of_grid`."""

    def draw(run: Run, model_fn, key, shape):
        sde = vesde_of_grid(run.sigmas)
        k_init, k_run = jax.random.split(key)
        result = jax.jit(lambda x0, k: solve(model_fn, sde, x0, k, run.config))(sde.prior_sample(k_init, shape), k_run)
        return result.samples, int(result.nfe)

    return draw


def _options(cfg: Config) -> dict:
    return dict(final_denoise=cfg.final_denoise, parameterization=cfg.parameterization)


def _euler_maruyama(model_fn, sde, x0, key, cfg):
    from dsm_jax import samplers

    return samplers.euler_maruyama(model_fn, sde, x0, key, num_steps=cfg.sde_steps, **_options(cfg))


def _predictor_corrector(model_fn, sde, x0, key, cfg):
    from dsm_jax import samplers

    return samplers.predictor_corrector(model_fn, sde, x0, key, num_steps=cfg.sde_steps, snr=cfg.snr, **_options(cfg))


def _probability_flow(model_fn, sde, x0, key, cfg):
    from dsm_jax import samplers

    return samplers.probability_flow_ode(model_fn, sde, x0, **_options(cfg))


def karras_grid(run: Run):
    """The grid of the sigma-grid samplers: ``Config.grid_steps`` Karras levels over the run's sigma range.

    ``karras_sigmas(sigmas[0], sigmas[-1], grid_steps)`` (EDM Eq. 5, rho = 7),
    so a model trained on any grid of the run's range is queried inside it; one
    level is ``sigmas[0]`` alone (a single denoising step).
    """
    from dsm_jax.noise import karras_sigmas

    hi, lo, num = float(run.sigmas[0]), float(run.sigmas[-1]), run.config.grid_steps
    return karras_sigmas(hi, lo, num) if num > 1 else jnp.asarray([hi], jnp.float32)


def _on_the_grid(pick: Callable) -> Callable:
    """A ``draw`` running the sampler ``pick(dsm_jax.samplers)`` from ``sigmas[0] * N(0, I)`` on :func:`karras_grid`."""

    def draw(run: Run, model_fn, key, shape):
        from dsm_jax import samplers

        solve, sigmas = pick(samplers), karras_grid(run)
        options = dict(parameterization=run.config.parameterization, return_result=True)
        result = jax.jit(lambda x: solve(model_fn, x, sigmas, **options))(sigmas[0] * jax.random.normal(key, shape))
        return result.samples, int(result.nfe)

    return draw


_MORE_STEPS = "more levels (sample --steps N, or --set grid_steps=N)"


def _describe_grid(run: Run) -> str:
    return f"{run.config.grid_steps} Karras levels, sigma {run.sigmas[0]:.3g} -> {run.sigmas[-1]:.3g}, then 0"


def _ve_sde(run: Run) -> str:
    return f"of the VE SDE, sigma {run.sigmas[0]:.3g} -> {run.sigmas[-1]:.3g}"


SAMPLERS = {
    "ald": Sampler(
        "annealed Langevin",
        _annealed_langevin,
        lambda run: f"{len(run.sigmas)} levels x {run.config.steps_per_sigma} steps",
        "a smaller --set step_lr=...",
    ),
    "em": Sampler(
        "reverse SDE",
        _from_the_ve_prior(_euler_maruyama),
        lambda run: f"{run.config.sde_steps} steps {_ve_sde(run)}",
        "another sampler",
    ),
    "pc": Sampler(
        "predictor-corrector",
        _from_the_ve_prior(_predictor_corrector),
        lambda run: f"{run.config.sde_steps} steps {_ve_sde(run)}",
        "another sampler",
    ),
    "ode": Sampler(
        "probability flow",
        _from_the_ve_prior(_probability_flow),
        lambda run: f"adaptive Tsit5 on the probability flow {_ve_sde(run)}",
        "another sampler",
    ),
    "euler": Sampler("Euler on a sigma grid", _on_the_grid(lambda s: s.euler), _describe_grid, _MORE_STEPS),
    "heun": Sampler("Heun (EDM) on a sigma grid", _on_the_grid(lambda s: s.heun), _describe_grid, _MORE_STEPS),
    "dpmpp": Sampler("DPM-Solver++ 2M", _on_the_grid(lambda s: s.dpm_solver_pp), _describe_grid, _MORE_STEPS),
}
"""The samplers of ``dsm-jax --sampler`` and of ``Config.sampler``, by name: the one table of their names."""


def describe_samplers() -> str:
    """``"ald (annealed Langevin), em (reverse SDE), ..."``: the names of :data:`SAMPLERS` and their meaning."""
    return ", ".join(f"{name} ({sampler.meaning})" for name, sampler in SAMPLERS.items())


# ---------------------------------------------------------------------------
# Sampling, evaluation and their outputs
# ---------------------------------------------------------------------------


def sample_labels(run: Run, labels, num: int) -> np.ndarray | None:
    """``[num]`` labels: ``labels`` cycled over the samples (None: None); ValueError for a bad label.

    Example: ``labels=(0, 1, 2)``, ``num=5`` -> ``[0, 1, 2, 0, 1]``.
    """
    if labels is None:
        return None
    k = run.config.num_classes
    if k is None:
        raise ValueError("labels were given for an unconditional run (num_classes=None): train with num_classes=K.")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty list of integers, got {labels.tolist()!r}.")
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must lie in 0..{k - 1} (num_classes={k}), got {labels.tolist()!r}.")
    return np.resize(labels, num).astype(np.int32)


def draw_samples(run: Run, params, key: jax.Array, num: int, sampler: str, *, labels=None, guidance: float = 0.0):
    """``(samples [num, *D] numpy, nfe)``: ``num`` draws of ``SAMPLERS[sampler]`` with the run's model.

    ``labels`` (a conditional run): the requested classes, cycled over the
    samples (:func:`sample_labels`), drawn with classifier-free guidance of
    weight ``guidance`` (:func:`dsm_jax.guidance.classifier_free`; 0 is the
    conditional model). Without labels a conditional run samples its
    unconditional (null-label) model.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}.")
    cycled = sample_labels(run, labels, num)
    if cycled is None:
        if guidance:
            raise ValueError(f"guidance={guidance!r} needs labels.")
        model_fn = run.model_fn(params)
    else:
        from dsm_jax.guidance import classifier_free

        model_fn = classifier_free(
            run.conditional_model_fn(params),
            jnp.asarray(cycled),
            guidance,
            null_label=cast(int, run.config.num_classes),
        )
    samples, nfe = SAMPLERS[sampler].draw(run, model_fn, key, (num,) + run.dataset.shape)
    return np.asarray(jax.block_until_ready(samples)), int(nfe)


def evaluate(run: Run, params, samples: np.ndarray, key: jax.Array) -> dict:
    """Sample-quality metrics against held-out data, the Fisher divergence when the score is known, the Frechet
    distance for the digits."""
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
        out["sliced_wasserstein_data_floor"] = float(metrics.sliced_wasserstein(jnp.asarray(train_flat[:n]), y, k_sw))
        if run.dataset.name == "digits":
            report = metrics.frechet_with_baselines(samples, test, run.dataset.train, jax.random.fold_in(key, 3))
            out.update(
                frechet=report.frechet, frechet_floor=report.floor, frechet_gaussian=report.gaussian, frechet_n=report.n
            )
    dist = run.dataset.distribution
    if dist is not None:
        fd = metrics.per_sigma_fisher_divergence(
            run.model_fn(params),
            dist,
            jnp.asarray(run.sigmas),
            k_fisher,
            num_samples=run.config.fisher_samples,
            parameterization=run.config.parameterization,
        )
        rel = np.asarray(fd.relative, dtype=np.float64)
        out["relative_fisher"] = {f"{s:.4g}": float(r) for s, r in zip(run.sigmas, rel, strict=False)}
        out["relative_fisher_mean"] = float(rel.mean())
        if finite.all():
            mw = metrics.mode_weights(jnp.asarray(samples), dist)
            out["mode_weights"] = [float(w) for w in np.asarray(mw.weights)]
            out["true_weights"] = [float(w) for w in np.asarray(dist.weights)]
    return out


def write_figures(
    run: Run, params, samples: np.ndarray, workdir, *, sampler: str, stem: str = "samples", labels=None
) -> list:
    """PNG figures titled by the ``sampler`` that drew ``samples``; skipped with a notice without matplotlib.

    ``stem="samples"`` (the training run's record) also draws the score field
    (2-D) and the loss curves. With ``labels`` (``[N]``, the class of each
    sample) an image grid has one row per requested class. Returns the names
    of the files written.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        say("  (matplotlib not installed: no figures; pip install 'dsm_jax[plots]')")
        return []
    from dsm_jax import plotting
    from dsm_jax.parameterization import score_from_model

    workdir = Path(workdir)
    written = []
    lo, hi = run.dataset.data_range or (-1.0, 1.0)
    if run.dataset.shape == (2,):
        plotting.plot_samples(
            samples[np.isfinite(samples).all(axis=1)],
            run.dataset.test,
            titles=("held-out data", f"samples ({sampler})"),
            path=workdir / f"{stem}.png",
        )
        written.append(f"{stem}.png")
        if stem == "samples":
            sigma = float(run.sigmas[-1])
            model_fn = run.model_fn(params)
            score = jax.jit(
                lambda x: score_from_model(model_fn, x, sigma, parameterization=run.config.parameterization)
            )
            dist = run.dataset.distribution
            plotting.plot_score_field(
                score,
                log_prob_fn=None if dist is None else jax.jit(dist.convolve(sigma).log_prob),
                data=None if dist is not None else run.dataset.test[:2000],
                title=f"learned score at sigma={sigma:.3g}",
                path=workdir / "score_field.png",
            )
            written.append("score_field.png")
    elif len(run.dataset.shape) == 3 and labels is not None:
        classes = list(dict.fromkeys(np.asarray(labels).tolist()))  # requested order, each once
        per_class = min(int(np.sum(labels == c)) for c in classes)
        per_class = min(per_class, max(1, 64 // len(classes)))
        rows = [samples[labels == c][:per_class] for c in classes]
        plotting.plot_image_grid(
            np.clip(np.concatenate(rows), lo, hi),
            ncols=per_class,
            data_range=(lo, hi),
            title=f"samples ({sampler}), one row per class {', '.join(map(str, classes))}",
            path=workdir / f"{stem}.png",
        )
        written.append(f"{stem}.png")
    elif len(run.dataset.shape) == 3:
        num = min(64, samples.shape[0])
        plotting.plot_image_grid(
            np.clip(samples[:num], lo, hi),
            data_range=(lo, hi),
            title=f"samples ({sampler})",
            path=workdir / f"{stem}.png",
        )
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


def sample_and_evaluate(
    run: Run,
    params,
    workdir,
    *,
    num: int,
    sampler: str,
    seed: int,
    stem: str = "samples",
    metrics_name: str = "metrics.json",
    extra_metrics: Callable[[np.ndarray], dict] | None = None,
    labels=None,
    guidance: float = 0.0,
) -> dict:
    """Samples, evaluates and writes ``<stem>.npz``, ``metrics_name`` and the figures (:func:`write_figures`).

    ``extra_metrics(samples) -> dict`` adds to the metrics (the FID of ``evaluate --fid-weights``).
    ``labels`` and ``guidance``: class-conditional sampling (:func:`draw_samples`); the ``.npz``
    then also holds each sample's ``labels``.

    The sampling key is ``fold_in(key(seed), 1_000_003)``, a stream disjoint
    from the training steps'. Returns the metrics, with ``"files"``: the names
    of the files written.

    Raises:
        UserError: every sample is NaN or Inf (nothing is written then).
    """
    workdir = Path(workdir)
    key = jax.random.fold_in(jax.random.key(seed), 1_000_003)  # sampling stream, disjoint from training steps
    k_sample, k_eval = jax.random.split(key)
    say(f"sampling {num} examples with {sampler} ({SAMPLERS[sampler].describe(run)}) ...")
    t0 = time.perf_counter()
    samples, nfe = draw_samples(run, params, k_sample, num, sampler, labels=labels, guidance=guidance)
    cycled = sample_labels(run, labels, num)
    seconds = time.perf_counter() - t0
    if not np.isfinite(samples).any():
        raise UserError(
            f"the {sampler} sampler diverged: all {num} samples are NaN or Inf; nothing was written; "
            f"try {SAMPLERS[sampler].hint}."
        )
    results = evaluate(run, params, samples, k_eval)
    if extra_metrics is not None:
        results.update(extra_metrics(samples))
    results.update(sampler=sampler, nfe=nfe, sampling_seconds=round(seconds, 3), seed=seed)
    extra_arrays = {}
    if cycled is not None:
        results.update(labels=sorted(set(cycled.tolist())), guidance=float(guidance))
        extra_arrays = {"labels": cycled, "guidance": float(guidance)}
    files = []
    if jax.process_index() == 0:
        write_atomic(
            workdir / f"{stem}.npz",
            lambda p: np.savez(open(p, "wb"), samples=samples, nfe=nfe, sampler=sampler, seed=seed, **extra_arrays),
        )
        _write_json(workdir / metrics_name, results)
        files = [f"{stem}.npz", metrics_name] + write_figures(
            run, params, samples, workdir, sampler=sampler, stem=stem, labels=cycled
        )
    results["files"] = files
    return results


def output_names(
    cfg: Config, sampler: str, num: int, seed: int, *, evaluate: bool, labels=None, guidance: float = 0.0
) -> dict:
    """The ``stem`` and ``metrics_name`` of :func:`sample_and_evaluate` for ``sample`` and ``evaluate``.

    * ``sample``: ``samples_<sampler>_n<num>_seed<seed>.npz``, ``..._metrics.json`` and ``.png``.
    * ``evaluate`` with the training run's sampler, size and seed: ``{}``, the
      run's own record (``samples.npz``, ``metrics.json``, the figures); with
      any other: ``eval_<sampler>_n<num>_seed<seed>.json``, ``.npz`` and ``.png``.
    * ``labels`` (conditional sampling) add ``_labels<0-1-2>_g<guidance>`` to the tag.
    """
    tag = f"{sampler}_n{num}_seed{seed}"
    if labels is not None:
        tag += f"_labels{'-'.join(str(int(v)) for v in labels)}_g{guidance:g}"
    if not evaluate:
        return {"stem": f"samples_{tag}", "metrics_name": f"samples_{tag}_metrics.json"}
    if labels is not None or (sampler, num, seed) != (cfg.sampler, cfg.num_samples, cfg.seed):
        return {"stem": f"eval_{tag}", "metrics_name": f"eval_{tag}.json"}
    return {}


def print_metrics(results: dict) -> None:
    """One line per metric, each with what its value means."""
    parts = []
    if "mmd2" in results:
        ratio, n = results["mmd2_over_floor"], results["mmd_n"]
        if ratio < 0:
            verdict = "at the floor: the unbiased estimate is below zero, the samples cannot be told from the data"
        elif ratio <= 3:
            verdict = f"within 3 floors: the samples cannot be told from held-out data at n={n}"
        else:
            verdict = (
                f"{ratio:.0f} times the spread between two data samples of this size: the samples differ "
                f"detectably; a fixed error's ratio grows in proportion to n, so compare at equal n"
            )
        parts.append(
            f"MMD^2 {results['mmd2']:.2e} (two-sample floor {results['mmd2_floor']:.1e}, ratio {ratio:.2f}: {verdict})"
        )
        sw, floor = results["sliced_wasserstein"], results["sliced_wasserstein_data_floor"]
        times = f"{sw / floor:.1f}x " if floor > 0 else ""
        parts.append(
            f"sliced Wasserstein {sw:.4f} ({times}its floor {floor:.4f}, the distance between two data "
            f"samples of this size, what a perfect model gives)"
        )
    if "frechet" in results:
        parts.append(
            f"Frechet distance {results['frechet']:.3f} in digits-classifier features, a small-scale FID (floor "
            f"{results['frechet_floor']:.3f}: training digits vs the held-out ones, what a perfect model gives; "
            f"a full-covariance Gaussian fitted to the training digits: {results['frechet_gaussian']:.3f}; "
            f"n={results['frechet_n']}, lower is better)"
        )
    if "relative_fisher_mean" in results:
        parts.append(
            f"relative Fisher divergence {results['relative_fisher_mean']:.4f} (mean over the "
            f"{len(results['relative_fisher'])} levels of E|s_model - s|^2 / E|s|^2 on the noised data: "
            f"0 is the exact score, 1 as far off as a zero score)"
        )
    if "mode_weights" in results:
        got, truth = results["mode_weights"], results["true_weights"]
        err = max(abs(a - b) for a, b in zip(got, truth, strict=False))
        shown = (
            f"{' '.join(f'{w:.3f}' for w in got)} (truth {' '.join(f'{w:.3f}' for w in truth)}; "
            if len(got) <= 8
            else f"of {len(got)} modes ("
        )
        parts.append(f"mode weights {shown}largest error {err:.3f}; each sample counted for its likeliest mode)")
    if results.get("fraction_finite", 1.0) < 1.0:
        parts.append(f"WARNING: only {100 * results['fraction_finite']:.1f}% of samples are finite")
    for p in parts:
        say("  " + p)


# ---------------------------------------------------------------------------
# The work directory
# ---------------------------------------------------------------------------


def default_workdir(preset: str, cfg: Config) -> Path:
    """``runs/<preset>`` for the preset's own dataset, ``runs/<preset>-<dataset name or file stem>`` otherwise."""
    from dsm_jax.config import get_preset

    if cfg.dataset == get_preset(preset).dataset:
        return Path("runs", preset)
    return Path("runs", f"{preset}-{Path(cfg.dataset).stem}")


def _names(names: Sequence[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def lock_workdir(stack: ExitStack, workdir: Path, command: str) -> workdir_lib.WorkdirLock | None:
    """Locks ``workdir`` until ``stack`` closes (process 0 of a multi-host run only; others get None)."""
    if jax.process_index() != 0:
        return None
    try:
        return stack.enter_context(workdir_lib.WorkdirLock(workdir, command=command))
    except workdir_lib.WorkdirLocked as err:
        raise UserError(str(err)) from None


def _interrupt_cleanups(workdir: Path, lock: workdir_lib.WorkdirLock | None) -> list:
    """What to undo before exiting on a signal: this process's temporaries, then the lock."""
    out: list[Callable[[], object]] = [lambda: workdir_lib.remove_tmp_files(workdir)]
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


def plan_workdir(workdir: Path, cfg: Config, overwrite: bool) -> tuple:
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
    from dsm_jax.config import training_differences

    where = f"--workdir {os.fspath(workdir)!r}"
    _check_not_a_file(workdir)
    if not workdir.is_dir() or not [e for e in workdir.iterdir() if e.name != workdir_lib.LOCK_NAME]:
        return "new", None
    foreign = workdir_lib.foreign_entries(workdir)
    saved = None if "config.json" in foreign else _load_saved_config(workdir)
    if saved is None:
        if foreign:
            raise UserError(
                f"{where} exists, is not empty and holds no dsm-jax run ({_names(foreign)}); "
                "choose another --workdir (nothing was changed)."
            )
        if not overwrite:
            raise UserError(
                f"{where} holds files of a dsm-jax run but no config.json; pass --overwrite to delete "
                "them or choose another --workdir."
            )
        return "clear", "deleting the files of a run without config.json (--overwrite)"
    diffs = training_differences(saved, cfg)
    if not diffs:
        return "resume", (
            "--overwrite: the run there has the same training config; resuming it (nothing deleted)"
            if overwrite
            else None
        )
    shown = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, a, b in diffs[:4])
    steps = _checkpoint_steps(workdir)
    if steps and not overwrite:
        raise UserError(
            f"{where} holds a run with a different config ({shown}); "
            "pass --overwrite to start over or choose another --workdir."
        )
    if foreign:
        raise UserError(
            f"{where} holds a run with a different config ({shown}) and also files no dsm-jax run "
            f"wrote ({_names(foreign)}); nothing was deleted: move them away or choose another --workdir."
        )
    return "clear", (
        f"deleting the run there, whose config differs ({shown}; --overwrite)"
        if steps
        else "replacing the run there, which has a different config and no checkpoint"
    )


def prepare_workdir(workdir: Path, cfg: Config, overwrite: bool, lock: workdir_lib.WorkdirLock | None = None) -> str:
    """Under the lock, resumes or starts ``workdir``, clearing only run files; returns "new" or "resume".

    The plan (:func:`plan_workdir`) is made again here, under the lock, so that
    it matches what is on disk now. The directory itself is never removed (it
    may be the current directory, a parent of it, or the home directory).
    """
    action, note = plan_workdir(workdir, cfg, overwrite)
    if note:
        say(f"{workdir}: {note}")
    if action == "clear" and jax.process_index() == 0:
        try:
            workdir_lib.clear_run_files(workdir, keep=None if lock is None else lock.path)
        except ValueError as err:  # refused before deleting anything
            raise UserError(str(err)) from None
    workdir.mkdir(parents=True, exist_ok=True)
    return "resume" if action == "resume" else "new"


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def _check_config(cfg: Config) -> None:
    """What a config alone shows cannot train: checked before any data is loaded."""
    if cfg.num_sigmas < 2:
        raise UserError(
            f"num_sigmas={cfg.num_sigmas} cannot work: the noise grid runs from sigma_max to sigma_min "
            "and needs at least 2 levels; pass --set num_sigmas=N with N >= 2."
        )


def _check_trainable(run: Run, *, sample: bool) -> None:
    """The checks of what would otherwise fail late: the devices, the held-out data to evaluate against."""
    cfg = run.config
    if cfg.batch_size % jax.device_count():
        raise UserError(f"batch_size={cfg.batch_size} must be divisible by the {jax.device_count()} devices.")
    num_test = run.dataset.test.shape[0]
    if sample and num_test < 2:
        total = num_test + run.dataset.train.shape[0]
        how = f"num_test={cfg.num_test}" if cfg.num_test is not None else "by default 10% of a user array's rows"
        raise UserError(
            f"{cfg.dataset!r} leaves {num_test} held-out examples of {total} ({how}); evaluation after "
            "training needs at least 2: pass --set num_test=N with N >= 2, or --no-sample."
        )


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
        return Interrupted(
            f"interrupted ({signal_name(signum)}) at step {err.saved_step}, which was checkpointed; "
            "re-run the same command to resume.",
            signum,
        )
    if isinstance(err, SystemExit):
        return err
    signum = getattr(err, "signum", signal.SIGINT)
    steps = _checkpoint_steps(workdir)
    if steps:
        line = (
            f"interrupted ({signal_name(signum)}) before this session's first checkpoint; the checkpoint of "
            f"step {steps[-1]} is kept; re-run the same command to resume."
        )
    else:
        line = (
            f"interrupted ({signal_name(signum)}) before the first checkpoint; re-run the same command to start again."
        )
    return Interrupted(line, signum)


def _sampling_interrupted_line(command: str, workdir: Path) -> str:
    kept = (
        "the trained checkpoints are kept; 'dsm-jax evaluate --workdir " + os.fspath(workdir) + "' samples again"
        if command == "train"
        else "every file already in the work directory is intact"
    )
    return f"dsm-jax {command}: interrupted while sampling; nothing of this sampling was written, {kept}."


def train_and_sample(
    cfg: Config,
    workdir,
    *,
    user_set=None,
    overwrite: bool = False,
    sample: bool = True,
    quiet: bool = False,
    on_phase: Callable[[str], None] = _ignore,
) -> tuple:
    """``dsm-jax train``: trains (or resumes) ``cfg`` in ``workdir``, then samples, evaluates and writes the record.

    Every check runs before anything is changed, under the lock of an existing
    ``workdir`` (:func:`plan_workdir`); a new directory is created, locked and
    prepared (:func:`prepare_workdir`) only once they have all passed, and
    ``config.json`` is written then. Training checkpoints into
    ``workdir/checkpoints`` and resumes from it; sampling
    (:func:`sample_and_evaluate`, with ``cfg.sampler``, ``cfg.num_samples`` and
    ``cfg.seed``) ends at once, leaving every file complete or absent, on a signal.

    Args:
        cfg: the run's config.
        workdir: its work directory (a ``str`` or ``os.PathLike``).
        user_set: the config fields the user gave; with it, the model is first
            chosen by the data's shape (:func:`fit_to_data`); None keeps ``cfg``'s.
        overwrite: delete a run with another training config (only its files).
        sample: sample and evaluate after training.
        quiet: no progress bar.
        on_phase: called with :data:`PREPARING`, :data:`TRAINING` and
            :data:`SAMPLING` as the work enters each (it starts in :data:`CHECKING`).

    Returns:
        ``(run, state, results)``: the run as trained (its config the one used),
        the final ``TrainState`` and the metrics (None without ``sample``).

    Raises:
        UserError: a check failed (nothing was changed), or the checkpoint was
            written with another training config than ``config.json``'s.
        dsm_jax.errors.Interrupted: a signal during training (its line says
            whether and at which step it checkpointed).
    """
    from dsm_jax import config as config_lib
    from dsm_jax.images import batch_source
    from dsm_jax.models import init_params
    from dsm_jax.train import ConfigMismatchError, learning_rate_schedule, make_optimizer, train

    workdir = Path(workdir)
    with ExitStack() as stack:
        # An existing directory is locked before it is inspected, so that it cannot change between the
        # checks and the writes; a new one is only created once every check has passed.
        lock = lock_workdir(stack, workdir, "train") if workdir.is_dir() else None
        _check_not_a_file(workdir)
        _check_config(cfg)
        run = build_run(cfg, user_set=user_set)
        cfg = run.config
        plan_workdir(workdir, cfg, overwrite)
        _check_trainable(run, sample=sample)
        params = init_params(run.model, jax.random.key(cfg.seed), jnp.asarray(run.dataset.train[:1]))
        n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
        loss_fn = LOSSES[cfg.loss].make(run)
        optimizer = make_optimizer(cfg.learning_rate, warmup_steps=cfg.warmup_steps, grad_clip_norm=cfg.grad_clip_norm)
        try:
            labels = run.dataset.train_labels if cfg.num_classes is not None else None
            batches = batch_source(
                run.dataset.train, cfg.batch_size, seed=cfg.seed, flip=cfg.random_flip, labels=labels
            )
        except ValueError as err:
            raise UserError(str(err)) from None
        on_phase(PREPARING)
        if lock is None:
            workdir.mkdir(parents=True, exist_ok=True)
            lock = lock_workdir(stack, workdir, "train")
        what = prepare_workdir(workdir, cfg, overwrite, lock)
        # config.json is written once the run really starts: a failed check above leaves none behind.
        if jax.process_index() == 0:
            write_atomic(workdir / "config.json", lambda p: p.write_text(config_lib.dumps(cfg, run.resolved)))
        on_phase(TRAINING)
        say(
            f"{'resuming' if what == 'resume' else 'training'} in {workdir}: "
            f"{run.dataset.description or cfg.dataset}; {cfg.model} ({n_params:,} parameters); "
            f"{len(run.sigmas)} sigmas {run.sigmas[0]:.3g} -> {run.sigmas[-1]:.3g}; {cfg.num_steps} steps of "
            f"batch {cfg.batch_size} on {jax.local_device_count()} {jax.default_backend()} device(s)"
        )
        for sentence in run.chosen:
            say(f"  {sentence}")
        t0 = time.perf_counter()
        try:
            state = train(
                loss_fn,
                params,
                batches,
                workdir=workdir,
                num_steps=cfg.num_steps,
                optimizer=optimizer,
                seed=cfg.seed,
                ema_decay=cfg.ema_decay,
                steps_per_call=cfg.steps_per_call,
                save_every=cfg.save_every,
                keep=cfg.keep,
                log_every=cfg.log_every,
                config=config_lib.training_fields(cfg),
                config_defaults=config_lib.training_fields(config_lib.Config()),
                quiet=quiet,
                parallel=cfg.parallel,
                tensorboard=cfg.tensorboard,
                learning_rate_fn=learning_rate_schedule(cfg.learning_rate, warmup_steps=cfg.warmup_steps),
            )
        except (KeyboardInterrupt, SystemExit) as err:
            raise _training_interrupted(err, workdir) from None
        except ConfigMismatchError as err:
            # The checkpoint was saved with another training config than config.json's (a hand edit,
            # or a directory replaced under a live run): the user's to sort out, not a bug.
            raise UserError(str(err)) from None
        say(f"trained to step {int(state.step)} in {time.perf_counter() - t0:.1f} s")
        if not sample:
            return run, state, None
        on_phase(SAMPLING)
        params = jax.tree.map(jnp.asarray, state.ema_params)
        results = call_interruptibly(
            lambda: sample_and_evaluate(run, params, workdir, num=cfg.num_samples, sampler=cfg.sampler, seed=cfg.seed),
            message=_sampling_interrupted_line("train", workdir),
            cleanups=_interrupt_cleanups(workdir, lock),
        )
    print_metrics(results)
    say(f"wrote {workdir}/: checkpoints/, config.json, metrics.jsonl, {', '.join(results['files'])}")
    return run, state, results


# ---------------------------------------------------------------------------
# Sampling, evaluating and denoising with a trained run
# ---------------------------------------------------------------------------


def fid_metric(run: Run, num: int, weights, reference, *, force: bool = False):
    """``samples -> {"fid": ..., "fid_reference": ...}`` for ``evaluate --fid-weights W --fid-ref STATS``, or None.

    Everything is checked before any sampling: both files given, readable and
    made with the same settings (the reference's input size is used: 299 for
    standard statistics), an image run, and at least
    :data:`dsm_jax.inception.FID_MIN_SAMPLES` samples and reference images
    unless ``force``.

    Raises:
        UserError: one line naming the file or the setting at fault.
    """
    if weights is None and reference is None:
        return None
    if weights is None or reference is None:
        raise UserError("--fid-weights FILE and --fid-ref STATS go together: give both.")
    shape = run.dataset.shape
    if len(shape) != 3 or shape[-1] not in (1, 3):
        raise UserError(f"FID needs an image run [H, W, 1 or 3]; {run.config.dataset!r} has examples of shape {shape}.")
    from dsm_jax import inception

    try:
        ref = inception.load_reference_stats(reference)
        network = inception.FIDNetwork.load(weights, input_size=ref.settings.get("input_size"))
    except ValueError as err:
        raise UserError(str(err)) from None
    differences = inception._differences(ref.settings, network.settings)
    if differences:
        raise UserError(f"--fid-ref {reference} was made with other settings: {'; '.join(differences)}.")
    for what, count in (("--num", num), (f"the reference {reference}", ref.num_images)):
        if count < inception.FID_MIN_SAMPLES and not force:
            raise UserError(
                f"FID with {count} images ({what}): at least {inception.FID_MIN_SAMPLES} are needed "
                "(--num 50000 is the standard); --fid-force computes it anyway."
            )
    if network.input_size != inception.FID_INPUT_SIZE:
        say(f"  note: FID at input size {network.input_size} (the reference's), not comparable with published FIDs")

    def compute(samples: np.ndarray) -> dict:
        value = inception.fid(samples, ref, network=network, force=True)
        say(f"  FID {value:.4g} against {ref.num_images} images of the {ref.split} split of {ref.dataset}")
        about = {"dataset": ref.dataset, "split": ref.split, "num_images": ref.num_images, "hash": ref.settings_hash}
        return {"fid": value, "fid_reference": about}

    return compute


def sample_workdir(
    workdir,
    *,
    evaluate: bool = False,
    sampler: str | None = None,
    num: int | None = None,
    seed: int | None = None,
    steps: int | None = None,
    on_phase: Callable[[str], None] = _ignore,
    fid_weights=None,
    fid_ref=None,
    fid_force: bool = False,
    labels=None,
    guidance: float | None = None,
) -> dict:
    """``dsm-jax sample`` (``evaluate=False``) and ``evaluate``: files named by :func:`output_names`.

    ``labels`` (a conditional run's classes, cycled over the samples) and
    ``guidance`` (the classifier-free weight, default 0): ``sample --labels 0,1,2 --guidance 2``.

    ``fid_weights`` and ``fid_ref`` (together) add the FID (:func:`fid_metric`).

    ``sampler``, ``num`` and ``seed`` default to the run's; ``steps`` sets the
    run's ``grid_steps`` (the levels of the euler, heun and dpmpp samplers). ``evaluate`` with
    the training run's own sampler, size and seed recomputes its record and
    says whether the metrics changed; the training run's files are kept
    otherwise. The work directory is locked while this writes into it.

    Returns:
        The metrics written, with ``"files"``.
    """
    command = "evaluate" if evaluate else "sample"
    workdir = Path(workdir)
    with ExitStack() as stack:
        # sample and evaluate write into the run directory: one writer at a time.
        lock = lock_workdir(stack, workdir, command) if workdir.is_dir() else None
        run, params = load_trained(workdir)
        if steps is not None:
            run.config = dataclasses.replace(run.config, grid_steps=steps)
        cfg = run.config
        sampler = sampler or cfg.sampler
        num = cfg.num_samples if num is None else num
        seed = cfg.seed if seed is None else seed
        if guidance is not None and labels is None:
            raise UserError(f"--guidance {guidance:g} needs --labels (the classes to guide towards).")
        guidance = 0.0 if guidance is None else guidance
        try:
            sample_labels(run, labels, num)
        except ValueError as err:
            raise UserError(f"--labels: {err}") from None
        names = output_names(cfg, sampler, num, seed, evaluate=evaluate, labels=labels, guidance=guidance)
        extra = fid_metric(run, num, fid_weights, fid_ref, force=fid_force)
        previous = None
        if evaluate and names:
            say(
                f"{sampler}, {num} samples, seed {seed} differ from the training run's {cfg.sampler}, "
                f"{cfg.num_samples} samples, seed {cfg.seed}: its metrics.json and samples are kept"
            )
        elif evaluate and (workdir / "metrics.json").exists():
            previous = json.loads((workdir / "metrics.json").read_text())
        on_phase(SAMPLING)
        results = call_interruptibly(
            lambda: sample_and_evaluate(
                run,
                params,
                workdir,
                num=num,
                sampler=sampler,
                seed=seed,
                extra_metrics=extra,
                labels=labels,
                guidance=guidance,
                **names,
            ),
            message=_sampling_interrupted_line(command, workdir),
            cleanups=_interrupt_cleanups(workdir, lock),
        )
    print_metrics(results)
    if previous is not None:
        changed = [
            k
            for k in sorted(set(previous) | set(results))
            if k not in ("sampling_seconds", "files") and previous.get(k) != results.get(k)
        ]
        say(
            "  metrics.json: the same values as before (same sampler, size and seed as training)"
            if not changed
            else "  metrics.json: recomputed with the training run's sampler, size and seed; changed: "
            + ", ".join(f"{k} {previous.get(k)!r} -> {results.get(k)!r}" for k in changed[:6])
        )
    say(f"wrote {workdir}/: {', '.join(results['files'])} ({results['nfe']} model evaluations per sample)")
    return results


def denoise_file(workdir, input_path, sigma: float, output_path, *, on_phase: Callable[[str], None] = _ignore) -> Path:
    """``dsm-jax denoise``: Tweedie-denoises the arrays of ``input_path`` into the ``.npy`` ``output_path``.

    ``E[x | y] = y + sigma^2 s(y, sigma)`` with the run's EMA model, for ``y``
    of shape ``[N, *D]`` (or one example ``[*D]``). The run is only read (a
    read-only restore, safe beside a live writer); it is locked only when the
    output lies inside it. Returns the path written.
    """
    from dsm_jax.data import load_array
    from dsm_jax.tweedie import denoise

    workdir = Path(workdir)
    if isinstance(sigma, bool) or not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise UserError(f"--sigma must be a positive number, got {sigma!r}.")
    inp, outp = Path(input_path), Path(output_path)
    if outp.suffix != ".npy":
        raise UserError(f"--output must be a .npy path, got {os.fspath(output_path)!r}.")
    if outp.is_dir():
        raise UserError(f"--output {os.fspath(output_path)!r} is a directory; give the path of a .npy file to write.")
    if outp.exists() and inp.exists() and outp.resolve() == inp.resolve():
        raise UserError(f"--output {os.fspath(output_path)!r} is the input file; choose another path.")
    if not outp.parent.is_dir():
        raise UserError(f"--output directory {os.fspath(outp.parent)!r} does not exist.")
    y = load_array(inp)
    with ExitStack() as stack:
        inside = workdir.is_dir() and workdir.resolve() in outp.resolve().parents
        lock = lock_workdir(stack, workdir, "denoise") if inside else None
        run, params = load_trained(workdir)
        shape = run.dataset.shape
        single = tuple(y.shape) == shape
        if single:
            y = y[None]
        if tuple(y.shape[1:]) != shape:
            dims = ", ".join(map(str, shape))
            raise UserError(f"--input has shape {tuple(y.shape)}; the model expects [N, {dims}].")
        model_fn = run.model_fn(params)
        fn = jax.jit(lambda y: denoise(model_fn, y, sigma, parameterization=run.config.parameterization))
        chunk = 1024

        def work():
            out = np.concatenate([np.asarray(fn(jnp.asarray(y[i : i + chunk]))) for i in range(0, y.shape[0], chunk)])
            write_atomic(outp, lambda p: np.save(open(p, "wb"), (out[0] if single else out).astype(np.float32)))

        on_phase(SAMPLING)
        call_interruptibly(
            work,
            message=f"dsm-jax denoise: interrupted; {outp} was not written (nor changed).",
            cleanups=_interrupt_cleanups(outp.parent, lock),
        )
    say(f"denoised {y.shape[0]} example(s) at sigma={sigma:g} (Tweedie: x + sigma^2 s(x, sigma)); wrote {outp}")
    return outp


@contextlib.contextmanager
def quiet_library_errors(enabled: bool = True):
    """Drops orbax's background reports of a failed write inside the block.

    When a checkpoint write fails (a full disk), orbax logs the error from each
    of its writer threads through absl, and tensorstore's late completions
    report "Event loop is closed" as unraisable exceptions; the same error is
    raised to the caller, which reports it in one line, so both are noise.
    After a failure, the block's end waits 0.2 s for the writes still in flight.
    """
    if not enabled:
        yield
        return
    from dsm_jax.checkpoint import DropClosedLoopErrors

    closed_loop = DropClosedLoopErrors()
    absl = logging.getLogger("absl")
    absl.addFilter(_drop_record)
    failed = False
    try:
        yield
    except Exception:
        failed = True
        raise
    finally:
        closed_loop.remove(grace_seconds=0.2 if failed else 0.0)
        absl.removeFilter(_drop_record)


def _drop_record(record) -> bool:
    return False
