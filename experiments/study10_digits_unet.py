"""Study 10: 8x8 digits with the U-Net: samples, Tweedie denoising vs the Wiener filter, bits/dim.

The model is the ``dsm-jax train --preset digits`` run (NCSNv2-style U-Net,
``output / sigma``, 20 geometric levels from 9.6 to 0.02, 3000 steps of batch
128 on this CPU). Denoising: held-out images plus Gaussian noise at sigma in
{0.1, 0.2, 0.5}, denoised by Tweedie's formula x + sigma^2 s(x, sigma) with
the model, and by the best linear denoiser fitted on the training images,
mu + S (S + sigma^2 I)^-1 (y - mu) (S the training covariance); PSNR on the
[-1, 1] range. Likelihood: held-out bits/dim through the probability-flow ODE
of the VE SDE (Hutchinson trace), with the 17 grey levels uniformly
dequantized (bin width 1/8, offset log2(8) = 3 bits/dim), next to a Gaussian
fitted on the training set.
"""

from __future__ import annotations

import math

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
from _digits import digits_run

from dsm_jax.data import DIGITS_RANGE
from dsm_jax.likelihood import bits_per_dim, log_likelihood
from dsm_jax.metrics import psnr
from dsm_jax.samplers import annealed_langevin
from dsm_jax.sde import VESDE
from dsm_jax.tweedie import denoise

SIGMAS = (0.1, 0.2, 0.5)
BIN = 2.0 / 16  # digits levels 0..16 map to k / 8 - 1


def wiener(train, y, sigma):
    flat = train.reshape(train.shape[0], -1).astype(np.float64)
    mu, cov = flat.mean(0), np.cov(flat.T)
    gain = cov @ np.linalg.inv(cov + sigma**2 * np.eye(cov.shape[0]))
    out = mu + (y.reshape(y.shape[0], -1) - mu) @ gain.T
    return out.reshape(y.shape).astype(np.float32)


def main(argv=None):
    args = C.parse_args(__doc__.splitlines()[0], argv)
    run, params = digits_run(args.quick)
    model_fn = run.model_fn(params)
    train, test = run.dataset.train, run.dataset.test
    n_test = 16 if args.quick else test.shape[0]
    test = test[:n_test]
    low, high = DIGITS_RANGE
    results = {"model_steps": 0 if args.quick else run.config.num_steps, "denoising": []}
    rng = np.random.RandomState(args.seed)
    denoise_fn = jax.jit(lambda y, s: denoise(model_fn, y, s))
    for sigma in SIGMAS:
        y = (test + sigma * rng.randn(*test.shape)).astype(np.float32)
        tw = np.clip(np.asarray(denoise_fn(jnp.asarray(y), sigma)), low, high)
        wi = np.clip(wiener(train, y, sigma), low, high)
        row = {
            "sigma": sigma,
            "psnr_noisy": float(jnp.mean(psnr(jnp.asarray(np.clip(y, low, high)), jnp.asarray(test)))),
            "psnr_tweedie": float(jnp.mean(psnr(jnp.asarray(tw), jnp.asarray(test)))),
            "psnr_wiener": float(jnp.mean(psnr(jnp.asarray(wi), jnp.asarray(test)))),
        }
        results["denoising"].append(row)
        print(row)

    # Held-out bits/dim (dequantized) through the ODE, and a fitted Gaussian for reference.
    n_ll = 2 if args.quick else 200
    sigmas = run.sigmas
    sde = VESDE(sigma_min=float(sigmas[-1]), sigma_max=float(sigmas[0]))
    x = jnp.asarray(test[:n_ll]) + BIN * (jax.random.uniform(jax.random.key(1), test[:n_ll].shape) - 0.5)
    dim = int(np.prod(test.shape[1:]))
    offset = math.log2(1.0 / BIN)
    ll = log_likelihood(model_fn, sde, x, jax.random.key(2), trace="hutchinson", rtol=1e-3, atol=1e-3)
    flat = train.reshape(train.shape[0], -1).astype(np.float64)
    mu, cov = flat.mean(0), np.cov(flat.T) + BIN**2 / 12 * np.eye(dim)
    diff = np.asarray(x).reshape(n_ll, -1) - mu
    _, logdet = np.linalg.slogdet(cov)
    gauss_ll = -0.5 * (np.sum(diff @ np.linalg.inv(cov) * diff, 1) + logdet + dim * math.log(2 * math.pi))
    results["bits_per_dim"] = {
        "ode_model": float(jnp.mean(bits_per_dim(ll, dim, dequantization_offset=offset))),
        "gaussian_fit": float(np.mean(bits_per_dim(jnp.asarray(gauss_ll), dim, dequantization_offset=offset))),
        "uniform_over_17_levels": math.log2(17),
        "offset": offset,
        "n": n_ll,
    }
    print("bits/dim", results["bits_per_dim"])

    n_samples, steps_per_sigma = (8, 2) if args.quick else (64, run.config.steps_per_sigma)
    x0 = float(sigmas[0]) * jax.random.normal(jax.random.key(3), (n_samples,) + run.dataset.shape)
    samples = np.asarray(
        annealed_langevin(
            model_fn, x0, jax.random.key(4), jnp.asarray(sigmas), steps_per_sigma=steps_per_sigma, step_lr=run.step_lr
        )
    )
    C.save_results(
        args,
        "study10_digits_unet",
        results,
        {
            "workdir_config": run.config.to_dict(),
            "n_test": n_test,
            "step_lr": run.step_lr,
            "samples_steps_per_sigma": steps_per_sigma,
        },
    )

    from dsm_jax.plotting import plot_image_grid

    plot_image_grid(
        np.clip(samples, low, high),
        title="annealed Langevin samples (digits U-Net)",
        path=args.out / "study10_digits_unet.png",
        dpi=100,
    )
    return results


if __name__ == "__main__":
    main()
