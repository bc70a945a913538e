"""Study 14(b) (super-resolution and deblurring) end to end in quick mode (the harness, not the results)."""

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
NAME = "study14_inverse_problems"


def _finite(values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


@pytest.mark.slow  # five sampler compilations of the U-Net and its vjp: ~50 s of CPU
def test_study14_inverse_problems(tmp_path):
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        importlib.import_module(NAME).main(["--quick", "--out", str(tmp_path)])
    finally:
        sys.path.remove(str(EXPERIMENTS))
    payload = json.loads((tmp_path / f"{NAME}.json").read_text())
    assert payload["quick"] is True and payload["study"] == NAME
    assert (tmp_path / f"{NAME}.png").stat().st_size > 0
    r = payload["results"]
    assert _finite([r["frechet_floor"], r["frechet_gaussian"], r["accuracy_truth"]])
    # The truth is a digit set the classifier labels well even in quick mode (it is trained, the model is not).
    assert r["accuracy_truth"] >= 0.75
    expected = {
        "superres_noisy": {"naive", "wiener", "dps", "pigdm"},
        "superres_noise_free": {"naive", "wiener", "dps", "pigdm", "projection"},
        "deblur": {"naive", "wiener", "dps", "pigdm"},
    }
    assert set(r["problems"]) == set(expected)
    for problem, methods in expected.items():
        rows = r["problems"][problem]
        assert set(rows) == methods
        for name, row in rows.items():
            keys = ["psnr", "psnr_se", "frechet", "accuracy", "residual_rms"]
            if name not in ("naive", "wiener"):
                keys += ["psnr_mean_of_draws", "psnr_mean_of_draws_se", "accuracy_mean_of_draws"]
            assert _finite([row[k] for k in keys]), (problem, name, row)
            assert 0.0 <= row["accuracy"] <= 1.0
        selection = r["dps_step_size_selection"][problem]
        assert selection["chosen"] in payload["settings"]["dps_step_sizes"]
        assert selection["validation_psnr"][str(selection["chosen"])] == max(selection["validation_psnr"].values())
        # The best linear estimator beats the naive inverse (2-6 dB on these 8 digits; no model involved).
        assert rows["wiener"]["psnr"] > rows["naive"]["psnr"] + 1.0
