"""A site's policy (``medfed site --policy POLICY.yaml``): what this hospital lets run on its
data, checked against every job before the data is read (site/policy.py).

A field left out sets no restriction. Models are named in four forms: a built-in name
(``small_cnn``, ``unet``...), ``monai:<Class>`` (``monai:*``: any class of
``monai.networks.nets``), ``import:<package or module>`` (a factory of the user's code in it)
and ``bundle`` (any MONAI Bundle the operator gives with ``--bundle``). Example::

    tasks: [classification]
    models: [small_cnn, "monai:DenseNet121"]
    algorithms: [fedavg, fedprox]
    topologies: [server]
    max_rounds: 100
    privacy: {require_dp: true, max_epsilon: 8, require_secure_aggregation: true}
    disclose: sizes            # the server learns split sizes, not class counts
    peers: [hospital_a, hospital_b]
    approve: manual            # the operator approves each job: medfed site approve JOB_HASH
    allowed_imports: [mfpkg]   # model: {import: ...} and loss: {import: ...} only from these packages
    allow_bundles: false
"""

# No `from __future__ import annotations`: pydantic parses field types at class creation.

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import Field, ValidationError, field_validator

from medfed.config.algorithms import AlgorithmConfig, algorithm_names
from medfed.config.files import read_yaml
from medfed.config.limits import MAX_ROUNDS, SiteName
from medfed.config.messages import describe_error
from medfed.config.model import ModelConfig
from medfed.core.errors import ConfigError
from medfed.core.schema import Count, Frozen, Real

_MODULE = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
_PACKAGE = r"[A-Za-z_][A-Za-z0-9_]*"
MODEL_FORMS = ("<name>", "monai:<Class>", "monai:*", "import:<package>", "bundle")


def builtin_model_names() -> tuple[str, ...]:
    """The networks a job names by ``model.name``."""
    return get_args(ModelConfig.model_fields["name"].annotation)


def all_algorithm_names() -> list[str]:
    """Every value of ``algorithm.name``, sorted."""
    return sorted(n for m in get_args(get_args(AlgorithmConfig)[0]) for n in algorithm_names(m))


class Approve(str, Enum):
    """Who lets a job run: ``auto`` (the policy alone) or ``manual`` (the operator, per job hash)."""

    AUTO = "auto"
    MANUAL = "manual"


class Disclose(str, Enum):
    """What of its data summary a site tells the server: ``counts`` (sizes and class counts)
    or ``sizes`` (split sizes and image shape only)."""

    COUNTS = "counts"
    SIZES = "sizes"


class PrivacyRules(Frozen):
    """``require_dp``: the job must have DP (``privacy.dp`` or ``privacy.dp_sgd``);
    ``max_epsilon``: and spend at most this epsilon (at the job's delta, after its last
    round, as ``--max-epsilon`` checks it); ``require_secure_aggregation``: the job must
    mask updates (``privacy.secure_aggregation``)."""

    require_dp: bool = False
    max_epsilon: Real | None = Field(None, gt=0)
    require_secure_aggregation: bool = False


class SitePolicy(Frozen):
    """The site's rules; see the module's docstring. Lists must not be empty, except
    ``allowed_imports: []`` (no user code at all)."""

    tasks: Annotated[list[Literal["classification", "segmentation", "reconstruction"]], Field(min_length=1)] | None = None
    models: Annotated[list[str], Field(min_length=1)] | None = None
    algorithms: Annotated[list[str], Field(min_length=1)] | None = None
    topologies: Annotated[list[Literal["server", "cyclic", "swarm", "split"]], Field(min_length=1)] | None = None
    max_rounds: Count | None = Field(None, ge=1, le=MAX_ROUNDS)
    privacy: PrivacyRules = PrivacyRules()
    disclose: Disclose = Disclose.COUNTS
    peers: Annotated[list[SiteName], Field(min_length=1)] | None = None
    approve: Approve = Approve.AUTO
    allowed_imports: list[str] | None = None
    allow_bundles: bool = True

    @field_validator("models")
    @classmethod
    def _model_forms(cls, v: list[str] | None) -> list[str] | None:
        names = builtin_model_names()
        for i, m in enumerate(v or []):
            form, _, rest = m.partition(":")
            ok = (m in names or m == "bundle"
                  or (form == "monai" and (rest == "*" or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rest)))
                  or (form == "import" and re.fullmatch(_MODULE, rest)))
            if not ok:
                raise ValueError(f"[{i}] {m!r} is not a model this policy can name; give a built-in name "
                                 f"({', '.join(names)}), monai:<Class>, monai:*, import:<package> or bundle")
        return v

    @field_validator("algorithms")
    @classmethod
    def _known_algorithms(cls, v: list[str] | None) -> list[str] | None:
        known = all_algorithm_names()
        for i, a in enumerate(v or []):
            if a not in known:
                raise ValueError(f"[{i}] unknown algorithm {a!r}; must be one of {', '.join(known)}")
        return v

    @field_validator("allowed_imports")
    @classmethod
    def _packages(cls, v: list[str] | None) -> list[str] | None:
        for i, p in enumerate(v or []):
            if not re.fullmatch(_PACKAGE, p):
                raise ValueError(f"[{i}] {p!r} is not a top-level package name (such as 'mfpkg', without dots)")
        return v


def parse_policy(raw: object, source: str) -> SitePolicy:
    """A policy from parsed YAML; ConfigError naming ``source`` and every bad field, one a
    line (an unknown field: ``policy file 'p.yaml': colour: is not a known field``)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must be a mapping of policy fields (tasks, models, algorithms...), "
                          f"got {type(raw).__name__}")
    try:
        return SitePolicy.model_validate(raw)
    except ValidationError as e:
        lines = [_policy_error(err) for err in e.errors()]
        raise ConfigError(f"{source} is invalid:\n  " + "\n  ".join(lines)) from None


def _policy_error(err: dict) -> str:
    text = describe_error(err)
    if err["type"] == "extra_forbidden":  # say what the section may hold
        model = PrivacyRules if tuple(err["loc"])[:1] == ("privacy",) else SitePolicy
        text += f" (a {'privacy section' if model is PrivacyRules else 'policy'} has: {', '.join(model.model_fields)})"
    # a list check's message starts with the item's index: models: [2] ... -> models[2]: ...
    return re.sub(r"^([a-z_.]+): \[(\d+)\] ", r"\1[\2]: ", text)


def load_policy(path: Path) -> SitePolicy:
    """Read and check a policy file; ConfigError naming the file and the field."""
    return parse_policy(read_yaml(path, "policy file"), f"policy file '{path}'")
