"""Reading job files: YAML with a bound on what its aliases expand to, validation into a
:class:`~medfed.config.job.Job`, and the data paths resolved against the job file's folder
(so a job file and its data can move together)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from medfed.config.job import Job
from medfed.config.limits import MAX_YAML_NODES
from medfed.config.messages import format_validation_error
from medfed.core.errors import ConfigError
from medfed.core.files import bundle_sha256, sha256_file

SITE_LOCAL = Path("<site-local>")  # stands for every file path when the job travels to sites


def parse_job(raw: Any, source: str = "job", base_dir: Path | None = None) -> Job:
    """Validate a mapping (parsed YAML) as a Job. Relative data paths and ``model.init``
    resolve against base_dir; the init file's SHA-256 is filled in (see :func:`with_init_hash`)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a job must be a mapping of fields, got {type(raw).__name__}")
    try:
        job = Job.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
    if base_dir is not None:
        job = job.model_copy(update={"data": resolve_paths(job.data, base_dir),
                                     "model": resolve_paths(job.model, base_dir)})
    return with_init_hash(job, source)


def with_init_hash(job: Job, source: str = "job") -> Job:
    """``job`` with ``model.init_sha256`` set to the SHA-256 of the ``model.init`` file
    (and a bundle's ``bundle_sha256``, :func:`with_bundle_hash`).

    A job that arrived at a site (its paths ``<site-local>``) keeps the server's hash. A
    file that cannot be read, or whose content differs from a pinned ``init_sha256``, is a
    ConfigError naming the field."""
    job = with_bundle_hash(job, source)
    m = job.model
    if m.init is None or m.init == SITE_LOCAL:
        return job
    try:
        digest = sha256_file(m.init)
    except OSError as e:
        raise ConfigError(f"{source}: model.init: cannot read '{m.init}': {e.strerror or e}") from None
    if m.init_sha256 is not None and m.init_sha256 != digest:
        raise ConfigError(
            f"{source}: model.init_sha256: the job pins {m.init_sha256}, but '{m.init}' has SHA-256 {digest}; "
            "give the file the job was written for, or remove init_sha256 to accept this one"
        )
    return job.model_copy(update={"model": m.model_copy(update={"init_sha256": digest})})


def with_bundle_hash(job: Job, source: str = "job") -> Job:
    """``job`` with ``model.bundle_sha256`` set to the bundle's digest
    (:func:`~medfed.core.files.bundle_sha256`) when its model is a MONAI Bundle. A job that
    arrived at a site keeps the server's digest (the site checks its own bundle against it).
    A folder that is not a bundle, or whose digest differs from a pinned one, is a
    ConfigError naming the field."""
    m = job.model
    if getattr(m, "bundle", None) is None or m.bundle == SITE_LOCAL:  # type: ignore[union-attr]
        return job
    folder = m.bundle  # type: ignore[union-attr]
    digest = checked_bundle_digest(folder, f"{source}: model.bundle")
    pinned = m.bundle_sha256  # type: ignore[union-attr]
    if pinned is not None and pinned != digest:
        raise ConfigError(
            f"{source}: model.bundle_sha256: the job pins {pinned}, but the bundle '{folder}' has SHA-256 {digest} "
            "(of its configs/ and scripts/); give the bundle the job was written for, or remove bundle_sha256 to "
            "accept this one"
        )
    return job.model_copy(update={"model": m.model_copy(update={"bundle_sha256": digest})})


def checked_bundle_digest(folder: Path, where: str) -> str:
    """The digest of the MONAI Bundle at ``folder`` (see :func:`with_bundle_hash`), after
    checking that it is one: a folder with ``configs/metadata.json``. ConfigError naming
    ``where`` otherwise."""
    if not folder.is_dir():
        raise ConfigError(f"{where}: '{folder}' is not a folder; give the folder of a MONAI Bundle (it holds "
                          "configs/metadata.json)")
    if not (folder / "configs" / "metadata.json").is_file():
        raise ConfigError(f"{where}: '{folder}' is not a MONAI Bundle: it has no configs/metadata.json")
    try:
        return bundle_sha256(folder)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read the bundle '{folder}': {e.strerror or e}") from None


def map_paths(value: Any, fn: Callable[[Path], Path]) -> Any:
    """A copy of a config value with ``fn`` applied to every Path inside it (unchanged
    parts are shared, not copied)."""
    if isinstance(value, Path):
        return fn(value)
    if isinstance(value, list):
        items = [map_paths(v, fn) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else items
    if isinstance(value, dict):
        mapped = {k: map_paths(v, fn) for k, v in value.items()}
        return value if all(mapped[k] is v for k, v in value.items()) else mapped
    if isinstance(value, BaseModel):
        update = {}
        for name in type(value).model_fields:
            old = getattr(value, name)
            new = map_paths(old, fn)
            if new is not old:
                update[name] = new
        return value.model_copy(update=update) if update else value
    return value


def resolve_paths(value: Any, base_dir: Path) -> Any:
    """A copy of a config section with every relative path made absolute against base_dir."""
    return map_paths(value, lambda p: p if p.is_absolute() else (base_dir / p).resolve())


class _TooLarge(yaml.YAMLError):
    """A YAML document that would expand past MAX_YAML_NODES values, or into itself."""


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """The number of nodes of the document under ``root`` once every alias is written out,
    counted without writing them out (each node's size is computed once). Raises _TooLarge
    past ``limit`` or when an alias refers to a node that contains it."""
    size: dict[int, int] = {}
    open_nodes: set[int] = set()  # started but not finished: the ancestors of the current node
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        if finished:
            open_nodes.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            if size[key] > limit:
                raise _TooLarge(
                    f"holds more than {limit:,} values once its aliases (*name) are written out; "
                    "a job, data or consortium file needs nowhere near that many: write the repeated parts "
                    "out, or use fewer nested aliases"
                )
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise _TooLarge(f"has an alias that refers to a value containing it (line {node.start_mark.line + 1})")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children)
    return size[id(root)]


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses a document whose aliases expand past MAX_YAML_NODES values.

    PyYAML shares the object an alias names, so a "billion laughs" file (each anchor a
    list of ten aliases of the one before) loads in an instant as a small graph; whatever
    walks it afterwards (validation, an error message, a JSON dump) sees the expanded tree
    and never finishes. The composed graph is measured before any object is built."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _expanded_size(node, MAX_YAML_NODES)
        return node


_FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # PyYAML built without libyaml has no C loader


def read_yaml(path: Path, what: str) -> Any:
    """The parsed content of a YAML file; ConfigError naming ``what`` (e.g. "job file")
    and the file when it is missing, not YAML, or too large once its aliases are expanded
    (more than MAX_YAML_NODES values)."""
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' not found")
    try:
        text = path.read_text(encoding="utf-8")
        # an alias needs an anchor (&name): a text without one cannot expand, and libyaml's
        # loader reads it several times faster (a job of 100 sites: 3 ms against 23)
        return yaml.load(text, Loader=_FAST_LOADER if "&" not in text else _BoundedLoader)
    except _TooLarge as e:
        raise ConfigError(f"{what} '{path}' {e}") from None
    except RecursionError:
        raise ConfigError(f"{what} '{path}' nests its values too deeply to read") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {e}") from None


def load_job(path: str | Path) -> Job:
    """Read and validate a YAML job file. Raises ConfigError naming the file and field."""
    path = Path(path)
    return parse_job(read_yaml(path, "job file"), source=str(path), base_dir=path.parent.resolve())


def builtin_job_path(name: str = "quickstart") -> Path:
    """The path of a job file shipped inside the package (``medfed run`` with no argument)."""
    return Path(__file__).parent.parent / "examples" / f"{name}.yaml"
