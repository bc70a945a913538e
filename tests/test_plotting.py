"""Plots: each function returns a figure and writes a non-empty PNG; bad input is refused."""

import json
import sys

import numpy as np
import pytest

from dsm_jax import plotting as P

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path, min_bytes=2000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > min_bytes


def _two_blobs(n=400, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(2.0, 0.5, (n // 2, 2)), rng.normal(-2.0, 0.5, (n // 2, 2))])


def _blob_log_prob(x):
    x = np.asarray(x)
    return np.logaddexp(-np.sum((x - 2.0) ** 2, 1) / 0.5, -np.sum((x + 2.0) ** 2, 1) / 0.5)


def test_score_field_png(tmp_path):
    from matplotlib.figure import Figure

    fig = P.plot_score_field(
        lambda x: -np.asarray(x),
        log_prob_fn=_blob_log_prob,
        path=tmp_path / "a" / "field.png",
        num_arrows=9,
        resolution=40,
    )
    assert isinstance(fig, Figure)
    _check_png(tmp_path / "a" / "field.png")
    # Background from data instead of a density, default limits from the data.
    P.plot_score_field(lambda x: -np.asarray(x), data=_two_blobs(), path=tmp_path / "hist.png", num_arrows=9)
    _check_png(tmp_path / "hist.png")
    with pytest.raises(ValueError, match=r"score_fn must return shape \[B, 2\]=\(81, 2\), got \(81, 1\)"):
        P.plot_score_field(lambda x: np.zeros((len(x), 1)), num_arrows=9)


def test_samples_and_trajectories_png(tmp_path):
    data = _two_blobs()
    P.plot_samples(data + 0.1, data, path=tmp_path / "samples.png")
    _check_png(tmp_path / "samples.png")
    P.plot_samples(data, path=tmp_path / "alone.png", xlim=(-4, 4), ylim=(-4, 4))
    _check_png(tmp_path / "alone.png")
    traj = np.cumsum(np.random.default_rng(1).normal(0, 0.1, (50, 6, 2)), axis=0)
    P.plot_trajectories(traj, data=data, num_paths=4, path=tmp_path / "traj.png")
    _check_png(tmp_path / "traj.png")
    with pytest.raises(ValueError, match=r"samples must be 2-D points of shape \[N, 2\], got shape \(5, 3\)"):
        P.plot_samples(np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"trajectory must have shape \[T, B, 2\], got \(5, 2\)"):
        P.plot_trajectories(np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"xlim must be \(low, high\) with high > low"):
        P.plot_samples(data, xlim=(1, 1))


def test_image_grid_png(tmp_path):
    images = np.linspace(-1, 1, 10 * 8 * 8).reshape(10, 8, 8, 1)
    P.plot_image_grid(images, title="digits", path=tmp_path / "grid.png")
    _check_png(tmp_path / "grid.png", min_bytes=500)
    rgb = np.random.default_rng(0).uniform(0, 1, (3, 4, 4, 3))
    P.plot_image_grid(rgb, ncols=3, data_range=(0.0, 1.0), path=tmp_path / "rgb.png")
    _check_png(tmp_path / "rgb.png", min_bytes=200)
    with pytest.raises(ValueError, match=r"images must have shape \[N, H, W, C\] with C in \(1, 3\)"):
        P.plot_image_grid(np.zeros((2, 4, 4, 2)))


def _records():
    out = [{"event": "start", "step": 0}]
    for s in range(10, 110, 10):
        out.append({"step": s, "loss": 1.0 / s, "grad_norm": 2.0, "per_sigma_loss": [1.0 / s, 2.0 / s, None]})
    out.append({"step": 110, "loss": None, "grad_norm": None, "per_sigma_loss": [None, None, None]})
    out.append({"event": "done", "step": 110})
    return out


def test_losses_from_records_and_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    records = P.read_metrics(path)
    assert len(records) == 11 and all("event" not in r for r in records)
    P.plot_losses(path, sigmas=[1.0, 0.1, 0.01], title="run", path=tmp_path / "losses.png")
    _check_png(tmp_path / "losses.png")
    P.plot_losses([{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}], path=tmp_path / "plain.png")
    _check_png(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="sigmas has 2 entries but per_sigma_loss has 3"):
        P.plot_losses(path, sigmas=[1.0, 0.1])
    with pytest.raises(ValueError, match=r"sigmas must be positive, got \[1.0, 0.0, 0.1\]"):
        P.plot_losses(path, sigmas=[1.0, 0.0, 0.1])  # a log colour scale
    with pytest.raises(ValueError, match="no training records"):
        P.plot_losses([{"event": "start", "step": 0}])
    (tmp_path / "bad.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 of .*bad.jsonl.* is not JSON"):
        P.read_metrics(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="does not exist"):
        P.read_metrics(tmp_path / "missing.jsonl")


def _records_20_sigmas(sigmas):
    return [
        {
            "step": s,
            "loss": 1.0 / s,
            "grad_norm": 1.0 + 1.0 / s,
            "per_sigma_loss": [1.0 / (s * sig**2) for sig in sigmas],
        }
        for s in range(10, 210, 10)
    ]


def test_losses_colour_twenty_sigmas_by_a_log_colorbar():
    sigmas = np.geomspace(5.0, 0.01, 20)
    fig = P.plot_losses(_records_20_sigmas(sigmas), sigmas=sigmas)
    panels, bars = fig.axes[:3], fig.axes[3:]
    assert len(panels) == 3 and len(bars) == 1  # the loss, per sigma, gradient norm; one colorbar
    assert all(ax.get_xlabel() == "step" and ax.get_ylabel() for ax in panels)
    assert all(ax.get_legend() is None for ax in panels)  # no legend to cover the curves
    assert "unweighted" in panels[1].get_title() and "weighted" in panels[0].get_title()
    assert len(panels[1].get_lines()) == 20
    colours = {tuple(line.get_color()) for line in panels[1].get_lines()}
    assert len(colours) == 20  # one colour per level
    (bar,) = bars
    assert bar.get_yscale() == "log" and "sigma" in bar.get_ylabel()
    low, high = bar.get_ylim()
    np.testing.assert_allclose([low, high], [0.01, 5.0], rtol=1e-6)
    # Without sigmas: coloured by level index, still a colorbar and no legend.
    fig = P.plot_losses(_records_20_sigmas(sigmas))
    assert "index" in fig.axes[3].get_ylabel() and fig.axes[1].get_legend() is None


def test_samples_have_axis_labels_readable_points_and_count_what_is_off_the_plot():
    data = np.random.default_rng(0).uniform(-1.0, 1.0, (400, 2))  # no tail beyond the 10% margin
    samples = np.concatenate([data, [[50.0, 50.0], [-40.0, 0.0]]])
    fig = P.plot_samples(samples, data)
    left, right = fig.axes
    assert (left.get_xlabel(), left.get_ylabel(), right.get_xlabel()) == ("$x_1$", "$x_2$", "$x_1$")
    assert left.get_title() == "data (n = 400)" and right.get_title() == "samples (n = 402, 2 outside)"
    assert right.collections[0].get_sizes()[0] >= 3.0


def test_score_field_has_a_colorbar_a_note_on_normalised_arrows_and_crops_to_the_density():
    # Two clusters at (2, 2) and (-2, -2), std 0.5: beyond the old fixed [-3, 3] box.
    def log_prob(x):
        x = np.asarray(x)
        return np.logaddexp(-np.sum((x - 2.0) ** 2, 1) / 0.5, -np.sum((x + 2.0) ** 2, 1) / 0.5)

    fig = P.plot_score_field(lambda x: -np.asarray(x), log_prob_fn=log_prob, num_arrows=9, resolution=40)
    ax, bar = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("$x_1$", "$x_2$") and bar.get_ylabel() == "density"
    assert "normalised" in fig.get_supxlabel()
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    # Density above 1% of its peak reaches 2 + 0.5 * sqrt(2 ln 100) = 3.52 from the origin; with the margin ~4.2.
    assert 3.5 < x1 < 5.0 and -5.0 < x0 < -3.5 and 3.5 < y1 < 5.0
    # A narrow density far from the origin: the box moves there and shrinks around it.
    fig = P.plot_score_field(
        lambda x: -np.asarray(x),
        num_arrows=5,
        resolution=20,
        log_prob_fn=lambda x: -np.sum((np.asarray(x) - [20.0, -10.0]) ** 2, 1) / 0.02,
    )
    (x0, x1), (y0, y1) = fig.axes[0].get_xlim(), fig.axes[0].get_ylim()
    assert x0 < 20.0 < x1 and y0 < -10.0 < y1 and x1 - x0 < 3.0
    # Background from data: a histogram density with its colorbar.
    fig = P.plot_score_field(lambda x: -np.asarray(x), data=_two_blobs(), num_arrows=5)
    assert "histogram" in fig.axes[1].get_ylabel()
    # A wide field: square arrow cells (5 along x, 3 along y) and a figure as wide as the data, not a strip.
    calls = []
    fig = P.plot_score_field(lambda x: calls.append(len(x)) or -np.asarray(x), xlim=(-2, 2), ylim=(-1, 1), num_arrows=5)
    assert calls == [15]
    width, height = fig.get_size_inches()
    assert height < 0.75 * width
    with pytest.raises(ValueError, match="num_arrows must be an integer >= 2, got 1"):
        P.plot_score_field(lambda x: -np.asarray(x), num_arrows=1)


def test_figures_display_as_png_in_ipython():
    formatters = pytest.importorskip("IPython.core.formatters")
    fig = P.plot_samples(_two_blobs())
    png = formatters.PNGFormatter()(fig)  # what a notebook cell ending with the figure shows
    assert png[:8] == PNG_SIGNATURE and len(png) > 2000


def test_missing_matplotlib_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r'pip install "dsm_jax\[plots\]"'):
        P.plot_samples(np.zeros((3, 2)))
