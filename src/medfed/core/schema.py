"""The base of every validated, frozen settings model (job file, consortium, site data), and
the number types every settings section uses."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError


class Frozen(BaseModel):
    """Unknown fields are an error; a loaded model cannot change. A model's validator is
    built the first time it validates, not when its module is imported: every command
    imports the whole job schema, most never validate most of it (start-up time)."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


# (Field(...) rather than pydantic's Strict and AllowInfNan markers: those load pydantic.types,
# which costs every command's start-up a few milliseconds.)
# A count: a whole number. Strict, so YAML's ``true`` (a bool, which Python counts as 1)
# and floats such as ``2.0`` or ``1.0e9`` are refused rather than rounded into a count.
Count = Annotated[int, Field(strict=True)]


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise PydanticCustomError("bool_number", "must be a number, not true/false")
    return v


# A real number: finite, and never a bool. Not strict: YAML reads ``1e-3`` (no dot) as a
# string, which pydantic then parses as the number it means.
Real = Annotated[float, Field(allow_inf_nan=False), BeforeValidator(_not_bool)]


def _literal_not_bool(v: Any) -> Any:
    """For ``Literal[1, 3]``-style fields, which would take ``true`` as 1 and ``1.0`` as 1."""
    if isinstance(v, (bool, float)):
        raise PydanticCustomError("int_type", "must be an integer")
    return v


NoBool = BeforeValidator(_literal_not_bool)
