"""The report's depth section: IIS and standard top-1 against the depth of a layer (``layers:``).

One line per base model (a model and the stores of its other layers, ``r10`` and
``r10@stages.1``), drawn only when some model was measured at several layers. Rows of libraries
built from another store's elements (``library_from``) are left out: the lines compare one
model's own concept libraries along its depth.
"""

from __future__ import annotations

import base64
import html
import math

import pandas as pd
from iis.apps import report_plots as plots
from matplotlib.figure import Figure


def base_model(model: str, layer: str | None) -> str:
    """The model a layer's store belongs to: ``r10@e4@stages.1`` (layer ``stages.1``) -> ``r10@e4``."""
    if not layer or layer == "final" or not model.endswith(f"@{layer}"):
        return model
    return model[: -len(layer) - 1]


def depth_points(iis: pd.DataFrame) -> pd.DataFrame:
    """Mean (over seeds) IIS and standard top-1 per (library panel, base model, layer).

    Args:
        iis: ``iis.parquet`` as :func:`iis.analyze.tables.read_table` gives it (``layer``, ``depth``).

    Returns:
        Columns ``panel, base, layer, depth, iis_normalized, standard_top1``, sorted by depth, for
        the base models that have two or more layers; empty when none has.
    """
    columns = ["panel", "base", "layer", "depth", "iis_normalized", "standard_top1"]
    if iis.empty or "depth" not in iis:
        return pd.DataFrame(columns=columns)
    own = iis[iis["library_source"].isna()] if "library_source" in iis else iis
    own = own.assign(layer=own["layer"].fillna("final"), depth=own["depth"].fillna(1.0))
    own = own.assign(base=[base_model(m, la) for m, la in zip(own["model"], own["layer"])],
                     panel=plots.panel_labels(own))
    layered = own.groupby("base")["layer"].nunique()
    own = own[own["base"].isin(layered[layered > 1].index)]
    if own.empty:
        return pd.DataFrame(columns=columns)
    points = own.groupby(["panel", "base", "layer", "depth"], as_index=False)[["iis_normalized", "standard_top1"]].mean()
    return points.sort_values(["panel", "base", "depth"]).reset_index(drop=True)[columns]


def depth_figure(points: pd.DataFrame) -> bytes:
    """One panel per library (normalised IIS) and one for standard top-1, both against depth;
    one line per base model, each point labelled with its layer."""
    panels = sorted(points["panel"].unique())
    titles = [*panels, "standard head"]
    ncols = min(3, len(titles))
    nrows = math.ceil(len(titles) / ncols)
    fig = Figure(figsize=(4.2 * ncols + 2.0, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[len(titles):]:
        ax.set_visible(False)
    colours = plots.model_colours(sorted(points["base"].unique()))
    for ax, title in zip(axes, titles):
        standard = title == "standard head"
        # Top-1 is the same for every library: draw it from the first panel's rows.
        rows = points[points["panel"] == (panels[0] if standard else title)]
        value = "standard_top1" if standard else "iis_normalized"
        for base, line in rows.groupby("base", sort=True):
            ax.plot(line["depth"], line[value], marker="o", ms=4, lw=1.6, color=colours[base],
                    label=plots.mathtext_safe(plots.short_name(base)))
            for row in line.itertuples():
                ax.annotate(plots.mathtext_safe(row.layer), (row.depth, getattr(row, value)), fontsize=6,
                            xytext=(2, 3), textcoords="offset points", color="0.35")
        ax.set(title=plots.mathtext_safe(title), xlabel="depth (layer position, 0..1)",
               ylabel="standard top-1" if standard else "IIS / (s_max - s_min)", xlim=(-0.02, 1.15))
        ax.grid(alpha=0.25)
    axes[0].legend(fontsize=8, frameon=False, title="model", title_fontsize=8)
    return plots.png_bytes(fig)


def depth_section(iis: pd.DataFrame) -> str | None:
    """The section's HTML (a plot and its caption), or None when no model has several layers."""
    points = depth_points(iis)
    if points.empty:
        return None
    png = base64.b64encode(depth_figure(points)).decode("ascii")
    caption = ("Each line is one model measured at several layers from one extraction pass (`layers:`): depth is "
               "the layer's position, (i + 1) / (n + 1) for stage i of n and 1 for the pooled pre-logit features "
               "(final). IIS and top-1 are means over seeds, with each store's own concept libraries. "
               "Correlations across models use the final layer only.")
    return (f"<img class='plot' alt='IIS and standard top-1 against depth' src='data:image/png;base64,{png}'>"
            f"<p class='caption'>{html.escape(caption)}</p>")
