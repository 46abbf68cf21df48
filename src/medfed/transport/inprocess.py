"""In-process transport: sites are objects in this process, called one after another.

Deterministic and the default for simulation. There is nothing to wait on, so
``timeout`` is not enforced here: a site's call returns when its training ends. A round's
updates past the memory budget are kept on disk (transport/spool.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from medfed.core.errors import MedfedError
from medfed.core.types import EvalRequest, EvalResult, FitRequest, Message, SiteFailure, Update
from medfed.site.app import SiteApp
from medfed.transport.base import Transport, describe_exception
from medfed.transport.spool import Spool


class InProcessTransport(Transport):
    def __init__(self, apps: dict[str, SiteApp]):
        self.apps = apps

    def _app(self, site: str) -> SiteApp:
        if site not in self.apps:
            raise MedfedError(f"unknown site '{site}'")
        return self.apps[site]

    def fit(self, requests: Sequence[FitRequest], timeout: float) -> list[Update | SiteFailure]:
        out: list[Update | SiteFailure] = []
        spool = Spool()
        for req in requests:
            try:
                out.append(spool.update(self._app(req.site).fit(req.params, req.plan)))
            except Exception as e:  # one site's failure must not stop the federation
                out.append(SiteFailure(req.site, describe_exception(e)))
        return out

    def evaluate(
        self, requests: Sequence[EvalRequest], timeout: float
    ) -> list[list[EvalResult] | SiteFailure]:
        out: list[list[EvalResult] | SiteFailure] = []
        for req in requests:
            try:
                out.append(self._app(req.site).evaluate(req.params, req.splits, req.arm))
            except Exception as e:
                out.append(SiteFailure(req.site, describe_exception(e)))
        return out

    def exchange(self, messages: Sequence[Message], timeout: float) -> list[dict | SiteFailure]:
        out: list[dict | SiteFailure] = []
        for m in messages:
            try:
                # a JSON round trip: the site sees exactly what a network would carry
                reply = self._app(m.site).exchange(m.topic, m.round, json.loads(json.dumps(m.body)))
                out.append(json.loads(json.dumps(reply)))
            except Exception as e:
                out.append(SiteFailure(m.site, describe_exception(e)))
        return out
