"""Registry of concept-library builders.

A builder is a pure function ``build(inputs: LibraryInputs, *, num_concepts, seed, ratio,
options) -> ConceptLibrary``, registered with the class of its ``options`` (a frozen
:class:`~iis.analyze.libraries.base.LibraryOptions`). Adding a library means one module that
calls :func:`register_library` and one import line at the bottom of this file; the pipeline
parser then checks its options and the registry-parametrised tests cover it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from iis.analyze.libraries.base import ConceptLibrary, ElementSet, LibraryInputs, LibraryOptions
from pydantic import ValidationError

Builder = Callable[..., ConceptLibrary]


@dataclass(frozen=True)
class LibrarySpec:
    """A registered builder.

    Attributes:
        name: the name used in pipelines.yaml and in every table's ``library`` column.
        build: the builder function.
        per_ratio: True when the library depends on the sparsity ratio (end2end), so it is
            built once per ratio instead of once per (model, seed).
        supervised: True when the builder reads train/val features and labels.
        needs_text: True when the builder reads CLIP features (``LibraryInputs.text``).
        options: the class of the builder's ``options`` argument; its fields are the keys of
            ``analysis.options.<name>`` in pipelines.yaml, with their types and defaults.
    """

    name: str
    build: Builder
    per_ratio: bool = False
    supervised: bool = False
    needs_text: bool = False
    options: type[LibraryOptions] = LibraryOptions

    def make_options(self, given: LibraryOptions | Mapping[str, Any] | None = None) -> LibraryOptions:
        """``given`` checked against :attr:`options` (None: the defaults); raises ValueError naming the library."""
        if isinstance(given, self.options):
            return given
        try:
            return self.options.model_validate(dict(given or {}))
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise ValueError(f"library {self.name!r}: bad options: {problems}") from None


_REGISTRY: dict[str, LibrarySpec] = {}


def register_library(name: str, *, per_ratio: bool = False, supervised: bool = False, needs_text: bool = False,
                     options: type[LibraryOptions] = LibraryOptions) -> Callable[[Builder], Builder]:
    """Decorator that registers a builder under ``name``, with the class of its options."""

    def _register(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"concept library {name!r} is registered twice")
        _REGISTRY[name] = LibrarySpec(name=name, build=fn, per_ratio=per_ratio, supervised=supervised,
                                      needs_text=needs_text, options=options)
        return fn

    return _register


def list_libraries() -> list[str]:
    """Names of the registered libraries, sorted."""
    return sorted(_REGISTRY)


def get_library(name: str) -> LibrarySpec:
    """The spec registered under ``name``; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown concept library {name!r}; known: {', '.join(list_libraries())}") from None


def build_library(
    name: str,
    inputs: LibraryInputs,
    *,
    num_concepts: int,
    seed: int,
    ratio: float | None = None,
    options: LibraryOptions | Mapping[str, Any] | None = None,
) -> ConceptLibrary:
    """Build library ``name`` with ``num_concepts`` concepts (``ratio`` only for per-ratio ones).

    ``options`` are the library's own settings, e.g. the text library's cutoffs: an instance of
    its options class, or a mapping checked against it (a task carries plain data); None gives
    the defaults. An unknown or ill-typed option raises ValueError.
    """
    spec = get_library(name)
    if spec.per_ratio and ratio is None:
        raise ValueError(f"library {name!r} is built per sparsity ratio; pass ratio=")
    return spec.build(inputs, num_concepts=num_concepts, seed=seed, ratio=ratio, options=spec.make_options(options))


__all__ = [
    "ConceptLibrary",
    "ElementSet",
    "LibraryInputs",
    "LibraryOptions",
    "LibrarySpec",
    "build_library",
    "get_library",
    "list_libraries",
    "register_library",
]

# Registrations: importing a module runs its @register_library.
from iis.analyze.libraries import cluster, end2end, prototype, text  # noqa: E402,F401
