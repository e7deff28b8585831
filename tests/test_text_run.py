"""The text path end to end: `iis run smoke-text` (a tiny random CLIP, all four libraries)."""

from __future__ import annotations

import textwrap

import pandas as pd
import pytest

from iis.cli import main
from iis.config import ConfigError, load_pipelines


@pytest.mark.slow
def test_run_smoke_text(tmp_path, monkeypatch):
    # From an empty folder: the shipped pipeline, its concept list read from the package.
    monkeypatch.chdir(tmp_path)
    assert main(["run", "smoke-text"]) == 0
    results = tmp_path / "results" / "smoke-text"
    iis = pd.read_parquet(results / "iis.parquet")
    assert set(iis.library) == {"prototype", "cluster", "end2end", "text"}
    # Random CLIP weights are marked on every row they made, and only there.
    text = iis[iis.library == "text"]
    assert text.caveat.str.contains("random CLIP weights").all() and iis[iis.library != "text"].caveat.isna().all()
    acc = pd.read_parquet(results / "accuracy.parquet")
    assert acc[acc.library == "text"].caveat.notna().all() and (acc[acc.library == "text"].num_concepts == 16).all()
    corr = pd.read_parquet(results / "correlation.parquet")
    assert corr.set_index("library").caveat.notna().to_dict() == {
        "cluster": False, "end2end": False, "prototype": False, "text": True}
    concepts = pd.read_parquet(results / "concepts.parquet")
    words = concepts[concepts.library == "text"]
    kept, dropped = words[words.kept], words[~words.kept]
    assert len(kept) + len(dropped) == 74  # every word of data/concepts/digits.txt is accounted for
    assert 0 < len(kept) <= 16 and kept.word.notna().all()
    # Every dropped concept says which filter dropped it and the value that did.
    assert dropped.drop_reason.isin({"top5_similarity", "val_similarity", "num_concepts"}).all()
    top5 = dropped[dropped.drop_reason == "top5_similarity"]
    assert (top5.drop_value <= 0.12).all() and len(top5) > 0
    # Kept text concepts are shown by their word in explanations and the report.
    expl = pd.read_parquet(results / "explanations.parquet")
    assert (expl.library == "text").all() and expl.word.map(lambda w: all(isinstance(x, str) for x in w)).all()
    html = (results / "report.html").read_text()
    assert kept.word.iloc[0] in html or any(w in html for w in kept.word)
    store = tmp_path / "cache" / "smoke-text" / "clip.zarr"
    assert (store / "text" / "zarr.json").is_file()


def test_clip_weights_need_a_file_or_the_explicit_flag(tmp_path):
    base = """
    pipelines:
      p:
        dataset: {source: builtin, name: digits}
        models: [{name: a, backbone: resnet10t}]
        store: s
        results: r
        text: {concepts: words.txt, clip: {model: ViT-B-32, weights: WEIGHTS}}
        analysis: {libraries: [prototype, text]}
    """
    (tmp_path / "words.txt").write_text("a loop\n")
    path = tmp_path / "pipelines.yaml"
    for weights, message in [("missing.bin", r"pipelines\.p\.text\.clip\.weights: file not found: .*missing\.bin"),
                             ("random", "random weights need the explicit value random-for-tests")]:
        path.write_text(textwrap.dedent(base).replace("WEIGHTS", weights))
        with pytest.raises(ConfigError, match=message):
            load_pipelines(path)
    without_text = "\n".join(line for line in textwrap.dedent(base).splitlines() if "text: {" not in line)
    path.write_text(without_text)
    with pytest.raises(ConfigError, match="analysis.libraries has text, which needs a `text:` section"):
        load_pipelines(path)
