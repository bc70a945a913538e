"""Study 14(b): super-resolution 4x4 -> 8x8 and deblurring of held-out digits with the posterior samplers.

The digits U-Net of study 10 (``dsm-jax train --preset digits``, a VE model
on the grid 9.6 -> 0.02, sampled on its VE SDE ``vesde_of_grid``) solves
three linear inverse problems ``y = A x + sigma_y eps`` on held-out digits:

* super-resolution: ``A`` = 2x2 average pooling (``Downsample(2)``, 8x8 ->
  4x4), with ``sigma_y = 0.05`` and noise-free;
* deblurring: ``A`` = a Gaussian blur of 1 pixel (``GaussianBlur(1.0)``,
  reflect padding), ``sigma_y = 0.05``.

Methods (``dsm_jax.samplers.inverse``): DPS (Chung et al. 2023; the
reference code's un-squared-norm step, its step size chosen per problem on
validation digits disjoint from the scored ones, by the PSNR of one draw;
a step pulls by the step size times a unit-norm direction mapped through
the denoiser's Jacobian, so 50 steps, not the paper's 1000, need larger ones),
PiGDM (Song et al. 2023; isotropic ``Sigma_t`` with the training set's mean
pixel variance) and projection onto ``A x = y`` with the pseudo-inverse
(noise-free super-resolution only: it imposes ``y``). Baselines: the naive
inverse (nearest-neighbour upsampling ``A^+ y``; for the blur, which has no
cheap pseudo-inverse, the blurred measurement itself) and the best linear
estimator, the Wiener / LMMSE solution from the training mean and covariance,
``x_hat = mu + C A^T (A C A^T + sigma_y^2 I)^-1 (y - A mu)``.

Metrics: PSNR against the truth (one draw per image, and the mean of several
draws, an estimate of the posterior mean: for a perfect sampler one draw has
twice the posterior mean's squared error), the Frechet distance in the
digits classifier's features of one draw per image against the held-out
truth set (next to ``frechet_with_baselines``' floor and Gaussian baseline;
the reconstructions are paired with the truth, so they can go below the
floor of independent samples), and the classifier's accuracy against the
true labels. Every reconstruction is clipped to the data range [-1, 1].
"""

from __future__ import annotations

import time

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
from _digits import digits_run

from dsm_jax.data import load_digits
from dsm_jax.digits_classifier import digits_classifier
from dsm_jax.measurements import Downsample, GaussianBlur
from dsm_jax.metrics import frechet_with_baselines, psnr
from dsm_jax.run import vesde_of_grid
from dsm_jax.samplers.inverse import dps, pigdm, projection

PROBLEMS = {
    "superres_noisy": (Downsample(2), 0.05),
    "superres_noise_free": (Downsample(2), 0.0),
    "deblur": (GaussianBlur(1.0), 0.05),
}
SAMPLERS = ("dps", "pigdm", "projection")


def labels_of(images):
    """The true digit of each image, found by its pixels (the 1797 digits are pairwise distinct)."""
    all_images, all_labels = load_digits()
    label_of = {image.tobytes(): int(label) for image, label in zip(all_images, all_labels, strict=True)}
    return np.array([label_of[np.asarray(image, np.float32).tobytes()] for image in images])


def wiener(train, operator, y, sigma_y):
    """The LMMSE estimate ``mu + C A^T (A C A^T + sigma_y^2 I)^-1 (y - A mu)`` from the training mean and covariance."""
    flat = train.reshape(train.shape[0], -1).astype(np.float64)
    mu, cov = flat.mean(0), np.cov(flat.T) + 1e-4 * np.eye(flat.shape[1])  # ridge: constant border pixels
    a = np.asarray(operator.matrix(train.shape[1:]), np.float64)
    gain = cov @ a.T @ np.linalg.inv(a @ cov @ a.T + sigma_y**2 * np.eye(a.shape[0]))
    yf = np.asarray(y, np.float64).reshape(y.shape[0], -1)
    return (mu + (yf - mu @ a.T) @ gain.T).reshape((y.shape[0],) + train.shape[1:]).astype(np.float32)


def naive(operator, y):
    """``A^+ y`` (nearest-neighbour upsampling) where cheap, else ``y`` itself (a blur keeps the image size)."""
    return np.asarray(operator.pinv(jnp.asarray(y)) if operator.has_pinv else y)


def make_samplers(model_fn, sde, operator, num_steps, data_variance):
    """Jitted ``(y [N, *M], key, step_size, sigma_y) -> x [N, *D]`` per method; the two scalars are traced,
    so one compilation per method and batch shape serves every step size and noise level."""

    def run_dps(y, k, step_size, sigma_y):
        return dps(model_fn, sde, operator, y, k, num_steps=num_steps, step_size=step_size).samples

    def run_pigdm(y, k, step_size, sigma_y):
        return pigdm(model_fn, sde, operator, y, sigma_y, k, num_steps=num_steps, data_variance=data_variance).samples

    def run_projection(y, k, step_size, sigma_y):
        return projection(model_fn, sde, operator, y, k, num_steps=num_steps).samples

    return {"dps": jax.jit(run_dps), "pigdm": jax.jit(run_pigdm), "projection": jax.jit(run_projection)}


def draws_of(sampler, y, draws, key, step_size, sigma_y):
    """``[N, draws, *D]`` clipped reconstructions: every image's measurement repeated ``draws`` times in one batch."""
    out = sampler(jnp.asarray(np.repeat(y, draws, axis=0)), key, jnp.float32(step_size), jnp.float32(sigma_y))
    return np.clip(np.asarray(out), -1.0, 1.0).reshape((y.shape[0], draws) + out.shape[1:])


def mean_psnr(x, truth):
    """``(mean, standard error)`` over images of the per-image PSNR in dB (data range 2)."""
    values = np.asarray(psnr(jnp.asarray(x), jnp.asarray(truth)))
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size))


def scores(one, mean, truth, labels, train, classifier, key, operator, y):
    """PSNR, Frechet distance, classifier accuracy and measurement residual of one draw per image
    (and PSNR / accuracy of ``mean``, the mean of the draws)."""
    p, p_se = mean_psnr(one, truth)
    row = {"psnr": p, "psnr_se": p_se}
    row["residual_rms"] = float(np.sqrt(np.mean((np.asarray(operator.A(jnp.asarray(one))) - y) ** 2)))
    if mean is not None:
        row["psnr_mean_of_draws"], row["psnr_mean_of_draws_se"] = mean_psnr(mean, truth)
        row["accuracy_mean_of_draws"] = float(np.mean(classifier.predict(mean) == labels))
    row["frechet"] = frechet_with_baselines(one, truth, train, key).frechet
    row["accuracy"] = float(np.mean(classifier.predict(one) == labels))
    return row


def main(argv=None):
    args = C.parse_args(__doc__.splitlines()[0], argv)
    started = time.perf_counter()
    run, params = digits_run(args.quick)
    model_fn = run.model_fn(params)
    sde = vesde_of_grid(run.sigmas)
    train, test = run.dataset.train, run.dataset.test
    # Quick mode gives the validation batch the scored batch's shape: one compilation per sampler.
    if args.quick:
        n, n_val, draws, draws_val, num_steps, step_sizes = 8, 8, 2, 2, 4, (0.5, 1.0)
    else:
        n, n_val, draws, draws_val, num_steps, step_sizes = 64, 16, 2, 1, 50, (1.0, 3.0, 10.0, 30.0, 100.0)
    truth, validation = test[:n], test[test.shape[0] - n_val :]  # disjoint: selection never sees scored digits
    labels = labels_of(truth)
    classifier = digits_classifier()
    data_variance = float(train.reshape(train.shape[0], -1).var(axis=0).mean())
    key = jax.random.key(args.seed)
    k_frechet = jax.random.fold_in(key, 0)
    reference = frechet_with_baselines(truth, truth, train, k_frechet)
    results = {
        "frechet_floor": reference.floor,
        "frechet_gaussian": reference.gaussian,
        "accuracy_truth": float(np.mean(classifier.predict(truth) == labels)),
        "problems": {},
        "dps_step_size_selection": {},
        "seconds": {},
    }
    shown, samplers = {}, {}
    for p_index, (problem, (operator, sigma_y)) in enumerate(PROBLEMS.items()):
        k_problem = jax.random.fold_in(key, 1 + p_index)
        k_meas, k_val_meas, k_val, k_run = jax.random.split(k_problem, 4)
        y = np.asarray(operator.measure(jnp.asarray(truth), k_meas, sigma_y))
        y_val = np.asarray(operator.measure(jnp.asarray(validation), k_val_meas, sigma_y))

        if repr(operator) not in samplers:
            samplers[repr(operator)] = make_samplers(model_fn, sde, operator, num_steps, data_variance)
        sampler_of = samplers[repr(operator)]
        start = time.perf_counter()
        sweep = {}
        for step_size in step_sizes:
            out = draws_of(sampler_of["dps"], y_val, draws_val, k_val, step_size, sigma_y)
            sweep[str(step_size)] = mean_psnr(out.reshape((-1,) + out.shape[2:]), np.repeat(validation, draws_val, 0))[
                0
            ]
        results["seconds"][f"{problem}/dps_step_size_sweep"] = time.perf_counter() - start
        best = max(step_sizes, key=lambda s: np.nan_to_num(sweep[str(s)], nan=-np.inf))  # a diverged run loses
        results["dps_step_size_selection"][problem] = {"validation_psnr": sweep, "chosen": best}
        print(problem, "DPS step sizes (validation PSNR):", sweep, "->", best, flush=True)

        common = (k_frechet, operator, y)
        linear = {"naive": naive(operator, y), "wiener": np.clip(wiener(train, operator, y, sigma_y), -1.0, 1.0)}
        rows = {k: scores(v, None, truth, labels, train, classifier, *common) for k, v in linear.items()}
        images = {"measured": linear["naive"][:8], "wiener": linear["wiener"][:8]}
        for s_index, name in enumerate(SAMPLERS):
            if name == "projection" and sigma_y > 0:
                continue  # projection imposes A x = y: for noise-free measurements only
            start = time.perf_counter()
            out = draws_of(sampler_of[name], y, draws, jax.random.fold_in(k_run, s_index), best, sigma_y)
            results["seconds"][f"{problem}/{name}"] = time.perf_counter() - start
            rows[name] = scores(out[:, 0], out.mean(axis=1), truth, labels, train, classifier, *common)
            images[name] = out[:8, 0]
            print(problem, name, rows[name], f"{results['seconds'][f'{problem}/{name}']:.1f} s", flush=True)
        results["problems"][problem] = rows
        shown[problem] = images
    settings = {
        "n_images": n,
        "n_validation": n_val,
        "draws": draws,
        "draws_validation": draws_val,
        "num_steps": num_steps,
        "seconds": "wall time of each step, including the first compilation of each sampler and batch shape",
        "sde": repr(sde),
        "predictor": "reverse_diffusion_predictor",
        "dps_convention": "code",
        "dps_step_sizes": list(step_sizes),
        "pigdm_covariance": "isotropic",
        "pigdm_data_variance": data_variance,
        "projection_corrector_steps": 1,
        "projection_snr": 0.16,
        "problems": {k: {"operator": repr(op), "sigma_y": s} for k, (op, s) in PROBLEMS.items()},
    }
    results["seconds"]["total"] = time.perf_counter() - started
    C.save_results(args, "study14_inverse_problems", results, settings)
    C.save_figure(figure(shown, truth[:8], results, draws), args, "study14_inverse_problems")
    return results


def canvas(rows):
    """One grey image of rows of 8x8 digits in [-1, 1] with a one-pixel gutter (white) between them."""
    rows = [np.asarray(r)[..., 0] for r in rows]
    n, h, w = rows[0].shape
    out = np.ones((len(rows) * (h + 1) + 1, n * (w + 1) + 1))
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            out[1 + i * (h + 1) : 1 + i * (h + 1) + h, 1 + j * (w + 1) : 1 + j * (w + 1) + w] = (image + 1) / 2
    return out


def figure(shown, truth, results, draws):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 7.5))
    grid = fig.add_gridspec(2, len(shown), height_ratios=(1.1, 1), wspace=0.3, hspace=0.15)
    for i, (problem, images) in enumerate(shown.items()):
        ax = fig.add_subplot(grid[0, i])
        names = ["truth", *images]
        ax.imshow(canvas([truth, *images.values()]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks([4.5 + 9 * k for k in range(len(names))], names)
        ax.set_xticks([])
        ax.set_title(problem)
    fig.suptitle(
        "rows: truth / measured (super-resolution: A^+ y, the naive baseline; deblurring: the blurred y) / Wiener / "
        "one draw of each sampler"
    )
    ax = fig.add_subplot(grid[1, :])
    methods = ["naive", "wiener", *SAMPLERS]
    for i, (problem, rows) in enumerate(results["problems"].items()):
        xs = [m + 0.2 * (i - 1) for m, name in enumerate(methods) if name in rows]
        got = [name for name in methods if name in rows]
        color = f"C{i}"
        ax.errorbar(
            xs,
            [rows[k]["psnr"] for k in got],
            [rows[k]["psnr_se"] for k in got],
            fmt="o",
            color=color,
            label=f"{problem}: one draw",
        )
        means = [(x, rows[k]) for x, k in zip(xs, got, strict=True) if "psnr_mean_of_draws" in rows[k]]
        ax.errorbar(
            [x for x, _ in means],
            [r["psnr_mean_of_draws"] for _, r in means],
            [r["psnr_mean_of_draws_se"] for _, r in means],
            fmt="s",
            mfc="none",
            color=color,
            label=f"{problem}: mean of {draws} draws",
        )
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("PSNR (dB), mean +- SE over images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return fig


if __name__ == "__main__":
    main()
