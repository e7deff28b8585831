"""pipelines.yaml: parsed once into frozen objects; every problem named by key path and reason;
where pipelines come from (the user's file, then the shipped ones); what each command checks."""

from __future__ import annotations

import textwrap
from pathlib import Path

import iis.analyze.pipeline as pipeline
import pydantic
import pytest
from iis.analyze import libraries as registry
from iis.analyze.summary import model_groups

import iis.jobs as jobs
from iis.catalog import write_starter
from iis.config import (
    ConfigError,
    _options_model,
    find_pipeline,
    is_shipped,
    list_pipelines,
    load_pipeline,
    load_pipelines,
    shipped_pipelines_file,
)

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


def test_shipped_pipelines_are_package_data_and_write_under_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = shipped_pipelines_file()
    assert shipped.is_file() and shipped.parent.name == "data" and (shipped.parent / "__init__.py").is_file()
    # The checkout's top-level pipelines.yaml is that same file (a link), not a second copy.
    assert is_shipped(ROOT / "pipelines.yaml")
    pipelines = load_pipelines(shipped)
    assert {"smoke", "smoke-text", "demo"} <= set(pipelines)
    smoke = pipelines["smoke"]
    assert smoke.name == "smoke" and smoke.store == tmp_path / "cache" / "smoke"
    assert smoke.results == tmp_path / "results" / "smoke"
    assert smoke.analysis.ratios == tuple(sorted(smoke.analysis.ratios))
    # Inputs resolve inside the package: the concept list ships beside the file.
    text = pipelines["smoke-text"].text
    assert text.concepts == shipped.parent / "concepts" / "digits.txt" and text.concepts.is_file()
    assert load_pipelines(ROOT / "pipelines.yaml")["smoke"].store == tmp_path / "cache" / "smoke"


def test_defaults_and_relative_paths(tmp_path):
    cfg = load_pipeline(_write(tmp_path, GOOD), "p")
    assert cfg.store == tmp_path / "cache" / "p" and cfg.results == tmp_path / "results" / "p"
    assert cfg.analysis.ratios == (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98)
    assert cfg.models[0].weights == "random" and cfg.store_path("b") == tmp_path / "cache" / "p" / "b.zarr"
    with pytest.raises(pydantic.ValidationError):
        cfg.models[0].weights = "pretrained"  # frozen


def test_explain_ratio_defaults_to_an_analysis_ratio(tmp_path):
    # The default 0.9 when the analysis fits it; else the analysis ratio nearest it, never a refusal
    # of a pipeline that did not write an explain section.
    assert load_pipeline(_write(tmp_path, GOOD), "p").explain_ratio() == 0.9
    short = GOOD.replace("    results: results/p", "    results: results/p\n    analysis: {ratios: [0, 0.5, 0.7]}")
    assert load_pipeline(_write(tmp_path, short), "p").explain_ratio() == 0.7
    given = short.replace("analysis: {ratios: [0, 0.5, 0.7]}", "analysis: {ratios: [0, 0.5, 0.7]}\n    explain: {ratio: 0.5}")
    assert load_pipeline(_write(tmp_path, given), "p").explain_ratio() == 0.5
    # A ratio the user wrote must be one the analysis fits.
    wrong = given.replace("explain: {ratio: 0.5}", "explain: {ratio: 0.9}")
    with pytest.raises(ConfigError, match=r"explain\.ratio 0\.9 is not in analysis\.ratios \(0\.0, 0\.5, 0\.7\)"):
        load_pipeline(_write(tmp_path, wrong), "p")


def test_frozen_configs_hold_tuples(tmp_path):
    text = GOOD.replace("{name: a, backbone: resnet10t}",
                        "{name: a, backbone: resnet10t, train: {epochs: 2, checkpoints: [2, 0]}}")
    cfg = load_pipeline(_write(tmp_path, text), "p")
    for sequence in (cfg.models, cfg.analysis.ratios, cfg.analysis.libraries, cfg.analysis.seeds,
                     cfg.models[0].train.checkpoints):
        assert isinstance(sequence, tuple)
    assert cfg.models[0].train.checkpoints == (0, 2)
    with pytest.raises(AttributeError):
        cfg.analysis.ratios.append(0.99)
    with pytest.raises(pydantic.ValidationError):
        cfg.analysis.options.end2end = {"epochs": 1}


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
        (("{name: a, backbone: resnet10t}", "{name: a, backbone: resnet10t, group: 'my run'}"),
         r"pipelines\.p\.models\[0\]\.group: model groups use letters, digits"),
    ],
)
def test_malformed_yaml_names_key_and_reason(tmp_path, edit, message):
    old, new = edit
    assert old in GOOD
    with pytest.raises(ConfigError, match=message):
        load_pipelines(_write(tmp_path, GOOD.replace(old, new)))


def test_errors_name_the_cause_not_its_consequences(tmp_path):
    # The one model's bad backbone empties `models:`; that it is then too short is not a second problem.
    bad = GOOD.replace("{name: a, backbone: resnet10t}", "{name: a, backbone: resnet_nonexistent}")
    bad = bad.replace("      - {name: b, backbone: test_vit, weights: random, img_size: 32}\n", "")
    with pytest.raises(ConfigError) as err:
        load_pipelines(_write(tmp_path, bad))
    assert str(err.value).splitlines()[1:] == [
        "  pipelines.p.models[0].backbone: unknown timm model 'resnet_nonexistent' (see timm.list_models())"]
    # An empty list is still refused for itself; a mapping where a list belongs says "list".
    empty = GOOD.split("    models:")[0] + "    models: []\n    store: cache/p\n    results: results/p\n"
    with pytest.raises(ConfigError, match=r"pipelines\.p\.models: Tuple should have at least 1 item"):
        load_pipelines(_write(tmp_path, empty))
    mapping = GOOD.split("    models:")[0] + "    models: {a: {backbone: resnet10t}}\n    store: cache/p\n    results: results/p\n"
    with pytest.raises(ConfigError, match=r"pipelines\.p\.models: Input should be a list, got dict"):
        load_pipelines(_write(tmp_path, mapping))


def test_group_key_reaches_the_correlation_of_every_checkpoint(tmp_path, monkeypatch):
    """A `group:` ties separate entries into one run for the correlation; a trained entry's
    checkpoints all take it; entries without one are left to the default (their name)."""
    text = GOOD.replace("{name: a, backbone: resnet10t}",
                        "{name: a, backbone: resnet10t, group: shared, train: {epochs: 2, checkpoints: [0, 2]}}")
    text = text.replace("img_size: 32}", "img_size: 32, group: shared}")
    text = text.replace("      - {name: b,", "      - {name: c, backbone: resnet10t}\n      - {name: b,")
    cfg = load_pipeline(_write(tmp_path, text), "p")
    assert cfg.groups() == {"a@e0": "shared", "a@e2": "shared", "b": "shared"}

    seen = {}
    monkeypatch.setattr(jobs, "require_stores", lambda cfg: None)
    monkeypatch.setattr(pipeline, "analyze_stores", lambda stores, **kw: seen.update(kw))
    jobs.analyze_pipeline(cfg, synchronous=True)
    assert seen["groups"] == {"a@e0": "shared", "a@e2": "shared", "b": "shared"}
    assert model_groups(["a@e0", "b", "c"], seen["groups"]) == {"a@e0": "shared", "b": "shared", "c": "c"}


def test_every_problem_is_listed_at_once(tmp_path):
    text = GOOD.replace("{name: a, backbone: resnet10t}", "{name: a, backbone: resnet10t, img_size: x, foo: 1}")
    with pytest.raises(ConfigError) as info:
        load_pipelines(_write(tmp_path, text))
    assert "2 problem(s)" in str(info.value)
    assert "models[0].foo: unknown key" in str(info.value)


OPTIONS = GOOD.replace("    results: results/p", "    results: results/p\n    analysis: {libraries: [prototype, end2end], options: OPTS}")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("{end2end: {epochs: many}}", r"pipelines\.p\.analysis\.options\.end2end\.epochs: Input should be a valid integer"),
        ("{end2end: {epochs: 0}}", r"pipelines\.p\.analysis\.options\.end2end\.epochs: Input should be greater than or equal to 1"),
        ("{end2end: {init: kmeans}}", r"pipelines\.p\.analysis\.options\.end2end\.init: Input should be 'anchors' or 'random'"),
        ("{end2end: {colour: 1}}", r"pipelines\.p\.analysis\.options\.end2end\.colour: unknown key"),
        ("{prototype: {k: 3}}", r"pipelines\.p\.analysis\.options\.prototype\.k: unknown key"),
        ("{wordcloud: {}}", r"pipelines\.p\.analysis\.options\.wordcloud: unknown key"),
        ("{cluster: {}}", r"pipelines\.p\.analysis: options given for libraries not in `libraries`: cluster"),
        # Coerced look-alikes are refused here too, as in the pipeline's own sections.
        ("{end2end: {epochs: true}}", r"end2end\.epochs: .*valid integer, got a boolean"),
        ("{end2end: {batch_size: 64.0}}", r"end2end\.batch_size: .*valid integer, got 64\.0"),
        ("{end2end: {tau: false}}", r"end2end\.tau: .*valid number, got a boolean"),
    ],
)
def test_bad_library_option_is_reported_at_parse_time_with_its_key_path(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline(_write(tmp_path, OPTIONS.replace("OPTS", options)), "p")


def test_text_option_key_path(tmp_path):
    (tmp_path / "words.txt").write_text("a loop\n")
    text = GOOD.replace("    results: results/p", """    results: results/p
    text: {concepts: words.txt, clip: {model: iis-tiny-test, weights: random-for-tests}}
    analysis: {libraries: [prototype, text], options: {text: {top5_cutoff: high}}}""")
    with pytest.raises(ConfigError, match=r"pipelines\.p\.analysis\.options\.text\.top5_cutoff: Input should be a valid number"):
        load_pipeline(_write(tmp_path, text), "p")


def test_options_are_the_registry_classes_and_reach_the_builders(tmp_path):
    cfg = load_pipeline(_write(tmp_path, OPTIONS.replace("OPTS", "{end2end: {epochs: 5, tau: 0.2}}")), "p")
    given = cfg.analysis.library_options("end2end")
    assert isinstance(given, registry.get_library("end2end").options)
    assert (given.epochs, given.tau, given.batch_size) == (5, 0.2, 256)  # the rest keep their defaults
    plain = cfg.analysis.options_by_library()
    assert plain["end2end"]["epochs"] == 5 and plain["prototype"] == {}
    assert registry.get_library("end2end").make_options(plain["end2end"]) == given  # what a task rebuilds


FINETUNE = GOOD.replace("    results: results/p", "    results: results/p\n    finetune: FT").replace(
    "{name: a, backbone: resnet10t}", "{name: a, backbone: resnet10t, layers: [stages.1, final]}")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("{model: a, seed: 4}", r"pipelines\.p\.finetune: `seed` was replaced by `seeds`, a list of training seeds "
                                r"\(default \[0, 1, 2\]\); write `seeds: \[4, \.\.\.\]`"),
        ("{model: a, seeds: []}", r"pipelines\.p\.finetune\.seeds: seeds must be a non-empty list without repeats"),
        ("{model: a, seeds: [1, 1]}", r"pipelines\.p\.finetune\.seeds: seeds must be a non-empty list without repeats"),
        ("{model: a, seeds: [one]}", r"pipelines\.p\.finetune\.seeds\[0\]: Input should be a valid integer"),
        ("{model: a, holdout: 1.0}", r"pipelines\.p\.finetune\.holdout: Input should be less than 1"),
        ("{model: a, steps: 0}", r"pipelines\.p\.finetune\.steps: Input should be greater than or equal to 1"),
        ("{model: a, library: cluster}", r"pipelines\.p\.finetune\.library: Input should be 'prototype'"),
        ("{model: zz}", r"pipelines\.p: finetune\.model 'zz' is not a model of this pipeline"),
        ("{model: a@stages.1}", r"pipelines\.p: finetune\.model 'a@stages\.1' is an inner layer \(stages\.1\); "
                                r"name the model itself, 'a'"),
        ("{model: a, scoring_libraries: []}",
         r"pipelines\.p\.finetune\.scoring_libraries: scoring_libraries must be a non-empty list without repeats"),
        ("{model: a, scoring_libraries: [text]}",
         r"pipelines\.p: finetune\.scoring_libraries text not in analysis\.libraries \(prototype"),
    ],
)
def test_bad_finetune_section_names_key_and_reason(tmp_path, section, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline(_write(tmp_path, FINETUNE.replace("FT", section)), "p")


def test_finetune_defaults_to_three_seeds_and_needs_two_images_per_class(tmp_path):
    ft = load_pipeline(_write(tmp_path, FINETUNE.replace("FT", "{model: a}")), "p").finetune
    assert ft.seeds == (0, 1, 2) and ft.holdout == 0.3 and ft.steps is None and ft.scoring_libraries is None
    one = FINETUNE.replace("FT", "{model: a}").replace("    store: cache/p", "    elements: {images_per_class: 1}\n    store: cache/p")
    with pytest.raises(ConfigError, match=r"pipelines\.p: finetune needs elements\.images_per_class >= 2"):
        load_pipeline(_write(tmp_path, one), "p")


def test_the_config_asks_the_registry_which_libraries_need_text(tmp_path):
    @registry.register_library("words-test", needs_text=True)
    def build(inputs, *, num_concepts, seed, ratio=None, options=None):  # pragma: no cover - never built
        raise AssertionError

    _options_model.cache_clear()
    try:
        text = GOOD.replace("    results: results/p", "    results: results/p\n    analysis: {libraries: [prototype, words-test]}")
        with pytest.raises(ConfigError, match="analysis.libraries has words-test, which needs a `text:` section"):
            load_pipeline(_write(tmp_path, text), "p")
    finally:
        registry._REGISTRY.pop("words-test")
        _options_model.cache_clear()


MISSING_INPUTS = """
pipelines:
  gpu:
    dataset: {source: imagefolder, root: /nowhere/imagenet}
    models:
      - {name: a, backbone: resnet50.tv_in1k, weights: /nowhere/r50.safetensors}
      - {name: b, backbone: no_such_timm_model}
    text: {concepts: /nowhere/words.txt, clip: {model: ViT-B-32, weights: /nowhere/clip.bin}}
    analysis: {libraries: [prototype, text]}
    store: /shared/stores
    results: results/gpu
"""


def test_stage_two_parses_without_the_inputs_of_stage_one(tmp_path):
    path = _write(tmp_path, MISSING_INPUTS)
    with pytest.raises(ConfigError) as err:
        load_pipeline(path, "gpu")
    for key in ("dataset.root: directory not found: /nowhere/imagenet", "models[0].weights: file not found",
                "models[1].backbone: unknown timm model", "text.concepts: file not found",
                "text.clip.weights: file not found"):
        assert key in str(err.value)
    cfg = load_pipeline(path, "gpu", check_inputs=False)
    assert cfg.store_path("a") == Path("/shared/stores/a.zarr") and cfg.results == tmp_path / "results" / "gpu"
    assert cfg.models[0].weights == "/nowhere/r50.safetensors" and cfg.clip_store == Path("/shared/stores/clip.zarr")


def test_a_pipeline_is_found_in_the_users_file_then_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # An empty folder: the shipped pipelines, writing here.
    demo = find_pipeline("demo")
    assert demo.store == tmp_path / "cache" / "demo" and demo.results == tmp_path / "results" / "demo"
    # A ./pipelines.yaml adds pipelines and overrides shipped names; the others stay reachable.
    (tmp_path / "pipelines.yaml").write_text(textwrap.dedent(GOOD).replace("  p:", "  smoke:"))
    assert find_pipeline("smoke").store == tmp_path / "cache" / "p"
    assert find_pipeline("smoke-text").store == tmp_path / "cache" / "smoke-text"
    entries = {(e.name, e.shipped): e for e in list_pipelines()}
    assert not entries[("smoke", False)].shadowed and entries[("smoke", True)].shadowed
    assert not entries[("demo", True)].shadowed
    with pytest.raises(ConfigError, match=r"no pipeline 'nope'; known: demo, smoke, smoke-text \(from pipelines\.yaml and shipped"):
        find_pipeline("nope")
    with pytest.raises(ConfigError, match="config file not found: .*other.yaml"):
        find_pipeline("demo", tmp_path / "other.yaml")


def test_init_writes_a_starter_that_parses_and_never_overwrites(tmp_path):
    path = write_starter(tmp_path)
    assert path == tmp_path / "pipelines.yaml"
    text = path.read_text()
    assert text.count("#") > 10 and "imagenet-subset" in text
    cfg = load_pipeline(path, "imagenet-subset", check_inputs=False)
    assert cfg.extract.device == "cuda" and len(cfg.models) == 4
    with pytest.raises(ConfigError, match=r"dataset\.root: directory not found: /data/imagenet100"):
        load_pipeline(path, "imagenet-subset")
    path.write_text("mine\n")
    with pytest.raises(ConfigError, match="exists; not overwriting"):
        write_starter(path)
    assert path.read_text() == "mine\n"


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


def test_repeated_keys_are_refused_with_their_path_and_lines(tmp_path):
    # GOOD's lines: 1 blank, 2 `pipelines:`, 3 `p:`, ..., 6 model a, 8 `store:`; yaml would keep only the last.
    again = GOOD + "  p:\n    dataset: {source: builtin, name: mnist5k}\n"
    with pytest.raises(ConfigError, match=r"pipelines\.p: key repeated at line 10 \(first at line 3\)"):
        load_pipelines(_write(tmp_path, again))
    with pytest.raises(ConfigError, match=r"pipelines\.p: key repeated"):
        load_pipeline(_write(tmp_path, again), "p")  # also when only one pipeline is read
    store = GOOD.replace("    results: results/p", "    results: results/p\n    store: elsewhere")
    with pytest.raises(ConfigError, match=r"pipelines\.p\.store: key repeated at line 10 \(first at line 8\)"):
        load_pipelines(_write(tmp_path, store))
    inner = GOOD.replace("{name: a, backbone: resnet10t}", "{name: a, backbone: resnet10t, name: c}")
    with pytest.raises(ConfigError, match=r"pipelines\.p\.models\[0\]\.name: key repeated at line 6"):
        load_pipelines(_write(tmp_path, inner))
    # A merge key is not a repeat: the keys written beside it override the merged ones, as yaml says.
    merged = GOOD.replace("  p:\n", "  p: &p\n") + "  q:\n    <<: *p\n    store: cache/q\n    results: results/q\n"
    assert load_pipelines(_write(tmp_path, merged))["q"].store == tmp_path / "cache" / "q"


def test_a_name_key_inside_a_pipeline_is_refused(tmp_path):
    named = GOOD.replace("    store: cache/p", "    name: other\n    store: cache/p")
    with pytest.raises(ConfigError, match=r"pipelines\.p\.name: unknown key; a pipeline is named by its key"):
        load_pipelines(_write(tmp_path, named))
    with pytest.raises(ConfigError, match=r"pipelines\.p\.name: unknown key"):
        load_pipelines(_write(tmp_path, named.replace("name: other", "name: p")))


@pytest.mark.parametrize(("dataset", "message"), [
    ("{source: builtin, name: digits, root: imgs}", r"`root` is read only by source imagefolder; source builtin"),
    ("{source: builtin, name: digits, file: l.csv}", r"`file` is read only by source filelist; source builtin"),
    ("{source: imagefolder, root: imgs, file: l.csv}", r"`file` is read only by source filelist; source imagefolder"),
    ("{source: filelist, file: l.csv, root: imgs}", r"`root` is read only by source imagefolder; source filelist"),
])
def test_keys_of_another_dataset_source_are_refused(tmp_path, dataset, message):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "l.csv").write_text("path,label\n")
    text = GOOD.replace("{source: builtin, name: digits}", dataset)
    with pytest.raises(ConfigError, match=r"pipelines\.p\.dataset: " + message):
        load_pipelines(_write(tmp_path, text))


@pytest.mark.parametrize(("section", "message"), [
    ("extract: {batch_size: true}", r"pipelines\.p\.extract\.batch_size: Input should be a valid integer, got a boolean"),
    ("extract: {block_rows: 2.0}", r"pipelines\.p\.extract\.block_rows: Input should be a valid integer, got 2\.0"),
    ("extract: {block_rows: '64'}", r"pipelines\.p\.extract\.block_rows: Input should be a valid integer, got '64'"),
    ("extract: {row_cache_mb: false}", r"pipelines\.p\.extract\.row_cache_mb: Input should be a valid integer"),
    ("analysis: {seeds: [0, true]}", r"pipelines\.p\.analysis\.seeds\[1\]: Input should be a valid integer"),
    ("analysis: {ratios: [0, true]}", r"pipelines\.p\.analysis\.ratios\[1\]: Input should be a valid number, got a boolean"),
    ("elements: {slic: 1}", r"pipelines\.p\.elements\.slic: Input should be a valid boolean \(true or false\), got 1"),
])
def test_numbers_and_booleans_are_not_coerced(tmp_path, section, message):
    text = GOOD.replace("    results: results/p", f"    results: results/p\n    {section}")
    with pytest.raises(ConfigError, match=message):
        load_pipelines(_write(tmp_path, text))


def test_yaml_numbers_still_parse(tmp_path):
    # Ints where floats go, and `1e-3`, which PyYAML reads as a string, stay accepted.
    text = GOOD.replace("{name: a, backbone: resnet10t}",
                        "{name: a, backbone: resnet10t, train: {epochs: 2, checkpoints: [2], lr: 1e-3, weight_decay: 0}}")
    text = text.replace("    results: results/p", "    results: results/p\n    extract: {block_rows: 8}")
    cfg = load_pipeline(_write(tmp_path, text), "p")
    assert cfg.models[0].train.lr == 0.001 and cfg.models[0].train.weight_decay == 0.0
    assert cfg.extract.block_rows == 8 and cfg.models[1].img_size == 32
