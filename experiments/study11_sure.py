"""Study 11: SURE from noisy data only vs DSM on clean data (8x8 digits, sigma = 0.2).

Two denoisers D(y) = y - sigma eps_hat(y) with the same small U-Net
predicting the noise (zero-initialised output, so D starts as the identity)
and the same budget. (a) SURE (Stein 1981): trained on one fixed noisy copy
y = x + sigma eps of 1200 training images only, minimising Stein's unbiased
estimate of the risk |D(y) - y|^2 + 2 sigma^2 div D(y) - d sigma^2 with a
Hutchinson divergence (``dsm_jax.losses.sure_loss``); the clean images are
never seen. (b) DSM on the same clean images at the same sigma with the eps
parameterization (fresh noise every step), whose optimum is the same
posterior mean E[x | y]. Every few steps both are scored on held-out digits
(PSNR) and by SURE on the 300 remaining noisy training images (a validation
risk that needs no clean data: SURE is unbiased for a denoiser that did not
see those images). SURE is also reported at the step its validation SURE
picks (early stopping without clean data). Next to them: the noisy input and
the Wiener filter fitted on clean training data. The seeds' claim: SURE
nearly matches the clean-data denoiser.
"""

from __future__ import annotations

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
from study10_digits_unet import wiener

from dsm_jax.data import load_dataset
from dsm_jax.losses import dsm_loss, sure_loss
from dsm_jax.metrics import psnr
from dsm_jax.models import UNet, init_params, make_model_fn
from dsm_jax.train import create_train_state, make_optimizer, make_train_step

SIGMA = 0.2


def main(argv=None):
    args = C.parse_args(__doc__.splitlines()[0], argv)
    steps = 4 if args.quick else 1500
    eval_at = (2, 4) if args.quick else (100, 200, 400, 800, 1500)
    data = load_dataset("digits", seed=args.seed)
    train, test = data.train, data.test
    rng = np.random.RandomState(args.seed)
    noisy = (train + SIGMA * rng.randn(*train.shape)).astype(np.float32)  # one fixed noisy copy
    n_fit = int(0.8 * train.shape[0])
    clean_fit, noisy_fit, noisy_val = train[:n_fit], noisy[:n_fit], noisy[n_fit:]
    model = UNet(channels=8, channel_mults=(1,)) if args.quick else UNet(channels=16, channel_mults=(1, 2))
    params = init_params(model, jax.random.key(0), jnp.asarray(train[:1]))

    def denoiser(p):
        # The network predicts the noise; DSM with parameterization "eps" trains the same function class.
        f = make_model_fn(model, p)
        return lambda y, s: y - s.reshape((-1,) + (1,) * (y.ndim - 1)) * f(y, s)

    losses = {
        "sure_noisy_only": (lambda p, y, k: sure_loss(denoiser(p), y, SIGMA, k), noisy_fit),
        "dsm_clean": (
            lambda p, x, k: dsm_loss(make_model_fn(model, p), x, SIGMA, k, parameterization="eps"),
            clean_fit,
        ),
    }
    y_test = (test + SIGMA * np.random.RandomState(1).randn(*test.shape)).astype(np.float32)
    score = lambda pred: float(jnp.mean(psnr(jnp.clip(jnp.asarray(pred), -1, 1), jnp.asarray(test))))
    full = lambda y: jnp.full((y.shape[0],), SIGMA)
    apply = jax.jit(lambda p, y: denoiser(p)(y, full(y)))
    val_sure = jax.jit(lambda p, k: sure_loss(denoiser(p), jnp.asarray(noisy_val), SIGMA, k, num_probes=8))

    optimizer = make_optimizer(1e-3, grad_clip_norm=1.0)
    results = {
        "psnr_noisy": score(y_test),
        "psnr_wiener_clean_fit": score(wiener(clean_fit, y_test, SIGMA)),
        "curves": {},
    }
    final = {}
    for name, (loss_fn, source) in losses.items():
        step_fn = jax.jit(make_train_step(loss_fn, optimizer))
        state = create_train_state(params, optimizer)
        curve, train_losses = [], []
        for i in range(steps):
            batch = source[np.random.RandomState(i).randint(0, source.shape[0], 128)]
            state, metrics = step_fn(state, jnp.asarray(batch), jax.random.fold_in(jax.random.key(args.seed), i))
            train_losses.append(float(metrics["loss"]))
            if i + 1 in eval_at:
                curve.append(
                    {
                        "step": i + 1,
                        "psnr_test": score(apply(state.params, jnp.asarray(y_test))),
                        "sure_validation": float(val_sure(state.params, jax.random.key(7))),
                        "train_loss_last50": float(np.mean(train_losses[-50:])),
                        "params": state.params,
                    }
                )
                print(name, {k: v for k, v in curve[-1].items() if k != "params"})
        final[name] = curve[-1]["params"]
        results["curves"][name] = [{k: v for k, v in row.items() if k != "params"} for row in curve]
        results[f"psnr_{name}"] = curve[-1]["psnr_test"]
    picked = min(results["curves"]["sure_noisy_only"], key=lambda row: row["sure_validation"])
    results["psnr_sure_early_stopped"] = picked["psnr_test"]
    results["sure_early_stop_step"] = picked["step"]
    # d sigma^2: the validation SURE of the identity, the risk of not denoising at all.
    results["sure_identity"] = float(np.prod(train.shape[1:]) * SIGMA**2)
    print({k: v for k, v in results.items() if k != "curves"})
    C.save_results(
        args,
        "study11_sure",
        results,
        {
            "sigma": SIGMA,
            "steps": steps,
            "batch": 128,
            "learning_rate": 1e-3,
            "n_fit": n_fit,
            "n_validation": int(noisy_val.shape[0]),
            "eval_at": eval_at,
            "params": "raw (no EMA)",
        },
    )

    from dsm_jax.plotting import plot_image_grid

    rows = [test[:8], y_test[:8]] + [np.asarray(apply(p, jnp.asarray(y_test[:8]))) for p in final.values()]
    plot_image_grid(
        np.clip(np.concatenate(rows), -1, 1),
        ncols=8,
        title=f"clean / noisy (sigma={SIGMA}) / SURE (noisy data only) / DSM (clean data), step {steps}",
        path=args.out / "study11_sure.png",
        dpi=100,
    )
    return results


if __name__ == "__main__":
    main()
