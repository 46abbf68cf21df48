"""Turning pydantic's validation errors into medfed's messages: the field path as the user
wrote it and the bad value, e.g. ``train.lr: must be > 0, got -1``."""

from __future__ import annotations

import re
from typing import Any, get_args

from pydantic import ValidationError

from medfed.config.algorithms import AlgorithmConfig
from medfed.config.data import DataConfig
from medfed.config.model import task_kind
from medfed.config.transforms import AugmentStep, PreprocessStep
from medfed.privacy.settings import CompressionConfig, PrivacyConfig
from medfed.robust.settings import RobustConfig

_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "missing": "is required",
    "extra_forbidden": "is not a known field",
    "too_short": "must have at least {min_length} item(s)",
    "string_too_short": "must have at least {min_length} character(s)",
    "string_too_long": "must have at most {max_length} character(s)",
    "string_pattern_mismatch": "must match {pattern}",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "too_long": "must have at most {max_length} item(s)",
}


def _union_tags(union: Any, field: str) -> set[str]:
    """The discriminator values of an ``Annotated[Union[...], Field(discriminator=...)]``."""
    members = get_args(get_args(union)[0])
    return {tag for m in members for tag in get_args(m.model_fields[field].annotation)}


# The tags pydantic puts in error locations of the unions; derived, so a new algorithm,
# data source or transform never needs listing here.
_UNION_TAGS = (
    _union_tags(DataConfig, "source") | _union_tags(AlgorithmConfig, "name") | _union_tags(PreprocessStep, "name")
    | _union_tags(AugmentStep, "name") | {"classification", "segmentation", "reconstruction"} | {"named", "monai", "import", "bundle"}
    | {"server", "cyclic", "swarm", "split"}
)
_UNION_PARENTS = ("data", "algorithm", "task", "model", "topology", "]")


def _field_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    tag_skipped = False  # one tag per union: ``model.monai`` after the tag ``monai`` is a field
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif (not tag_skipped and parts and parts[-1].lstrip(".").endswith(_UNION_PARENTS)
              and item in _UNION_TAGS):
            tag_skipped = True
            continue  # pydantic adds the union tag; users never write it
        else:
            parts.append(("." if parts else "") + str(item))
        tag_skipped = False
    return "".join(parts) or "(job)"


def _num(v: Any) -> Any:
    return f"{v:g}" if isinstance(v, float) else v


_RELATIVE_PATH = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*: ")
# fields that nested checks of the update-path sections name at the start of their message
_NESTED_CHECKED = {
    f for m in (PrivacyConfig, CompressionConfig, RobustConfig) for f in m.model_fields
} | {"adaptive"}


def describe_error(err: dict[str, Any]) -> str:
    """One item of ``ValidationError.errors()`` as ``field.path: what is wrong, got value``
    (the path as the user writes it; a check across fields gives its own message)."""
    path = _field_path(tuple(err["loc"]))
    etype = err["type"]
    ctx = err.get("ctx", {}) or {}
    if etype == "literal_error":
        msg = f"must be one of {ctx.get('expected', '')}"
        if path.endswith("name") and path.split(".")[0] in ("model", "algorithm"):
            msg = f"unknown {path.split('.')[0]} name; {msg}"
    elif etype in ("union_tag_invalid", "union_tag_not_found"):
        key = str(ctx.get("discriminator", "")).strip("'")
        key = "kind" if key == f"{task_kind.__name__}()" else key
        what = {"source": "data source", "name": f"{path} name", "kind": "task kind"}.get(key, key)
        if etype == "union_tag_not_found":
            return f"{path}.{key}: is required"
        return f"{path}.{key}: unknown {what} {ctx.get('tag')!r}; must be one of {ctx.get('expected_tags', '')}"
    elif etype == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        if not err["loc"]:  # a check across fields: its message starts with the field path
            return msg
        head = msg.split(":", 1)[0].split(".")[0]
        if _RELATIVE_PATH.match(msg) and head in _NESTED_CHECKED:  # a nested check naming its own field
            return f"{path}.{msg}"
    elif etype in _MESSAGES:
        try:
            msg = _MESSAGES[etype].format(**{k: _num(v) for k, v in ctx.items()})
        except KeyError:
            msg = err["msg"]
    else:
        msg = err["msg"][:1].lower() + err["msg"][1:]
    if etype not in ("missing", "value_error", "union_tag_not_found") and "input" in err:
        got = err["input"]
        msg += f", got {got!r}" if not isinstance(got, dict) else ""
    return f"{path}: {msg}"


def format_validation_error(e: ValidationError, source: str) -> str:
    """Every error of ``e``, one a line, under ``{source}: invalid job``."""
    lines = [describe_error(err) for err in e.errors()]
    return f"{source}: invalid job\n  " + "\n  ".join(lines)

