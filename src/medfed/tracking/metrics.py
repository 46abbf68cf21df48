"""The metrics store of a run: one JSON object per line in ``metrics.jsonl``.

A record is ``{"round", "arm", "site", "split", "metric", "value"}``: ``round`` counts from
1, ``arm`` is ``federated``, ``local``, ``personalized``, ``finetuned`` or ``centralized``, ``site`` is a site name or
``"all"`` (the example-weighted mean over the training sites) or ``"median"`` (their median, val
and test only: a figure no single site can move far), ``split`` is ``train`` (training loss as
reported by the site), ``val`` or ``test``. ``value`` is ``null`` where the metric is
undefined, e.g. AUC on a split holding one class, or a non-finite number.

Appending lines keeps a crashed run's metrics readable up to its last complete record and
makes two runs of the same job byte-identical.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from medfed.core.errors import RunDirError

ARMS = ("local", "federated", "personalized", "finetuned", "centralized")  # display order: baseline, method(s), upper bound
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


class MetricsWriter:
    """Append records to ``path``, one JSON line each, flushed as written.

    The file is opened once, in append mode, and closed on leaving the ``with`` block::

        with MetricsWriter(run_dir / "metrics.jsonl") as metrics:
            metrics.write(1, "federated", "hospital_a", "test", "auc", 0.81)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")

    def write(self, round: int, arm: str, site: str, split: str, metric: str, value: float | None) -> None:
        """Append one record. NaN and infinite values are written as ``null``."""
        if self._file is None:
            raise ValueError(f"MetricsWriter for '{self.path}' is closed")
        if arm not in ARMS:
            raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        record = {"round": int(round), "arm": arm, "site": site, "split": split, "metric": metric,
                  "value": _clean(value)}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

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
    """The arms that have at least one record, in ``ARMS`` order."""
    present = {r["arm"] for r in records}
    return [a for a in ARMS if a in present]


def comparison_rows(records: list[dict], monitor: str, split: str = "test") -> list[dict]:
    """Per site, the ``monitor`` metric on ``split`` at each arm's last round.

    An arm's last round is the latest round it has any ``split`` record for, the same for
    every site, so a table never mixes rounds. A value is None where the arm is absent,
    the site has no record at that round, or the metric was undefined. Rows follow
    :func:`site_order`; each is ``{"site", "local", "federated", "personalized", "finetuned", "centralized", "gain"}``
    with ``gain = federated - local`` (None if either is None).
    """
    last: dict[str, int] = {}
    for r in records:
        if r["split"] == split:
            last[r["arm"]] = max(last.get(r["arm"], 0), r["round"])
    final: dict[tuple[str, str], float | None] = {}
    for r in records:
        if r["split"] == split and r["metric"] == monitor and r["round"] == last.get(r["arm"]):
            final[(r["arm"], r["site"])] = r["value"]  # a repeated record: the later one wins
    rows = []
    for site in site_order(records):
        row: dict[str, Any] = {"site": site} | {arm: final.get((arm, site)) for arm in ARMS}
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
