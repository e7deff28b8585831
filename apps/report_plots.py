"""The report's pictures as PNG bytes: table reductions and matplotlib figures, and image crops.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot), so nothing touches the
global backend or the process's open-figure list; ``savefig`` renders PNG through Agg.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

if TYPE_CHECKING:
    from iis.extract.datasets import ImageDataset

log = logging.getLogger(__name__)

DPI = 110
_PANEL_SIZE = (4.6, 3.5)  # inches per panel; two panels a row fit the page at about 1:1
_MAX_NAME = 34  # characters of a model name in a legend or next to a point
_MAX_NAMED_POINTS = 12  # above this many models, points carry numbers keyed in the legend


def mathtext_safe(text: object) -> str:
    """``text`` as matplotlib draws it literally: a ``$`` would start mathtext (and an unpaired
    one raises), so every ``$`` is escaped."""
    return str(text).replace("$", r"\$")


def varying_keys(*frames: pd.DataFrame) -> list[str]:
    """The panel keys other than ``library`` that take more than one value across ``frames``
    (a ratio grid missing from a table written before grids were keyed does not count)."""
    vary = []
    for key in ("num_concepts", "protocol", "dataset", "grid", "library_source"):
        values = {_key_label(key, v) for f in frames if key in f for v in f[key]
                  if key != "grid" or (v is not None and not pd.isna(v))}
        if len(values) > 1:
            vary.append(key)
    return vary


def _key_label(key: str, value) -> str:
    """A panel key's value as a label part (the store whose elements built the library: its name)."""
    missing = value is None or pd.isna(value)
    if key == "num_concepts":
        return "K=" + int_or_dash(value)
    if key == "grid":
        return "grid " + ("–" if missing else str(value))
    if key == "library_source":
        return "own elements" if missing else f"elements of {Path(str(value)).stem}"
    return str(value)


def panel_labels(df: pd.DataFrame, vary: list[str] | None = None) -> pd.Series:
    """One label per row naming its panel: the library, plus the keys in ``vary`` (default: those
    that vary within ``df``), e.g. ``"prototype · K=64"``."""
    vary = varying_keys(df) if vary is None else vary
    label = df["library"].astype(str)
    for key in vary:
        column = df[key] if key in df else pd.Series(None, index=df.index, dtype=object)
        label = label + " · " + column.map(lambda v, key=key: _key_label(key, v))
    return label


def int_or_dash(value) -> str:
    """An integer count or key as text; a missing one as an en dash."""
    return "–" if value is None or pd.isna(value) else str(int(value))


def mean_arr_curves(iis: pd.DataFrame, vary: list[str] | None = None) -> pd.DataFrame:
    """ARR curves averaged over seeds: one row per (panel, model, ratio grid).

    Returns columns ``panel, model, ratios (list[float]), arr (list[float]), n_seeds``. Seeds whose
    ratio grids differ are kept apart rather than mixed point by point.
    """
    rows = []
    if iis.empty:
        return pd.DataFrame(columns=["panel", "model", "ratios", "arr", "n_seeds"])
    df = iis.assign(panel=panel_labels(iis, vary))
    df["grid"] = df["ratios"].map(lambda r: tuple(float(x) for x in r))
    for (panel, model, grid), group in df.groupby(["panel", "model", "grid"], sort=True):
        arr = np.array([np.asarray(a, dtype=float) for a in group["arr"]])
        rows.append({"panel": panel, "model": model, "ratios": list(grid),
                     "arr": np.nanmean(arr, axis=0).tolist(), "n_seeds": len(group)})
    return pd.DataFrame(rows)


def model_points(iis: pd.DataFrame, vary: list[str] | None = None, ranking: pd.DataFrame | None = None) -> pd.DataFrame:
    """One point per (panel, model), averaged over seeds, with an interval of IIS, normalised.

    The interval is the one of ``ranking.parquet`` where there is one: a bootstrap over test
    images and library seeds together. Else a model with one seed takes that seed's bootstrap
    interval over test images; a model with several seeds and no ranking gets none (averaging
    the seeds' endpoints would not be an interval of anything). Intervals are in units of the
    sparsity ratio, like ``iis``; dividing by the grid's span puts them on the scale of
    ``iis_normalized``.

    Returns columns ``panel, model, standard_top1, iis_normalized, ci_low, ci_high, n_seeds, ci_kind``
    (``"images and seeds"``, ``"images"`` or None).
    """
    cols = ["panel", "model", "standard_top1", "iis_normalized", "ci_low", "ci_high", "n_seeds", "ci_kind"]
    if iis.empty:
        return pd.DataFrame(columns=cols)
    span = iis["ratios"].map(lambda r: float(max(r) - min(r)) if len(r) > 1 else math.nan)
    df = iis.assign(panel=panel_labels(iis, vary), ci_low=iis["iis_ci_low"].astype(float) / span,
                    ci_high=iis["iis_ci_high"].astype(float) / span, span=span)
    out = df.groupby(["panel", "model"], sort=True).agg(
        standard_top1=("standard_top1", "mean"), iis_normalized=("iis_normalized", "mean"),
        ci_low=("ci_low", "first"), ci_high=("ci_high", "first"), n_seeds=("seed", "nunique"),
        span=("span", "first"),
    ).reset_index()
    single = (out["n_seeds"] == 1) & out["ci_low"].notna()
    out.loc[~single, ["ci_low", "ci_high"]] = math.nan
    out["ci_kind"] = np.where(single, "images", None)
    if ranking is not None and not ranking.empty:
        joint = ranking.assign(panel=panel_labels(ranking, vary)).set_index(["panel", "model"])
        for i, row in out.iterrows():
            key = (row["panel"], row["model"])
            if key in joint.index and np.isfinite(joint.loc[key, "iis_ci_low"]):
                out.loc[i, "ci_low"] = joint.loc[key, "iis_ci_low"] / row["span"]
                out.loc[i, "ci_high"] = joint.loc[key, "iis_ci_high"] / row["span"]
                out.loc[i, "ci_kind"] = "images and seeds"
    return out[cols]


def model_colours(models: list[str]) -> dict[str, tuple]:
    """A stable colour per model: tab10 up to 10 models, tab20 up to 20, then a continuous map."""
    models = sorted(set(models))
    n = len(models)
    if n <= 10:
        cmap = colormaps["tab10"]
        return {m: cmap(i) for i, m in enumerate(models)}
    if n <= 20:
        cmap = colormaps["tab20"]
        return {m: cmap(i) for i, m in enumerate(models)}
    cmap = colormaps["turbo"]
    return {m: cmap(0.05 + 0.9 * i / (n - 1)) for i, m in enumerate(models)}


def short_name(name: str, limit: int = _MAX_NAME) -> str:
    """``name`` cut in the middle to ``limit`` characters: the ends tell checkpoints apart."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return name[:head] + "…" + name[len(name) - (limit - 1 - head):]


def _panels(n: int) -> tuple[Figure, list]:
    ncols = min(2, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(_PANEL_SIZE[0] * ncols + 2.2, _PANEL_SIZE[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _legend(fig: Figure, colours: dict[str, tuple], marker: str) -> None:
    from matplotlib.lines import Line2D

    numbered = len(colours) > _MAX_NAMED_POINTS
    handles = [Line2D([], [], color=c, marker=marker, lw=1.8 if marker == "" else 0,
                      label=mathtext_safe(f"{i}  {short_name(m)}" if numbered else short_name(m)))
               for i, (m, c) in enumerate(colours.items(), start=1)]
    ncol = max(1, math.ceil(len(handles) / 30))
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False, ncol=ncol,
               title="model", title_fontsize=8)


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG, without the Software metadata (it carries a URL)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None}, facecolor="white")
    return buf.getvalue()


def arr_figure(curves: pd.DataFrame, colours: dict[str, tuple]) -> bytes:
    """ARR against sparsity ratio: one panel per library, one line per model, ARR = 1 dashed."""
    panels = sorted(curves["panel"].unique())
    fig, axes = _panels(len(panels))
    top = max(1.05, max((np.nanmax(a) for a in curves["arr"] if len(a)), default=1.0) + 0.03)
    for ax, panel in zip(axes, panels):
        for row in curves[curves["panel"] == panel].itertuples():
            ax.plot(row.ratios, row.arr, marker="o", ms=3, lw=1.6, color=colours[row.model], alpha=0.9)
        ax.axhline(1.0, color="0.35", ls="--", lw=1)
        ax.set(title=mathtext_safe(panel), xlabel="sparsity ratio s", ylabel="ARR(s)", xlim=(-0.02, 1.0),
               ylim=(0, top))
        ax.grid(alpha=0.25)
    _legend(fig, colours, marker="")
    return png_bytes(fig)


def iis_figure(points: pd.DataFrame, colours: dict[str, tuple], captions: dict[str, str]) -> bytes:
    """IIS (normalised) against standard top-1: one point per model with its interval and the LSQ trend."""
    panels = sorted(points["panel"].unique())
    fig, axes = _panels(len(panels))
    for ax, panel in zip(axes, panels):
        sub = points[points["panel"] == panel]
        x, y = sub["standard_top1"].to_numpy(float), sub["iis_normalized"].to_numpy(float)
        mid = (np.nanmin(x) + np.nanmax(x)) / 2 if np.isfinite(x).any() else 0.0
        number = {m: str(i) for i, m in enumerate(colours, start=1)}
        for row in sub.itertuples():
            err = None
            if np.isfinite(row.ci_low) and np.isfinite(row.ci_high):
                err = [[max(0.0, row.iis_normalized - row.ci_low)], [max(0.0, row.ci_high - row.iis_normalized)]]
            ax.errorbar(row.standard_top1, row.iis_normalized, yerr=err, fmt="o", ms=6, capsize=3,
                        color=colours[row.model], ecolor=colours[row.model], elinewidth=1.1, zorder=3)
            name = number[row.model] if len(colours) > _MAX_NAMED_POINTS else short_name(row.model, 22)
            # Labels point inward, so the rightmost names do not run off the panel.
            right = row.standard_top1 > mid
            ax.annotate(mathtext_safe(name), (row.standard_top1, row.iis_normalized), xytext=(-5 if right else 5, 4),
                        textcoords="offset points", ha="right" if right else "left", fontsize=7.5, color="0.15")
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() >= 2 and np.ptp(x[ok]) > 0:
            slope, intercept = np.polyfit(x[ok], y[ok], 1)
            xs = np.linspace(x[ok].min(), x[ok].max(), 50)
            ax.plot(xs, slope * xs + intercept, color="0.3", ls="--", lw=1.2, zorder=2, label="LSQ fit")
        if ok.any():
            lo = np.fmin(y, sub["ci_low"].to_numpy(float))[ok]
            hi = np.fmax(y, sub["ci_high"].to_numpy(float))[ok]
            pad_x = max(0.02, 0.12 * np.ptp(x[ok]))
            pad_y = max(0.02, 0.08 * (hi.max() - lo.min()))
            ax.set_xlim(x[ok].min() - pad_x, x[ok].max() + pad_x)
            ax.set_ylim(lo.min() - pad_y, hi.max() + pad_y)
        title = f"{panel}\n{captions[panel]}" if captions.get(panel) else panel
        ax.set_title(mathtext_safe(title), fontsize=10)
        ax.set(xlabel="standard head test top-1", ylabel="IIS (normalised)")
        ax.grid(alpha=0.25)
    _legend(fig, colours, marker="o")
    return png_bytes(fig)


def finetune_figure(ft: pd.DataFrame) -> bytes:
    """Before → after of standard top-1 and IIS, one row per (model, λ, scoring library when there
    is a ``library`` column): arrows, so a zoomed axis cannot exaggerate a change the way a
    truncated bar would."""
    libraries = ft["library"].astype(str).tolist() if "library" in ft else [""] * len(ft)
    labels = [(f"{short_name(m, 26)}  λ={lam:g}" if ft["model"].nunique() > 1 else f"λ={lam:g}")
              + (f" · {lib}" if lib else "") for m, lam, lib in zip(ft["model"], ft["lambda"], libraries)]
    width = 7.0 + 0.065 * max(len(label) for label in labels)
    fig = Figure(figsize=(width, max(2.4, 1.3 + 0.38 * len(ft))), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    ys = np.arange(len(ft))[::-1]
    for ax, (what, title) in zip(axes, [("standard_top1", "standard head top-1"), ("iis", "IIS")]):
        before, after = ft[f"{what}_before"].to_numpy(float), ft[f"{what}_after"].to_numpy(float)
        for y, b, a in zip(ys, before, after):
            colour = "#2f8f4e" if a >= b else "#c0392b"
            ax.annotate("", (a, y), (b, y), arrowprops={"arrowstyle": "-|>", "color": colour, "lw": 1.6})
        ax.scatter(before, ys, color="#9aa6b8", s=36, zorder=3, label="before")
        ax.scatter(after, ys, color="#3b6fb6", s=36, zorder=3, label="after")
        finite = np.concatenate([before, after])
        finite = finite[np.isfinite(finite)]
        if finite.size:
            pad = max(0.005, 0.12 * np.ptp(finite))
            ax.set_xlim(finite.min() - pad, finite.max() + pad)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(-0.7, len(ft) - 0.3)
        ax.grid(axis="x", alpha=0.25)
    axes[0].set_yticks(ys, [mathtext_safe(label) for label in labels], fontsize=8)
    fig.legend(*axes[1].get_legend_handles_labels(), loc="outside right upper", fontsize=8, frameon=False)
    return png_bytes(fig)


# --------------------------------------------------------------------------------------------------
# Dataset images


class Pictures:
    """Test images and concept crops from ``dataset`` as PNG bytes; any failure gives ``None``.

    A report is best effort: an image that is missing, unreadable or outside the dataset leaves
    its card without that picture, with a warning (the first few only), instead of stopping it.
    """

    def __init__(self, dataset: ImageDataset | None, *, sample_px: int, crop_px: int):
        self.dataset, self.sample_px, self.crop_px = dataset, sample_px, crop_px
        self._train_index: dict[str, int] | None = None
        self._train: dict[int, Image.Image] = {}
        self._failures = 0

    def _fail(self, what: str, exc: Exception) -> None:
        self._failures += 1
        if self._failures <= 5:
            log.warning("report: no picture for %s: %s", what, exc)

    def sample(self, split: str, index: int, image_id: str) -> bytes | None:
        """Sample ``index`` of ``split``, or the sample whose id is ``image_id`` if they disagree."""
        if self.dataset is None:
            return None
        try:
            ids = self.dataset.splits[split].ids
            if not (0 <= index < len(ids) and str(ids[index]) == image_id):
                index = int(np.flatnonzero(ids.astype(str) == image_id)[0])  # IndexError if absent
            return scaled_png(self.dataset.load(split, index), self.sample_px)
        except Exception as exc:  # best effort, see the class docstring
            self._fail(f"test image {image_id!r}", exc)
            return None

    def crop(self, source_id: str, box) -> bytes | None:
        """The ``box`` = (y0, x0, y1, x1) of the train image ``source_id``, clipped to the image."""
        if self.dataset is None:
            return None
        try:
            if self._train_index is None:
                self._train_index = {str(i): n for n, i in enumerate(self.dataset.splits["train"].ids)}
            index = self._train_index[source_id]
            if index not in self._train:
                self._train[index] = self.dataset.load("train", index).convert("RGB")
            image = self._train[index]
            y0, x0, y1, x1 = (int(v) for v in box)
            x0, y0, x1, y1 = max(0, x0), max(0, y0), min(image.width, x1), min(image.height, y1)
            if x1 <= x0 or y1 <= y0:
                raise ValueError(f"empty box {list(box)} in a {image.width}x{image.height} image")
            return scaled_png(image.crop((x0, y0, x1, y1)), self.crop_px)
        except Exception as exc:  # best effort, see the class docstring
            self._fail(f"train element of {source_id!r}", exc)
            return None


def scaled_png(image: Image.Image, side: int) -> bytes:
    """``image`` as RGB PNG bytes, scaled so its longer side is ``side`` px (pixel-sharp when enlarging)."""
    image = image.convert("RGB")
    factor = side / max(image.size)
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    image = image.resize(size, Image.Resampling.NEAREST if factor >= 1 else Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
