"""The base of every validated, frozen settings model (job file, consortium, site data)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    """Unknown fields are an error; a loaded model cannot change."""

    model_config = ConfigDict(extra="forbid", frozen=True)
