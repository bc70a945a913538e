"""Study 13: sample quality per model evaluation, from annealed Langevin to Heun and DPM-Solver++.

Four trained models, each the run of a preset of ``dsm-jax train``: an NCSN
(multi-scale DSM) MLP and an EDM-trained MLP on the eight Gaussians
(presets ``default`` and ``edm``), an NCSN U-Net and an EDM U-Net on the 8x8
digits (``digits`` and ``edm_digits``). Each is sampled with annealed
Langevin (1 to 100 steps per level), Euler-Maruyama and predictor-corrector
on the reverse VE SDE, the adaptive probability-flow ODE (Tsit5 at several
tolerances), and the sigma-grid solvers Euler, Heun (EDM Algorithm 1; and
Algorithm 2, its stochastic version, at S_churn 3 and 40,
the latter at EDM's cap gamma = sqrt(2) - 1) and
DPM-Solver++ (2M) on Karras grids spanning the run's sigma range, at budgets
from 5 to 1000 model evaluations (NFE). Quality: MMD^2 to held-out mixture
draws over its two-sample floor (toys); the Frechet distance in the digits
classifier's features (a small-scale FID) next to its floor (held-out real
vs training real) and a full-covariance Gaussian fitted to the data
(digits). Each sample set's wall-clock time is recorded (one run after
compilation; the compilation time separately).

The trained runs are cached in ``experiments/results/_cache/<preset>``
(the digits run is the one studies 10-12 use); quick mode trains nothing and
uses tiny untrained models (its numbers test the harness, not the samplers).
The rows of a finished case are kept in ``_cache/study13_rows_<case>.json``,
so an interrupted full run resumes at the next case (delete them to redo).
"""

from __future__ import annotations

import dataclasses
import json
import time

import _common as C
import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax import noise, samplers
from dsm_jax.config import get_preset
from dsm_jax.metrics import digits_features, frechet_distance, frechet_with_baselines, mmd2, mmd2_floor
from dsm_jax.models import init_params
from dsm_jax.run import build_run, load_trained, train_and_sample, vesde_of_grid

CASES = (
    ("toy", "ncsn", "default"),
    ("toy", "edm", "edm"),
    ("digits", "ncsn", "digits"),
    ("digits", "edm", "edm_digits"),
)
# Budgets per sampler family; the actual NFE of each setting is recorded.
FULL = {
    "ald": [1, 2, 5, 10, 20, 50],  # steps per level (NFE = levels x steps + 1)
    "em": [5, 10, 20, 50, 100, 200, 1000],  # time steps (NFE = steps + 1)
    "pc": [5, 10, 25, 50, 100, 500],  # predictor steps, one corrector each (NFE = 2 steps + 1)
    "ode": [1e-1, 1e-2, 1e-3, 1e-4],  # rtol = atol
    "euler": [5, 10, 20, 35, 50, 100, 200, 1000],  # levels (NFE = levels)
    "heun": [3, 5, 10, 18, 25, 50, 100, 500],  # levels (NFE = 2 levels - 1)
    "dpmpp": [5, 10, 20, 35, 50, 100, 200],  # levels (NFE = levels)
    "heun_churn": [3, 40],  # EDM Algorithm 2 on 18 levels (35 NFE): S_churn (gamma = min(S_churn / 18, 0.414))
}
# The digits U-Net runs a lax.scan of convolutions slowly on a CPU: smaller sweeps there.
# (0.3-0.4 s per evaluation of 297 images here: each sample set of 401 evaluations takes minutes).
DIGITS = {
    "ald": [1, 5, 20],
    "em": [20, 100],
    "pc": [10, 50],
    "ode": [1e-2],
    "euler": [10, 35, 100],
    "heun": [5, 10, 18, 50],
    "dpmpp": [5, 10, 20, 35],
    "heun_churn": [3, 40],
}
QUICK = {"ald": [1], "em": [5], "pc": [3], "ode": [1e-1], "euler": [4], "heun": [3], "dpmpp": [4], "heun_churn": [10]}


def trained(preset: str, quick: bool):
    """``(run, ema_params)`` of ``dsm-jax train --preset <preset>``, trained into the cache on first use."""
    config = get_preset(preset)
    if quick:
        tiny = dict(num_sigmas=4, steps_per_sigma=2)
        if config.dataset == "digits":
            tiny.update(channels=8, channel_mults=(1,))
        else:
            tiny.update(width=16, depth=1)
        run = build_run(dataclasses.replace(config, **tiny))
        return run, init_params(run.model, jax.random.key(0), jnp.asarray(run.dataset.train[:1]))
    workdir = C.RESULTS_DIR / "_cache" / preset
    if not (workdir / "checkpoints").is_dir():
        train_and_sample(config, workdir, user_set=frozenset(), sample=False, quiet=True)
    return load_trained(workdir)


def sampler_calls(run, model_fn, budgets: dict):
    """``[(sampler, setting, fn(x_init, key) -> SampleResult, prior)]`` for every budget; prior "grid" or "sde"."""
    p = run.config.parameterization
    sigmas = jnp.asarray(run.sigmas)
    sde = vesde_of_grid(run.sigmas)
    hi, lo = float(run.sigmas[0]), float(run.sigmas[-1])
    out = []
    for k in budgets["ald"]:
        step_lr = 2.0 * float(noise.ncsnv2_step_size(run.sigmas, k))  # technique 4, as build_run

        def ald(x, key, k=k, step_lr=step_lr):
            return samplers.annealed_langevin(
                model_fn, x, key, sigmas, steps_per_sigma=k, step_lr=step_lr, parameterization=p, return_result=True
            )

        out.append(("ald", k, ald))
    for n in budgets["em"]:
        out.append(
            (
                "em",
                n,
                lambda x, key, n=n: samplers.euler_maruyama(model_fn, sde, x, key, num_steps=n, parameterization=p),
            )
        )
    for n in budgets["pc"]:
        out.append(
            (
                "pc",
                n,
                lambda x, key, n=n: samplers.predictor_corrector(
                    model_fn, sde, x, key, num_steps=n, snr=run.config.snr, parameterization=p
                ),
            )
        )
    for tol in budgets["ode"]:
        out.append(
            (
                "ode",
                tol,
                lambda x, key, tol=tol: samplers.probability_flow_ode(
                    model_fn, sde, x, rtol=tol, atol=tol, parameterization=p
                ),
            )
        )
    grid_samplers = {"euler": samplers.euler, "heun": samplers.heun, "dpmpp": samplers.dpm_solver_pp}
    for name, solver in grid_samplers.items():
        for n in budgets[name]:
            grid = noise.karras_sigmas(hi, lo, n)
            out.append(
                (
                    name,
                    n,
                    lambda x, key, solver=solver, grid=grid: solver(
                        model_fn, x, grid, parameterization=p, return_result=True
                    ),
                )
            )
    for churn in budgets["heun_churn"]:
        grid = noise.karras_sigmas(hi, lo, 18)
        out.append(
            (
                "heun_churn",
                churn,
                lambda x, key, churn=churn, grid=grid: samplers.heun(
                    model_fn, x, grid, key, churn=churn, parameterization=p, return_result=True
                ),
            )
        )
    return out


def main(argv=None):
    args = C.parse_args(__doc__.splitlines()[0], argv)
    results, settings = {}, {"budgets_toy": FULL, "budgets_digits": DIGITS}
    for data, training, preset in CASES:
        run, params = trained(preset, args.quick)
        model_fn = run.model_fn(params)
        budgets = QUICK if args.quick else (DIGITS if data == "digits" else FULL)
        test = np.asarray(run.dataset.test)
        if data == "toy":
            n = 256 if args.quick else 2000
            mixture = run.dataset.distribution
            reference = jnp.asarray(mixture.sample(jax.random.key(3), n))
            floor = mmd2_floor(mixture.sample, jax.random.key(4), n, against=reference)
            baseline = {"mmd2_floor": float(floor.floor)}

            def quality(samples, reference=reference, floor=floor):
                value = float(mmd2(jnp.asarray(samples), reference, bandwidth=floor.bandwidth))
                return {"mmd2": value, "mmd2_over_floor": value / float(floor.floor)}
        else:
            n = 32 if args.quick else test.shape[0]
            report = frechet_with_baselines(test[:n], test, run.dataset.train, jax.random.key(4))
            baseline = {"frechet_floor": report.floor, "frechet_gaussian": report.gaussian, "frechet_n": report.n}
            test_features = digits_features(test)

            def quality(samples, test_features=test_features):
                flat = np.nan_to_num(np.asarray(samples), nan=0.0, posinf=1e3, neginf=-1e3)
                return {"frechet": frechet_distance(digits_features(flat), test_features)}

        shape = (n,) + run.dataset.shape
        x_grid = float(run.sigmas[0]) * jax.random.normal(jax.random.key(5), shape)
        cached = C.RESULTS_DIR / "_cache" / f"study13_rows_{data}_{training}.json"
        rows = [] if args.quick or not cached.exists() else json.loads(cached.read_text())
        done = {(r["sampler"], r["setting"]) for r in rows}
        for sampler, setting, fn in sampler_calls(run, model_fn, budgets):
            if (sampler, setting) in done:
                continue
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(x_grid, jax.random.key(6)).compile()
            compile_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            result = C.block(compiled(x_grid, jax.random.key(6)))
            seconds = time.perf_counter() - t0
            samples = np.asarray(result.samples)
            row = {
                "sampler": sampler,
                "setting": setting,
                "nfe": int(result.nfe),
                "seconds": seconds,
                "compile_seconds": compile_seconds,
                "finite_fraction": float(np.mean(np.all(np.isfinite(samples.reshape(n, -1)), axis=1))),
                **quality(samples),
            }
            rows.append(row)
            print(f"{data}/{training}", row, flush=True)
            if not args.quick:
                C.write_atomic(cached, json.dumps(rows, indent=1))
        results[f"{data}_{training}"] = {"rows": rows, "n": n, "train_steps": run.config.num_steps, **baseline}
    C.save_results(args, "study13_fast_samplers", results, settings)
    plot(results, args)
    return results


MARKERS = {
    "ald": "o-",
    "em": "v-",
    "pc": "s-",
    "ode": "^-",
    "euler": "x-",
    "heun": "D-",
    "dpmpp": "P-",
    "heun_churn": "*",
}


def plot(results: dict, args) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2)
    for ax, (data, training, _) in zip(axes.flat, CASES, strict=True):
        case = results[f"{data}_{training}"]
        key = "mmd2_over_floor" if data == "toy" else "frechet"
        for sampler, marker in MARKERS.items():
            rows = sorted((r for r in case["rows"] if r["sampler"] == sampler), key=lambda r: r["nfe"])
            ax.plot([r["nfe"] for r in rows], [r[key] for r in rows], marker, label=sampler, ms=4)
        ax.set_xscale("log")
        # The unbiased MMD^2 at the floor is often negative: a symmetric log axis, nothing clamped.
        ax.set_yscale("symlog", linthresh=1.0) if data == "toy" else ax.set_yscale("log")
        if data == "toy":
            ax.axhline(1.0, color="0.5", ls="--", lw=0.8, label="two-sample floor")
            ax.set_ylabel("MMD^2 / floor")
        else:
            ax.axhline(case["frechet_floor"], color="0.5", ls="--", lw=0.8, label="floor (real vs real)")
            ax.axhline(case["frechet_gaussian"], color="0.5", ls=":", lw=0.8, label="Gaussian fit")
            ax.set_ylabel("Frechet distance (digits features)")
        ax.set_xlabel("model evaluations per sample")
        ax.set_title(f"{data}, {training}-trained")
        ax.legend(fontsize=7, ncol=2)
    C.save_figure(fig, args, "study13_fast_samplers")


if __name__ == "__main__":
    main()
