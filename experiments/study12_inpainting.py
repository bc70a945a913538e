"""Study 12: inpainting digits with the score model (masked halves).

The digits U-Net of study 10 (``dsm-jax train --preset digits``) fills in
the bottom half (and, separately, the right half) of held-out digits with
annealed Langevin dynamics in which the known pixels are re-noised to the
current level after every step (Song & Ermon 2019, Section 5;
``dsm_jax.samplers.inpaint_annealed_langevin``). PSNR on the missing half
against the truth, next to two baselines: the training mean image, and the
best linear predictor of the missing half from the known half (the Gaussian
conditional mean fitted on the training set). One sample per image: a draw
from the conditional law is not its mean, so its expected squared error is
twice that of the conditional mean for a perfect model; the mean of
several draws per image (an estimate of the conditional mean) is scored
too.
"""

from __future__ import annotations

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
from _digits import digits_run

from dsm_jax.samplers import inpaint_annealed_langevin


def psnr_on(mask_missing, pred, truth, data_range=2.0):
    err = ((pred - truth) ** 2 * mask_missing).sum(axis=(1, 2, 3)) / mask_missing.sum(axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(data_range**2 / np.maximum(err, 1e-12))))


def gaussian_conditional(train, y, known):
    flat = train.reshape(train.shape[0], -1).astype(np.float64)
    mu, cov = flat.mean(0), np.cov(flat.T) + 1e-4 * np.eye(flat.shape[1])
    k, u = known.reshape(-1) > 0, known.reshape(-1) == 0
    gain = cov[np.ix_(u, k)] @ np.linalg.inv(cov[np.ix_(k, k)])
    yf = y.reshape(y.shape[0], -1)
    out = yf.copy()
    out[:, u] = mu[u] + (yf[:, k] - mu[k]) @ gain.T
    return out.reshape(y.shape).astype(np.float32)


def main(argv=None):
    args = C.parse_args(__doc__.splitlines()[0], argv)
    run, params = digits_run(args.quick)
    model_fn = run.model_fn(params)
    n = 8 if args.quick else 64
    test = run.dataset.test[:n]
    mean_image = run.dataset.train.mean(0, keepdims=True)
    masks = {
        "bottom_half_missing": np.ones((8, 8, 1), np.float32),
        "right_half_missing": np.ones((8, 8, 1), np.float32),
    }
    masks["bottom_half_missing"][4:] = 0.0
    masks["right_half_missing"][:, 4:] = 0.0
    steps = 2 if args.quick else run.config.steps_per_sigma
    draws = 2 if args.quick else 8  # the mean of several draws estimates the posterior mean
    results, grids = {}, []
    for i, (name, known) in enumerate(masks.items()):
        y = np.repeat(test * known, draws, axis=0)  # draws of image j are rows j * draws ... (j + 1) * draws - 1
        out = jax.jit(
            lambda y, k: inpaint_annealed_langevin(
                model_fn, y, jnp.asarray(known), k, jnp.asarray(run.sigmas), steps_per_sigma=steps, step_lr=run.step_lr
            )
        )(jnp.asarray(y), jax.random.key(i))
        out = np.clip(np.asarray(out), -1, 1).reshape((n, draws) + test.shape[1:])
        posterior_mean, out = out.mean(axis=1), out[:, 0]
        y = y[::draws]
        missing = np.broadcast_to(1.0 - known, test.shape)
        lin = np.clip(gaussian_conditional(run.dataset.train, y, known), -1, 1)
        results[name] = {
            "psnr_score_model": psnr_on(missing, out, test),
            "psnr_score_model_mean_of_draws": psnr_on(missing, posterior_mean, test),
            "psnr_linear_conditional_mean": psnr_on(missing, lin, test),
            "psnr_mean_image": psnr_on(missing, np.broadcast_to(mean_image, test.shape), test),
            "known_pixels_kept_exactly": bool(np.allclose(out * known, np.clip(test, -1, 1) * known, atol=1e-5)),
        }
        print(name, results[name])
        grids += [test[:8], np.where(known > 0, test[:8], -1.0), out[:8], posterior_mean[:8], lin[:8]]
    C.save_results(
        args, "study12_inpainting", results, {"n": n, "draws": draws, "steps_per_sigma": steps, "step_lr": run.step_lr}
    )

    from dsm_jax.plotting import plot_image_grid

    plot_image_grid(
        np.concatenate(grids),
        ncols=8,
        title=f"rows: truth / observed / one inpainting / mean of {draws} / linear (bottom, then right half)",
        path=args.out / "study12_inpainting.png",
        dpi=100,
    )
    return results


if __name__ == "__main__":
    main()
