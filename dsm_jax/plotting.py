"""Figures: score fields, samples against data, Langevin trajectories, image grids, loss curves.

matplotlib is an optional extra (``pip install "dsm_jax[plots]"``); it is
imported when a function here is called, with a clear error if it is
missing. Figures are built with ``matplotlib.figure.Figure`` directly, not
through ``pyplot``: nothing depends on a display or a global backend (PNG
files are rendered by Agg), a script opens no window, and no figure is left
open in a loop. A returned figure shows as a PNG image when it ends a
notebook cell (or is passed to ``IPython.display.display``), in Jupyter and
Colab alike and without ``%matplotlib inline``: it has ``_repr_png_``,
IPython's hook for objects that render themselves.

Every function returns the figure and, given ``path``, also writes it as a
PNG (``dpi`` keyword, parent directories created).
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from dsm_jax._checks import check_positive_int
from dsm_jax._utils import PathLike

__all__ = [
    "plot_image_grid",
    "plot_losses",
    "plot_samples",
    "plot_score_field",
    "plot_trajectories",
    "read_metrics",
]

Limits = tuple[float, float]

_DATA_COLOR = "#9aa5b1"
_SAMPLE_COLOR = "#d1495b"


@functools.cache
def _inline_figure_class(figure_class: type) -> type:
    """``figure_class`` with ``_repr_png_``, so that notebooks show it without pyplot."""

    class InlineFigure(figure_class):
        """A ``matplotlib.figure.Figure`` that IPython displays as a PNG image."""

        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, format="png")
            return buffer.getvalue()

    return InlineFigure


def _figure(nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] = (4.2, 4.0), **kwargs):
    """A new figure with an ``nrows x ncols`` grid of axes (always a 2-D array)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            'dsm_jax.plotting needs matplotlib: pip install "dsm_jax[plots]" (or pip install matplotlib).'
        ) from None
    fig = _inline_figure_class(Figure)(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def _finish(fig, path: PathLike | None, dpi: int):
    if path is not None:
        path = os.fspath(path)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fig.savefig(path, dpi=dpi, format="png")
    return fig


def _points(name: str, x: Any) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be 2-D points of shape [N, 2], got shape {arr.shape}.")
    return arr


def _limits(name: str, lim: Limits | None, *arrays: np.ndarray | None, axis: int) -> Limits:
    """Explicit limits, or the 0.5%-99.5% range of the points with a 10% margin."""
    if lim is not None:
        low, high = (float(v) for v in lim)
        if not high > low:
            raise ValueError(f"{name} must be (low, high) with high > low, got {tuple(lim)!r}.")
        return low, high
    values = np.concatenate([a[:, axis] for a in arrays if a is not None])
    low, high = np.percentile(values, [0.5, 99.5])
    pad = 0.1 * max(high - low, 1e-6)
    return float(low - pad), float(high + pad)


def _scatter(ax, pts: np.ndarray, color: str, label: str):
    # Marker area in pt^2: readable dots for a few hundred points, no solid blot for tens of thousands.
    size = float(np.clip(12000.0 / len(pts), 3.0, 30.0))
    ax.scatter(pts[:, 0], pts[:, 1], s=size, c=color, alpha=0.55, linewidths=0, label=label, rasterized=True)


def _style_2d(ax, xlim: Limits, ylim: Limits, title: str | None):
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    if title:
        ax.set_title(title)


def _density_limits(
    log_prob_fn: Callable[[Any], Any], *, threshold: float = 1e-2, size: int = 65
) -> tuple[Limits, Limits]:
    """The box holding where ``exp(log_prob_fn)`` exceeds ``threshold`` times its maximum, with a 10% margin.

    Searched on a ``size^2`` grid from ``[-3, 3]^2``, doubled (up to 64 times)
    while the region touches the box's edge; ``[-3, 3]^2`` if nothing is found.
    """
    half, centre = 3.0, np.zeros(2)
    for _ in range(7):
        axis = np.linspace(-half, half, size)
        grid = np.stack(np.meshgrid(centre[0] + axis, centre[1] + axis), axis=-1).reshape(-1, 2).astype(np.float32)
        log_p = np.asarray(log_prob_fn(grid), np.float64).reshape(size, size)  # [y, x]
        finite = np.isfinite(log_p)
        if not finite.any():
            break
        inside = finite & (log_p >= np.max(log_p[finite]) + math.log(threshold))
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        if rows[0] > 0 and cols[0] > 0 and rows[-1] < size - 1 and cols[-1] < size - 1:
            step = axis[1] - axis[0]
            low = centre + np.array([axis[cols[0]], axis[rows[0]]]) - step
            high = centre + np.array([axis[cols[-1]], axis[rows[-1]]]) + step
            pad = 0.1 * (high - low)
            return (float(low[0] - pad[0]), float(high[0] + pad[0])), (float(low[1] - pad[1]), float(high[1] + pad[1]))
        half *= 2.0
    return (-3.0, 3.0), (-3.0, 3.0)


# ---------------------------------------------------------------------------
# Score field
# ---------------------------------------------------------------------------


def plot_score_field(
    score_fn: Callable[[Any], Any],
    *,
    log_prob_fn: Callable[[Any], Any] | None = None,
    data: Any | None = None,
    xlim: Limits | None = None,
    ylim: Limits | None = None,
    num_arrows: int = 21,
    resolution: int = 200,
    title: str | None = "score field",
    path: PathLike | None = None,
    dpi: int = 120,
):
    """Arrows of a 2-D score over a heat map of the density, with a colorbar.

    The background is ``exp(log_prob_fn)`` on a ``resolution^2`` grid when
    ``log_prob_fn`` is given (e.g. the exact density), else a 2-D histogram
    of ``data``, else blank; the colorbar gives its scale. Arrows show the
    direction of ``s(x)`` on a grid of square cells, ``num_arrows`` along
    the longer side; their length is normalised, ``|s| / (|s| + c)`` with
    ``c`` the median norm on the grid (so it grows like ``|s|`` for small
    scores and saturates for large ones, and the field stays readable far
    from the data where scores are huge); a note under the plot says so.

    The default limits crop to the data: from ``data`` when given, else to
    where the density is above 1% of its peak (plus a 10% margin), else
    ``[-3, 3]``.

    Args:
        score_fn: ``score_fn(x [B, 2]) -> [B, 2]``, e.g.
            ``lambda x: model_fn(x, jnp.full(len(x), sigma))``.
        log_prob_fn: ``log_prob_fn(x [B, 2]) -> [B]``, optional.
        data: ``[N, 2]`` points for the histogram (and the default limits).
        xlim, ylim: plot limits; default as above.
        num_arrows: arrows along the longer side (>= 2).
        resolution: heat-map pixels per side.
        title: axes title.
        path: where to write a PNG.
        dpi: PNG resolution.

    Returns:
        The matplotlib ``Figure``.
    """
    num_arrows = check_positive_int("num_arrows", num_arrows, minimum=2)
    data = None if data is None else _points("data", data)
    if data is None and log_prob_fn is not None and xlim is None and ylim is None:
        xlim, ylim = _density_limits(log_prob_fn)
    default = (-3.0, 3.0)
    xlim = _limits("xlim", xlim if (xlim is not None or data is not None) else default, data, axis=0)
    ylim = _limits("ylim", ylim if (ylim is not None or data is not None) else default, data, axis=1)
    # Height from the aspect of the limits (equal axes), so a wide field is not a strip under a tall colorbar.
    aspect = float(np.clip((ylim[1] - ylim[0]) / (xlim[1] - xlim[0]), 0.4, 2.5))
    fig, axes = _figure(size=(5.0, 3.6 * aspect + 1.0))
    ax = axes[0, 0]

    if log_prob_fn is not None or data is not None:
        if log_prob_fn is not None:
            gx, gy = np.linspace(*xlim, resolution), np.linspace(*ylim, resolution)
            grid = np.stack(np.meshgrid(gx, gy), axis=-1).reshape(-1, 2).astype(np.float32)
            density = np.exp(np.asarray(log_prob_fn(grid), np.float64)).reshape(resolution, resolution)
            label = "density"
        else:
            points = np.asarray(data)
            # About 4 points per bin along each side's sqrt(N) / 2 bins: a smooth picture, not shot noise.
            bins = int(np.clip(math.sqrt(len(points)) / 2, 10, resolution // 2))
            counts, _, _ = np.histogram2d(points[:, 1], points[:, 0], bins=bins, range=[ylim, xlim])
            cell_area = (xlim[1] - xlim[0]) * (ylim[1] - ylim[0]) / bins**2
            density = counts / (len(points) * cell_area)  # a density estimate, comparable with a true density
            label = "density (histogram of the data)"
        image = ax.imshow(
            density, origin="lower", extent=(*xlim, *ylim), cmap="Blues", aspect="auto", interpolation="bilinear"
        )
        fig.colorbar(image, ax=ax, shrink=0.85, label=label)

    # Square cells: num_arrows along the longer side, as many as fit along the other.
    width, height = xlim[1] - xlim[0], ylim[1] - ylim[0]
    cell = max(width, height) / (num_arrows - 1)
    nx, ny = (max(2, int(round(extent / cell)) + 1) for extent in (width, height))
    ax_x, ax_y = np.linspace(*xlim, nx), np.linspace(*ylim, ny)
    pts = np.stack(np.meshgrid(ax_x, ax_y), axis=-1).reshape(-1, 2).astype(np.float32)
    s = np.asarray(score_fn(pts), np.float64)
    if s.shape != pts.shape:
        raise ValueError(f"score_fn must return shape [B, 2]={pts.shape}, got {s.shape}.")
    norm = np.linalg.norm(s, axis=1, keepdims=True)
    c = max(float(np.median(norm)), 1e-12)
    cell = min(width / (nx - 1), height / (ny - 1))
    arrows = 0.9 * cell * s / (norm + c)
    ax.quiver(
        pts[:, 0],
        pts[:, 1],
        arrows[:, 0],
        arrows[:, 1],
        angles="xy",
        scale_units="xy",
        scale=1.0,
        color="#1b1b1b",
        width=0.004,
        headwidth=3.5,
    )
    _style_2d(ax, xlim, ylim, title)
    fig.supxlabel(
        f"arrows: direction of the score, length normalised to |s| / (|s| + c), c = median |s| = {c:.3g}",
        fontsize=8,
        color="#555555",
    )
    return _finish(fig, path, dpi)


# ---------------------------------------------------------------------------
# Samples and trajectories
# ---------------------------------------------------------------------------


def plot_samples(
    samples: Any,
    data: Any | None = None,
    *,
    xlim: Limits | None = None,
    ylim: Limits | None = None,
    titles: Sequence[str] = ("data", "samples"),
    path: PathLike | None = None,
    dpi: int = 120,
):
    """Generated 2-D samples, next to the data when given (two panels, same limits).

    Panel titles give the number of points and, when some lie beyond the
    limits (not drawn), how many.

    Args:
        samples: ``[N, 2]``.
        data: ``[M, 2]`` reference points, optional.
        xlim, ylim: limits; default from the data and samples.
        titles: panel titles (data, samples).
        path: where to write a PNG.
        dpi: PNG resolution.

    Returns:
        The matplotlib ``Figure``.
    """
    samples = _points("samples", samples)
    data = None if data is None else _points("data", data)
    # Limits from the data when there is some, so wild samples do not shrink the picture.
    ref = data if data is not None else samples
    xlim, ylim = _limits("xlim", xlim, ref, axis=0), _limits("ylim", ylim, ref, axis=1)
    panels = [(data, _DATA_COLOR, titles[0])] if data is not None else []
    panels.append((samples, _SAMPLE_COLOR, titles[-1]))
    aspect = float(np.clip((ylim[1] - ylim[0]) / (xlim[1] - xlim[0]), 0.4, 2.5))
    fig, axes = _figure(1, len(panels), size=(4.2, 4.2 * aspect + 0.5), sharex=True, sharey=True)
    for ax, (pts, color, title) in zip(axes[0], panels, strict=False):
        _scatter(ax, pts, color, title)
        shown = (pts[:, 0] >= xlim[0]) & (pts[:, 0] <= xlim[1]) & (pts[:, 1] >= ylim[0]) & (pts[:, 1] <= ylim[1])
        outside = int(np.sum(~shown))
        # Points beyond the limits are not drawn: say how many, so a diffuse sampler is not mistaken for a sparse one.
        _style_2d(ax, xlim, ylim, f"{title} (n = {len(pts)}" + (f", {outside} outside)" if outside else ")"))
    for ax in axes[0, 1:]:
        ax.set_ylabel("")
    return _finish(fig, path, dpi)


def plot_trajectories(
    trajectory: Any,
    *,
    data: Any | None = None,
    num_paths: int = 12,
    xlim: Limits | None = None,
    ylim: Limits | None = None,
    title: str | None = "Langevin trajectories",
    path: PathLike | None = None,
    dpi: int = 120,
):
    """Paths of a few 2-D chains over the data: start (circle), path (line), end (star).

    Args:
        trajectory: ``[T, B, 2]`` states over time (e.g. a sampler's
            ``return_trajectory=True`` output).
        data: ``[M, 2]`` points drawn behind, optional.
        num_paths: chains drawn (the first ones).
        xlim, ylim: limits; default from the data, else from the paths.
        title: axes title.
        path: where to write a PNG.
        dpi: PNG resolution.

    Returns:
        The matplotlib ``Figure``.
    """
    traj = np.asarray(trajectory, dtype=np.float64)
    if traj.ndim != 3 or traj.shape[2] != 2 or traj.shape[0] < 1 or traj.shape[1] < 1:
        raise ValueError(f"trajectory must have shape [T, B, 2], got {traj.shape}.")
    if isinstance(num_paths, bool) or not isinstance(num_paths, int) or num_paths < 1:
        raise ValueError(f"num_paths must be an integer >= 1, got {num_paths!r}.")
    data = None if data is None else _points("data", data)
    paths = traj[:, :num_paths]
    ref = data if data is not None else paths.reshape(-1, 2)
    xlim, ylim = _limits("xlim", xlim, ref, axis=0), _limits("ylim", ylim, ref, axis=1)
    fig, axes = _figure()
    ax = axes[0, 0]
    if data is not None:
        _scatter(ax, data, _DATA_COLOR, "data")
    colors = [_color_cycle(i) for i in range(paths.shape[1])]
    for i in range(paths.shape[1]):
        ax.plot(paths[:, i, 0], paths[:, i, 1], "-", lw=0.8, alpha=0.8, color=colors[i])
    ax.scatter(paths[0, :, 0], paths[0, :, 1], s=18, facecolors="none", edgecolors=colors, label="start")
    ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=60, marker="*", c=colors, label="end")
    ax.legend(loc="upper right", fontsize=8)
    _style_2d(ax, xlim, ylim, title)
    return _finish(fig, path, dpi)


def _color_cycle(i: int) -> str:
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
    return palette[i % len(palette)]


# ---------------------------------------------------------------------------
# Image grids
# ---------------------------------------------------------------------------


def plot_image_grid(
    images: Any,
    *,
    ncols: int | None = None,
    data_range: Limits = (-1.0, 1.0),
    title: str | None = None,
    cell_inches: float = 0.6,
    path: PathLike | None = None,
    dpi: int = 120,
):
    """Images ``[N, H, W, C]`` (C = 1 grey, 3 RGB) tiled in a grid, values clipped to ``data_range``.

    Args:
        images: ``[N, H, W, C]`` or ``[N, H, W]``, channels-last.
        ncols: images per row; default about ``sqrt(N)``.
        data_range: ``(low, high)`` mapped to black and white (digits: ``(-1, 1)``).
        title: figure title.
        cell_inches: size of one image in the figure.
        path: where to write a PNG.
        dpi: PNG resolution.

    Returns:
        The matplotlib ``Figure``.
    """
    imgs = np.asarray(images, dtype=np.float64)
    if imgs.ndim == 3:
        imgs = imgs[..., None]
    if imgs.ndim != 4 or imgs.shape[-1] not in (1, 3) or imgs.shape[0] == 0:
        raise ValueError(f"images must have shape [N, H, W, C] with C in (1, 3), got {np.shape(images)}.")
    low, high = _limits("data_range", data_range, axis=0)
    n, h, w, c = imgs.shape
    if ncols is None:
        ncols = int(math.ceil(math.sqrt(n)))
    elif isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be an integer >= 1, got {ncols!r}.")
    nrows = int(math.ceil(n / ncols))
    unit = np.clip((imgs - low) / (high - low), 0.0, 1.0)
    # One canvas with a 1-pixel gutter between images (one imshow, crisp pixels).
    canvas = np.ones((nrows * (h + 1) + 1, ncols * (w + 1) + 1, c))
    for i in range(n):
        r, q = divmod(i, ncols)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = unit[i]
    fig, axes = _figure(size=(cell_inches * ncols + 0.2, cell_inches * nrows + (0.4 if title else 0.2)))
    ax = axes[0, 0]
    ax.imshow(
        canvas[..., 0] if c == 1 else canvas,
        cmap="gray" if c == 1 else None,
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
    )
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return _finish(fig, path, dpi)


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------


def read_metrics(path: PathLike) -> list:
    """The training records of a ``metrics.jsonl`` file (event lines skipped).

    Raises:
        ValueError: the file is missing or a line is not JSON.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"metrics file {path!r} does not exist.")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"line {number} of {path!r} is not JSON: {err}.") from None
            if isinstance(record, dict) and "event" not in record and "loss" in record:
                records.append(record)
    return records


def _series(records: list, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of records holding ``key``; None (non-finite) becomes NaN."""
    rows = [(r["step"], r[key]) for r in records if key in r]
    if not rows:
        return np.zeros(0), np.zeros((0,))
    steps = np.asarray([s for s, _ in rows], dtype=np.float64)
    values = np.asarray(
        [
            [np.nan if v is None else v for v in value]
            if isinstance(value, list)
            else (np.nan if value is None else value)
            for _, value in rows
        ],
        dtype=np.float64,
    )
    return steps, values


def plot_losses(
    metrics: PathLike | Iterable[dict],
    *,
    sigmas: Sequence[float] | None = None,
    title: str | None = None,
    path: PathLike | None = None,
    dpi: int = 120,
):
    """Training curves: the loss, the per-sigma losses and the gradient norm against the step.

    Reads the training driver's records (a path to ``metrics.jsonl`` or a
    list of dicts with ``step``, ``loss`` and optionally ``per_sigma_loss``
    (a list, one entry per noise level) and ``grad_norm``); event records
    are skipped and null values (non-finite) leave gaps. Panels for
    missing keys are omitted.

    ``loss`` is what the optimiser minimised, the lambda(sigma)-weighted
    mean over the levels (:func:`dsm_jax.losses.multiscale_dsm_loss`);
    ``per_sigma_loss`` holds the *unweighted* DSM loss of each level, which
    grows like ``1 / sigma^2`` (``d / (2 sigma^2)`` for an untrained
    model), so the per-sigma curves span decades. They are coloured by
    ``log sigma`` with a colorbar (by level index without ``sigmas``), which
    stays readable at any number of levels. ``grad_norm`` is the global norm
    of the gradient before clipping.

    Args:
        metrics: path or records.
        sigmas: ``[L]`` noise levels for the colorbar, optional.
        title: figure title.
        path: where to write a PNG.
        dpi: PNG resolution.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ValueError: no record holds a loss, or ``sigmas`` does not match.
    """
    if isinstance(metrics, (str, os.PathLike)):
        records = read_metrics(metrics)
    else:
        records = [r for r in metrics if isinstance(r, dict) and "event" not in r and "loss" in r]
    if not records:
        raise ValueError("metrics holds no training records (dicts with 'step' and 'loss').")
    levels = None if sigmas is None else np.asarray(sigmas, dtype=np.float64).reshape(-1)
    panels = [("loss", "training loss (weighted over sigma)", "loss")]
    per_sigma_steps, per_sigma = _series(records, "per_sigma_loss")
    if per_sigma.ndim == 2 and per_sigma.size:
        panels.append(("per_sigma_loss", "per-sigma loss (unweighted)", "DSM loss at sigma"))
        if levels is not None:
            if len(levels) != per_sigma.shape[1]:
                raise ValueError(
                    f"sigmas has {len(levels)} entries but per_sigma_loss has {per_sigma.shape[1]} per record."
                )
            if not np.all(levels > 0):
                raise ValueError(f"sigmas must be positive, got {levels.tolist()}.")
    if any(r.get("grad_norm") is not None for r in records):
        panels.append(("grad_norm", "gradient norm", "global norm (before clipping)"))

    from matplotlib import cm, colormaps, colors

    fig, axes = _figure(1, len(panels), size=(4.4, 3.4))
    for ax, (key, label, ylabel) in zip(axes[0], panels, strict=False):
        if key == "per_sigma_loss":
            if levels is not None:
                lo, hi = float(levels.min()), float(levels.max())
                if lo == hi:  # one level: LogNorm needs vmin < vmax
                    lo, hi = lo / 2, hi * 2
                norm = colors.LogNorm(vmin=lo, vmax=hi)
                values, bar_label = levels, "sigma (log scale)"
            else:
                norm = colors.Normalize(vmin=0, vmax=max(per_sigma.shape[1] - 1, 1))
                values, bar_label = np.arange(per_sigma.shape[1]), "noise level index"
            mappable = cm.ScalarMappable(norm=norm, cmap=colormaps["viridis"])
            for i in range(per_sigma.shape[1]):
                ax.plot(per_sigma_steps, per_sigma[:, i], color=mappable.to_rgba(values[i]), lw=1.0)
            fig.colorbar(mappable, ax=ax, label=bar_label)
        else:
            steps, values = _series(records, key)
            ax.plot(steps, values, color="#1f77b4", lw=1.2)
        if np.nanmin(_series(records, key)[1], initial=np.inf) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _finish(fig, path, dpi)
