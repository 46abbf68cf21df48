"""The report of a run folder: one self-contained ``report.html`` (its line charts are
inline SVG, other figures base64 PNG; no external CSS or JS). Its comparison table, like
the terminal's, comes from tables.py.

The report is rebuilt from the files of the run folder alone (``job.yaml``,
``metrics.jsonl``, ``sites.json``, ``run.json``, ``model_best.json``, ``contribution.json`` and, for a
deployed run, ``audit.json``), so ``medfed report`` can redo it at any time; only ``job.yaml`` and
``metrics.jsonl`` are required.
"""

from __future__ import annotations

import base64
import io
import json
import math
from datetime import datetime
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from medfed.config import Job, load_job
from medfed.core.errors import RunDirError
from medfed.core.summary import SiteSummary
from medfed.core.files import atomic_write_text
from medfed.tracking.contribution import contribution_section, read_contribution
from medfed.tracking.metrics import ARMS, CONSORTIUM_SITES, MEAN_SITE, MEDIAN_SITE, curves, read_metrics, site_order
from medfed.tracking.reconstructions import reconstructions_section
from medfed.tracking.svgchart import CYCLE, Panel, Series, line_chart
from medfed.tracking.tables import MISSING, Cell, comparison_section, fmt, html_table, pictures_section
from medfed.core.types import Metric

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_NAME = "report.html"
ARM_STYLE = {
    "local": ("#d95f02", "--"), "federated": ("#1b6ec2", "-"), "finetuned": ("#7570b3", "-."), "personalized": ("#e7298a", "-."),
    "centralized": ("#1b9e77", ":"), "zero_filled": ("#777777", ":"), "pretrain": ("#999999", "-"),
}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; } tr.pooled td { font-weight: bold; background: #fafafa; }
tr.spread td { font-style: italic; background: #fcfcf6; }
.meta td { border: none; padding: 0.1em 1em 0.1em 0; text-align: left; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; } .note { color: #666; font-size: 0.9em; }
"""


# --------------------------------------------------------------------------- formatting


def _fmt_date(iso: Any) -> str:
    try:
        return datetime.fromisoformat(str(iso)).strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    except ValueError:
        return str(iso)


def fmt_bytes(n: Any) -> str:
    """A byte count in decimal units, e.g. "512 B", "1.2 MB"; an en dash if not a count."""
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0:
        return MISSING
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
    return MISSING  # not reached


# --------------------------------------------------------------------------- reading the run folder


def _read_json(path: Path) -> dict | None:
    """A JSON object file, or None if the file is absent. Malformed: RunDirError."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"'{path}' is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RunDirError(f"'{path}' must hold a JSON object, got {type(obj).__name__}")
    return obj


def _require(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise RunDirError(f"run folder '{run_dir}' not found")
    for name in ("job.yaml", "metrics.jsonl"):
        if not (run_dir / name).is_file():
            raise RunDirError(f"'{run_dir / name}' not found; is '{run_dir}' a run folder written by `medfed run`?")


# --------------------------------------------------------------------------- figures


def _png(fig: "Figure") -> str:
    """An <img> tag holding a matplotlib ``fig`` as a base64 PNG (the contribution chart)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig)  # render with Agg, whatever pyplot's backend is; no pyplot state
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    fig.clear()
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


MAX_SITE_PANELS = 12  # beyond this, per-site panels are unreadable and slow to draw


def learning_curves_figure(records: list[dict], monitor: str) -> str | None:
    """One small panel per site (and "all") of test ``monitor`` against round, one line per
    arm, as inline SVG; with more than MAX_SITE_PANELS sites, only the "all" panel."""
    by_site = curves(records, monitor, "test")
    by_site.pop(MEDIAN_SITE, None)  # one consortium panel: the weighted mean
    if not by_site:
        return None
    if len(by_site) - (MEAN_SITE in by_site) > MAX_SITE_PANELS and MEAN_SITE in by_site:
        by_site = {MEAN_SITE: by_site[MEAN_SITE]}
    panels, seen = [], set()
    for i, (site, arms) in enumerate(by_site.items()):
        lines = []
        for arm, (rounds, values) in arms.items():
            color, style = ARM_STYLE[arm]
            # zero_filled is scored once, the same every round: a level
            level = arm == "zero_filled" and len(rounds) == 1
            lines.append(Series(rounds, values, color, style, arm, markers=len(rounds) <= 20, level=level))
            seen.add(arm)
        panels.append(Panel(lines, "all sites (weighted)" if site == MEAN_SITE else site,
                            f"test {monitor}" if i % 4 == 0 else ""))
    legend = [Series((), (), ARM_STYLE[a][0], ARM_STYLE[a][1], a) for a in ARMS if a in seen]
    return line_chart(panels, ncols=4, legend=legend, description=f"test {monitor} by round, per site and arm")


def _many_sites_note(records: list[dict]) -> str:
    n = len([s for s in site_order(records) if s not in CONSORTIUM_SITES])
    if n <= MAX_SITE_PANELS:
        return ""
    return (f'<p class="note">{n} sites: per-site panels are drawn for at most {MAX_SITE_PANELS} sites; '
            "the per-site values are in the table above and in metrics.jsonl.</p>")


def training_loss_figure(records: list[dict], arm: str = "federated", metric: str = Metric.LOSS) -> str | None:
    """Training loss of ``arm`` against round, one line per site, as inline SVG (the
    pretraining stage: arm ``pretrain``, metric ``ssl_loss``)."""
    by_site = curves([r for r in records if r["arm"] == arm], metric, "train")
    by_site.pop(MEDIAN_SITE, None)
    if not by_site:
        return None
    many = len(by_site) > MAX_SITE_PANELS  # then thin grey unlabelled lines, no legend
    lines = []
    for k, (site, arms) in enumerate(by_site.items()):
        rounds, values = arms[arm]
        if site == MEAN_SITE:
            lines.append(Series(rounds, values, "black", "--", "all sites"))
        else:
            lines.append(Series(rounds, values, "#999999" if many else CYCLE[k % len(CYCLE)], "-", site,
                                width=0.6 if many else 1.2))
    ylabel = "training loss" if metric == Metric.LOSS else str(metric)
    legend = [] if many else lines
    return line_chart([Panel(lines, ylabel=ylabel)], legend=legend, scale=2.0,
                      description=f"{ylabel} of each site by round")


# --------------------------------------------------------------------------- sections


def _pretrain_section(job: Job, records: list[dict]) -> str:
    """The self-supervised stage before the federated one (``pretrain``): its loss per site
    and round; nothing for a job without it."""
    cfg = job.pretrain
    if cfg is None:
        return ""
    img = training_loss_figure(records, "pretrain", Metric.SSL_LOSS)
    note = (f'<p class="note">{escape(cfg.method)}: {cfg.rounds} federated round(s) (FedAvg) on every training '
            "image of every site, labels unused; the federated arm starts from the pretrained encoder with the "
            "head as initialized; local and centralized start from the job's initial model.</p>")
    return "\n".join(["<h2>Self-supervised pretraining (ssl_loss)</h2>", note,
                      img or '<p class="note">No data recorded.</p>'])


def _counts(counts: Any) -> str:
    return " / ".join(str(c) for c in counts) if isinstance(counts, list) else MISSING


def _sites_section(sites: dict | None, segmentation: bool = False) -> str:
    if sites is None or not isinstance(sites.get("sites"), list):
        return '<h2>Sites</h2><p class="note">No sites.json in this run folder.</p>'
    splits = ("train", "val", "test")
    header = ["site", *splits, *(f"{s} classes" for s in splits), "skipped files"]
    rows, notes = [], []
    for raw in sites["sites"]:
        try:
            s = SiteSummary.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise RunDirError(f"sites.json: site {raw.get('name', '?') if isinstance(raw, dict) else '?'!r}: "
                              f"{where}: {err['msg']}") from None
        train = f"{s.train} ({s.unlabeled} unlabeled)" if s.unlabeled else str(s.train)  # scarce labels
        rows.append([s.name + (" (held out)" if s.held_out else ""), train, str(s.val), str(s.test),
                     *(_counts(s.class_counts.get(k)) for k in splits), str(s.skipped)])
        # a deployed site names no files: they stay at the site
        notes += [f"{s.name}: {f.file}: {f.reason}" for f in s.skipped_files[:20]]
        if len(s.skipped_files) > 20:
            notes.append(f"{s.name}: ... and {len(s.skipped_files) - 20} more (see sites.json)")
    what = ("examples in which each class appears" if segmentation
            else "examples per class (binary, multi-class) or positives per label (multi-label)")
    if any(isinstance(r, dict) and r.get("unlabeled") for r in sites["sites"]):
        what += "; of the labeled examples only"
    out = ("<h2>Sites</h2>" + html_table(header, rows)
           + f'<p class="note">Class counts: {what}, in class order. A held-out site never trains; it is '
             "evaluated with the models the other sites trained and left out of “all”.</p>")
    if notes:
        out += "<h3>Skipped files</h3><pre>" + escape("\n".join(notes)) + "</pre>"
    return out


MAX_PREDICTION_IMAGES = 4  # per site in the report; all of them stay in the folder


def _predictions_section(run_dir: Path) -> str:
    return pictures_section(
        run_dir / "predictions", "Predicted masks (test, final federated model)",
        "Each picture: image, ground truth, prediction (3D: the middle slice). All saved predictions are in "
        "the run folder under predictions/.", MAX_PREDICTION_IMAGES, 300)


MAX_AUDIT_ROWS = 200  # shown in the report; all of them stay in audit.json


def _charts_section(job: Job, records: list[dict], run_dir: Path) -> str:
    """The dashboard's interactive charts (learning curves per site and arm, epsilon against
    the budget, bytes per round), inline: its script and style are in the page, its data a
    JSON block; nothing is fetched."""
    from medfed.dashboard.page import static_charts
    from medfed.dashboard.snapshot import charts, job_summary

    audit = _read_json(run_dir / "audit.json")
    rows = audit.get("rows") if isinstance(audit, dict) and isinstance(audit.get("rows"), list) else None
    return "<h2>Interactive charts</h2>\n" + static_charts(charts(records, job_summary(job), rows))


def _audit_section(run_dir: Path) -> str:
    """The exchanges of a deployed run (``audit.json``, written by the server's run store), per
    arm and round; nothing for a simulated run, which has no audit.json."""
    audit = _read_json(run_dir / "audit.json")
    if audit is None:
        return ""
    rows = audit.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise RunDirError(f"'{run_dir / 'audit.json'}' must hold {{\"rows\": [...]}} with one object per exchange")

    def total(key: str) -> int:
        return sum(r[key] for r in rows if isinstance(r.get(key), int) and not isinstance(r.get(key), bool))

    statuses: dict[str, int] = {}
    for r in rows:
        statuses[str(r.get("status", "?"))] = statuses.get(str(r.get("status", "?")), 0) + 1
    not_accepted = ", ".join(f"{n} {s}" for s, n in statuses.items() if s != "accepted")
    parts = ["<h2>Audit</h2>",
             f"<p>{len(rows)} exchange{'s' if len(rows) != 1 else ''}"
             + (f" ({escape(not_accepted)})" if not_accepted else "")
             + f"; {escape(fmt_bytes(total('bytes_sent')))} sent, {escape(fmt_bytes(total('bytes_received')))} "
               "received over the run.</p>"]
    shown = rows[:MAX_AUDIT_ROWS]
    groups: dict[tuple[str, Any], list[dict]] = {}
    for r in shown:
        groups.setdefault((str(r.get("arm", "?")), r.get("round")), []).append(r)
    arm_rank = {a: i for i, a in enumerate(ARMS)}

    def order(key: tuple[str, Any]) -> tuple:
        arm, rnd = key
        return (arm_rank.get(arm, len(ARMS)), arm, rnd if isinstance(rnd, int) else 0)

    header = ["site", "kind", "status", "bytes sent", "bytes received", "SHA-256", "seconds", "reason"]
    for arm, rnd in sorted(groups, key=order):
        cells: list[list[Cell]] = []
        for r in groups[(arm, rnd)]:
            sha = r.get("sha256")
            seconds = r.get("seconds")
            cells.append([
                str(r.get("site", "?")), str(r.get("kind", MISSING)), str(r.get("status", MISSING)),
                fmt_bytes(r.get("bytes_sent")), fmt_bytes(r.get("bytes_received")),
                (str(sha)[:12], str(sha)) if sha else MISSING,
                f"{seconds:.2f}" if isinstance(seconds, (int, float)) and math.isfinite(seconds) else MISSING,
                str(r.get("reason") or ""),
            ])
        title = "calls refused before naming a task" if arm == "connection" else f"{arm}, round {rnd}"
        parts.append(f"<h3>{escape(title)}</h3>" + html_table(header, cells))
    if len(rows) > MAX_AUDIT_ROWS:
        parts.append(f'<p class="note">The first {MAX_AUDIT_ROWS} exchanges are shown; '
                     f"{len(rows) - MAX_AUDIT_ROWS} more are in audit.json.</p>")
    parts.append('<p class="note">One row per exchange of the server with a site. Bytes sent: server to site; '
                 "bytes received: site to server. SHA-256: of the site's answer (hover for the full digest).</p>")
    return "\n".join(parts)


MAX_ROUND_ROWS = 30


def _per_round(records: list[dict], metric: str, site: str | None = MEAN_SITE) -> dict[int, float]:
    """Federated records of ``metric`` by round: the value of ``site``, or the sum over the
    sites (``site=None``)."""
    out: dict[int, float] = {}
    for r in records:
        if r["arm"] != "federated" or r["metric"] != metric or r["value"] is None:
            continue
        if site is None and r["site"] not in CONSORTIUM_SITES:
            out[r["round"]] = out.get(r["round"], 0.0) + r["value"]
        elif site is not None and r["site"] == site:
            out[r["round"]] = r["value"]
    return out


def _update_path_section(job: Job, records: list[dict]) -> str:
    """What protected the updates (DP with its epsilon per round, secure aggregation, a
    robust rule, simulated attackers) and the bytes sites sent per round."""
    p = job.privacy
    notes, header, cols = [], ["round"], []
    dp = p.dp or p.dp_sgd
    eps = _per_round(records, Metric.EPSILON)
    if dp is not None:
        unit = "site-level DP-FedAvg, " + p.dp.noise + " noise" if p.dp is not None else "sample-level DP-SGD (worst site)"
        last = max(eps) if eps else None
        budget = f"; budget max_epsilon {dp.max_epsilon:g}" if dp.max_epsilon is not None else ""
        spent = f"ε = {eps[last]:.3g} at δ = {dp.delta:g} after round {last}" if last else "no round completed"
        stopped = ""
        if last is not None and last < job.rounds:
            stopped = f" Training stopped after round {last} of {job.rounds}: the next round would pass the budget."
        notes.append(f"<p><b>Differential privacy</b> ({escape(unit)}, noise multiplier {dp.noise_multiplier:g}, "
                     f"Opacus {escape(dp.accountant.upper())} accountant): {escape(spent)}{escape(budget)}.{escape(stopped)}</p>")
        clip = _per_round(records, "clip")
        if clip:
            unclipped = _per_round(records, "unclipped_fraction")
            header.append("clipping bound")
            cols.append(lambda r: fmt(clip.get(r)))
            if unclipped:
                header.append("unclipped share (noisy)")
                cols.append(lambda r: fmt(unclipped.get(r)))
    if p.secure_aggregation is not None:
        notes.append(f"<p><b>Secure aggregation</b>: the server saw only the sum of each round's updates "
                     f"(threshold {job.secagg_threshold} of {job.sites_per_round} sites, coordinates clipped to "
                     f"±{p.secure_aggregation.clip_range:g}).</p>")
    if job.topology.kind != "server":
        notes.append(f"<p><b>Topology</b>: {escape(job.topology.label)}.</p>")
        spread = _per_round(records, "consensus_distance")
        if spread:  # gossip, BrainTorrent: how far the sites' own models are from their consensus
            header.append("consensus distance")
            cols.append(lambda r: fmt(spread.get(r)))
    if job.robust is not None:
        notes.append(f"<p><b>Robust aggregation</b>: {escape(job.robust.rule)} in place of the weighted mean.</p>")
    if job.attack is not None:
        from medfed.robust.attacks import choose_attackers

        who = choose_attackers(job.training_sites, job.attack.fraction, job.seed)
        notes.append(f"<p><b>Simulated attack</b>: {escape(job.attack.kind)} (scale {job.attack.scale:g}) by "
                     f"{escape(', '.join(who) or 'no site')}.</p>")
    sent = _per_round(records, Metric.BYTES_SENT, site=None)
    if not sent and not notes:
        return ""
    model = _per_round(records, Metric.MODEL_BYTES)
    counts: dict[int, int] = {}
    for r in records:
        if r["arm"] == "federated" and r["metric"] == Metric.BYTES_SENT and r["site"] != MEAN_SITE:
            counts[r["round"]] = counts.get(r["round"], 0) + 1
    if sent:
        header += ["per site / model"]  # epsilon and bytes per round: the interactive charts above
        cols.append(lambda r: fmt(sent[r] / counts[r] / model[r]) if r in sent and model.get(r) else MISSING)
        total = sum(sent.values())
        method = f"compression: {job.compression.method}" if job.compression is not None else "no compression"
        notes.append(f"<p><b>Communication</b> ({escape(method)}): sites sent {escape(fmt_bytes(total))} of tensors "
                     "over the run; “per site / model” is one site's upload against the full model.</p>")
    rounds = sorted(set(eps) | set(sent))
    if len(rounds) > MAX_ROUND_ROWS:  # evenly spaced rounds and the last; metrics.jsonl has them all
        step = math.ceil(len(rounds) / MAX_ROUND_ROWS)
        rounds = rounds[::step] + ([rounds[-1]] if (len(rounds) - 1) % step else [])
    rows = [[str(r)] + [c(r) for c in cols] for r in rounds]
    table = html_table(header, rows) if len(header) > 1 else ""
    return "<h2>Privacy, robustness and communication</h2>\n" + "\n".join(notes) + table


def _header(job_name: str, job_hash: str, run: dict | None) -> str:
    meta = [("job hash", job_hash)]
    if run is None:
        meta.append(("status", "unknown (no run.json)"))
    else:
        meta += [("status", str(run.get("status", "unknown"))),
                 ("started", _fmt_date(run.get("started", MISSING))),
                 ("finished", _fmt_date(run.get("finished", MISSING))),
                 ("elapsed", f"{run['elapsed_s']:.1f} s" if isinstance(run.get("elapsed_s"), (int, float)) else MISSING),
                 ("rounds", str(run.get("rounds", MISSING))),
                 ("medfed", str(run.get("medfed_version", MISSING)))]
    rows = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in meta)
    return f"<h1>medfed run: {escape(job_name)}</h1>\n<table class=\"meta\">{rows}</table>"


def render_report(run_dir: Path) -> str:
    """The HTML text of the report of ``run_dir`` (see :func:`write_report`)."""
    run_dir = Path(run_dir)
    _require(run_dir)
    job = load_job(run_dir / "job.yaml")
    job_text = (run_dir / "job.yaml").read_text(encoding="utf-8")
    records = read_metrics(run_dir / "metrics.jsonl")
    run = _read_json(run_dir / "run.json")
    best = _read_json(run_dir / "model_best.json")
    monitor = job.task.monitor
    job_hash = str(run.get("job_hash")) if run and run.get("job_hash") else job.job_hash()

    curves_img = learning_curves_figure(records, monitor)
    loss_img = training_loss_figure(records)
    no_data = '<p class="note">No data recorded.</p>'
    body = [
        _header(job.name, job_hash, run),
        _sites_section(_read_json(run_dir / "sites.json"), job.task.kind == "segmentation"),
        comparison_section(records, monitor, best, job.held_out),
        _predictions_section(run_dir),
        reconstructions_section(run_dir),
        f"<h2>Learning curves: test {escape(monitor)}</h2>", curves_img or no_data,
        _many_sites_note(records),
        "<h2>Training loss (federated)</h2>", loss_img or no_data,
        _pretrain_section(job, records),
        _charts_section(job, records, run_dir),
        _update_path_section(job, records),
        contribution_section(read_contribution(run_dir), _png),
        _audit_section(run_dir),
        "<h2>Job</h2>", f"<pre>{escape(job_text)}</pre>",
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>medfed: {escape(job.name)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def write_report(run_dir: Path, mode: int = 0o666) -> Path:
    """Build ``run_dir/report.html``, a single self-contained file, and return its path.

    Raises RunDirError if the run folder, its ``job.yaml`` or its ``metrics.jsonl`` is
    missing or a file in it is malformed; ConfigError if ``job.yaml`` is invalid.
    The file is written atomically (core/files.py), so a reader never sees half a report;
    ``mode`` as there (a deployment's report, which shows the audit, is private).
    """
    run_dir = Path(run_dir)
    html_text = render_report(run_dir)
    path = run_dir / REPORT_NAME
    atomic_write_text(path, html_text, mode=mode)
    return path
