"""Studies 7, 8, 10, 11, 12, 13 end to end in quick mode (tiny budgets: the harness, not the results)."""

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _run(name, tmp_path):
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        module = importlib.import_module(name)
        module.main(["--quick", "--out", str(tmp_path)])
    finally:
        sys.path.remove(str(EXPERIMENTS))
    payload = json.loads((tmp_path / f"{name}.json").read_text())
    assert payload["quick"] is True and payload["study"] == name
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    return payload["results"]


def _finite(values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_study07_langevin_vs_annealed(tmp_path):
    r = _run("study07_langevin_vs_annealed", tmp_path)
    for kind in ("exact_score", "learned_score"):
        for sampler in ("langevin", "annealed"):
            w = r[kind][sampler]
            assert len(w) == 2 and _finite(w) and abs(sum(w) - 1.0) < 1e-5
    # With the exact score even quick settings separate the samplers: 512 samples, binomial
    # SE sqrt(0.16 / 512) = 0.018; annealed is within 4 SE of 0.8, plain Langevin is not.
    assert abs(r["exact_score"]["annealed"][1] - 0.8) < 4 * 0.018
    assert abs(r["exact_score"]["langevin"][1] - 0.8) > 4 * 0.018


def test_study08_sde_samplers(tmp_path):
    r = _run("study08_sde_samplers", tmp_path)
    for kind in ("exact", "learned"):
        assert {row["sampler"] for row in r[kind]} == {"em", "pc", "ode"}
        assert all(row["nfe"] > 0 and _finite([row["mmd2"], row["sliced_wasserstein"]]) for row in r[kind])
    bpd = r["bits_per_dim"]
    assert _finite(bpd.values())
    # The ODE with the exact score reproduces the exact log-likelihood (tolerance 1e-5 solver, 16 points).
    assert abs(bpd["ode_exact_score"] - bpd["exact_mixture"]) < 0.05


@pytest.mark.slow  # ~45 s of XLA compilation; run with -m slow (keeps the default suite < 10 min)
def test_study10_digits_unet(tmp_path):
    r = _run("study10_digits_unet", tmp_path)
    assert [row["sigma"] for row in r["denoising"]] == [0.1, 0.2, 0.5]
    for row in r["denoising"]:
        assert _finite([row["psnr_noisy"], row["psnr_tweedie"], row["psnr_wiener"]])
        # The Wiener filter fitted on the training set always beats the noisy input.
        assert row["psnr_wiener"] > row["psnr_noisy"]
    assert _finite([r["bits_per_dim"]["ode_model"], r["bits_per_dim"]["gaussian_fit"]])


def test_study11_sure(tmp_path):
    r = _run("study11_sure", tmp_path)
    assert _finite(
        [
            r["psnr_noisy"],
            r["psnr_wiener_clean_fit"],
            r["psnr_sure_noisy_only"],
            r["psnr_dsm_clean"],
            r["psnr_sure_early_stopped"],
        ]
    )
    assert r["psnr_wiener_clean_fit"] > r["psnr_noisy"]
    for name in ("sure_noisy_only", "dsm_clean"):
        assert [row["step"] for row in r["curves"][name]] == [2, 4]
        assert _finite([row["psnr_test"] for row in r["curves"][name]])
    # The zero-initialised denoiser is the identity, whose SURE is exactly d sigma^2 = 2.56 (a Rademacher
    # probe gives v^T I v = d, no Monte-Carlo error); four Adam steps of 1e-3 move it by ~0.04 (a wrong
    # sign or scale of the divergence term would land near -2.56 or 0).
    assert all(abs(row["sure_validation"] - r["sure_identity"]) < 0.5 for row in r["curves"]["sure_noisy_only"])


def test_study12_inpainting(tmp_path):
    r = _run("study12_inpainting", tmp_path)
    for mask in ("bottom_half_missing", "right_half_missing"):
        row = r[mask]
        assert row["known_pixels_kept_exactly"] is True
        assert _finite(
            [
                row["psnr_score_model"],
                row["psnr_score_model_mean_of_draws"],
                row["psnr_linear_conditional_mean"],
                row["psnr_mean_image"],
            ]
        )


@pytest.mark.slow  # four untrained tiny runs x seven samplers: ~1 min of XLA compilation
def test_study13_fast_samplers(tmp_path):
    r = _run("study13_fast_samplers", tmp_path)
    assert set(r) == {"toy_ncsn", "toy_edm", "digits_ncsn", "digits_edm"}
    for case in r.values():
        samplers = {row["sampler"] for row in case["rows"]}
        assert samplers == {"ald", "em", "pc", "ode", "euler", "heun", "dpmpp", "heun_churn"}
        for row in case["rows"]:
            quality = row.get("mmd2", row.get("frechet"))
            assert row["nfe"] > 0 and _finite([quality, row["seconds"]])
            if row["sampler"] == "heun":
                assert row["nfe"] == 2 * row["setting"] - 1
            if row["sampler"] in ("euler", "dpmpp"):
                assert row["nfe"] == row["setting"]
