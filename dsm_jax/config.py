"""Run configurations of the ``dsm-jax`` command: a frozen dataclass, presets, overrides.

A :class:`Config` holds everything a run depends on; it is saved as
``config.json`` in the work directory and compared on resume. Presets are
named configs (:data:`PRESETS`); ``--set key=value`` overrides any field,
parsed by the field's type.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Sequence
from typing import Any

from dsm_jax.flows import PATHS
from dsm_jax.losses import SIGMA_SAMPLING
from dsm_jax.noise import WEIGHTINGS
from dsm_jax.parameterization import PARAMETERIZATIONS
from dsm_jax.run import LOSSES as _LOSS_TABLE
from dsm_jax.run import SAMPLERS as _SAMPLER_TABLE
from dsm_jax.run import describe_losses, describe_samplers

MODELS = ("mlp", "unet")
SAMPLERS = tuple(_SAMPLER_TABLE)
"""The names of :data:`dsm_jax.run.SAMPLERS`, the one table of the command's samplers."""
LOSSES = tuple(_LOSS_TABLE)
"""The names of :data:`dsm_jax.run.LOSSES`, the one table of the command's training losses."""
# The names of dsm_jax.models.embeddings.EMBEDDINGS, written out: that module loads flax.
EMBEDDINGS = ("fourier", "sinusoidal")
# dsm_jax.train.PARALLEL and the compute dtypes of the networks, written out: those modules load jax and flax.
PARALLEL = ("pmap", "sharding")
DTYPES = ("float32", "bfloat16")


def _field(default, help: str):
    """A config field with its one-line meaning (``dsm-jax train --list-keys`` prints it)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class Config:
    """One run of ``dsm-jax train``.

    ``None`` for ``sigma_max`` means the NCSNv2 rule (the largest pairwise
    distance in the training set, Song & Ermon 2020, technique 1); ``None``
    for ``step_lr`` means technique 4 (``2 * ncsnv2_step_size``, the step
    convention of :func:`dsm_jax.samplers.annealed_langevin`). Technique 4 is
    derived for high-dimensional data; for 2-D sets the default ``2e-5``
    keeps ``alpha_i / sigma_i^2 = 2e-5 / sigma_min^2 = 0.2`` at every level.

    The default ``sigma_sampling="stratified"`` trains every grid level with
    a log-uniform jitter inside its cell, so the model is also right between
    the levels, where the reverse-SDE and ODE samplers query it; with it, the
    MLP's Fourier features of ``log sigma`` need a low frequency scale
    (``fourier_scale=1``): at the NCSN++ value 16 the features oscillate ~10
    times inside one cell and the model cannot fit the small noise levels
    (relative Fisher divergence ~1 below sigma = 0.05 on the default run,
    against 0.06 with scale 1).
    """

    # data
    dataset: str = _field(
        "eight_gaussians", "a built-in dataset (dsm-jax train --list) or a path to a .npy/.npz float array [N, ...]"
    )
    num_train: int | None = _field(
        None, "training examples (None: 10000 toy draws, all the rest of an array or of the digits)"
    )
    num_test: int | None = _field(
        None, "held-out examples for the metrics (None: 2000 toy draws, 297 digits, 10% of an array)"
    )
    random_flip: bool = _field(
        False, "mirror training images left-right, each with probability 1/2 drawn from (seed, step); 8-bit images"
    )
    # model
    model: str = _field(
        "mlp", "mlp (vectors; images are flattened) or unet (images [H, W, C]); chosen by the data's shape unless set"
    )
    width: int = _field(128, "MLP hidden width")
    depth: int = _field(3, "MLP hidden layers")
    channels: int = _field(32, "U-Net base channel count")
    channel_mults: tuple[int, ...] = _field(
        (1, 2), "U-Net channel multiplier per resolution (e.g. 1,2: one downsampling)"
    )
    num_res_blocks: int = _field(1, "U-Net residual blocks per resolution")
    attention_resolutions: tuple[int, ...] = _field(
        (), "U-Net image sizes that get self-attention (e.g. 16; empty: none)"
    )
    dropout: float = _field(0.0, "U-Net dropout rate in the residual blocks while training (0.1 in DDPM / NCSN++)")
    embedding: str = _field("fourier", "sigma embedding: fourier (random Fourier features of log sigma) or sinusoidal")
    fourier_scale: float = _field(
        1.0, "frequency scale of the Fourier features of log sigma (1 suits stratified sigmas)"
    )
    parameterization: str = _field("score", "what the network outputs: score, eps, x0 or energy")
    scale_by_sigma: bool = _field(False, "divide the network output by sigma (NCSNv2 technique 3)")
    num_classes: int | None = _field(
        None, "classes of a class-conditional model (labels 0..K-1 of the data; None: unconditional)"
    )
    label_dropout: float = _field(0.1, "num_classes set: probability of training on the null label (CFG)")
    # noise levels and loss
    sigma_max: float | None = _field(
        None, "largest noise level (None: the largest pairwise distance of the training set, NCSNv2)"
    )
    sigma_min: float = _field(0.01, "smallest noise level")
    num_sigmas: int = _field(10, "number of geometric noise levels from sigma_max down to sigma_min")
    loss: str = _field("dsm", f"training loss: {describe_losses()}")
    weighting: str = _field("sigma2", "loss weight lambda(sigma) per level: sigma2, one, inv_sigma2 or min_snr")
    sigma_sampling: str = _field(
        "stratified", "levels per example: all, random (one level, 1/L of the cost), log_uniform or stratified"
    )
    sigma_data: float = _field(0.5, "loss=edm: the data's standard deviation (root mean square) in the preconditioning")
    p_mean: float = _field(-1.2, "loss=edm: mean of log sigma during training")
    p_std: float = _field(1.2, "loss=edm: standard deviation of log sigma during training")
    path: str = _field("linear", "loss=flow_matching: the probability path, linear (rectified flow) or vp")
    # optimisation
    batch_size: int = _field(256, "global batch size (divisible by the device count)")
    num_steps: int = _field(4000, "training steps (a larger value extends a finished run)")
    learning_rate: float = _field(1e-3, "Adam learning rate after the warmup")
    warmup_steps: int = _field(100, "linear learning-rate warmup steps")
    grad_clip_norm: float | None = _field(1.0, "clip the global gradient norm to this (None: no clipping)")
    ema_decay: float = _field(0.999, "decay of the exponential moving average of the parameters used for sampling")
    seed: int = _field(0, "seed of the data draws, initialisation, batches, training noise and sampling")
    steps_per_call: int = _field(50, "training steps per compiled call (lax.scan); 1 for convolutions on a CPU")
    save_every: int = _field(1000, "checkpoint every this many steps")
    keep: int = _field(3, "checkpoints kept")
    log_every: int = _field(100, "write a metrics.jsonl line every this many steps")
    parallel: str = _field(
        "pmap", "data-parallel backend: pmap, or sharding (jit over a device mesh); a run may resume under either"
    )
    dtype: str = _field("float32", "network compute dtype: float32, or bfloat16 (parameters and loss stay float32)")
    tensorboard: bool = _field(False, "also write TensorBoard event files to the work directory (needs tensorboardX)")
    # sampling and evaluation
    sampler: str = _field("ald", f"sampler after training: {describe_samplers()}")
    num_samples: int = _field(2000, "samples drawn after training and by sample/evaluate")
    steps_per_sigma: int = _field(100, "annealed Langevin steps per noise level")
    step_lr: float | None = _field(2e-5, "annealed Langevin step scale (None: NCSNv2 technique 4)")
    sde_steps: int = _field(500, "time steps of the em and pc samplers")
    snr: float = _field(0.16, "signal-to-noise ratio of the pc sampler's Langevin corrector")
    grid_steps: int = _field(
        18, "noise levels of the euler, heun and dpmpp samplers (N evaluations, heun 2 N - 1); sample --steps"
    )
    final_denoise: bool = _field(True, "end sampling with one Tweedie denoising step at the smallest sigma")
    fisher_samples: int = _field(
        2000, "points per level for the relative Fisher divergence (when the exact score is known)"
    )

    def __post_init__(self):
        for name in (
            "num_sigmas",
            "batch_size",
            "steps_per_call",
            "save_every",
            "keep",
            "log_every",
            "num_samples",
            "steps_per_sigma",
            "sde_steps",
            "grid_steps",
            "fisher_samples",
            "width",
            "channels",
            "num_res_blocks",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("num_steps", "warmup_steps", "seed", "depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        for name in (
            "sigma_max",
            "sigma_min",
            "learning_rate",
            "step_lr",
            "snr",
            "grad_clip_norm",
            "fourier_scale",
            "sigma_data",
            "p_std",
        ):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0 and value < float("inf")):
                raise ValueError(f"{name} must be a positive number, got {value!r}.")
        if self.sigma_max is not None and self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max must exceed sigma_min={self.sigma_min}, got {self.sigma_max!r}.")
        finite = isinstance(self.p_mean, (int, float)) and abs(self.p_mean) < float("inf")
        if isinstance(self.p_mean, bool) or not finite:
            raise ValueError(f"p_mean must be a finite number, got {self.p_mean!r}.")
        if self.loss == "flow_matching" and self.num_classes is not None:
            raise ValueError(
                f"num_classes={self.num_classes!r} needs loss='dsm' or 'edm': flow-matching runs are unconditional."
            )
        if self.parameterization == "v":
            raise ValueError(
                "parameterization='v' is defined for variance-preserving noising only; the command's runs use "
                "variance-exploding noising (x + sigma eps): choose score, eps, x0 or energy."
            )
        if self.num_classes is not None and (
            isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1
        ):
            raise ValueError(f"num_classes must be None or a positive integer, got {self.num_classes!r}.")
        if isinstance(self.label_dropout, bool) or not (
            isinstance(self.label_dropout, (int, float)) and 0.0 <= self.label_dropout < 1.0
        ):
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout!r}.")
        if isinstance(self.dropout, bool) or not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be a rate in [0, 1), got {self.dropout!r}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}.")
        for name, choices in (
            ("model", MODELS),
            ("sampler", SAMPLERS),
            ("loss", LOSSES),
            ("sigma_sampling", SIGMA_SAMPLING),
            ("parameterization", PARAMETERIZATIONS),
            ("weighting", WEIGHTINGS),
            ("embedding", EMBEDDINGS),
            ("parallel", PARALLEL),
            ("dtype", DTYPES),
            ("path", PATHS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}.")
        if not self.channel_mults or any(not isinstance(m, int) or m < 1 for m in self.channel_mults):
            raise ValueError(f"channel_mults must be positive integers, got {self.channel_mults!r}.")
        if any(not isinstance(r, int) or r < 1 for r in self.attention_resolutions):
            raise ValueError(f"attention_resolutions must be positive integers, got {self.attention_resolutions!r}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown config keys {unknown}.")
        d = dict(d)
        for name in ("channel_mults", "attention_resolutions"):
            if name in d:
                if not isinstance(d[name], (list, tuple)):
                    raise ValueError(f"{name} must be a list of positive integers, got {d[name]!r}.")
                d[name] = tuple(d[name])
        return cls(**d)


PRESETS = {
    "default": Config(),
    "two_clusters": Config(dataset="two_clusters", num_steps=3000),
    "swiss_roll": Config(dataset="swiss_roll", num_steps=5000),
    "digits": Config(
        dataset="digits",
        model="unet",
        channels=32,
        channel_mults=(1, 2),
        scale_by_sigma=True,
        sigma_min=0.02,
        num_sigmas=20,
        # One continuous level per image: the cost of "random" (1/L of "stratified"), and right between the
        # grid levels, where the ODE and fast samplers query the model ("random" trains the grid levels only).
        sigma_sampling="log_uniform",
        batch_size=128,
        num_steps=3000,
        learning_rate=5e-4,
        steps_per_call=1,  # convolutions in an XLA CPU while loop are ~30x slower
        save_every=500,
        num_samples=100,
        steps_per_sigma=20,
        step_lr=None,
        fisher_samples=1,
    ),
    # Accelerator-sized (a GPU or TPU: about 1.3M steps of batch 128); on a CPU only with --set shrinking it.
    "cifar10": Config(
        dataset="data/cifar-10-batches-bin",
        num_test=10_000,
        random_flip=True,
        model="unet",
        channels=128,
        channel_mults=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        dropout=0.1,
        embedding="fourier",
        scale_by_sigma=True,
        sigma_max=50.0,
        sigma_min=0.01,
        num_sigmas=232,
        sigma_sampling="log_uniform",
        batch_size=128,
        num_steps=1_300_000,
        learning_rate=2e-4,
        warmup_steps=5000,
        grad_clip_norm=1.0,
        ema_decay=0.9999,
        steps_per_call=1,
        save_every=50_000,
        log_every=1000,
        sampler="pc",
        sde_steps=1000,
        snr=0.16,
        num_samples=10_000,
        fisher_samples=1,
    ),
}
# sigma_data is the data's root mean square: 1.43 for the 8 Gaussians, 0.85 for the digits.
# Sampled with Heun on 18 Karras levels (35 evaluations; study 13 measures it against annealed Langevin).
PRESETS["edm"] = Config(loss="edm", parameterization="x0", sigma_data=1.4, num_steps=4000, sampler="heun")
PRESETS["edm_digits"] = dataclasses.replace(
    PRESETS["digits"], loss="edm", parameterization="x0", scale_by_sigma=False, sigma_data=0.85, sampler="heun"
)
# Flow matching on the 8 Gaussians, sampled by Heun on a Karras grid of its VE score (the converted velocity).
PRESETS["flow_matching"] = Config(loss="flow_matching", sampler="heun", num_steps=4000)
# The digits preset as a class-conditional model: one network for s(x | y) and, by label dropout, s(x).
PRESETS["digits_conditional"] = dataclasses.replace(PRESETS["digits"], num_classes=10, label_dropout=0.1)
"""Named configs: ``default`` (8 Gaussians, exact score known), ``two_clusters``
(the DSM tutorial's mixture), ``swiss_roll``, ``digits`` (8x8 digits, U-Net), ``edm`` and
``edm_digits`` (the same data trained with EDM's preconditioned denoiser and loss, ``loss="edm"``),
``flow_matching`` (the 8 Gaussians, a velocity on the linear path, ``loss="flow_matching"``, sampled by heun),
``digits_conditional`` (the digits U-Net conditioned on the class, ``num_classes=10``, trained with
label dropout 0.1 for classifier-free guidance: ``dsm-jax sample --labels 0,1,2 --guidance 2``),
``cifar10``.

``cifar10`` is accelerator-sized: the NCSN++ / score_sde VE recipe (Song et
al. 2021) on CIFAR-10's binary version (the directory ``cifar-10-batches-bin``
the official ``cifar-10-binary.tar.gz`` unpacks to; ``--set dataset=DIR``
elsewhere): a DDPM-layout U-Net with 128 channels, multipliers (1, 2, 2, 2),
2 residual blocks per resolution, self-attention at 16x16 and dropout 0.1
(35.4M parameters), random flips, sigma in [0.01, 50] drawn log-uniformly, Adam
2e-4 after 5000 warmup steps, EMA 0.9999, batch 128, 1.3M steps (score_sde's
VE runs), the predictor-corrector sampler with 1000 steps and snr 0.16, and
10000 samples after training (``dsm-jax evaluate --num 50000 --fid-weights
... --fid-ref ...`` for the FID-50k of papers). Not reproduced here:
NCSN++'s FIR resampling and skip rescaling. A CPU runs it only shrunk,
e.g. ``--set channels=8 --set channel_mults=1,2 --set num_res_blocks=1
--set attention_resolutions= --set batch_size=16 --set num_steps=4``."""

# Fields that do not change what training computes: a resumed run may differ in these.
NON_TRAINING_FIELDS = frozenset(
    {
        "num_steps",
        "log_every",
        "save_every",
        "parallel",  # both backends compute the same steps (to float rounding) and read each other's checkpoints
        "tensorboard",
        "keep",
        "sampler",
        "num_samples",
        "steps_per_sigma",
        "step_lr",
        "sde_steps",
        "grid_steps",
        "snr",
        "final_denoise",
        "fisher_samples",
    }
)


def _optional_of(hint: Any) -> Any:
    """``T`` for ``Optional[T]`` / ``T | None`` (``typing.Union`` or ``types.UnionType``), else None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None))
    return None


def _parse_value(name: str, text: str, annotation: Any) -> Any:
    hint = annotation
    inner = _optional_of(hint)
    if inner is not None:
        if text.strip().lower() in ("none", "null", "auto"):
            return None
        hint = inner
    try:
        if hint is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
        if typing.get_origin(hint) is tuple:
            return tuple(int(t) for t in text.replace("(", "").replace(")", "").split(",") if t.strip())
        return text
    except ValueError:
        raise ValueError(f"--set {name}={text!r}: expected {getattr(hint, '__name__', hint)}.") from None


def apply_overrides(config: Config, overrides: dict) -> Config:
    """``config`` with ``{name: string}`` overrides parsed by each field's type."""
    hints = typing.get_type_hints(Config)
    parsed = {}
    for name, text in overrides.items():
        if name not in hints:
            raise ValueError(f"unknown config key {name!r}; valid keys: {', '.join(sorted(hints))}.")
        parsed[name] = _parse_value(name, text, hints[name])
    return dataclasses.replace(config, **parsed)


def _type_name(hint: Any) -> str:
    inner = _optional_of(hint)
    if inner is not None:
        return _type_name(inner) + " or None"
    if typing.get_origin(hint) is tuple:
        return "ints, e.g. 1,2"
    return hint.__name__


def presets_listing() -> str:
    """What ``dsm-jax train --list`` prints: the presets, the built-in datasets and user arrays."""
    from dsm_jax.data import DATASETS

    lines = ["presets:"]
    lines += [f"  {n:14s} dataset={c.dataset}, model={c.model}, {c.num_steps} steps" for n, c in PRESETS.items()]
    lines += ["datasets:"] + [f"  {name:14s} {desc}" for name, desc in DATASETS.items()]
    lines += [
        "  PATH.npy/.npz  your own float array: vectors [N, d] (MLP) or images [N, H, W, C] in [-1, 1] (U-Net)",
        "config keys: dsm-jax train --list-keys",
    ]
    return "\n".join(lines)


def keys_listing() -> str:
    """What ``dsm-jax train --list-keys`` prints: every field with its type, default and meaning."""
    lines = ["config keys (--set key=value, or a --config JSON file); name, type, default, meaning:"]
    for name, type_name, default, meaning in describe_fields():
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
        lines.append(f"  {name:17s} {type_name:14s} {shown:16s} {meaning}")
    return "\n".join(lines)


def describe_fields() -> list:
    """``[(name, type, default, meaning)]`` of every :class:`Config` field, in declaration order."""
    hints = typing.get_type_hints(Config)
    return [
        (f.name, _type_name(hints[f.name]), f.default, f.metadata.get("help", "")) for f in dataclasses.fields(Config)
    ]


def read_config_file(path) -> dict:
    """The fields in a JSON config file: a saved ``config.json`` (``{"config": {...}, "resolved": ...}``)
    or a bare ``{field: value}`` object.

    Raises:
        ValueError: the file is missing, not JSON, not an object, or names
            unknown fields (all of them are listed).
    """
    path = os.fspath(path)
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--config {path!r} does not exist.") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--config {path!r} is not a JSON file ({err}).") from None
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        obj = obj["config"]
    if not isinstance(obj, dict):
        raise ValueError(f"--config {path!r} must hold a JSON object of config fields, got {type(obj).__name__}.")
    unknown = sorted(set(obj) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise ValueError(f"--config {path!r}: unknown config keys {unknown}; dsm-jax train --list-keys lists them.")
    return obj


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.")
    return PRESETS[name]


def parse_assignments(items: Sequence[str]) -> dict:
    """``{key: text}`` of ``"key=value"`` strings (the ``--set`` arguments); the last of a key wins."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}.")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def resolve(preset: str, *, file_fields: dict | None = None, overrides: dict | None = None, source=None) -> Config:
    """The config of ``preset``, then ``file_fields`` (those of the file ``source``), then ``overrides``.

    Args:
        preset: a name of :data:`PRESETS`.
        file_fields: ``{field: value}``, as :func:`read_config_file` returns them.
        overrides: ``{field: text}``, parsed by each field's type (:func:`apply_overrides`).
        source: the file ``file_fields`` came from, named in errors.

    Example:
        >>> resolve("digits", overrides={"num_steps": "10"}).num_steps
        10
    """
    cfg = get_preset(preset)
    if file_fields:
        try:
            cfg = Config.from_dict({**cfg.to_dict(), **file_fields})
        except ValueError as err:
            where = "" if source is None else f"--config {os.fspath(source)!r}: "
            raise ValueError(f"{where}{err}") from None
    return apply_overrides(cfg, overrides or {})


def training_differences(a: Config, b: Config) -> list:
    """``[(field, a_value, b_value)]`` for fields that change training."""
    out = []
    for f in dataclasses.fields(Config):
        if f.name in NON_TRAINING_FIELDS:
            continue
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if va != vb:
            out.append((f.name, va, vb))
    return out


def training_fields(config: Config) -> dict:
    """The fields that change training (saved with each checkpoint and checked on resume)."""
    return {k: v for k, v in config.to_dict().items() if k not in NON_TRAINING_FIELDS}


def dumps(config: Config, resolved: dict) -> str:
    return json.dumps({"config": config.to_dict(), "resolved": resolved}, indent=2, sort_keys=True) + "\n"


__all__ = [
    "Config",
    "EMBEDDINGS",
    "LOSSES",
    "PRESETS",
    "MODELS",
    "SAMPLERS",
    "apply_overrides",
    "keys_listing",
    "presets_listing",
    "describe_fields",
    "get_preset",
    "parse_assignments",
    "read_config_file",
    "resolve",
    "training_differences",
]
