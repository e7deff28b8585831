"""The report's fine-tuning section (application 1): λ against λ = 0, with intervals.

The headline numbers are ``finetune_delta.parquet``'s paired differences λ − 0 in standard
top-1 and in IIS, per scoring library, each with its 95% bootstrap interval over test images and
(training seed, library seed) pairs. A difference is called a rise or a fall only when its
interval excludes 0; otherwise the section says the data cannot tell. Below them, the arms'
before → after means (``finetune.parquet``) show where both arms went from the start model.
"""

from __future__ import annotations

import base64
import html

import numpy as np
import pandas as pd
from iis.analyze.summary import direction
from iis.apps import report_plots as plots
from matplotlib.figure import Figure

_VERDICT = {
    "positive": "λ raises it: the interval excludes 0",
    "negative": "λ lowers it: the interval excludes 0",
    "cannot tell": "the data cannot tell: the interval holds 0",
    "undefined": "no interval (no per-image results, or bootstrap 0)",
}


def verdict(low: float, high: float) -> str:
    """What an interval of a difference λ − 0 lets one say (see :data:`_VERDICT`)."""
    return _VERDICT[direction(low, high)]


def delta_figure(delta: pd.DataFrame) -> bytes:
    """Δ standard top-1 and Δ IIS (λ − 0) per (model, λ, library), each with its interval, and a
    line at 0: a forest plot, so whether an interval crosses 0 is seen at a glance."""
    labels = [f"{plots.short_name(m, 26)}  λ={lam:g} · {lib}" if delta["model"].nunique() > 1
              else f"λ={lam:g} · {lib}" for m, lam, lib in zip(delta["model"], delta["lambda"], delta["library"])]
    fig = Figure(figsize=(7.0 + 0.065 * max(len(s) for s in labels), max(2.4, 1.3 + 0.38 * len(delta))),
                 layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    ys = np.arange(len(delta))[::-1]
    for ax, (what, title) in zip(axes, [("top1", "Δ standard head top-1 (λ − 0)"), ("iis", "Δ IIS (λ − 0)")]):
        point = delta[f"{what}_delta"].to_numpy(float)
        low, high = delta[f"{what}_delta_ci_low"].to_numpy(float), delta[f"{what}_delta_ci_high"].to_numpy(float)
        has = np.isfinite(low) & np.isfinite(high)
        ax.axvline(0.0, color="0.5", lw=1, ls="--")
        ax.errorbar(point[has], ys[has], xerr=[point[has] - low[has], high[has] - point[has]], fmt="o",
                    color="#3b6fb6", ecolor="#3b6fb6", capsize=3, ms=5)
        ax.scatter(point[~has], ys[~has], color="#9aa6b8", s=30, zorder=3)  # no interval computed
        ax.set_title(title, fontsize=10)
        ax.set_ylim(-0.7, len(delta) - 0.3)
        ax.grid(axis="x", alpha=0.25)
    axes[0].set_yticks(ys, [plots.mathtext_safe(s) for s in labels], fontsize=8)
    return plots.png_bytes(fig)


def finetune_section(ft: pd.DataFrame | None, delta: pd.DataFrame | None) -> str:
    """The section's HTML from ``finetune`` and ``finetune_delta.parquet`` (either may be absent)."""
    if (ft is None or ft.empty) and (delta is None or delta.empty):
        return _none("No finetune.parquet: run the fine-tuning application to compare λ > 0 with λ = 0.")
    parts = []
    if delta is not None and not delta.empty:
        parts.append(_delta_part(delta.sort_values(["model", "lambda", "library"]).reset_index(drop=True)))
    else:
        parts.append(_none("No finetune_delta.parquet: these results predate the paired comparison; rerun "
                           "`iis finetune` for λ − 0 with intervals."))
    if ft is not None and not ft.empty:
        parts.append(_arms_part(ft))
    return "".join(parts)


def _delta_part(delta: pd.DataFrame) -> str:
    rows = []
    for r in delta.to_dict("records"):
        seeds = f"{_count(r.get('seeds'))} × {_count(r.get('library_seeds'))}"
        rows.append(
            f"<tr class='row'>{_td(r['model'])}{_td(r['lambda'], text=format(r['lambda'], 'g'))}{_td(r['library'])}"
            f"{_td(seeds)}{_td(r['top1_lambda'])}{_td(r['top1_zero'])}{_td(r['top1_delta'], signed=True)}"
            f"{_td(_interval(r['top1_delta_ci_low'], r['top1_delta_ci_high']))}"
            f"{_td(verdict(r['top1_delta_ci_low'], r['top1_delta_ci_high']))}"
            f"{_td(r['iis_lambda'])}{_td(r['iis_zero'])}{_td(r['iis_delta'], signed=True)}"
            f"{_td(_interval(r['iis_delta_ci_low'], r['iis_delta_ci_high']))}"
            f"{_td(verdict(r['iis_delta_ci_low'], r['iis_delta_ci_high']))}</tr>")
    head = "".join(f"<th>{h}</th>" for h in (
        "model", "λ", "scoring library", "seeds × library seeds", "top-1 λ", "top-1 λ=0", "Δ top-1",
        "95% interval", "top-1 verdict", "IIS λ", "IIS λ=0", "Δ IIS", "95% interval", "IIS verdict"))
    caption = ("Paired differences λ − 0: both arms start from the same model and train on the same budget "
               "with the same seeds; each difference is the mean over (training seed, library seed) pairs, and its "
               "interval the 2.5-97.5 percentiles of a bootstrap that resamples test images and seed pairs, "
               "the same draws for both arms. A rise or fall is stated only when the interval excludes 0. The "
               "scoring libraries never hold an element the loss trained on: the loss's prototypes come from "
               "held-out source images, and every scoring library is built after fine-tuning from the other "
               "elements, embedded by the fine-tuned model.")
    return (_img(delta_figure(delta), "λ − 0 differences with intervals") + _caption(caption) +
            f"<div class='scroll'><table class='sortable'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _arms_part(ft: pd.DataFrame) -> str:
    cols = ["standard_top1_before", "standard_top1_after", "iis_before", "iis_after"]
    ft = ft.assign(library=ft["library"].fillna("prototype") if "library" in ft else "prototype")
    agg = ft.groupby(["model", "lambda", "library"], sort=True).agg(
        **{c: (c, "mean") for c in cols}, seeds=("seed", "nunique"), epochs=("epochs", "max")).reset_index()
    agg = agg.sort_values(["model", "lambda", "library"], ascending=[True, False, True]).reset_index(drop=True)
    rows = []
    for r in agg.to_dict("records"):
        top1, iis = (r[f"{w}_after"] - r[f"{w}_before"] for w in ("standard_top1", "iis"))
        rows.append(f"<tr class='row'>{_td(r['model'])}{_td(r['lambda'], text=format(r['lambda'], 'g'))}"
                    f"{_td(r['library'])}{_td(r['seeds'], 0)}{_td(r['epochs'], 0)}{_td(r['standard_top1_before'])}"
                    f"{_td(r['standard_top1_after'])}{_td(top1, signed=True)}{_td(r['iis_before'])}"
                    f"{_td(r['iis_after'])}{_td(iis, signed=True)}</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("model", "λ", "scoring library", "seeds", "epochs", "top-1 before",
                                              "top-1 after", "after − before", "IIS before", "IIS after",
                                              "after − before"))
    caption = ("Each arm against the start model, means over seeds. 'Before' is the start model as the "
               "pipeline's own analysis scored it (with libraries from every element; it never saw the loss). "
               "λ = 0 is plain fine-tuning on the same budget and seeds; the paper's claim is that λ > 0 raises "
               "the standard head's accuracy, which the differences above test.")
    return (_img(plots.finetune_figure(agg), "fine-tuning before and after") + _caption(caption) +
            f"<div class='scroll'><table class='sortable'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _count(values) -> str:
    return "–" if values is None or (isinstance(values, float) and np.isnan(values)) else str(len(values))


def _interval(low, high) -> str:
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return "–"
    return f"[{float(low):+.3f}, {float(high):+.3f}]"


def _td(value, digits: int = 3, signed: bool = False, text: str | None = None) -> str:
    """A table cell; a number carries its exact value in ``data-v`` for sorting."""
    if isinstance(value, str):
        return f"<td>{html.escape(value)}</td>"
    if value is None or pd.isna(value):
        return "<td data-v='nan' class='num'>–</td>"
    shown = html.escape(text) if text is not None else f"{float(value):{'+' if signed else ''}.{digits}f}"
    return f"<td data-v='{float(value)!r}' class='num'>{shown}</td>"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img class='plot' alt='{html.escape(alt, quote=True)}' src='data:image/png;base64,{data}'>"


def _caption(text: str) -> str:
    return f"<p class='caption'>{html.escape(text)}</p>"


def _none(text: str) -> str:
    return f"<p class='none'>{html.escape(text)}</p>"

