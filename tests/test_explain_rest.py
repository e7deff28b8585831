"""Explanations that add up (issue 11): concepts ranked by |contribution|, the unlisted ones summed
in ``rest``, so listed + rest + bias = logit for every stored row; and the default model to
explain is chosen by val top-1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from iis.analyze import tables
from iis.analyze.tasks import TaskSpec, run_task
from iis.apps.explain import default_explain_model, explain_split
from iis.apps.report import write_report
from test_tasks import _store


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path]:
    """A store and the library (with its heads) the real analysis task saved for it."""
    root = tmp_path_factory.mktemp("explain")
    store = _store(root / "m.zarr")
    result = run_task(TaskSpec(store=str(store), library="prototype", seed=0, num_concepts=8, ratios=(0.0, 0.5),
                               bootstrap=0, library_dir=str(root / "libs")))
    return store, Path(result.concept_rows[0]["library_file"])


@pytest.mark.parametrize("ratio, top", [(0.0, 3), (0.5, 2), (0.0, None), (0.5, 10)])
def test_stored_rows_add_up_to_the_logit(saved, tmp_path, ratio, top):
    store, library_file = saved
    ex = explain_split(store=store, library_file=library_file, ratio=ratio, limit=None, top=top)
    # Through the table, as `iis explain` stores them: the identity must hold on what is read back.
    tables.upsert(tmp_path, "explanations", ex.rows.assign(pipeline="p", seed=0))
    rows = pd.read_parquet(tmp_path / "explanations.parquet")
    assert len(rows) == 400
    kept = 8 - int(np.floor(ratio * 8))
    for r in rows.itertuples():
        contrib = np.asarray(r.contribution, dtype=np.float64)
        assert contrib.sum() + r.rest + r.bias == pytest.approx(r.logit, abs=1e-4)
        # Ranked by magnitude, largest first.
        assert np.all(np.diff(np.abs(contrib)) <= 1e-7)
        listed = kept if top is None else min(top, kept)
        assert len(contrib) == listed and r.n_rest == kept - listed
        if r.n_rest == 0:
            assert r.rest == 0.0
    # Ranked by magnitude, not by sign: the listed contributions are the largest |c| among all the
    # kept concepts', negative ones included (the old signed ranking listed only positive ones).
    full = explain_split(store=store, library_file=library_file, ratio=ratio, limit=None, top=None).rows
    for r, f in zip(ex.rows.itertuples(), full.itertuples()):
        largest = sorted(f.contribution, key=abs, reverse=True)[: len(r.contribution)]
        np.testing.assert_allclose(r.contribution, largest, atol=1e-6)
    if ratio == 0.0:  # some of this fixture's dense-head top-3 contributions are negative
        assert any(min(c) < 0 for c in rows.contribution)


def test_rest_is_what_the_listed_concepts_leave_out(saved):
    store, library_file = saved
    full = explain_split(store=store, library_file=library_file, ratio=0.0, limit=20, top=None).rows
    short = explain_split(store=store, library_file=library_file, ratio=0.0, limit=20, top=3).rows
    for f, s in zip(full.itertuples(), short.itertuples()):
        assert list(s.concept) == list(f.concept)[:3]
        assert s.rest == pytest.approx(sum(f.contribution[3:]), abs=1e-5)


def test_report_cards_show_the_rest(saved, tmp_path):
    store, library_file = saved
    rows = explain_split(store=store, library_file=library_file, ratio=0.0, limit=4, top=6).rows
    tables.upsert(tmp_path, "explanations", rows.assign(pipeline="p", seed=0))
    html = write_report(results=tmp_path).read_text()
    # 6 listed, 5 shown per card: the 6th joins the stored rest of the other 2 kept concepts.
    assert html.count("<li class='rest'>") == 4 and "3 other concepts" in html
    first = rows.iloc[0]
    shown_rest = first.rest + first.contribution[5]
    assert f"{shown_rest:+.3f}" in html
    # Every kept concept listed and shown: no rest line.
    rows = explain_split(store=store, library_file=library_file, ratio=0.5, limit=4, top=None).rows
    tables.upsert(tmp_path, "explanations", rows.assign(pipeline="p", seed=0))
    html = write_report(results=tmp_path).read_text()
    assert html.count("<li class='rest'>") == 4  # the four cards of ratio 0 only


def test_default_explain_model_is_chosen_by_val_not_test():
    acc = pd.DataFrame([
        # a: best on test, worse on val; b: best on val.
        {"pipeline": "p", "model": "a", "library": "standard", "protocol": "default", "seed": 0,
         "val_top1": 0.80, "test_top1": 0.95},
        {"pipeline": "p", "model": "b", "library": "standard", "protocol": "default", "seed": 0,
         "val_top1": 0.90, "test_top1": 0.85},
        # A reference-protocol row and a library row never count.
        {"pipeline": "p", "model": "a", "library": "standard", "protocol": "reference", "seed": 0,
         "val_top1": 0.99, "test_top1": 0.99},
        {"pipeline": "p", "model": "a", "library": "prototype", "protocol": "default", "seed": 0,
         "val_top1": 0.99, "test_top1": 0.99},
        {"pipeline": "other", "model": "c", "library": "standard", "protocol": "default", "seed": 0,
         "val_top1": 0.99, "test_top1": 0.99},
    ])
    assert default_explain_model(acc, models=["a", "b", "c"], pipeline="p") == "b"
    assert default_explain_model(acc.iloc[:0], models=["a", "b"]) == "a"  # no rows yet: the first model
    with pytest.raises(ValueError, match="no model to explain"):
        default_explain_model(acc, models=[])


@pytest.mark.parametrize("num_concepts", [1, 2, 10, 64, 1000])
def test_keep_count_keeps_at_least_one_for_every_accepted_ratio(num_concepts):
    from iis.analyze.activations import keep_count

    # 0.9999999999 * 10 is within the rounding tolerance of 10: it used to keep 0 concepts.
    for ratio in (0.0, 0.5, 0.9, 0.99, 0.9999999999, float(np.nextafter(1.0, 0.0))):
        assert 1 <= keep_count(ratio, num_concepts) <= num_concepts
    assert keep_count(0.9999999999, 10) == 1
    assert keep_count(0.3, 10) == 7  # the tolerance still stops 0.3 * 10 from flooring to 2
    with pytest.raises(ValueError, match="sparsity ratio"):
        keep_count(1.0, num_concepts)
