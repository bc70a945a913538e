"""Study 11: SURE from noisy data only vs DSM on clean data (8x8 digits, sigma = 0.2).

Two denoisers D(y) = y - sigma eps_hat(y) with the same small U-Net
predicting the noise, and the same budget. (a) SURE (Stein 1981): trained on noisy images y = x +
sigma eps only, minimising Stein's unbiased estimate of the risk
|D(y) - y|^2 + 2 sigma^2 div D(y) - d sigma^2 with a Hutchinson
divergence (``dsm_jax.losses.sure_loss``); the clean images are never seen.
(b) DSM on clean images at the same sigma with the eps parameterization,
whose optimum is the same posterior mean E[x | y]. PSNR on held-out images
noised at sigma, next to the noisy input and the Wiener filter fitted on
clean training data. The seeds' claim: SURE nearly matches the clean-data
denoiser.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import _common as C
from dsm_jax.data import load_dataset
from dsm_jax.losses import dsm_loss, sure_loss
from dsm_jax.metrics import psnr
from dsm_jax.models import UNet, init_params, make_model_fn
from study10_digits_unet import wiener

SIGMA = 0.2


def main(argv=None):
    args = C.parse_args(__doc__.splitlines()[0], argv)
    steps = 2 if args.quick else 1500
    data = load_dataset("digits", seed=args.seed)
    train, test = data.train, data.test
    rng = np.random.RandomState(args.seed)
    noisy_train = (train + SIGMA * rng.randn(*train.shape)).astype(np.float32)  # a fixed noisy data set
    model = UNet(channels=8, channel_mults=(1,)) if args.quick else UNet(channels=16, channel_mults=(1, 2))
    params = init_params(model, jax.random.key(0), jnp.asarray(train[:1]))

    def denoiser(p):
        # Residual form D(y) = y - sigma eps_hat(y): the network predicts the noise (it starts at
        # D = identity); DSM with parameterization "eps" trains the same function class.
        f = make_model_fn(model, p)
        return lambda y, s: y - s.reshape((-1,) + (1,) * (y.ndim - 1)) * f(y, s)

    def sure(p, y, k):
        return sure_loss(denoiser(p), y, SIGMA, k)

    def dsm(p, x, k):
        return dsm_loss(make_model_fn(model, p), x, SIGMA, k, parameterization="eps")

    pick = lambda arr: (lambda s: arr[np.random.RandomState(s).randint(0, arr.shape[0], 128)])
    denoisers, info = {}, {}
    for name, loss_fn, source in (("sure_noisy_only", sure, noisy_train), ("dsm_clean", dsm, train)):
        state, i = C.fit(loss_fn, params, pick(source), num_steps=steps, learning_rate=1e-3, seed=args.seed)
        f = denoiser(state.ema_params)
        denoisers[name] = jax.jit(lambda y, f=f: f(y, jnp.full((y.shape[0],), SIGMA)))
        info[name] = i["seconds"]

    y = (test + SIGMA * np.random.RandomState(1).randn(*test.shape)).astype(np.float32)
    score = lambda pred: float(jnp.mean(psnr(jnp.clip(jnp.asarray(pred), -1, 1), jnp.asarray(test))))
    results = {"psnr_noisy": score(y), "psnr_wiener_clean_fit": score(wiener(train, y, SIGMA))}
    for name, d in denoisers.items():
        results[f"psnr_{name}"] = score(d(jnp.asarray(y)))
    results["train_seconds"] = info
    print(results)
    C.save_results(args, "study11_sure", results, {"sigma": SIGMA, "steps": steps, "batch": 128})

    from dsm_jax.plotting import plot_image_grid

    rows = [test[:8], y[:8]] + [np.asarray(d(jnp.asarray(y[:8]))) for d in denoisers.values()]
    plot_image_grid(np.clip(np.concatenate(rows), -1, 1), ncols=8,
                    title=f"clean / noisy (sigma={SIGMA}) / SURE (noisy data only) / DSM (clean data)",
                    path=args.out / "study11_sure.png", dpi=100)
    return results


if __name__ == "__main__":
    main()
