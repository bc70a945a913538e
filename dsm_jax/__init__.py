"""dsm_jax: score-based generative modelling with denoising score matching in JAX.

Pure functions of arrays, PRNG keys and callables. A model is any callable
``model_fn(x, sigma) -> array`` with ``x: [B, *D]`` and ``sigma: [B]``.

Submodules: ``distributions`` (ground truth), ``divergence`` (jvp traces),
``noise``, ``losses``, ``sde``, ``samplers``, ``likelihood``, ``tweedie``,
``ode``, ``models``, ``train``, ``checkpoint``, ``runlog`` (the metrics log),
``workdir`` (lock, run files), ``data``, ``metrics``, ``plotting`` (matplotlib,
optional), ``run`` (the application layer: build, load, sample, evaluate a
run) and ``cli``.
"""

import os as _os
from typing import TYPE_CHECKING


def _xla_cpu_workaround() -> None:
    """Works around a miscompilation in the jaxlib 0.10.2 CPU backend.

    With jaxlib 0.10.2, jitted element-wise chains fused by the experimental YNN
    CPU fusion return wrong values for leading dimensions >= 16384 (reported
    upstream as jax issue 39103). Turning that fusion off restores exact results
    and costs nothing measurable here. The flag only exists in that release, so
    it is only set there; it takes effect if no computation has run yet (XLA
    reads the flags when the CPU client is created). Set
    ``DSM_JAX_NO_XLA_WORKAROUND=1`` to leave ``XLA_FLAGS`` untouched.
    """
    if _os.environ.get("DSM_JAX_NO_XLA_WORKAROUND"):
        return
    try:
        from importlib.metadata import version

        if version("jaxlib") != "0.10.2":
            return
    except Exception:  # pragma: no cover - metadata missing
        return
    flags = _os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in flags:
        _os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_experimental_ynn_fusion_type=").strip()


_xla_cpu_workaround()

from dsm_jax import (  # noqa: E402
    distributions,
    divergence,
    losses,
    noise,
    parameterization,
    tweedie,
)
from dsm_jax._checks import debug_checks  # noqa: E402
from dsm_jax.distributions import Gaussian, GaussianMixture  # noqa: E402
from dsm_jax.divergence import exact_divergence, hutchinson_divergence  # noqa: E402
from dsm_jax.losses import (  # noqa: E402
    dsm_loss,
    explicit_score_matching_loss,
    multiscale_dsm_loss,
    per_sigma_dsm_losses,
    sde_dsm_loss,
    sliced_score_matching_loss,
    sure_loss,
)
from dsm_jax.noise import (  # noqa: E402
    geometric_sigmas,
    get_weighting,
    ncsnv2_num_levels,
    ncsnv2_sigma_max,
    ncsnv2_step_size,
    sample_log_uniform_sigmas,
)
from dsm_jax.parameterization import as_score_fn, score_from_model  # noqa: E402
from dsm_jax.tweedie import denoise, posterior_covariance, posterior_mean  # noqa: E402

if TYPE_CHECKING:  # the lazy names below, for type checkers and editors
    from dsm_jax import likelihood, samplers, sde
    from dsm_jax.likelihood import bits_per_dim, log_likelihood
    from dsm_jax.samplers import (
        SampleResult,
        annealed_langevin,
        ddim,
        ddpm,
        denoise_observation,
        euler_maruyama,
        inpaint,
        inpaint_annealed_langevin,
        langevin,
        predictor_corrector,
        probability_flow_ode,
    )
    from dsm_jax.sde import SDE, VESDE, VPSDE, SubVPSDE

__version__ = "0.1.0"

# Modules that pull in flax (``models``, ``train``), diffrax (``ode``, on the first solve), optax, orbax,
# scikit-learn or matplotlib load on first use, and so do the names taken from them: ``import dsm_jax``
# stays at the cost of jax itself.
_LAZY_MODULES = (
    "flows",
    "sde",
    "ode",
    "samplers",
    "guidance",
    "measurements",
    "likelihood",
    "models",
    "train",
    "checkpoint",
    "runlog",
    "workdir",
    "data",
    "images",
    "metrics",
    "inception",
    "digits_classifier",
    "plotting",
    "run",
    "cli",
)
_LAZY_NAMES = {
    "SDE": "sde",
    "VESDE": "sde",
    "VPSDE": "sde",
    "SubVPSDE": "sde",
    "SampleResult": "samplers",
    "annealed_langevin": "samplers",
    "ddim": "samplers",
    "ddpm": "samplers",
    "denoise_observation": "samplers",
    "euler_maruyama": "samplers",
    "inpaint": "samplers",
    "inpaint_annealed_langevin": "samplers",
    "langevin": "samplers",
    "predictor_corrector": "samplers",
    "probability_flow_ode": "samplers",
    "bits_per_dim": "likelihood",
    "log_likelihood": "likelihood",
}


def __getattr__(name):
    import importlib

    if name in _LAZY_MODULES:
        return importlib.import_module(f"dsm_jax.{name}")
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f"dsm_jax.{_LAZY_NAMES[name]}"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'dsm_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_MODULES) | set(_LAZY_NAMES))


__all__ = [
    "Gaussian",
    "GaussianMixture",
    "SDE",
    "SampleResult",
    "SubVPSDE",
    "VESDE",
    "VPSDE",
    "annealed_langevin",
    "as_score_fn",
    "bits_per_dim",
    "ddim",
    "ddpm",
    "debug_checks",
    "denoise",
    "denoise_observation",
    "distributions",
    "divergence",
    "dsm_loss",
    "euler_maruyama",
    "exact_divergence",
    "explicit_score_matching_loss",
    "geometric_sigmas",
    "get_weighting",
    "hutchinson_divergence",
    "inpaint",
    "inpaint_annealed_langevin",
    "langevin",
    "likelihood",
    "log_likelihood",
    "losses",
    "multiscale_dsm_loss",
    "ncsnv2_num_levels",
    "ncsnv2_sigma_max",
    "ncsnv2_step_size",
    "noise",
    "parameterization",
    "per_sigma_dsm_losses",
    "posterior_covariance",
    "posterior_mean",
    "predictor_corrector",
    "probability_flow_ode",
    "sample_log_uniform_sigmas",
    "samplers",
    "score_from_model",
    "sde",
    "sde_dsm_loss",
    "sliced_score_matching_loss",
    "sure_loss",
    "tweedie",
]
