"""The one transport interface. In-process, process-pool, Ray and gRPC implement it.

A transport sends each request to its site and returns one answer per request, in the
order of the requests, so that everything above it is deterministic. A site that raises
or does not answer within ``timeout`` seconds yields a :class:`SiteFailure` carrying the
site name and the cause; it never raises for one site's failure.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from medfed.core.types import EvalRequest, EvalResult, FitRequest, Message, SiteFailure, Update

# Reserved name of the pseudo-site that holds all sites' training data pooled (the
# centralized baseline). Site names cannot contain '*', so it never clashes.
CENTRALIZED_SITE = "*pooled*"


class Transport(ABC):
    @abstractmethod
    def fit(self, requests: Sequence[FitRequest], timeout: float) -> list[Update | SiteFailure]:
        """Run local training at each requested site."""

    @abstractmethod
    def evaluate(
        self, requests: Sequence[EvalRequest], timeout: float
    ) -> list[list[EvalResult] | SiteFailure]:
        """Evaluate the given parameters on the requested splits of each site."""

    def exchange(self, messages: Sequence[Message], timeout: float) -> list[dict | SiteFailure]:
        """Deliver protocol messages of the update path (JSON-able bodies) and return each
        site's reply. Transports that cannot carry them refuse."""
        raise NotImplementedError(f"{type(self).__name__} cannot carry update-path messages")

    def close(self) -> None:
        """Release workers or connections. Idempotent."""

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_ELSEWHERE = {
    "pool": "runs each site in a worker process of its own",
    "ray": "runs each site in a Ray actor, a process of its own, perhaps on another machine",
}


def separate_sites_refusal(transport: str) -> str:
    """Why datasets or a model factory held in this Python session cannot go with a
    transport whose sites run elsewhere: they would have to be pickled, code and all."""
    where = _ELSEWHERE.get(transport, "runs each site outside this process")
    return (
        f"transport: {transport} {where}, which cannot receive datasets or a model factory held in this Python "
        "session (they would have to be pickled, code and all); use transport: inprocess with medfed.run's "
        "datasets= or model="
    )


def describe_exception(e: BaseException) -> str:
    """A one-line cause for the server log: the error type and message."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
