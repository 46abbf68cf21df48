"""What the sites are doing and how far the run is, from its events.

The events come from ``run.log`` in a simulation (the round loop's "round N/M started",
"done", "site 'x' left out: cause") and from ``state.sqlite`` in a deployment (the
participants that joined, the rounds started and completed, one audit row per exchange
with a site), see :func:`store_events`. Both feed the same state machine
(:func:`site_states`); times are seconds since the Unix epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from medfed.dashboard.readers import Event

# a site's state, as the page shows it
WAITING, JOINED, READY, TRAINING, ANSWERED, FAILED, DECLINED, LEFT_OUT = (
    "waiting", "joined", "ready", "training", "answered", "failed", "declined", "left out")
TASK_KINDS = ("fit", "evaluate", "exchange")
MAX_TIMING_ROWS = 500  # rounds whose timing is sent to the page (the latest)


def store_events(store: dict[str, Any]) -> list[Event]:
    """The events of a deployment's run state (:func:`~medfed.dashboard.readers.read_store`)."""
    events = [Event(p["first_seen"], "joined", sites=(p["name"],)) for p in store["participants"]]
    for r in store["rounds"]:
        if r["started"] is not None:
            events.append(Event(r["started"], "round_started", r["arm"], r["round"], sites=tuple(r["sites"])))
        if r["completed"] is not None:
            events.append(Event(r["completed"], "round_done", r["arm"], r["round"]))
    for a in store["audit"]:
        status, reason = a["status"], a["reason"] or ""
        if status == "redone":
            continue
        if a["kind"] == "call" and status == "failed" and reason.startswith("cannot take part in the job: "):
            events.append(Event(a["when"], "declined", sites=(a["site"],),
                                cause=reason.removeprefix("cannot take part in the job: ")))
        elif a["kind"] == "call" and reason.startswith("left out of the run: "):
            events.append(Event(a["when"], "left_out", sites=(a["site"],),
                                cause=reason.removeprefix("left out of the run: ")))
        elif status == "accepted":
            events.append(Event(a["when"], "answered", a["arm"], a["round"], sites=(a["site"],)))
        else:
            what = a["kind"] if a["kind"] in TASK_KINDS else "call"
            events.append(Event(a["when"], "failed", a["arm"], a["round"], sites=(a["site"],),
                                cause=f"{what} {status}" + (f": {reason}" if reason else ""),
                                seen=status != "timeout"))
    return events


def site_states(names: Sequence[str], held_out: Iterable[str], events: Iterable[Event], *,
                present: Iterable[str] = (), infer_answers: bool = False,
                last_seen: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per site: ``{name, state, cause, arm, round, last_seen, held_out}``.

    ``names`` in order, then any other site the events name; ``present`` sites start
    ``ready`` (a simulation builds them all before round 1), the others ``waiting``.
    ``infer_answers``: a round done means its sites still training answered (a simulation
    logs failures only); a deployment records every answer. ``last_seen`` seeds the time
    each site was last heard from (a deployment's participants table)."""
    held = set(held_out)
    present = set(present)
    rows: dict[str, dict[str, Any]] = {}

    def row(name: str) -> dict[str, Any]:
        if name not in rows:
            rows[name] = {"name": name, "state": READY if name in present else WAITING, "cause": None, "arm": None,
                          "round": None, "last_seen": (last_seen or {}).get(name), "held_out": name in held}
        return rows[name]

    for name in names:
        row(name)
    rounds: dict[tuple[str | None, int | None], list[str]] = {}
    for e in sorted(events, key=lambda e: e.when):
        if e.kind == "round_started":
            rounds[(e.arm, e.round)] = list(e.sites)
            for s in e.sites:
                row(s).update(state=TRAINING, cause=None, arm=e.arm, round=e.round)
        elif e.kind == "round_done" and infer_answers:
            for s in rounds.get((e.arm, e.round), []):
                r = row(s)
                if r["state"] == TRAINING and (r["arm"], r["round"]) == (e.arm, e.round):
                    r.update(state=ANSWERED, last_seen=max(r["last_seen"] or 0, e.when))
        elif e.kind in ("joined", "ready", "answered", "failed", "declined", "left_out"):
            state = {"joined": JOINED, "ready": READY, "answered": ANSWERED, "failed": FAILED,
                     "declined": DECLINED, "left_out": LEFT_OUT}[e.kind]
            for s in e.sites:
                r = row(s)
                r.update(state=state, cause=e.cause)
                if e.arm is not None:
                    r.update(arm=e.arm, round=e.round)
                if e.seen:
                    r["last_seen"] = max(r["last_seen"] or 0, e.when)
    return list(rows.values())


def round_progress(events: Iterable[Event], records: Sequence[dict], total: int | None) -> dict[str, Any]:
    """How far the run is: the federated arm's current round (the latest started, or
    recorded), the rounds done, each round's start, end and duration, and per arm the
    latest round recorded. ``total``: the job's rounds."""
    started: dict[tuple[str, int], float] = {}
    done: dict[tuple[str, int], float] = {}
    stop = None
    for e in events:
        if e.kind == "round_started" and e.arm and e.round:
            started[(e.arm, e.round)] = e.when
        elif e.kind == "round_done" and e.arm and e.round:
            done[(e.arm, e.round)] = e.when
        elif e.kind == "budget_stop":
            stop = e.cause
    recorded: dict[str, int] = {}
    for r in records:
        recorded[r["arm"]] = max(recorded.get(r["arm"], 0), r["round"])
    fed = "federated"
    current = max([k[1] for k in started if k[0] == fed] + [recorded.get(fed, 0)])
    finished = max([k[1] for k in done if k[0] == fed] + [recorded.get(fed, 0)])
    timing = []
    for (arm, rnd) in sorted(set(started) | set(done), key=lambda k: (k[0] != fed, k[0], k[1])):
        if arm != fed:
            continue
        t0, t1 = started.get((arm, rnd)), done.get((arm, rnd))
        timing.append({"round": rnd, "started": t0, "done": t1,
                       "seconds": t1 - t0 if t0 is not None and t1 is not None else None})
    arms = sorted(set(recorded) | {a for a, _ in started})
    return {
        "arm": fed, "round": current, "done": finished, "total": total,
        "in_round": (fed, current) in started and (fed, current) not in done,
        "timing": timing[-MAX_TIMING_ROWS:],
        "arms": [{"arm": a, "round": max([recorded.get(a, 0)] + [r for x, r in started if x == a])} for a in arms],
        "first_event": min([*started.values(), *done.values()], default=None),
        "stopped_early": stop,
    }
