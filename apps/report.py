"""``write_report``: one self-contained HTML page from a results folder's Parquet tables.

Everything is inline: figures are PNG data URIs, the style sheet and the few lines of table-sorting
script sit in the page, so the file opens offline and can be mailed as is. A section without data
says so in one line; an image that cannot be loaded leaves its card without the picture.
"""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from iis.analyze.summary import direction
from iis.analyze.tables import read_table, table_path
from iis.apps import report_plots as plots
from iis.apps.report_depth import depth_section
from iis.apps.report_finetune import finetune_section

from iis.store_format import atomic_file

if TYPE_CHECKING:
    from iis.extract.datasets import ImageDataset

log = logging.getLogger(__name__)

_TOP_CONCEPTS = 5  # concepts shown per explanation card
_CROPS_PER_CONCEPT = 3
_SAMPLE_PX = 128  # longer side of a card's test image
_CROP_PX = 44  # longer side of a concept crop


def write_report(*, results: Path, out: Path | None = None, dataset: ImageDataset | None = None,
                 title: str | None = None, max_cards: int = 8) -> Path:
    """Write ``results/report.html`` (or ``out``) from the tables in ``results`` and return its path.

    Reads ``accuracy``, ``iis``, ``correlation`` and ``concepts.parquet`` (absent ones count as
    empty) and, when present, ``explanations``, ``finetune`` and ``finetune_delta.parquet``. ``dataset`` supplies the
    pixels of explained test images and of concept source crops; without it the cards show no
    pictures. At most ``max_cards`` explanation cards, alternating correct and wrong predictions.
    """
    results = Path(results)
    out = results / "report.html" if out is None else Path(out)
    iis = read_table(results, "iis")
    iis = iis.loc[iis["ratios"].map(lambda r: r is not None and len(r) > 0).astype(bool)].reset_index(drop=True)
    corr, acc, concepts, ranking = (read_table(results, n) for n in ("correlation", "accuracy", "concepts", "ranking"))
    expl, finetune, delta = (_optional(results, n) for n in ("explanations", "finetune", "finetune_delta"))
    vary = plots.varying_keys(iis, corr)
    if title is None:
        names = sorted({*iis["pipeline"].dropna(), *acc["pipeline"].dropna()})
        sets = sorted({*iis["dataset"].dropna(), *corr["dataset"].dropna()})
        title = "IIS report" + (f": {', '.join(map(str, names))}" if names else "") + (
            f" on {', '.join(map(str, sets))}" if sets else "")
    body = [
        f"<header><h1>{_e(title)}</h1><p class='meta'>{_e(_meta(iis, acc, results))}</p></header>",
        _section("how", "How to read this", _HOW_TO_READ),
        _section("headline", "Headline: is interpretability tied to classifiability?", _headline(corr, vary)),
        _section("arr", "1 · Accuracy retention against sparsity", _arr(iis, vary)),
        _section("iis-vs-top1", "2 · IIS against standard top-1", _scatter(iis, corr, vary, ranking)),
        _section("ranking", "3 · IIS ranking and its confidence", _ranking(ranking, vary)),
        _section("table", "Every IIS row", _iis_table(iis)),
        *([_section("depth", "IIS and standard top-1 against depth", depth)] if (depth := depth_section(iis)) else []),
        _section("explanations", "4 · Explained test predictions", _cards(expl, dataset, max_cards)),
        _section("finetune", "5 · Fine-tuning with interpretability maximisation", finetune_section(finetune, delta)),
        _section("concepts", "Concept libraries built", _concepts(concepts)),
    ]
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body><main>{''.join(body)}</main><script>{_JS}</script></body></html>")
    with atomic_file(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    log.info("report: wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return out


# --------------------------------------------------------------------------------------------------
# Sections


_VERDICT = {
    "positive": "positive, as the paper reports: the interval excludes 0",
    "negative": "negative, against the paper's finding: the interval excludes 0",
    "undefined": "undefined (too few models, constant values, or no interval computed)",
}


def _verdict(row: dict) -> tuple[str, str]:
    """``(sign, sentence)`` for a correlation row, from Spearman's interval and p-value."""
    low, high, p = row.get("spearman_ci_low"), row.get("spearman_ci_high"), row.get("spearman_p")
    sign = direction(low, high, p)
    if sign != "cannot tell":
        return sign, _VERDICT[sign]
    if direction(low, high) == "cannot tell":
        return sign, "the data cannot tell: the interval holds 0"
    return sign, f"the data cannot tell: the interval excludes 0, but {_p(p)} (too few models to trust it)"


def _all_scope(corr: pd.DataFrame) -> pd.DataFrame:
    """The rows over every model (tables written before scopes existed hold only those)."""
    return corr[corr["scope"].fillna("all") == "all"] if "scope" in corr else corr


def _ci(low, high) -> str:
    return f"[{_num(low, 2, signed=True)}, {_num(high, 2, signed=True)}]"


def _headline(corr: pd.DataFrame, vary: list[str]) -> str:
    if corr.empty:
        return _none("No correlation.parquet: it needs `iis analyze` over two or more models.")
    everything = corr.assign(panel=plots.panel_labels(corr, vary))
    stats = []
    for r in _all_scope(everything).sort_values("panel").to_dict("records"):
        sign, verdict = _verdict(r)
        n = r["n_models"]
        few = "; few models, so read it as a hint" if not pd.isna(n) and n < 5 else ""
        others = everything[(everything["panel"] == r["panel"]) & (everything["scope"].fillna("all") != "all")]
        grouped = "".join(
            f"<div class='small'>{_e(_scope_label(o))}: ρ = {_num(o['spearman_rho'], 2, signed=True)} "
            f"{_ci(o['spearman_ci_low'], o['spearman_ci_high'])}, {plots.int_or_dash(o['n_models'])} models: "
            f"{_e(_verdict(o)[1].split(':')[0])}</div>"
            for o in others.sort_values(["scope", "group"], na_position="first").to_dict("records"))
        stats.append(
            f"<div class='stat {sign.replace(' ', '-')}'><div class='lib'>{_e(r['panel'])}</div>"
            f"<div class='big'>ρ = {_num(r['spearman_rho'], signed=True)}</div>"
            f"<div>95% interval {_ci(r.get('spearman_ci_low'), r.get('spearman_ci_high'))} (bootstrap over models); "
            f"Spearman {_p(r['spearman_p'])}; Pearson r = {_num(r['pearson_r'], signed=True)} "
            f"({_p(r['pearson_p'])}); over <b>{plots.int_or_dash(r['n_models'])}</b> models</div>"
            f"<div class='verdict'>{_e(verdict)}{few}</div>{grouped}</div>")
    return (f"<p>Correlation, across models, between the standard head's test top-1 and IIS. "
            f"The paper finds it positive: more classifiable representations are more interpretable. "
            f"A direction is stated only when the 95% bootstrap interval of Spearman's ρ excludes 0 "
            f"and its permutation p-value is below 0.05. "
            f"Checkpoints of one run (and fine-tuned copies) are not independent models, so the "
            f"correlation is also shown across runs (each run's final model) and within each run.</p>"
            f"<div class='stats'>{''.join(stats)}</div>")


def _scope_label(row: dict) -> str:
    if row.get("scope") == "across":
        return "across groups (final models)"
    return f"within {row.get('group')}"


def _arr(iis: pd.DataFrame, vary: list[str]) -> str:
    if iis.empty:
        return _none("No iis.parquet rows: run `iis analyze` first.")
    curves = plots.mean_arr_curves(iis, vary)
    png = plots.arr_figure(curves, plots.model_colours(list(iis["model"])))
    return (_img(png, "plot", "ARR against sparsity ratio") +
            _caption("ARR(s) = interpretable-head top-1 / standard-head top-1, averaged over seeds. "
                     "The dashed line is ARR = 1: no accuracy lost. A curve that stays high to large s "
                     "means few concepts suffice."))


def _scatter(iis: pd.DataFrame, corr: pd.DataFrame, vary: list[str], ranking: pd.DataFrame) -> str:
    if iis.empty:
        return _none("No iis.parquet rows: nothing to plot.")
    points = plots.model_points(iis, vary, ranking)
    lines, short = [], {}
    corr = corr.assign(panel=plots.panel_labels(corr, vary))
    for r in _all_scope(corr).sort_values("panel").to_dict("records"):
        short[r["panel"]] = (f"r {_num(r['pearson_r'], 2)} · ρ {_num(r['spearman_rho'], 2)} · "
                             f"τ {_num(r['kendall_tau'], 2)} · n {plots.int_or_dash(r['n_models'])}")
    for r in corr.sort_values(["panel", "scope", "group"], na_position="first").to_dict("records"):
        scope = "" if r.get("scope") in (None, "all") or pd.isna(r.get("scope")) else f" ({_scope_label(r)})"
        lines.append(f"<li><b>{_e(r['panel'])}{_e(scope)}</b>: "
                     f"Pearson r = {_num(r['pearson_r'])} {_ci(r.get('pearson_ci_low'), r.get('pearson_ci_high'))} "
                     f"({_p(r['pearson_p'])}), Spearman ρ = {_num(r['spearman_rho'])} "
                     f"{_ci(r.get('spearman_ci_low'), r.get('spearman_ci_high'))} ({_p(r['spearman_p'])}), "
                     f"Kendall τ = {_num(r['kendall_tau'])} {_ci(r.get('kendall_ci_low'), r.get('kendall_ci_high'))} "
                     f"({_p(r['kendall_p'])}), n_models = {plots.int_or_dash(r['n_models'])}</li>")
    png = plots.iis_figure(points, plots.model_colours(list(iis["model"])), short)
    kinds = set(points["ci_kind"].dropna())
    bars = {
        frozenset(): "No bars: no interval was computed (or a model has several seeds and there is no ranking.parquet). ",
        frozenset({"images and seeds"}): "Bars: 95% bootstrap interval of IIS over test images and library seeds "
                                         "together (ranking.parquet). ",
        frozenset({"images"}): "Bars: 95% bootstrap interval of IIS over test images, at the one library seed. ",
    }.get(frozenset(kinds), "Bars: 95% bootstrap interval of IIS, over test images and library seeds where a model "
                            "has a ranking row, else over test images at its one seed. ")
    text = ("One point per model (mean over seeds). " + bars + "Intervals are normalised like IIS by the span of the "
            "ratio grid; the dashed line is the least-squares fit. "
            "Brackets are 95% bootstrap intervals over models; p-values are permutation p-values.")
    listing = f"<ul class='corr'>{''.join(lines)}</ul>" if lines else _none("No correlation.parquet rows.")
    return _img(png, "plot", "IIS against standard top-1") + _caption(text) + listing


def _ranking(ranking: pd.DataFrame, vary: list[str]) -> str:
    if ranking.empty:
        return _none("No ranking.parquet rows: run `iis analyze` (the ranking is written with the other tables).")
    ranking = ranking.assign(panel=plots.panel_labels(ranking, vary),
                             span=ranking["grid"].map(_grid_span) if "grid" in ranking else np.nan)
    parts = []
    for panel, g in ranking.sort_values(["panel", "rank"]).groupby("panel", sort=True):
        first = g.iloc[0]
        stable = ("" if pd.isna(first["seed_kendall_tau"]) else
                  f" Kendall τ between the rankings of {plots.int_or_dash(first['seed_pairs'])} pair(s) of library "
                  f"seeds: {_num(first['seed_kendall_tau'], 2, signed=True)} (1: every seed orders the models alike).")
        rows = []
        for r in g.to_dict("records"):
            s = r["span"] if np.isfinite(r["span"]) and r["span"] > 0 else np.nan
            rows.append(f"<tr class='row'>{_td(r['rank'], 0)}{_td(r['model'])}{_td(r['standard_top1'])}"
                        f"{_td(r['iis_normalized'])}{_td(r['iis_ci_low'] / s)}{_td(r['iis_ci_high'] / s)}"
                        f"{_td(r['p_above_next'], 2)}{_td(r['iis_adjusted'] / s, signed=True)}{_td(r['n_seeds'], 0)}</tr>")
        head = "".join(f"<th>{h}</th>" for h in ("rank", "model", "standard top-1", "IIS (norm.)", "CI low",
                                                  "CI high", "P(above next)", "IIS vs accuracy", "seeds"))
        caveat = f" <b>Caveat: {_e(first['caveat'])}.</b>" if isinstance(first.get("caveat"), str) else ""
        parts.append(f"<h3>{_e(panel)}</h3><p class='small'>{_e(stable)}{caveat}</p><div class='scroll'>"
                     f"<table class='sortable'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")
    return (_caption("Models ordered by IIS (mean over library seeds; normalised by the span of the ratio grid). "
                     "CI: 95% bootstrap interval over test images and library seeds together. P(above next): the "
                     "share of those resamples in which the model's IIS exceeds the next model's (0.5: no telling "
                     "them apart). IIS vs accuracy: the model's distance from the least-squares line of IIS on "
                     "standard top-1 across the panel's models; positive is more interpretable than its accuracy "
                     "predicts.") + "".join(parts))


def _grid_span(grid) -> float:
    if not isinstance(grid, str) or not grid:
        return float("nan")
    values = [float(v) for v in grid.split(",")]
    return max(values) - min(values)


def _iis_table(iis: pd.DataFrame) -> str:
    if iis.empty:
        return _none("No iis.parquet rows.")
    df = iis.sort_values(["library", "model", "num_concepts", "protocol", "seed"], kind="stable")
    span = df["ratios"].map(lambda r: max(r) - min(r) if len(r) > 1 else np.nan)
    show_dataset = df["dataset"].nunique() > 1
    head = ["model", *(["dataset"] if show_dataset else []), "library", "K", "protocol", "seed",
            "standard top-1", "IIS", "IIS (norm.)", "CI low (norm.)", "CI high (norm.)", "ratios"]
    rows = []
    for (_, r), s in zip(df.iterrows(), span):
        cells = [_td(r["model"]), *([_td(r["dataset"])] if show_dataset else []), _td(r["library"]),
                 _td(r["num_concepts"], 0), _td(r["protocol"]), _td(r["seed"], 0), _td(r["standard_top1"]),
                 _td(r["iis"]), _td(r["iis_normalized"]), _td(r["iis_ci_low"] / s), _td(r["iis_ci_high"] / s),
                 _td(f"{len(r['ratios'])} in [{min(r['ratios']):g}, {max(r['ratios']):g}]")]
        rows.append(f"<tr class='row'>{''.join(cells)}</tr>")
    ths = "".join(f"<th title='click to sort'>{_e(h)}</th>" for h in head)
    return (f"<p class='hint'>Click a column header to sort; click again to reverse.</p>"
            f"<div class='scroll'><table class='sortable' id='iis-table'><thead><tr>{ths}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _cards(expl: pd.DataFrame | None, dataset: ImageDataset | None, max_cards: int) -> str:
    if expl is None or expl.empty:
        return _none("No explanations.parquet: run `iis explain` to explain test predictions.")
    order = [c for c in ("pipeline", "dataset", "model", "library", "num_concepts", "sparsity", "seed",
                         "image_index") if c in expl]
    records = expl.sort_values(order, kind="stable").to_dict("records")
    right = [r for r in records if bool(r["correct"])]
    wrong = [r for r in records if not bool(r["correct"])]
    picked = []
    while len(picked) < max_cards and (right or wrong):
        # Alternate, so a handful of cards shows both kinds; fill from the other kind when one runs out.
        queue = right if (len(picked) % 2 == 0 and right) or not wrong else wrong
        picked.append(queue.pop(0))
    pictures = plots.Pictures(dataset, sample_px=_SAMPLE_PX, crop_px=_CROP_PX)
    note = "" if dataset is not None else _none("No dataset given: cards are shown without pictures.")
    total = f"{len(picked)} of {len(records)} explained predictions"
    return (f"<p>{total}. Concepts are ranked by the size of their contribution w·a to the predicted "
            f"class's logit (blue adds, red subtracts); the <i>rest</i> line sums the kept concepts not "
            f"listed, so the lines plus the bias equal the logit.</p>{note}<div class='cards'>"
            + "".join(_card(r, pictures) for r in picked) + "</div>")


def _card(r: dict, pictures: plots.Pictures) -> str:
    sample = pictures.sample(str(r.get("split", "test")), int(r["image_index"]), str(r["image_id"]))
    picture = _img(sample, "sample", str(r["image_id"])) if sample else "<div class='noimg'>no image</div>"
    listed = [float(c) for c in _seq(r.get("contribution"))]
    contrib = listed[:_TOP_CONCEPTS]
    # What the card leaves out is summed into one "rest" line, so the lines plus the bias add up
    # to the logit; rows written before `rest` existed show no such line.
    stored_rest = r.get("rest")
    known_rest = stored_rest is not None and not pd.isna(stored_rest)
    rest = (float(stored_rest) if known_rest else 0.0) + sum(listed[_TOP_CONCEPTS:])
    n_rest = len(listed) - len(contrib) + (int(r["n_rest"]) if known_rest and not pd.isna(r.get("n_rest"))
                                           else 0)
    show_rest = n_rest > 0  # every kept concept shown: the lines and the bias already add up
    scale = max((abs(c) for c in [*contrib, *([rest] if show_rest else [])]), default=1.0) or 1.0
    words, sources, boxes = _seq(r.get("word")), _seq(r.get("source_id")), _seq(r.get("box"))
    items = []
    for k, (concept, c) in enumerate(zip(_seq(r.get("concept")), contrib)):
        word = words[k] if k < len(words) and isinstance(words[k], str) and words[k] else None
        if word:
            shown = f"<span class='word'>{_e(word)}</span>"
        else:
            ids = _seq(sources[k]) if k < len(sources) else []
            bxs = _seq(boxes[k]) if k < len(boxes) else []
            crops = [pictures.crop(str(i), b) for i, b in zip(ids[:_CROPS_PER_CONCEPT], bxs)]
            shown = "".join(_img(p, "crop", f"concept {concept} element") for p in crops if p) or \
                "<span class='word muted'>no crops</span>"
        width = 50 * abs(c) / scale
        side = f"left:50%;width:{width:.1f}%" if c >= 0 else f"right:50%;width:{width:.1f}%"
        items.append(f"<li><span class='cid'>#{int(concept)}</span><span class='shown'>{shown}</span>"
                     f"<span class='bar'><span class='{'pos' if c >= 0 else 'neg'}' style='{side}'></span></span>"
                     f"<span class='val'>{_num(c, signed=True)}</span></li>")
    if show_rest:
        width = 50 * abs(rest) / scale
        side = f"left:50%;width:{width:.1f}%" if rest >= 0 else f"right:50%;width:{width:.1f}%"
        items.append(f"<li class='rest'><span class='cid'>rest</span><span class='shown'><span class='word muted'>"
                     f"{n_rest} other concept{'s' if n_rest != 1 else ''}</span></span>"
                     f"<span class='bar'><span class='{'pos' if rest >= 0 else 'neg'}' style='{side}'></span></span>"
                     f"<span class='val'>{_num(rest, signed=True)}</span></li>")
    kind = "right" if bool(r["correct"]) else "wrong"
    where = " · ".join(f"{label}{_e(r[key]) if isinstance(r[key], str) else format(float(r[key]), 'g')}"
                       for key, label in (("model", ""), ("library", ""), ("num_concepts", "K="),
                                          ("sparsity", "s="), ("seed", "seed "))
                       if key in r and r[key] is not None and not pd.isna(r[key]))
    return (f"<article class='card {kind}'><div class='card-head'>{picture}<div>"
            f"<div class='badge {kind}'>{'correct' if kind == 'right' else 'wrong'}</div>"
            f"<div>true <span class='cls-true'>{_e(r['true_name'])}</span></div>"
            f"<div>predicted <span class='cls-pred'>{_e(r['pred_name'])}</span></div>"
            f"<div class='small'>{where}</div><div class='small'>{_e(r['image_id'])} · logit "
            f"{_num(r.get('logit'))} (bias {_num(r.get('bias'))})</div></div></div>"
            f"<ol class='concepts'>{''.join(items) or '<li>no concepts kept</li>'}</ol></article>")


def _concepts(concepts: pd.DataFrame) -> str:
    if concepts.empty:
        return _none("No concepts.parquet rows.")
    keys = ["model", "library", "num_concepts", "sparsity", "seed"]
    built = concepts.groupby(keys, dropna=False).agg(n=("concept", "size"), kept=("kept", "sum")).reset_index()
    rows = []
    for lib, g in built.groupby("library", sort=True):
        sub = concepts[concepts["library"] == lib]
        reasons = sub.loc[~sub["kept"].fillna(True).astype(bool), "drop_reason"].value_counts()
        why = ", ".join(f"{k}: {v}" for k, v in reasons.items()) or "none dropped"
        words = int(sub["word"].notna().sum())
        rows.append(f"<tr>{_td(lib)}{_td(g['model'].nunique(), 0)}{_td(len(g), 0)}{_td(g['n'].median(), 0)}"
                    f"{_td(g['kept'].sum() / max(1, g['n'].sum()))}{_td('words' if words else 'visual elements')}"
                    f"{_td(why)}</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("library", "models", "libraries built", "concepts (median)",
                                              "kept share", "shown as", "dropped"))
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"


# --------------------------------------------------------------------------------------------------
# HTML helpers


def _optional(results: Path, name: str) -> pd.DataFrame | None:
    path = table_path(results, name)
    return pd.read_parquet(path) if path.exists() else None


def _meta(iis: pd.DataFrame, acc: pd.DataFrame, results: Path) -> str:
    parts = [f"results: {results}"]
    if not iis.empty:
        parts += [f"{iis['model'].nunique()} models", f"libraries: {', '.join(sorted(iis['library'].unique()))}",
                  f"seeds: {', '.join(str(s) for s in sorted(iis['seed'].unique()))}"]
    if not acc.empty and acc["n_test"].notna().any():
        parts.append(f"test images: {', '.join(str(int(n)) for n in sorted(acc['n_test'].dropna().unique()))}")
    return " · ".join(parts)


def _seq(value) -> list:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    return list(value)


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value, digits: int = 3, signed: bool = False) -> str:
    if value is None or pd.isna(value):
        return "–"
    return f"{float(value):{'+' if signed else ''}.{digits}f}"


def _p(value) -> str:
    """``"p = 0.042"``, ``"p < 0.001"`` or ``"p = –"``."""
    if value is None or pd.isna(value):
        return "p = –"
    return "p < 0.001" if value < 1e-3 else f"p = {float(value):.3f}"


def _td(value, digits: int = 3, signed: bool = False, text: str | None = None) -> str:
    """A table cell; a number carries its exact value in ``data-v`` for sorting."""
    if isinstance(value, str):
        return f"<td>{_e(value)}</td>"
    if value is None or pd.isna(value):
        return "<td data-v='nan' class='num'>–</td>"
    shown = _e(text) if text is not None else _num(value, digits, signed)
    return f"<td data-v='{float(value)!r}' class='num'>{shown}</td>"


def _img(png: bytes, kind: str, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img class='{kind}' alt='{_e(alt)}' src='data:image/png;base64,{data}'>"


def _section(anchor: str, heading: str, content: str) -> str:
    return f"<section id='{anchor}'><h2>{_e(heading)}</h2>{content}</section>"


def _caption(text: str) -> str:
    return f"<p class='caption'>{_e(text)}</p>"


def _none(text: str) -> str:
    return f"<p class='none'>{_e(text)}</p>"


_HOW_TO_READ = (
    "<p>Each model's features are described by a <b>concept library</b> of K concepts. An "
    "<b>interpretable head</b> predicts from only the strongest concepts of each image: the <b>sparsity "
    "ratio s</b> is the share of concepts dropped. <b>ARR(s)</b>, the accuracy retention ratio, is that "
    "head's test top-1 divided by the standard linear head's. <b>IIS</b> is the area under the ARR curve; "
    "normalised by the span of s it lies near 0 to 1, and 1 means nothing is lost however few concepts are "
    "kept. The cards below show single predictions and the concepts that drove them, each shown by the "
    "image crops it was built from, or by its word.</p>")

_CSS = """
body{margin:0;background:#f5f6f8;color:#1d2430;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif}main{max-width:1280px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:0 0 10px}.meta{color:#5b6575;margin:0;font-size:13px}
header{padding:8px 0 14px}section{background:#fff;border-radius:10px;box-shadow:0 1px 3px #0002;padding:16px 20px;
margin:14px 0}img.plot{max-width:100%;height:auto;display:block;margin:6px auto}
.caption,.hint{color:#5b6575;font-size:13px}.none{color:#8a6d1f;background:#fff8e5;border-left:3px solid #e0b44c;
padding:6px 10px;margin:6px 0}.stats{display:flex;flex-wrap:wrap;gap:12px}.stat{flex:1 1 240px;border-radius:8px;
padding:10px 14px;background:#f1f3f7;border-left:5px solid #999}.stat.positive{border-color:#2f8f4e}
.stat.negative{border-color:#c0392b}.stat.cannot-tell{border-color:#e0b44c}.stat .lib{font-weight:600}.stat .big{font-size:24px;font-weight:700}
.stat .verdict{font-size:13px;color:#5b6575}ul.corr{font-size:13px}.scroll{overflow:auto;max-height:560px}
table{border-collapse:collapse;font-size:13px;width:100%}th,td{padding:4px 8px;border-bottom:1px solid #e3e6eb;
text-align:left;white-space:nowrap}td.num{text-align:right;font-variant-numeric:tabular-nums}
th{background:#eef1f5;position:sticky;top:0;cursor:pointer;user-select:none}th[data-dir=asc]::after{content:" ▲"}
th[data-dir=desc]::after{content:" ▼"}tbody tr:hover{background:#f7f9fc}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:14px}
.card{border:1px solid #dde1e7;border-radius:10px;padding:12px;border-top:5px solid #2f8f4e}
.card.wrong{border-top-color:#c0392b}.card-head{display:flex;gap:12px;align-items:flex-start}
img.sample{border-radius:6px;border:1px solid #ccd;image-rendering:pixelated}.noimg{width:96px;height:96px;
display:flex;align-items:center;justify-content:center;background:#eef0f3;color:#889;border-radius:6px;font-size:12px}
.badge{display:inline-block;font-size:12px;font-weight:600;padding:1px 8px;border-radius:10px;color:#fff;
background:#2f8f4e}.badge.wrong{background:#c0392b}.cls-true,.cls-pred{font-weight:700}
.small{font-size:12px;color:#5b6575}ol.concepts{list-style:none;padding:0;margin:10px 0 0}
ol.concepts li{display:flex;align-items:center;gap:8px;padding:3px 0;border-top:1px solid #f0f2f5}
.cid{width:30px;font-size:12px;color:#5b6575}.shown{flex:1;display:flex;gap:4px;flex-wrap:wrap}
img.crop{border-radius:3px;border:1px solid #ccd;image-rendering:pixelated}.word{font-weight:600}.muted{color:#99a}
.bar{position:relative;width:70px;flex:none;height:12px;background:#f0f2f5;border-radius:3px}
.bar::before{content:"";position:absolute;left:50%;top:0;bottom:0;border-left:1px solid #99a}
.bar span{position:absolute;top:1px;bottom:1px}.bar .pos{background:#3b6fb6}.bar .neg{background:#c0392b}
.val{width:50px;flex:none;text-align:right;font-size:12px;font-variant-numeric:tabular-nums}
"""

_JS = """
document.querySelectorAll("table.sortable").forEach(function(t){
  t.querySelectorAll("th").forEach(function(th,i){th.addEventListener("click",function(){
    var asc=th.dataset.dir!=="asc";t.querySelectorAll("th").forEach(function(h){delete h.dataset.dir;});
    th.dataset.dir=asc?"asc":"desc";var body=t.tBodies[0];
    var key=function(r){var c=r.cells[i];return c.dataset.v!==undefined?parseFloat(c.dataset.v):c.textContent;};
    Array.from(body.rows).sort(function(a,b){var x=key(a),y=key(b),d;
      if(typeof x==="number"){if(isNaN(x))return 1;if(isNaN(y))return -1;d=x-y;}else d=String(x).localeCompare(y);
      return asc?d:-d;}).forEach(function(r){body.appendChild(r);});});});});
"""
