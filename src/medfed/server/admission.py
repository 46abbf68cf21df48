"""Who takes part in a deployed run: the sites that had joined a run being resumed, the
image shape most sites report (a site with another is left out, with the reason), what to
do about a site that built another model, and why sites are missing when the quorum fails."""

from __future__ import annotations

from collections import Counter
from typing import Any

from medfed.config import Job
from medfed.config.model import model_kind
from medfed.core.summary import SiteSummary
from medfed.server.store import RunStore


def site_rows(job: Job, summaries: dict[str, SiteSummary]) -> list[SiteSummary]:
    return [summaries[s] for s in job.site_names if s in summaries]


def members(store: RunStore, job: Job) -> list[str]:
    """The sites of ``job`` that had joined the run in ``store`` (its participants), in the
    job's order; none unless they are enough for the quorum (then every site is awaited)."""
    seen = {p["name"] for p in store.participants()}
    members = [s for s in job.site_names if s in seen]
    return members if sum(s in members for s in job.training_sites) >= job.quorum else []


def common_shape(job: Job, summaries: dict[str, Any]) -> tuple[tuple[int, ...], dict[str, str]]:
    """The image shape (C, *spatial) most of the ready sites report (a tie goes to the
    site first in the job), and for each site with another shape why it is left out."""
    shapes = {s: tuple(summaries[s].shape) for s in job.site_names if s in summaries}
    counts = Counter(shapes.values())
    top = max(counts.values())
    common = next(sh for sh in shapes.values() if counts[sh] == top)
    odd = {s: (f"its images are {list(sh)} (C, *spatial), the other sites' {list(common)}; every site must "
               "preprocess to one shape (transforms.preprocess)")
           for s, sh in shapes.items() if sh != common}
    return common, odd


def model_hint(job: Job) -> str:
    """What to do about a site that built another model than the server: the code that
    builds the job's ``model`` differs between them."""
    kind, label = model_kind(job.model), job.model.label
    if kind == "import":
        return (f"the site runs another version of '{label}' (or of a package it uses): install the same code at "
                "every site and the server")
    if kind == "bundle":
        return f"the site holds another version of {label}: give every site and the server the same bundle"
    if kind == "monai":
        return (f"the site runs another MONAI version ({label}): install the same versions of medfed and MONAI at "
                "every site and the server")
    return (f"the site runs another medfed or MONAI version (model '{label}'): install the same versions at "
            "every site and the server")


def absences(declined: dict[str, str], left_out: dict[str, str]) -> str:
    """Why sites are not there, for the quorum error: those that declined the job, those left out."""
    said = [f"site '{s}' cannot take part in the job: {why}" for s, why in declined.items()]
    said += [f"site '{s}' is left out: {why}" for s, why in left_out.items()]
    return "".join(f"; {x}" for x in said)
