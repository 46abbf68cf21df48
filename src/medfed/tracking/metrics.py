"""The metrics store of a run: one JSON object per line in ``metrics.jsonl``.

A record is ``{"round", "arm", "site", "split", "metric", "value"}``: ``round`` counts from
1, ``arm`` is ``federated``, ``local``, ``personalized``, ``finetuned``, ``centralized``, ``zero_filled`` or
``pretrain`` (the self-supervised stage: its ``ssl_loss`` per site on ``train``), ``site`` is a site name or
``"all"`` (the example-weighted mean over the training sites) or ``"median"`` (their median, val
and test only: a figure no single site can move far), ``split`` is ``train`` (training loss as
reported by the site), ``val`` or ``test``. ``value`` is ``null`` where the metric is
undefined, e.g. AUC on a split holding one class, or a non-finite number.

The spread across sites (worst and best site, standard deviation, gap) is not recorded:
:func:`spreads` computes it when reading, from the per-site records, for every table.

Appending lines keeps a crashed run's metrics readable up to its last complete record and
makes two runs of the same job byte-identical.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from medfed.core.errors import RunDirError
from medfed.core.types import lower_is_better

# display order: the zero-filled input (reconstruction), baseline, method(s), upper bound
ARMS = ("pretrain", "zero_filled", "local", "federated", "personalized", "finetuned", "centralized")
MODEL_ARMS = ARMS[1:]  # the arms with a model evaluated at the sites (the comparison's columns)
SPLITS = ("train", "val", "test")
MEAN_SITE = "all"  # the example-weighted mean over the training sites
MEDIAN_SITE = "median"  # the median over the training sites
CONSORTIUM_SITES = (MEAN_SITE, MEDIAN_SITE)  # figures over sites, not sites
FIELDS = ("round", "arm", "site", "split", "metric", "value")

Curve = tuple[list[int], list[float | None]]


def _clean(value: float | None) -> float | None:
    """A finite float, or None for None, NaN and +-inf."""
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def metric_record(round: int, arm: str, site: str, split: str, metric: str, value: float | None) -> dict:
    """One record as metrics.jsonl and the experiment trackers take it (NaN and inf: None)."""
    return {"round": int(round), "arm": arm, "site": site, "split": split, "metric": metric, "value": _clean(value)}


class MetricsWriter:
    """Append records to ``path``, one JSON line each, flushed as written.

    The file is opened once, in append mode, and closed on leaving the ``with`` block::

        with MetricsWriter(run_dir / "metrics.jsonl") as metrics:
            metrics.write(1, "federated", "hospital_a", "test", "auc", 0.81)

    ``on_record`` (optional) is called with each record once it is written: the job's
    experiment trackers (:class:`~medfed.tracking.external.Trackers`) see every record
    through it, and nothing else.
    """

    def __init__(self, path: str | Path, on_record: Callable[[dict], None] | None = None):
        self.path = Path(path)
        self.on_record = on_record
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")

    def write(self, round: int, arm: str, site: str, split: str, metric: str, value: float | None) -> None:
        """Append one record. NaN and infinite values are written as ``null``."""
        if self._file is None:
            raise ValueError(f"MetricsWriter for '{self.path}' is closed")
        if arm not in ARMS:
            raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        record = metric_record(round, arm, site, split, metric, value)
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self.on_record is not None:
            self.on_record(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _check_record(obj: Any) -> str | None:
    """What is wrong with one parsed line, or None."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    missing = [f for f in FIELDS if f not in obj]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    rnd = obj["round"]
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 1:
        return f"round must be an integer >= 1, got {rnd!r}"
    if obj["arm"] not in ARMS:
        return f"arm must be one of {', '.join(ARMS)}, got {obj['arm']!r}"
    if obj["split"] not in SPLITS:
        return f"split must be one of {', '.join(SPLITS)}, got {obj['split']!r}"
    for key in ("site", "metric"):
        if not isinstance(obj[key], str) or not obj[key]:
            return f"{key} must be a non-empty string, got {obj[key]!r}"
    v = obj["value"]
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
        return f"value must be a number or null, got {v!r}"
    return None


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a ``metrics.jsonl``, in file order. Blank lines are skipped.

    Raises RunDirError naming the file (and the line number, for a malformed line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunDirError(f"metrics file '{path}' not found; is this a run folder written by `medfed run`?") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunDirError(f"metrics file '{path}' cannot be read: {e}") from None
    records: list[dict] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunDirError(f"{path}, line {lineno}: not valid JSON ({e.msg}): {line[:80]!r}") from None
        problem = _check_record(obj)
        if problem is not None:
            raise RunDirError(f"{path}, line {lineno}: {problem}")
        records.append({f: obj[f] for f in FIELDS} | {"value": _clean(obj["value"])})
    return records


def site_order(records: list[dict]) -> list[str]:
    """Site names in first-seen order, then the consortium figures present (``"all"``,
    ``"median"``)."""
    seen = dict.fromkeys(r["site"] for r in records)
    return [s for s in seen if s not in CONSORTIUM_SITES] + [s for s in CONSORTIUM_SITES if s in seen]


def arms_present(records: list[dict]) -> list[str]:
    """The arms that have at least one evaluation record (val or test), in ``ARMS`` order: the
    arms with a model to compare (``pretrain`` records its training loss only)."""
    present = {r["arm"] for r in records if r["split"] != "train"}
    return [a for a in ARMS if a in present]


def last_rounds(records: list[dict], split: str = "test") -> dict[str, int]:
    """Per arm, the latest round it has any ``split`` record for."""
    last: dict[str, int] = {}
    for r in records:
        if r["split"] == split:
            last[r["arm"]] = max(last.get(r["arm"], 0), r["round"])
    return last


def comparison_rows(records: list[dict], monitor: str, split: str = "test") -> list[dict]:
    """Per site, the ``monitor`` metric on ``split`` at each arm's last round.

    An arm's last round is the latest round it has any ``split`` record for, the same for
    every site, so a table never mixes rounds. A value is None where the arm is absent,
    the site has no record at that round, or the metric was undefined. Rows follow
    :func:`site_order`; each is ``{"site", "zero_filled", "local", "federated", "personalized", "finetuned", "centralized", "gain"}``
    with ``gain = federated - local`` (None if either is None).
    """
    last = last_rounds(records, split)
    final: dict[tuple[str, str], float | None] = {}
    for r in records:
        if r["split"] == split and r["metric"] == monitor and r["round"] == last.get(r["arm"]):
            final[(r["arm"], r["site"])] = r["value"]  # a repeated record: the later one wins
    rows = []
    for site in site_order(records):
        row: dict[str, Any] = {"site": site} | {arm: final.get((arm, site)) for arm in MODEL_ARMS}
        fed, loc = row["federated"], row["local"]
        row["gain"] = fed - loc if fed is not None and loc is not None else None
        rows.append(row)
    return rows


def curves(records: list[dict], metric: str, split: str) -> dict[str, dict[str, Curve]]:
    """``metric`` on ``split`` against round: ``{site: {arm: (rounds, values)}}``.

    Sites follow :func:`site_order` (only those with a matching record), arms follow
    ``ARMS``; rounds ascend; undefined values stay None.
    """
    points: dict[str, dict[str, dict[int, float | None]]] = {}
    for r in records:
        if r["split"] == split and r["metric"] == metric:
            points.setdefault(r["site"], {}).setdefault(r["arm"], {})[r["round"]] = r["value"]
    out: dict[str, dict[str, Curve]] = {}
    for site in site_order(records):
        if site not in points:
            continue
        out[site] = {}
        for arm in ARMS:
            if arm in points[site]:
                rounds = sorted(points[site][arm])
                out[site][arm] = (rounds, [points[site][arm][k] for k in rounds])
    return out


# --------------------------------------------------------------------------- spread across sites

SPREAD_ROWS = ("worst", "best", "std", "gap")  # the figures of a Spread, in table order


@dataclass(frozen=True)
class Spread:
    """How one arm's figure varies across the training sites at one round.

    ``worst`` and ``best``: (site, value) by the figure's direction (the highest loss or
    HD95 is the worst, the lowest AUC or Dice); a tie goes to the site listed first.
    ``std``: the standard deviation of the sites' values, each site counting once
    (population, ddof 0); ``gap``: how far apart the best and the worst are,
    ``|best - worst|``. ``sites``: the sites with a defined value, over which all four
    are taken; ``undefined``: training sites without one (no record at that round, or the
    metric undefined there). The four are None when no site has a value."""

    round: int
    sites: tuple[str, ...]
    undefined: tuple[str, ...]
    worst: tuple[str, float] | None
    best: tuple[str, float] | None
    std: float | None
    gap: float | None

    def figure(self, name: str) -> float | None:
        """The value of one of :data:`SPREAD_ROWS`."""
        v = getattr(self, name)
        return v[1] if isinstance(v, tuple) else v

    def site(self, name: str) -> str | None:
        """The site of ``worst`` or ``best`` (None for the others or without a value)."""
        v = getattr(self, name)
        return v[0] if isinstance(v, tuple) else None


def site_spread(values: Mapping[str, float | None], metric: str, round: int = 0) -> Spread:
    """The :class:`Spread` of ``metric`` over ``values`` (site -> value, None where undefined)."""
    defined = [(s, v) for s, v in values.items() if v is not None]
    undefined = tuple(s for s, v in values.items() if v is None)
    if not defined:
        return Spread(round, (), undefined, None, None, None, None)
    lower = lower_is_better(metric)
    # min/max keep the first of equal values: ties go to the site listed first
    low, high = min(defined, key=lambda sv: sv[1]), max(defined, key=lambda sv: sv[1])
    worst, best = (high, low) if lower else (low, high)
    mean = sum(v for _, v in defined) / len(defined)
    std = math.sqrt(sum((v - mean) ** 2 for _, v in defined) / len(defined))
    return Spread(round, tuple(s for s, _ in defined), undefined, worst, best, std, high[1] - low[1])


def spreads(
    records: list[dict], metric: str, split: str = "test", held_out: Collection[str] = (), at_round: int | None = None
) -> dict[str, Spread]:
    """Per arm (in ``ARMS`` order), the spread of ``metric`` on ``split`` across the
    training sites: every site with a ``split`` record, less the consortium figures and the
    ``held_out`` sites (reported on their own rows, never in a spread). At each arm's last
    round, as :func:`comparison_rows`, or at ``at_round`` (arms without a record then are
    left out). The one computation of the spread that every table uses."""
    sites = [s for s in site_order([r for r in records if r["split"] == split])
             if s not in CONSORTIUM_SITES and s not in held_out]
    rounds = last_rounds(records, split)
    if at_round is not None:
        rounds = {a: at_round for a in rounds if any(r["arm"] == a and r["round"] == at_round and r["split"] == split
                                                      for r in records)}
    values: dict[str, dict[str, float | None]] = {a: {} for a in rounds}
    for r in records:
        if r["split"] == split and r["metric"] == metric and r["round"] == rounds.get(r["arm"]):
            values[r["arm"]][r["site"]] = r["value"]  # a repeated record: the later one wins
    return {a: site_spread({s: values[a].get(s) for s in sites}, metric, rounds[a]) for a in ARMS if a in rounds}


def spread_rows(
    records: list[dict], metric: str, split: str = "test", held_out: Collection[str] = ()
) -> list[dict]:
    """The spread of :func:`spreads` as rows under :func:`comparison_rows`' (one per
    :data:`SPREAD_ROWS` entry): ``{"site": "worst", <arm>: value, "where": {arm: site},
    "gain": federated - local, "lower_is_better": bool}``; ``lower_is_better`` says which
    way a gain is good (std and gap: a smaller spread is fairer)."""
    by_arm = spreads(records, metric, split, held_out)
    rows = []
    for name in SPREAD_ROWS:
        row: dict[str, Any] = {"site": name}
        row |= {arm: by_arm[arm].figure(name) if arm in by_arm else None for arm in ARMS}
        row["where"] = {arm: sp.site(name) for arm, sp in by_arm.items() if sp.site(name) is not None}
        fed, loc = row["federated"], row["local"]
        row["gain"] = fed - loc if fed is not None and loc is not None else None
        row["lower_is_better"] = name in ("std", "gap") or lower_is_better(metric)
        rows.append(row)
    return rows
