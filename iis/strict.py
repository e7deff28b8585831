"""Config field types that take what YAML wrote, never a coerced look-alike.

Pydantic's lax mode would take ``true`` as 1, ``2.0`` as 2 and ``"64"`` as 64, so a typo or a wrong
type in pipelines.yaml would pass unnoticed. Shared by the pipeline schema (:mod:`iis.config`) and
the libraries' own options (``analysis.options``).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator


def _whole_number(value: Any) -> Any:
    """``value`` if it is a YAML integer. Pydantic's lax mode would take ``true`` as 1, ``2.0`` as
    2 and ``"64"`` as 64, so a typo or a wrong type would pass unnoticed."""
    if isinstance(value, bool):
        raise ValueError(f"Input should be a valid integer, got a boolean ({str(value).lower()})")
    if not isinstance(value, int):
        raise ValueError(f"Input should be a valid integer, got {value!r}; write a whole number without "
                         "a decimal point or quotes")
    return value


def _not_bool(value: Any) -> Any:
    """``value`` unless it is a boolean, which pydantic's lax mode would take as the number 1 or 0.
    Strings stay allowed: PyYAML reads ``1e-3`` (no dot) as a string, which pydantic parses."""
    if isinstance(value, bool):
        raise ValueError(f"Input should be a valid number, got a boolean ({str(value).lower()})")
    return value


def _real_bool(value: Any) -> Any:
    """``value`` if it is a YAML boolean; lax mode would take 1, 0 or "yes" for one."""
    if not isinstance(value, bool):
        raise ValueError(f"Input should be a valid boolean (true or false), got {value!r}")
    return value


# The number and boolean types of every config field: what YAML wrote, never a coerced look-alike.
Int = Annotated[int, BeforeValidator(_whole_number)]
Float = Annotated[float, BeforeValidator(_not_bool)]
Bool = Annotated[bool, BeforeValidator(_real_bool)]
