"""The dashboard's web server: the standard library's threading HTTP server, two routes.

* ``GET /?token=T``: the page (:mod:`medfed.dashboard.page`: one HTML document with its
  script, styles and the charting library inlined; nothing is fetched from elsewhere).
* ``GET /api/state?since=V`` with the token in the ``X-Medfed-Token`` header (or the
  ``token`` query parameter): the run's snapshot (:mod:`medfed.dashboard.snapshot`) as
  JSON, or ``{"unchanged": true, "version", "server_time"}`` when its version is still
  ``V``. The page polls it every 2 s (10 s once the run is complete): polling needs no
  connection held open per viewer and passes any proxy or SSH tunnel.

Every request needs the token (``secrets.token_urlsafe``, compared in constant time); a
missing or wrong one is answered 403 and logged with the client's address. Requests are
bounded: a socket timeout, at most ``MAX_CLIENTS`` handled at once (503 beyond), no
request body read. Responses are never cached and carry a content security policy that
allows only the page's own inline script and style and requests to this server.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from medfed.core.errors import NetworkError
from medfed.core.text import printable
from medfed.dashboard.page import render_page
from medfed.dashboard.snapshot import RunView
from medfed.dashboard.source import check_run_folder

log = logging.getLogger("medfed.dashboard")

DEFAULT_PORT = 8765
REQUEST_TIMEOUT = 10.0  # seconds a client may take to send its request
MAX_CLIENTS = 32  # requests handled at once
TOKEN_HEADER = "X-Medfed-Token"


class DashboardServer(ThreadingHTTPServer):
    """Serves one run's dashboard. ``token`` guards every route; ``view`` reads the run."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 16

    def __init__(self, address: tuple[str, int], view: RunView, token: str):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.view, self.token = view, token
        self.slots = threading.BoundedSemaphore(MAX_CLIENTS)
        super().__init__(address, _Handler)

    def handle_error(self, request: object, client_address: tuple) -> None:
        """A connection that broke (the client went away, a timeout): one debug line, no traceback."""
        log.debug("dashboard: connection from %s ended with an error", client_address[0], exc_info=True)

    @property
    def url(self) -> str:
        """The page's address with its token; a wildcard host is shown as this machine's name."""
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/?token={self.token}"


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    timeout = REQUEST_TIMEOUT
    protocol_version = "HTTP/1.1"
    server_version = "medfed-dashboard"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if not self.server.slots.acquire(blocking=False):
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"busy: too many requests at once\n", "text/plain")
            return
        try:
            self._route()
        except Exception:  # a bug or an unreadable run: this request fails, the server goes on
            log.exception("dashboard: GET %s failed", printable(urlsplit(self.path).path, 200))
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"500: the dashboard failed; see its terminal\n",
                       "text/plain")
        finally:
            self.server.slots.release()

    def do_HEAD(self) -> None:  # noqa: N802
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"", "text/plain", allow="GET")

    def _route(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        given = self.headers.get(TOKEN_HEADER) or (query.get("token") or [""])[0]
        if not hmac.compare_digest(given.encode("utf-8", "replace"), self.server.token.encode()):
            log.warning("dashboard: refused GET %s from %s: %s", printable(url.path, 200), self.client_address[0],
                        "wrong token" if given else "no token")
            self._send(HTTPStatus.FORBIDDEN, b"403 forbidden: this dashboard needs the token of the address that "
                       b"`medfed dashboard` printed\n", "text/plain")
            return
        if url.path == "/":
            nonce = secrets.token_urlsafe(16)
            self._send(HTTPStatus.OK, render_page(nonce).encode(), "text/html", nonce=nonce)
        elif url.path == "/api/state":
            version, body = self.server.view.current()
            if (query.get("since") or [""])[0] == version:
                body = json.dumps({"unchanged": True, "version": version, "server_time": time.time()}).encode()
            self._send(HTTPStatus.OK, body, "application/json")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"404 not found\n", "text/plain")

    def _send(self, status: HTTPStatus, body: bytes, kind: str, nonce: str | None = None,
              allow: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", f"{kind}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        script = f"'nonce-{nonce}'" if nonce else "'none'"
        self.send_header("Content-Security-Policy",
                         f"default-src 'none'; script-src {script}; style-src {script}; connect-src 'self'; "
                         "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        if allow:
            self.send_header("Allow", allow)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
        log.debug("dashboard: %s %s", self.client_address[0], format % args)


def start(run_dir: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          token: str | None = None) -> DashboardServer:
    """A dashboard server for the run at ``run_dir``, bound and ready (call
    ``serve_forever``, or run it in a thread). RunDirError if ``run_dir`` is not a run,
    NetworkError if the address cannot be bound."""
    view = RunView(check_run_folder(run_dir))
    try:
        return DashboardServer((host, port), view, token or secrets.token_urlsafe(24))
    except OSError as e:
        hint = "; choose another with --port, or --port 0 for any free port" if port else ""
        raise NetworkError(f"the dashboard cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(server: DashboardServer) -> str:
    """What binding to a non-loopback address means, for the operator."""
    port = server.server_address[1]
    return (f"the dashboard listens on {server.server_address[0]}: anyone who can reach this machine and has the "
            "address below (its token) sees the run (site names and addresses, the audit, the log), over plain "
            "HTTP, not encrypted. To watch from another machine, prefer the default 127.0.0.1 and an SSH tunnel: "
            f"ssh -L {port}:127.0.0.1:{port} THIS_MACHINE")
