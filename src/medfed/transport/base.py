"""The one transport interface. In-process, process-pool (and later gRPC) implement it.

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


def describe_exception(e: BaseException) -> str:
    """A one-line cause for the server log: the error type and message."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
