"""pipelines.yaml: parsed once into frozen objects; every problem named by key path and reason."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pydantic
import pytest

from iis.config import ConfigError, load_pipeline, load_pipelines

ROOT = Path(__file__).resolve().parents[1]

GOOD = """
pipelines:
  p:
    dataset: {source: builtin, name: digits}
    models:
      - {name: a, backbone: resnet10t}
      - {name: b, backbone: test_vit, weights: random, img_size: 32}
    store: cache/p
    results: results/p
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipelines.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_pipelines_parse():
    pipelines = load_pipelines(ROOT / "pipelines.yaml")
    assert {"smoke", "demo"} <= set(pipelines)
    smoke = pipelines["smoke"]
    assert smoke.name == "smoke" and smoke.store == ROOT / "cache" / "smoke"
    assert smoke.analysis.ratios == sorted(smoke.analysis.ratios)


def test_defaults_and_relative_paths(tmp_path):
    cfg = load_pipeline(_write(tmp_path, GOOD), "p")
    assert cfg.store == tmp_path / "cache" / "p" and cfg.results == tmp_path / "results" / "p"
    assert cfg.analysis.ratios == [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98]
    assert cfg.models[0].weights == "random" and cfg.store_path("b") == tmp_path / "cache" / "p" / "b.zarr"
    with pytest.raises(pydantic.ValidationError):
        cfg.models[0].weights = "pretrained"  # frozen


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("      - {name: b, backbone: test_vit, weights: random, img_size: 32}",
          "      - {name: b, backbone: test_vit, weights: missing.pth}"),
         r"pipelines\.p\.models\[1\]\.weights: file not found: .*missing\.pth"),
        (("    store: cache/p", "    store: cache/p\n    colour: blue"), r"pipelines\.p\.colour: unknown key"),
        (("{name: a, backbone: resnet10t}", "{name: a, backbone: resnet10t, img_size: big}"),
         r"pipelines\.p\.models\[0\]\.img_size: Input should be a valid integer"),
        (("{name: a, backbone: resnet10t}", "{name: a, backbone: resnet_nonexistent}"),
         r"pipelines\.p\.models\[0\]\.backbone: unknown timm model 'resnet_nonexistent'"),
        (("{name: a, backbone: resnet10t}", "{name: b, backbone: resnet10t}"),
         r"pipelines\.p: model names must be unique, repeated: b"),
        (("name: digits", "name: cifar"), r"pipelines\.p\.dataset: builtin dataset name must be one of mnist5k, digits"),
        (("    results: results/p", "    results: results/p\n    analysis: {ratios: [0.5]}"),
         r"pipelines\.p\.analysis\.ratios: IIS needs at least two sparsity ratios"),
        (("    results: results/p", "    results: results/p\n    analysis: {libraries: [prototype, wordcloud]}"),
         r"pipelines\.p\.analysis\.libraries: unknown library 'wordcloud'; known: .*prototype"),
        (("    results: results/p", "    results: results/p\n    analysis: {ratios: [0, 1.0]}"),
         r"pipelines\.p\.analysis\.ratios\[1\]: Input should be less than 1"),
        (("{source: builtin, name: digits}", "{source: imagefolder, root: nowhere}"),
         r"pipelines\.p\.dataset\.root: directory not found: .*nowhere"),
        (("    store: cache/p\n", ""), r"pipelines\.p\.store: Field required"),
    ],
)
def test_malformed_yaml_names_key_and_reason(tmp_path, edit, message):
    old, new = edit
    assert old in GOOD
    with pytest.raises(ConfigError, match=message):
        load_pipelines(_write(tmp_path, GOOD.replace(old, new)))


def test_every_problem_is_listed_at_once(tmp_path):
    text = GOOD.replace("{name: a, backbone: resnet10t}", "{name: a, backbone: resnet10t, img_size: x, foo: 1}")
    with pytest.raises(ConfigError) as info:
        load_pipelines(_write(tmp_path, text))
    assert "2 problem(s)" in str(info.value)
    assert "models[0].foo: unknown key" in str(info.value)


def test_unknown_pipeline_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match=r"no pipeline 'q'; known: p"):
        load_pipeline(_write(tmp_path, GOOD), "q")
    with pytest.raises(ConfigError, match="config file not found"):
        load_pipelines(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipelines(_write(tmp_path, "pipelines: [unclosed"))
    with pytest.raises(ConfigError, match="top level must be a mapping with a `pipelines` key"):
        load_pipelines(_write(tmp_path, "- a\n- b\n"))


def test_weights_file_resolves_relative_to_yaml(tmp_path):
    (tmp_path / "w.pth").write_bytes(b"x")
    cfg = load_pipeline(_write(tmp_path, GOOD.replace("weights: random,", "weights: w.pth,")), "p")
    assert cfg.models[1].weights == str(tmp_path / "w.pth")


def test_one_pipeline_is_validated_without_the_others(tmp_path):
    text = GOOD + """
  gpu:
    dataset: {source: imagefolder, root: /only/on/the/gpu/node}
    models: [{name: a, backbone: resnet10t}]
    store: s
    results: r
"""
    path = _write(tmp_path, text)
    assert load_pipeline(path, "p").name == "p"
    with pytest.raises(ConfigError, match=r"pipelines\.gpu\.dataset\.root: directory not found"):
        load_pipeline(path, "gpu")
    with pytest.raises(ConfigError, match=r"pipelines\.gpu\.dataset\.root"):
        load_pipelines(path)
