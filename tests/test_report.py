"""The HTML report: self-contained, complete, robust to missing tables and pictures, and not blank."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from iis.analyze.tables import SCHEMAS, write_atomic
from iis.apps.report import write_report
from iis.apps.report_plots import mathtext_safe, mean_arr_curves, model_points
from iis.extract.datasets import load_dataset
from PIL import Image

MODELS = ["r10", "vit_tiny_patch16", "convnext_atto"]
LIBRARIES = ["prototype", "cluster"]
RATIOS = [0.0, 0.5, 0.9]
# Deliberately distinctive coefficients, so the report's printed numbers can be found verbatim.
CORR = {"prototype": (0.8123, 0.25, 0.5, 0.6667, 0.3333, 1.0), "cluster": (-0.4321, 0.5, -0.5, 0.6, -0.3333, 1.0)}
# Spearman intervals: both exclude 0 (but their p-values are large).
CI = {"prototype": (0.125, 0.875), "cluster": (-0.875, -0.125)}
N_CORRECT, N_WRONG = 3, 3


@pytest.fixture(scope="module")
def digits():
    return load_dataset(source="builtin", name="digits", seed=0)


def _iis_frame() -> pd.DataFrame:
    rows = []
    for m, model in enumerate(MODELS):
        for lib in LIBRARIES:
            for seed in (0, 1):
                arr = [1.0, 0.9 - 0.1 * m - 0.05 * seed, 0.6 - 0.1 * m]
                iis = float(np.trapezoid(arr, RATIOS))
                rows.append({
                    "pipeline": "demo", "dataset": "digits", "model": model, "backbone": model,
                    "weights": "random", "library": lib, "num_concepts": 16, "seed": seed,
                    "standard_top1": 0.7 + 0.1 * m, "iis": iis, "iis_normalized": iis / 0.9,
                    "iis_ci_low": iis - 0.09, "iis_ci_high": iis + 0.045, "ratios": RATIOS, "arr": arr,
                    "protocol": "default",
                })
    return pd.DataFrame(rows)


def _accuracy_frame() -> pd.DataFrame:
    rows = []
    for m, model in enumerate(MODELS):
        for lib, sparsity in [("standard", None)] + [(lib, s) for lib in LIBRARIES for s in RATIOS]:
            rows.append({
                "pipeline": "demo", "dataset": "digits", "model": model, "backbone": model, "weights": "random",
                "library": lib, "num_concepts": None if sparsity is None else 16, "sparsity": sparsity, "seed": 0,
                "val_top1": 0.7, "test_top1": 0.7 + 0.1 * m, "test_top5": 0.95, "test_top1_ci_low": 0.65,
                "test_top1_ci_high": 0.75, "active_concepts": 8, "n_train": 1257, "n_val": 180, "n_test": 360,
                "fit_seconds": 0.5, "protocol": "default",
            })
    return pd.DataFrame(rows)


def _correlation_frame() -> pd.DataFrame:
    return pd.DataFrame([
        {"dataset": "digits", "library": lib, "num_concepts": 16, "protocol": "default", "n_models": 3,
         "models": MODELS, "pearson_r": c[0], "pearson_p": c[1], "spearman_rho": c[2], "spearman_p": c[3],
         "kendall_tau": c[4], "kendall_p": c[5], "spearman_ci_low": CI[lib][0], "spearman_ci_high": CI[lib][1]}
        for lib, c in CORR.items()
    ])


def _concepts_frame(train_ids: list[str]) -> pd.DataFrame:
    return pd.DataFrame([
        {"pipeline": "demo", "dataset": "digits", "model": model, "library": lib, "num_concepts": 16,
         "sparsity": None, "seed": 0, "concept": k, "word": None, "element_index": [k],
         "source_id": [train_ids[k]], "box": [[0, 0, 4, 4]], "kept": True, "drop_reason": None,
         "drop_value": None, "library_file": f"{model}-{lib}.npy"}
        for model in MODELS for lib in LIBRARIES for k in range(16)
    ])


def _explanations_frame(ds, *, words: bool = False) -> pd.DataFrame:
    test, train = ds.splits["test"], ds.splits["train"]
    rows = []
    for n in range(N_CORRECT + N_WRONG):
        correct = n < N_CORRECT
        true = int(test.labels[n])
        pred = true if correct else (true + 1) % 10
        k = 4
        rows.append({
            "pipeline": "demo", "dataset": "digits", "model": "r10", "library": "prototype", "num_concepts": 16,
            "sparsity": 0.9, "seed": 0, "split": "test", "image_id": str(test.ids[n]), "image_index": n,
            "true": true, "pred": pred, "true_name": f"digit-{true}-t{n}", "pred_name": f"digit-{pred}-p{n}",
            "correct": correct, "logit": 3.5, "bias": 0.25, "concept": list(range(k)),
            "contribution": [1.5, 0.75, 0.2, -0.4][:k], "activation": [2.0, 1.0, 0.5, -0.5][:k],
            "word": [f"stroke{c}" if words and c == 1 else None for c in range(k)],
            # Concept c is shown by c + 1 crops (at most 3 are drawn) from train images.
            "source_id": [[str(train.ids[c + j]) for j in range(c + 1)] for c in range(k)],
            "box": [[[0, 0, 4, 4] for _ in range(c + 1)] for c in range(k)],
        })
    return pd.DataFrame(rows)


def _finetune_frame() -> pd.DataFrame:
    return pd.DataFrame([
        {"model": "r10", "lambda": lam, "seed": seed, "epochs": 2, "library": lib, "standard_top1_before": 0.8,
         "standard_top1_after": 0.85 + lam / 10, "iis_before": 0.5, "iis_after": 0.55 + lam / 10}
        for lam in (0.0, 0.5) for seed in (0, 1, 2) for lib in ("prototype", "cluster")
    ])


def _delta_frame() -> pd.DataFrame:
    """λ = 0.5 against 0: top-1 rises beyond doubt on prototype; IIS is within noise; cluster's
    intervals were not computed."""
    common = {"pipeline": "demo", "dataset": "digits", "model": "r10", "lambda": 0.5, "epochs": 2,
              "seeds": [0, 1, 2], "library_seeds": [0], "n_pairs": 3, "n_test": 100, "bootstrap": 200}
    return pd.DataFrame([
        {**common, "library": "prototype", "top1_lambda": 0.9, "top1_zero": 0.85, "top1_delta": 0.031,
         "top1_delta_ci_low": 0.012, "top1_delta_ci_high": 0.047, "iis_lambda": 0.6, "iis_zero": 0.61,
         "iis_delta": -0.011, "iis_delta_ci_low": -0.043, "iis_delta_ci_high": 0.021},
        {**common, "library": "cluster", "top1_lambda": 0.9, "top1_zero": 0.85, "top1_delta": 0.031,
         "top1_delta_ci_low": None, "top1_delta_ci_high": None, "iis_lambda": 0.7, "iis_zero": 0.6,
         "iis_delta": 0.1, "iis_delta_ci_low": None, "iis_delta_ci_high": None, "bootstrap": 0},
    ])


@pytest.fixture()
def results(tmp_path, digits):
    out = tmp_path / "results"
    for name, df in [("iis", _iis_frame()), ("accuracy", _accuracy_frame()), ("correlation", _correlation_frame()),
                     ("concepts", _concepts_frame(list(digits.splits["train"].ids)))]:
        write_atomic(df, out / f"{name}.parquet", SCHEMAS[name])
    _explanations_frame(digits).to_parquet(out / "explanations.parquet")
    _finetune_frame().to_parquet(out / "finetune.parquet")
    write_atomic(_delta_frame(), out / "finetune_delta.parquet", SCHEMAS["finetune_delta"])
    return out


def _images(page: str) -> dict[str, list[Image.Image]]:
    found: dict[str, list[Image.Image]] = {}
    for kind, data in re.findall(r"<img class='(\w+)'[^>]*src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page):
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
        assert image.format == "PNG"
        found.setdefault(kind, []).append(image)
    return found


def test_report_is_one_file_of_valid_embedded_pngs(results, digits):
    path = write_report(results=results, dataset=digits, max_cards=4)
    assert path == results / "report.html"
    page = path.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == sum(len(v) for v in _images(page).values())
    images = _images(page)
    # ARR curves, IIS against top-1, fine-tuning: λ - 0 with intervals, and before -> after.
    assert len(images["plot"]) == 4 and all(im.width >= 500 and im.height >= 250 for im in images["plot"])
    # One test image per card; concepts 0..3 carry 1, 2, 3, 4 source crops, of which at most 3 are drawn.
    assert len(images["sample"]) == 4 and all(min(im.size) >= 64 for im in images["sample"])
    assert len(images["crop"]) == 4 * (1 + 2 + 3 + 3) and all(min(im.size) >= 24 for im in images["crop"])
    # A crop of a digit is not a flat tile: the 4x4 box holds several grey levels.
    assert any(len(np.unique(np.asarray(im.convert("L")))) > 1 for im in images["crop"])
    # Nothing is fetched from anywhere: no URLs, no external style sheets, scripts or fonts.
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<link|@import|url\(|<script[^>]+src", page)
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r"src='([^']*)'", page))


def test_report_shows_models_numbers_table_and_cards(results, digits):
    page = write_report(results=results, dataset=digits, max_cards=4).read_text(encoding="utf-8")
    for model in MODELS:
        assert model in page
    for value in ("0.812", "0.500", "0.333", "-0.432", "-0.500", "0.667"):
        assert value in page, value
    assert "n_models = 3" in page
    # Headline: both intervals exclude 0, but over 3 models the permutation p-values (0.667, 0.6)
    # say the order could be chance, so no direction is stated.
    assert re.search(r"class='stat cannot-tell'><div class='lib'>prototype", page)
    assert re.search(r"class='stat cannot-tell'><div class='lib'>cluster", page)
    assert "[+0.12, +0.88]" in page and "the interval excludes 0, but p = 0.667" in page
    table = page[page.index("id='iis-table'"):]
    table = table[: table.index("</table>")]
    assert table.count("<tr class='row'>") == len(_iis_frame())
    # Numbers are formatted, and their sort keys are the exact values.
    assert "<td data-v='0.7' class='num'>0.700</td>" in table
    # Cards alternate correct and wrong predictions and name both classes.
    expl = _explanations_frame(digits)
    truths = re.findall(r"class='cls-true'>([^<]*)<", page)
    preds = re.findall(r"class='cls-pred'>([^<]*)<", page)
    kinds = re.findall(r"<article class='card (right|wrong)'", page)
    assert kinds == ["right", "wrong", "right", "wrong"]
    expected = [expl.iloc[i] for i in (0, N_CORRECT, 1, N_CORRECT + 1)]
    assert truths == [r.true_name for r in expected] and preds == [r.pred_name for r in expected]
    assert "+1.500" in page and "-0.400" in page  # signed contributions
    # Fine-tuning: the paired differences with their intervals, and what each lets one say.
    section = page[page.index("id='finetune'"):page.index("id='concepts'")]
    assert "[+0.012, +0.047]" in section and "[-0.043, +0.021]" in section
    prototype = section[section.index("<td>prototype</td>"):]
    prototype = prototype[:prototype.index("</tr>")]
    assert "λ raises it: the interval excludes 0" in prototype and "the data cannot tell: the interval holds 0" in prototype
    assert "3 × 1" in prototype and "+0.031" in prototype
    cluster = section[section.index("<td>cluster</td>"):]
    assert "no interval" in cluster[:cluster.index("</tr>")]
    # Each arm against the start model, per library, means over its 3 seeds.
    assert "+0.050" in section and "+0.100" in section


def test_report_without_explanations_finetune_or_dataset(results, digits):
    (results / "finetune.parquet").unlink()
    (results / "finetune_delta.parquet").unlink()
    _explanations_frame(digits, words=True).to_parquet(results / "explanations.parquet")
    page = write_report(results=results, dataset=None).read_text(encoding="utf-8")
    images = _images(page)
    assert len(images["plot"]) == 2 and "sample" not in images and "crop" not in images
    assert len(re.findall(r"<article class='card", page)) == N_CORRECT + N_WRONG
    assert "stroke1" in page and "No dataset given" in page and "No finetune.parquet" in page

    (results / "explanations.parquet").unlink()
    out = results / "elsewhere" / "r.html"
    page = write_report(results=results, out=out, dataset=digits, title="My <report>").read_text(encoding="utf-8")
    assert "No explanations.parquet" in page and "<article" not in page
    assert "My &lt;report&gt;" in page


def test_report_of_results_from_before_the_paired_comparison(results, digits):
    (results / "finetune_delta.parquet").unlink()
    # Written before: one row per (model, lambda, seed), without scoring libraries.
    _finetune_frame().drop(columns="library").drop_duplicates().to_parquet(results / "finetune.parquet")
    page = write_report(results=results, dataset=None).read_text(encoding="utf-8")
    assert "No finetune_delta.parquet" in page and "+0.100" in page


def test_report_survives_unloadable_pictures(results, digits):
    expl = _explanations_frame(digits)
    expl["image_id"] = "digits/not-there"
    expl["image_index"] = 10**6
    expl["source_id"] = [[["missing/1"], [str(digits.splits["train"].ids[0])], [], []]] * len(expl)
    expl["box"] = [[[[0, 0, 4, 4]], [[5, 5, 5, 5]], [], []]] * len(expl)  # the second box is empty
    expl.to_parquet(results / "explanations.parquet")
    page = write_report(results=results, dataset=digits).read_text(encoding="utf-8")
    assert "sample" not in _images(page) and "crop" not in _images(page)
    assert page.count("no image") == N_CORRECT + N_WRONG


def test_report_of_empty_results_says_so(tmp_path):
    page = write_report(results=tmp_path / "nothing").read_text(encoding="utf-8")
    assert "data:image" not in page
    for missing in ("No correlation.parquet", "No iis.parquet", "No explanations.parquet", "No finetune.parquet"):
        assert missing in page


def test_curves_average_seeds_and_intervals_are_normalised():
    iis = _iis_frame()
    curves = mean_arr_curves(iis)
    assert len(curves) == len(MODELS) * len(LIBRARIES) and set(curves["n_seeds"]) == {2}
    r10 = curves[(curves["model"] == "r10") & (curves["panel"] == "prototype")].iloc[0]
    np.testing.assert_allclose(r10["arr"], [1.0, 0.875, 0.6])
    points = model_points(iis).set_index(["panel", "model"])
    p = points.loc[("cluster", "convnext_atto")]
    rows = iis[(iis.model == "convnext_atto") & (iis.library == "cluster")]
    np.testing.assert_allclose(p["iis_normalized"], rows["iis_normalized"].mean())
    # Two seeds and no ranking: averaging the seeds' endpoints is no interval, so none is drawn.
    assert np.isnan(p["ci_low"]) and p["ci_kind"] is None
    # One seed: that seed's interval over test images, normalised.
    one = model_points(iis[iis.seed == 0]).set_index(["panel", "model"]).loc[("cluster", "convnext_atto")]
    first = rows[rows.seed == 0].iloc[0]
    np.testing.assert_allclose([one["ci_low"], one["ci_high"]], [(first.iis - 0.09) / 0.9, (first.iis + 0.045) / 0.9])
    assert one["ci_kind"] == "images"
    # With ranking.parquet: its interval over images and seeds together.
    ranking = pd.DataFrame([{"dataset": "digits", "library": "cluster", "num_concepts": 16, "protocol": "default",
                             "model": "convnext_atto", "iis_ci_low": 0.27, "iis_ci_high": 0.36}])
    joint = model_points(iis, ranking=ranking).set_index(["panel", "model"]).loc[("cluster", "convnext_atto")]
    np.testing.assert_allclose([joint["ci_low"], joint["ci_high"]], [0.3, 0.4])
    assert joint["ci_kind"] == "images and seeds"


def test_dollar_signs_in_names_are_drawn_literally(results, digits):
    """A ``$`` starts matplotlib mathtext; an unpaired one used to crash the report."""
    for name in ("iis", "accuracy", "correlation"):
        path = results / f"{name}.parquet"
        df = pd.read_parquet(path)
        if "model" in df:
            df["model"] = df["model"].replace({"r10": "r10$price", "convnext_atto": "x$^$y"})
        if "models" in df:
            df["models"] = df["models"].map(lambda ms: [{"r10": "r10$price"}.get(m, m) for m in ms])
        df["library"] = df["library"].replace({"cluster": "clu$ter"})
        write_atomic(df, path, SCHEMAS[name])
    ft = pd.read_parquet(results / "finetune.parquet").assign(model="r10$price")
    ft = pd.concat([ft, ft.assign(model="x$")], ignore_index=True)
    ft.to_parquet(results / "finetune.parquet")
    page = write_report(results=results, dataset=digits, max_cards=2).read_text(encoding="utf-8")
    assert "r10$price" in page and "clu$ter" in page and "x$^$y" in page
    assert mathtext_safe("a$b$c") == r"a\$b\$c"


def test_panels_split_by_grid_when_grids_differ():
    iis = _iis_frame()
    other = iis.assign(ratios=[[0.0, 0.3, 0.9]] * len(iis), grid="0,0.3,0.9")
    both = pd.concat([iis.assign(grid="0,0.5,0.9"), other], ignore_index=True)
    points = model_points(both)
    assert set(points["panel"]) == {f"{lib} · grid {g}" for lib in LIBRARIES for g in ("0,0.5,0.9", "0,0.3,0.9")}
    assert (points["n_seeds"] == 2).all()  # each point averages its own grid's seeds only


_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def _chromium(what: str, page) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip(f"no chromium on PATH to check {what}; by hand: chromium {' '.join(_FLAGS)} "
                    f"--screenshot=shot.png --window-size=1280,2000 file://{page}")
    return browser


def test_headless_screenshot_is_not_blank(results, digits, tmp_path):
    page = write_report(results=results, dataset=digits)
    browser = _chromium("the screenshot", page)
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1280,2000", f"file://{page}"], capture_output=True, timeout=120, check=False)
    assert shot.exists(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1280)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    not_white = (pixels.min(axis=2) < 235).mean()
    assert colours > 200 and not_white > 0.05, (colours, not_white)


def test_table_sorts_on_header_clicks_in_a_browser(results, digits, tmp_path):
    page = write_report(results=results, dataset=None).read_text(encoding="utf-8")
    browser = _chromium("table sorting", results / "report.html")
    # Click the "IIS" header twice (descending), then let the browser print the resulting DOM.
    clicked = tmp_path / "clicked.html"
    clicker = "<script>var h=document.querySelectorAll('#iis-table th');h[6].click();h[6].click();</script>"
    clicked.write_text(page.replace("</body>", clicker + "</body>"), encoding="utf-8")
    dom = subprocess.run([browser, *_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          f"file://{clicked}"], capture_output=True, text=True, timeout=120, check=False).stdout
    assert re.search(r'<th[^>]*data-dir="desc"[^>]*>IIS</th>', dom), "the IIS header was not sorted"
    table = dom[dom.index('id="iis-table"'):]
    rows = re.findall(r'<tr class="row">(.*?)</tr>', table[: table.index("</table>")])
    iis = [float(re.findall(r'<td data-v="([^"]*)"', row)[3]) for row in rows]  # K, seed, top-1, IIS
    assert len(iis) == len(_iis_frame()) and iis == sorted(iis, reverse=True)
    # The page as written is in key order, not already sorted by IIS: the clicks did the sorting.
    written = page[page.index("id='iis-table'"):]
    before = re.findall(r"<tr class='row'>(.*?)</tr>", written[: written.index("</table>")])
    assert len(before) == len(iis)
    assert [float(re.findall(r"<td data-v='([^']*)'", row)[3]) for row in before] != iis
