"""What is available here: ``iis pipelines`` (every pipeline and its file, the libraries and their
options) and ``iis init`` (a starter pipelines.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from iis.config import ConfigError, describe_file, list_pipelines, load_pipeline, pipeline_files, starter_file


def _dataset(raw: dict[str, Any]) -> str:
    ds = raw.get("dataset") if isinstance(raw.get("dataset"), dict) else {}
    source = ds.get("source", "?")
    where = ds.get("name") or ds.get("root") or ds.get("file") or "?"
    return f"{where} ({source})"


def _models(raw: dict[str, Any]) -> str:
    models = raw.get("models") if isinstance(raw.get("models"), list) else []
    names = [str(m.get("name", "?")) for m in models if isinstance(m, dict)]
    return f"{len(names)} model{'s' if len(names) != 1 else ''}: {', '.join(names)}"


def describe_pipelines(config: Path | None = None) -> tuple[str, int]:
    """The text of ``iis pipelines``: the files searched, then one line per pipeline; and how
    many of the pipelines in use are invalid.

    Each of the user's pipelines in use is checked against the schema (keys, types, ranges,
    library names), not against its inputs: a pipeline whose dataset lives on another machine is
    listed as valid. An invalid one is marked with its first problem (`iis run NAME` lists them
    all). A name defined twice is used from the first file, and the later one is marked hidden.
    """
    files = pipeline_files(config)
    lines = ["Pipelines, searched in this order (the first file that defines a name wins):"]
    lines += [f"  {i}. {describe_file(f)}" for i, f in enumerate(files, 1)]
    entries = list_pipelines(config)
    width = max((len(e.name) for e in entries), default=4)
    lines.append("")
    invalid = 0
    for e in entries:
        origin = "shipped" if e.shipped else str(e.path)
        mark = "  [hidden: an earlier file defines it]" if e.shadowed else ""
        if not e.shadowed and not e.shipped:  # the shipped ones are tested (and their layers: import timm)
            problem = _first_problem(e.path, e.name)
            if problem:
                invalid += 1
                mark = f"  [INVALID: {problem}]"
        lines.append(f"  {e.name:<{width}}  {origin:<10}  {_dataset(e.raw)}; {_models(e.raw)}{mark}")
    if not entries:
        lines.append("  (none)")
    return "\n".join(lines) + "\n", invalid


def _first_problem(path: Path, name: str) -> str | None:
    """The first schema problem of one pipeline, with how many there are; None when it is valid."""
    try:
        load_pipeline(path, name, check_inputs=False)
    except ConfigError as err:
        problems = [line.strip() for line in str(err).splitlines()[1:]] or [str(err)]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return problems[0] + more
    return None


def describe_libraries() -> str:
    """The registered concept libraries, what they read, and their options with defaults."""
    from iis.analyze.libraries import get_library, list_libraries

    lines = ["", "Concept libraries (analysis.libraries) and their options (analysis.options.<library>):"]
    for name in list_libraries():
        spec = get_library(name)
        traits = [t for t, on in (("per ratio", spec.per_ratio), ("supervised", spec.supervised),
                                  ("needs a text: section", spec.needs_text)) if on]
        lines.append(f"  {name}" + (f" ({', '.join(traits)})" if traits else ""))
        fields = spec.options.model_fields
        if not fields:
            lines.append("      no options")
        for field, info in fields.items():
            lines.append(f"      {field}: {_type_name(info.annotation)} = {info.default!r}")
    return "\n".join(lines) + "\n"


def _type_name(annotation: object) -> str:
    """An option's type as a user writes it: ``int``, or a choice's values (``'anchors' | 'random'``)."""
    if get_origin(annotation) is Literal:
        return " | ".join(repr(v) for v in get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def write_starter(path: Path) -> Path:
    """Write the commented starter pipelines.yaml to ``path``.

    A folder, existing or not (any path without a ``.yaml``/``.yml`` suffix), gets a
    ``pipelines.yaml`` inside it, created with its parents.

    Raises:
        ConfigError: when the file exists: it is never overwritten.
    """
    path = Path(path)
    if path.is_dir() or path.suffix.lower() not in (".yaml", ".yml"):
        path = path / "pipelines.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("x", encoding="utf-8") as out:  # "x": fails if it exists, with no race
            out.write(starter_file().read_text(encoding="utf-8"))
    except FileExistsError:
        raise ConfigError(f"{path} exists; not overwriting it (remove it, or give `iis init` another path)") from None
    return path
