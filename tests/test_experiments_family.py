"""The score-matching-family and 2-D study scripts (experiments/study0[1-6,9]_*.py) run end to end in quick mode.

Each script's ``main(["--quick", "--out", tmp])`` runs in-process; the test
checks the JSON it writes (keys, finite numbers) and a few properties that
hold even at quick settings (exact quantities, sums, shapes). Quick numbers
are not results.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def run_study(name: str, tmp_path: Path) -> dict:
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    module = importlib.import_module(name)
    module.main(["--quick", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / f"{name}.json").read_text())
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert payload["study"] == name and payload["quick"] is True
    assert {"date", "jax", "cpu_count"} <= set(payload["machine"])
    return payload["results"]


def numbers(tree, path=""):
    """(path, value) of every leaf of a JSON tree."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from numbers(v, f"{path}/{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from numbers(v, f"{path}/{i}")
    else:
        yield path, tree


def assert_finite(tree, *, allow_none=()):
    """Every leaf is a finite number, a bool or a string; None only under a path containing an allowed part."""
    for path, value in numbers(tree):
        if value is None:
            assert any(part in path for part in allow_none), f"non-finite value at {path}"
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            assert math.isfinite(value), f"{path} = {value}"


def assert_mmd(entry):
    assert set(entry) >= {"mmd2", "floor", "ratio_to_floor", "bandwidth", "n"}
    assert entry["floor"] > 0 and entry["bandwidth"] > 0
    assert entry["ratio_to_floor"] == pytest.approx(entry["mmd2"] / entry["floor"], rel=1e-5)


@pytest.mark.slow  # ~45 s of XLA compilation; run with -m slow (keeps the default suite < 10 min)
def test_study01_cost_vs_dimension(tmp_path):
    r = run_study("study01_cost_vs_dimension", tmp_path)
    assert_finite(r, allow_none=("d_ge_128",))
    assert r["dims"] == [2, 8] and r["esm_skipped"] == []
    assert set(r["per_method"]) == {"esm", "ssm_vr_1", "dsm"}  # quick mode leaves out SSM-VR-4
    for method in ("esm", "ssm_vr_1", "dsm"):
        assert all(t > 0 for t in r["per_method"][method]["seconds"])
        assert r["loglog_slopes"][method]["all_d"] is not None
    # The exact trace holds one tangent per basis vector: its temporaries grow with d.
    esm_temp = r["per_method"]["esm"]["temp_bytes"]
    assert esm_temp[1] > esm_temp[0]
    # The parameter count is the MLP's: its first and last layers grow with d.
    assert r["num_params"][1] > r["num_params"][0]


def test_study02_two_clusters(tmp_path):
    r = run_study("study02_two_clusters", tmp_path)
    assert_finite(r)
    assert r["relative_fisher_vs_noised_score"] >= 0 and r["relative_fisher_vs_clean_score"] >= 0
    assert sum(r["langevin_mode_weights"]) == pytest.approx(1.0, abs=1e-5)
    assert r["cluster_std_p_sigma"] == pytest.approx(math.sqrt(0.5))
    assert set(r["langevin_mmd"]) == {"p_sigma", "p_data"}
    for law in r["langevin_mmd"].values():
        assert set(law) == {"h_median", "h_0.5"}
        for entry in law.values():
            assert_mmd(entry)
    assert r["langevin_mmd"]["p_sigma"]["h_0.5"]["bandwidth"] == pytest.approx(0.5)


def test_study03_swiss_roll(tmp_path):
    r = run_study("study03_swiss_roll", tmp_path)
    assert_finite(r)
    for entry in list(r["mmd"].values()) + list(r["mmd_of_data_plus_0.3_noise"].values()):
        assert_mmd(entry)
    # sigma_1 is the largest pairwise distance of Swiss-roll points (radius up to 4.5 pi / 5 ~ 2.8 plus noise).
    assert 4.5 < r["sigma_max"] < 6.5
    assert r["step_lr"] > 0 and r["train_steps"] == 20


@pytest.mark.parametrize("name", ["study04_parameterization", "study05_weighting"])
def test_per_sigma_studies(name, tmp_path):
    r = run_study(name, tmp_path)
    assert_finite(r)
    sigmas = np.asarray(r["sigmas"])
    assert sigmas.shape == (10,) and np.all(np.diff(sigmas) < 0)
    rows = r["per_variant"] if name == "study04_parameterization" else r["per_weighting"]
    # Quick mode runs two variants of each.
    expected = {"score", "x0"} if name == "study04_parameterization" else {"sigma2", "inv_sigma2"}
    assert set(rows) == expected
    for row in rows.values():
        rel = np.asarray(row["relative_fisher_per_sigma"])
        assert rel.shape == (10,) and np.all(rel >= 0)
        assert row["mean_relative_fisher"] == pytest.approx(rel.mean(), rel=1e-5)
        if name == "study05_weighting":
            assert set(row["mmd"]) == {"h_median", "h_0.25"}
            for entry in row["mmd"].values():
                assert_mmd(entry)
            assert sum(row["mode_weights"]) == pytest.approx(1.0, abs=1e-5) or sum(row["mode_weights"]) == 0


def test_study06_one_vs_many_sigmas(tmp_path):
    r = run_study("study06_one_vs_many_sigmas", tmp_path)
    assert_finite(r, allow_none=("langevin_step",))
    assert np.allclose(r["true_weights"], np.arange(1, 9) / 36.0, atol=1e-6)
    assert set(r["variants"]) == {"single_sigma_0.1", "ncsn_10_levels"}  # quick mode
    for name, v in r["variants"].items():
        for entry in v["mmd"].values():
            assert_mmd(entry)
        assert 0.0 <= v["mode_weights_tv"] <= 1.0 and 0.0 <= v["off_mode_fraction"] <= 1.0
        assert (v["langevin_step"] is None) == (name == "ncsn_10_levels")


@pytest.mark.slow  # ~45 s of XLA compilation; run with -m slow (keeps the default suite < 10 min)
def test_study09_sm_family_wallclock(tmp_path):
    r = run_study("study09_sm_family_wallclock", tmp_path)
    assert_finite(r)
    rows = r["per_dim"]["4"]
    # DSM at sigma = 0.1 targets p * N(0, 0.01 I): per component the score shrinks by 0.25 / 0.26,
    # so its relative Fisher distance to the clean score is ~ (0.01 / 0.26)^2 ~ 1.5e-3 (exact scores, no training).
    assert 5e-4 < rows["dsm_bias"] < 5e-3
    for method in ("esm", "ssm", "ssm_vr", "dsm"):
        reading = rows[method]["full_budget"]  # quick mode: no half-budget reading
        assert set(rows[method]) == {"full_budget"}
        assert reading["steps"] > 0 and reading["relative_fisher"] >= 0
