"""Study 14(a): class-conditional digits with classifier-free guidance, class accuracy against diversity.

One U-Net of the preset ``digits_conditional`` (the digits recipe with
``num_classes=10`` and label dropout 0.1, so one network is both ``s(x | y)``
and, with the null label, ``s(x)``) is sampled for every class with
classifier-free guidance ``(1 + w) s(x | y) - w s(x)`` (Ho & Salimans 2022)
at ``w`` = 0, 0.5, 1, 2, 4, with Heun on the run's Karras grid (EDM
Algorithm 1, ``grid_steps`` levels, each evaluation a batch of ``2 B``).

Per scale: the accuracy of the digits classifier
(:func:`dsm_jax.digits_classifier.digits_classifier`) on the samples against
the requested class (per class and overall; its accuracy on held-out real
digits is the reference); the Frechet distance in the classifier's features
to the held-out digits with its floor (training digits of the same size)
and a Gaussian fit (:func:`dsm_jax.metrics.frechet_with_baselines`); and
the diversity: the mean per-class trace of the feature covariance, relative
to the same quantity on the training digits.

``--weights raw`` samples the last step's parameters instead of the EMA
(decay 0.999): after 1500 steps the EMA still weighs the initialisation by
``0.999^1500 = 0.22``.

The trained run is cached in ``experiments/results/_cache/digits_conditional``
(``--num-steps`` overrides the preset's step count when it trains; the
cached run's own count is recorded). Quick mode trains nothing and samples a
tiny untrained U-Net (its numbers test the harness, not the model).
"""

from __future__ import annotations

import dataclasses

import _common as C
import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax.checkpoint import load_params
from dsm_jax.config import get_preset
from dsm_jax.digits_classifier import digits_classifier, digits_features
from dsm_jax.metrics import frechet_with_baselines
from dsm_jax.models import init_params
from dsm_jax.run import build_run, draw_samples, load_trained, train_and_sample

SCALES = (0.0, 0.5, 1.0, 2.0, 4.0)
PRESET = "digits_conditional"


def conditional_run(quick: bool, num_steps: int | None, weights: str):
    """``(run, params)`` of the conditional digits preset (trained once and cached); ``weights``: ema or raw."""
    if quick:
        config = dataclasses.replace(get_preset(PRESET), channels=8, channel_mults=(1,), num_sigmas=4, grid_steps=3)
        run = build_run(config)
        return run, init_params(run.model, jax.random.key(0), jnp.asarray(run.dataset.train[:1]))
    workdir = C.RESULTS_DIR / "_cache" / PRESET
    if not (workdir / "checkpoints").is_dir():
        config = get_preset(PRESET)
        if num_steps is not None:
            config = dataclasses.replace(config, num_steps=num_steps)
        train_and_sample(config, workdir, user_set=frozenset(), sample=False, quiet=True)
    run, params = load_trained(workdir)
    if weights == "raw":
        params = jax.tree.map(jnp.asarray, load_params(workdir / "checkpoints", ema=False))
    return run, params


def per_class_spread(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of ``tr Cov(features | class)``: the within-class diversity."""
    return float(np.mean([np.trace(np.cov(features[labels == k].T)) for k in np.unique(labels)]))


def main(argv=None):
    args = C.parse_args(
        __doc__.splitlines()[0],
        argv,
        num_steps=(int, None, "training steps if it trains"),
        weights=(str, "ema", "ema (the EMA parameters, as dsm-jax sample) or raw (the last step's)"),
    )
    run, params = conditional_run(args.quick, args.num_steps, args.weights)
    classes = tuple(range(10))
    per_class = 2 if args.quick else 50
    n = per_class * len(classes)
    labels = np.resize(np.arange(10), n)
    classifier = digits_classifier()
    test, train = run.dataset.test, run.dataset.train
    real_accuracy = float(np.mean(classifier.predict(test) == run.dataset.test_labels))
    train_spread = per_class_spread(digits_features(train), run.dataset.train_labels)
    results = {"classifier_accuracy_on_test_digits": real_accuracy, "train_within_class_spread": train_spread}
    rows = []
    for i, w in enumerate(SCALES):
        x, nfe = draw_samples(run, params, jax.random.key(args.seed * 100 + i), n, "heun", labels=classes, guidance=w)
        x = np.clip(x, -1.0, 1.0)
        predicted = classifier.predict(x)
        report = frechet_with_baselines(x, test, train, jax.random.key(7))
        results[f"w={w:g}"] = {
            "accuracy": float(np.mean(predicted == labels)),
            "accuracy_per_class": [float(np.mean(predicted[labels == k] == k)) for k in classes],
            "frechet": report.frechet,
            "frechet_floor": report.floor,
            "frechet_gaussian": report.gaussian,
            "frechet_n": report.n,
            "within_class_spread_vs_train": per_class_spread(digits_features(x), labels) / train_spread,
            "nfe": nfe,
        }
        print(f"w={w:g}", {k: v for k, v in results[f"w={w:g}"].items() if k != "accuracy_per_class"})
        order = np.argsort(labels, kind="stable")
        rows.append(x[order].reshape(10, per_class, *x.shape[1:])[:, : min(per_class, 8)])
    settings = {
        "preset": PRESET,
        "num_steps_trained": run.config.num_steps,
        "weights": args.weights,
        "sampler": "heun",
        "grid_steps": run.config.grid_steps,
        "samples_per_class": per_class,
        "scales": SCALES,
    }
    C.save_results(args, "study14_conditional", results, settings)

    import matplotlib.pyplot as plt

    from dsm_jax.plotting import plot_image_grid

    scales = np.asarray(SCALES)
    get = lambda key: np.asarray([results[f"w={w:g}"][key] for w in SCALES])
    fig, (ax_a, ax_f, ax_s) = plt.subplots(1, 3, figsize=(12, 3.2))
    ax_a.plot(scales, get("accuracy"), "o-", label="samples")
    ax_a.axhline(real_accuracy, color="gray", ls="--", label="held-out digits")
    ax_a.set(xlabel="guidance w", ylabel="classifier accuracy vs requested class", ylim=(0, 1.02))
    ax_a.legend()
    ax_f.plot(scales, get("frechet"), "o-", label="samples")
    ax_f.plot(scales, get("frechet_floor"), "--", color="gray", label="floor (train digits)")
    ax_f.plot(scales, get("frechet_gaussian"), ":", color="k", label="Gaussian fit")
    ax_f.set(xlabel="guidance w", ylabel="Frechet distance (classifier features)", yscale="log")
    ax_f.legend()
    ax_s.plot(scales, get("within_class_spread_vs_train"), "o-")
    ax_s.axhline(1.0, color="gray", ls="--")
    ax_s.set(xlabel="guidance w", ylabel="within-class feature spread / train's")
    fig.suptitle(f"{PRESET}: classifier-free guidance ({run.config.num_steps} steps, {args.weights} weights, heun)")
    fig.tight_layout()
    C.save_figure(fig, args, "study14_conditional")
    plt.close(fig)
    shown = [0, len(SCALES) - 1]
    plot_image_grid(
        np.concatenate([rows[i].reshape(-1, *rows[i].shape[2:]) for i in shown]),
        ncols=rows[0].shape[1],
        title=f"one row per class 0-9: w = {SCALES[shown[0]]:g} (top block), w = {SCALES[shown[1]]:g} (bottom)",
        path=args.out / "study14_conditional_grid.png",
        dpi=100,
    )
    return results


if __name__ == "__main__":
    main()
