"""Issue 12 end to end: `layers:` in pipelines.yaml, layer columns in the tables, IIS along depth,
and concept libraries built from another store's visual elements (`analysis.library_from`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from iis.analyze import tables
from iis.analyze.pipeline import ClusterOptions, analyze_stores
from iis.analyze.store import StoreError
from iis.extract import store as st

from iis.cli import main
from iis.config import ConfigError, load_pipeline
from iis.jobs import analyze_pipeline

DIGITS = """
pipelines:
  layered:
    dataset: {source: builtin, name: digits, splits: {val: 0.15, test: 0.25}, seed: 0}
    models:
      - {name: r10, backbone: resnet10t, weights: random, img_size: 32, layers: [stages.1, stages.3, final]}
    elements: {images_per_class: 4, grid: 2}
    extract: {batch_size: 64, block_rows: 256}
    store: cache/layered
    results: results/layered
    analysis: {libraries: [prototype], num_concepts: 16, ratios: [0, 0.5, 0.9], bootstrap: 0}
  borrowed:
    dataset: {source: builtin, name: digits, splits: {val: 0.15, test: 0.25}, seed: 1}
    models:
      - {name: r10, backbone: resnet10t, weights: random, img_size: 32, layers: [stages.1, final]}
    elements: {images_per_class: 4, grid: 2}
    extract: {batch_size: 64, block_rows: 256}
    store: cache/borrowed
    results: results/borrowed
    analysis: {libraries: [prototype], num_concepts: 16, ratios: [0, 0.5, 0.9], bootstrap: 0,
               library_from: {pipeline: layered}}
"""


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipelines.yaml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------------
# pipelines.yaml


def test_an_unknown_layer_is_a_parse_time_error_with_its_key_path(tmp_path):
    path = _yaml(tmp_path, DIGITS.replace("layers: [stages.1, stages.3, final]", "layers: [stages.1, stages.7]"))
    with pytest.raises(ConfigError) as err:
        load_pipeline(path, "layered")
    text = str(err.value)
    assert "pipelines.layered.models[0].layers: resnet10t has no layer 'stages.7'" in text
    assert "available: stages.0 (act1), stages.1 (layer1)" in text  # the names to choose from


def test_layers_expand_to_one_measured_model_per_store(tmp_path):
    text = DIGITS.replace("layers: [stages.1, stages.3, final]", "layers: all")
    cfg = load_pipeline(_yaml(tmp_path, text), "layered")
    names = [m.name for m in cfg.measured_models()]
    assert names == [f"r10@stages.{i}" for i in range(5)] + ["r10"]
    assert {m.base for m in cfg.measured_models()} == {"r10"}
    assert [m.layer for m in cfg.measured_models()][-1] == "final"
    # Stage 2 lists the same stores without checking inputs.
    assert [m.name for m in load_pipeline(tmp_path / "pipelines.yaml", "layered", check_inputs=False)
            .measured_models()] == names


def test_layers_at_limits_the_layers_to_chosen_checkpoints(tmp_path):
    text = DIGITS.replace("weights: random, img_size: 32, layers: [stages.1, stages.3, final]}",
                          "img_size: 32, layers: [stages.1, final], layers_at: [2], "
                          "train: {epochs: 2, checkpoints: [0, 2]}}")
    cfg = load_pipeline(_yaml(tmp_path, text), "layered")
    assert [m.name for m in cfg.measured_models()] == ["r10@e0", "r10@e2@stages.1", "r10@e2"]
    bad = text.replace("layers_at: [2]", "layers_at: [1]")
    with pytest.raises(ConfigError, match=r"models\[0\]: layers_at \[1\] are not among train.checkpoints"):
        load_pipeline(_yaml(tmp_path, bad), "layered")


def test_the_demo_measures_layers_of_its_final_resnet_checkpoint_only():
    from iis.config import find_pipeline

    names = [m.name for m in find_pipeline("demo", check_inputs=False).measured_models()]
    layered = [n for n in names if n.count("@") > 1]
    assert layered == ["r10@e2@stages.1", "r10@e2@stages.3"] and len(names) == 11


def test_library_from_resolves_and_is_checked_when_read(tmp_path):
    cfg = load_pipeline(_yaml(tmp_path, DIGITS), "borrowed")
    assert cfg.elements_stores() == {
        str(tmp_path / "cache/borrowed/r10@stages.1.zarr"): tmp_path / "cache/layered/r10@stages.1.zarr",
        str(tmp_path / "cache/borrowed/r10.zarr"): tmp_path / "cache/layered/r10.zarr",
    }
    with pytest.raises(ConfigError, match=r"analysis.library_from: .*'nowhere' is not a pipeline of this file"):
        load_pipeline(_yaml(tmp_path, DIGITS.replace("{pipeline: layered}", "{pipeline: nowhere}")), "borrowed")
    both = DIGITS.replace("{pipeline: layered}", "{pipeline: layered, store: cache/x.zarr}")
    with pytest.raises(ConfigError, match="exactly one of `store` or `pipeline`"):
        load_pipeline(_yaml(tmp_path, both), "borrowed")


# --------------------------------------------------------------------------------------------------
# Synthetic layers and stores (written directly, as stage 1 would)

DIM, CLASSES, K = 32, 4, 8
SIZES = {"train": 800, "val": 200, "test": 400}


def _write(path: Path, *, depth: float | None, dataset: str = "synthetic", backbone: str = "planted",
           sha: str = "abc", layer: str | None = None, seed: int = 0) -> Path:
    """A store whose class information lies in the concept span in proportion to ``depth``.

    Concept directions are the first ``K`` axes; each class's mean is ``depth`` times a sparse mix
    of them plus ``1 - depth`` times a part on the remaining axes, which no concept sees. The
    visual elements are the concept directions themselves (two per concept).
    """
    rng = np.random.default_rng(seed)
    structure = np.random.default_rng(123)  # the same concept space in every store
    in_span = np.zeros((CLASSES, DIM))
    in_span[:, :K] = structure.normal(size=(CLASSES, K)) * 2.0
    outside = np.zeros((CLASSES, DIM))
    outside[:, K:] = structure.normal(size=(CLASSES, DIM - K)) * 2.0
    d = 1.0 if depth is None else depth
    means = d * in_span + (1 - d) * outside
    attrs = {"model": path.stem, "dataset": dataset, "backbone": backbone, "weights": "random",
             "weights_sha256": sha, "classes": [f"c{i}" for i in range(CLASSES)], "layer": "pre_logits"}
    if depth is not None:
        attrs.update(layer=layer or f"stages.{round(depth * 4) - 1}", depth=depth, base_model="m")
    n_el = 2 * K
    group = st.create_store(path, split_sizes=SIZES, feature_dim=DIM, block_rows=256,
                            elements=st.ElementProvenance(
                                source_id=np.array([f"{dataset}/train/{i}" for i in range(n_el)]),
                                source_index=np.arange(n_el), label=np.arange(n_el) % CLASSES,
                                box=np.tile([0, 0, 4, 4], (n_el, 1)), kind=np.array(["grid"] * n_el),
                                segment=np.full(n_el, -1)),
                            attrs=attrs)
    for split, n in SIZES.items():
        labels = rng.integers(0, CLASSES, n)
        columns = {"features": (means[labels] + rng.normal(size=(n, DIM))).astype(np.float32),
                   "labels": labels, "ids": np.array([f"{split}/{i}" for i in range(n)]),
                   "valid": np.ones(n, dtype=bool)}
        for b in range(st.num_blocks(n, 256)):
            span = st.block_slice(b, rows=n, block_rows=256)
            st.write_block(group, split, b, **{k: v[span] for k, v in columns.items()})
    elements = np.zeros((n_el, DIM), dtype=np.float32)
    elements[np.arange(n_el), np.arange(n_el) % K] = 1.0
    st.write_block(group, st.ELEMENTS, 0, features=elements)
    assert st.finalize_store(group, path)
    return path


def _analyze(stores, results, **kwargs) -> dict[str, pd.DataFrame]:
    return analyze_stores(stores, results=results, libraries=["prototype"], num_concepts=K, ratios=[0, 0.5, 0.9],
                          seeds=[0], bootstrap=0, cluster=ClusterOptions(synchronous=True), **kwargs)


def test_iis_rises_with_depth_as_class_information_moves_into_the_concept_span(tmp_path):
    depths = [0.25, 0.5, 0.75]
    stores = [_write(tmp_path / f"m@stages.{i}.zarr", depth=d) for i, d in enumerate(depths)]
    stores.append(_write(tmp_path / "m.zarr", depth=None))  # a final store: no depth attribute
    out = _analyze(stores, tmp_path / "results")
    iis = out["iis"].set_index("model")
    assert iis.loc["m", "layer"] == "final" and iis.loc["m", "depth"] == 1.0
    assert iis.loc["m@stages.1", "layer"] == "stages.1" and iis.loc["m@stages.1", "depth"] == 0.5
    ordered = iis.sort_values("depth")
    assert ordered.depth.tolist() == [0.25, 0.5, 0.75, 1.0]
    scores = ordered.iis_normalized.to_numpy()
    assert (np.diff(scores) > 0).all(), scores
    assert scores[-1] - scores[0] > 0.2, scores  # a real rise, not noise
    acc = out["accuracy"]
    assert set(zip(acc.model, acc.layer)) == {("m", "final"), ("m@stages.0", "stages.0"),
                                              ("m@stages.1", "stages.1"), ("m@stages.2", "stages.2")}
    assert set(out["concepts"].layer) == {"final", "stages.0", "stages.1", "stages.2"}
    # Correlations compare models at their final features only.
    assert out["correlation"].models.map(list).tolist() == [["m"]]
    assert out["iis"].library_source.isna().all()


def test_old_tables_without_layer_columns_still_load(tmp_path):
    old = pd.DataFrame({"pipeline": ["p"], "model": ["m"], "ratios": [[0.0, 0.5]], "iis": [0.4]})
    old.to_parquet(tmp_path / "iis.parquet")
    table = tables.read_table(tmp_path, "iis")
    assert table.loc[0, "layer"] == "final" and table.loc[0, "depth"] == 1.0
    assert table.loc[0, "library_source"] is None or pd.isna(table.loc[0, "library_source"])
    assert table.loc[0, "grid"] == "0,0.5"


def test_library_from_another_dataset_of_the_same_backbone_and_layer(tmp_path):
    mine = _write(tmp_path / "mine.zarr", depth=None, dataset="first", seed=0)
    other = _write(tmp_path / "other.zarr", depth=None, dataset="second", seed=1)
    own = _analyze([mine], tmp_path / "results")
    out = _analyze([mine], tmp_path / "results", elements_stores={str(mine): other})
    iis = out["iis"]
    # Both libraries sit side by side: the source is part of the key.
    assert sorted(iis.library_source.fillna("")) == ["", str(other)]
    borrowed = iis[iis.library_source == str(other)].iloc[0]
    assert borrowed.model == "mine" and borrowed.dataset == "first"
    assert borrowed.iis_normalized > 0.5  # the other dataset's elements span the same concepts
    concepts = out["concepts"]
    from_other = concepts[concepts.library_source == str(other)]
    assert len(from_other) == K and all(s[0].startswith("second/") for s in from_other.source_id)
    assert all(s[0].startswith("first/") for s in concepts[concepts.library_source.isna()].source_id)
    pd.testing.assert_frame_equal(iis[iis.library_source.isna()].reset_index(drop=True),
                                  own["iis"].reset_index(drop=True))
    # Libraries from elsewhere are saved apart: the store's own library file is not replaced.
    files = set(concepts.library_file)
    assert len(files) == 2 and all(Path(f).is_file() for f in files)
    # A rerun (as `iis run` does) finds both sources' rows and fits nothing.
    again = _analyze([mine], tmp_path / "results", elements_stores={str(mine): other}, skip_complete=True)
    pd.testing.assert_frame_equal(again["iis"], iis)
    assert sorted(out["correlation"].library_source.fillna("")) == ["", str(other)]
    # The ranking keeps them apart too (not one IIS averaged over both sources), each with its own
    # per-image file.
    ranking = out["ranking"]
    assert sorted(ranking.library_source.fillna("")) == ["", str(other)] and (ranking.n_models == 1).all()
    for source, row in ranking.set_index(ranking.library_source.fillna("")).iterrows():
        assert row.iis == iis.loc[iis.library_source.fillna("") == source, "iis"].item()
    kept = sorted((tmp_path / "results" / "correct" / "mine").glob("prototype-*.npz"))
    assert len(kept) == 2
    # The report draws each source in a panel of its own.
    from iis.apps.report import write_report

    page = write_report(results=tmp_path / "results").read_text()
    assert "prototype · own elements" in page and "prototype · elements of other" in page


@pytest.mark.parametrize("other, named", [
    ({"backbone": "another"}, "backbone 'another' != 'planted'"),
    ({"sha": "def"}, "weights (sha256) 'def' != 'abc'"),
    ({"depth": 0.5, "layer": "stages.1"}, "layer 'stages.1' != 'final'"),
])
def test_library_from_another_space_is_refused_naming_the_mismatch(tmp_path, other, named):
    mine = _write(tmp_path / "mine.zarr", depth=None)
    foreign = _write(tmp_path / "foreign.zarr", **{"depth": None, **other})
    with pytest.raises(StoreError, match="library_from") as err:
        _analyze([mine], tmp_path / "results", elements_stores={str(mine): foreign})
    assert named in str(err.value) and str(foreign) in str(err.value)
    assert not (tmp_path / "results" / "iis.parquet").exists()  # refused before any fitting


# --------------------------------------------------------------------------------------------------
# Digits, end to end


@pytest.mark.slow
def test_layers_on_digits_extract_and_analyze_one_row_per_layer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(_yaml(tmp_path, DIGITS))
    assert main(["extract", "layered", "--config", config]) == 0
    stores = sorted(p.name for p in (tmp_path / "cache/layered").glob("*.zarr"))
    assert stores == ["r10.zarr", "r10@stages.1.zarr", "r10@stages.3.zarr"]
    assert main(["analyze", "layered", "--config", config, "--synchronous"]) == 0
    iis = pd.read_parquet(tmp_path / "results/layered/iis.parquet").set_index("model")
    assert sorted(iis.index) == ["r10", "r10@stages.1", "r10@stages.3"]
    assert iis.layer.to_dict() == {"r10": "final", "r10@stages.1": "stages.1", "r10@stages.3": "stages.3"}
    # resnet10t has 5 stages: stages.i sits at (i + 1) / 6.
    np.testing.assert_allclose(iis.depth.loc[["r10@stages.1", "r10@stages.3", "r10"]], [2 / 6, 4 / 6, 1.0])
    acc = pd.read_parquet(tmp_path / "results/layered/accuracy.parquet")
    assert set(zip(acc.model, acc.layer)) == {("r10", "final"), ("r10@stages.1", "stages.1"),
                                              ("r10@stages.3", "stages.3")}

    # Another pipeline (other splits and elements) builds its libraries from this one's elements.
    assert main(["extract", "borrowed", "--config", config]) == 0
    assert main(["analyze", "borrowed", "--config", config, "--synchronous"]) == 0
    borrowed = pd.read_parquet(tmp_path / "results/borrowed/iis.parquet").set_index("model")
    assert borrowed.library_source.to_dict() == {
        "r10": str(tmp_path / "cache/layered/r10.zarr"),
        "r10@stages.1": str(tmp_path / "cache/layered/r10@stages.1.zarr")}
    # Elements of another layer are refused by name, before any fitting.
    text = DIGITS.replace("{pipeline: layered}", "{store: cache/layered/r10@stages.3.zarr}")
    cfg = load_pipeline(_yaml(tmp_path, text), "borrowed", check_inputs=False)
    with pytest.raises(StoreError, match=r"r10@stages.1.zarr: library_from .*r10@stages.3.zarr holds elements of "
                                         r"another feature space \(layer 'stages.3' != 'stages.1'; feature_dim 256 != 64\)"):
        analyze_pipeline(cfg, synchronous=True)


def test_report_has_a_depth_section_only_when_a_model_has_several_layers(tmp_path):
    from iis.apps.report import write_report
    from iis.apps.report_depth import base_model, depth_points

    assert base_model("r10@e4@stages.1", "stages.1") == "r10@e4" and base_model("r10@e4", "final") == "r10@e4"
    stores = [_write(tmp_path / f"m@stages.{i}.zarr", depth=d) for i, d in enumerate([0.25, 0.5])]
    stores += [_write(tmp_path / "m.zarr", depth=None), _write(tmp_path / "solo.zarr", depth=None, seed=3)]
    results = tmp_path / "results"
    out = _analyze(stores, results)
    points = depth_points(out["iis"])
    # One line (base model m) of three layers; `solo` has one layer and no line.
    assert set(points.base) == {"m"} and points.layer.tolist() == ["stages.0", "stages.1", "final"]
    assert points.depth.tolist() == [0.25, 0.5, 1.0]
    np.testing.assert_allclose(points.standard_top1, out["iis"].set_index("model").loc[
        ["m@stages.0", "m@stages.1", "m"], "standard_top1"])
    html = write_report(results=results).read_text()
    assert "id='depth'" in html and "IIS and standard top-1 against depth" in html
    single = tmp_path / "single"
    _analyze([stores[-1]], single)
    assert "id='depth'" not in write_report(results=single).read_text()


def test_library_from_in_explicit_cli_mode(tmp_path, caplog):
    mine = _write(tmp_path / "mine.zarr", depth=None, dataset="first", seed=0)
    other = _write(tmp_path / "other.zarr", depth=None, dataset="second", seed=1)
    common = ["analyze", "--store", str(mine), "--libraries", "prototype", "--num-concepts", str(K),
              "--ratios", "0,0.5,0.9", "--seeds", "0", "--bootstrap", "0", "--synchronous"]
    assert main([*common, "--results", str(tmp_path / "R"), "--library-from", str(other)]) == 0
    iis = pd.read_parquet(tmp_path / "R" / "iis.parquet")
    assert list(iis.library_source) == [str(other)]  # only the borrowed library: the store's own is not fitted
    concepts = pd.read_parquet(tmp_path / "R" / "concepts.parquet")
    assert len(concepts) == K and all(s[0].startswith("second/") for s in concepts.source_id)
    # Another feature space is refused in one line naming it, before any table is written.
    foreign = _write(tmp_path / "foreign.zarr", depth=None, backbone="another")
    assert main([*common, "--results", str(tmp_path / "F"), "--library-from", str(foreign)]) != 0
    assert "backbone 'another' != 'planted'" in caplog.text and str(foreign) in caplog.text
    assert not (tmp_path / "F" / "iis.parquet").exists()
