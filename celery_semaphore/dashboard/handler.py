"""The dashboard's HTTP routes: one page, its assets, JSON read from the shared snapshot, a
stream of server-sent events, and the actions (POST only, each checking the token).

    GET  /                     the page (static/index.html)
    GET  /static/<file>        its script, style and icon
    GET  /api/config           what the page needs to know: actions on or off, graphviz, Redis
    GET  /api/gates            a page of gates: sort, order, filter, offset, count
    GET  /api/gate             one gate's details: name, parked (offset of the parked page)
    GET  /api/events           the two above, pushed after every read pass (text/event-stream)
    GET  /api/explain          explain(task_id)
    GET  /api/graph.svg        the gate's picture (Graphviz), for an <img>
    POST /api/action/<verb>    check, resize, pause, resume, cancel, purge (X-Semaphore-Token)
"""

from __future__ import annotations

import hmac
import json
import shutil
from http.server import BaseHTTPRequestHandler
from importlib import resources
from typing import Any, Protocol, cast
from urllib.parse import parse_qsl, urlsplit

import redis
from celery import Celery
from celery.utils.log import get_logger

from .. import __version__
from ..errors import ConfigurationError, SemaphoreError
from ..explain import UnknownCall, explain
from ..graph import GraphvizMissing
from .actions import Refused, perform
from .board import Board
from .picture import Pictures
from .view import View

__all__ = ["TOKEN_HEADER", "Handler", "Host"]

logger = get_logger(__name__)

ACTIONS = "/api/action/"
#: The header an action carries the token in (a custom header: a cross-site form cannot set it).
TOKEN_HEADER = "X-Semaphore-Token"
#: Seconds between two keepalive comments of an idle event stream.
KEEPALIVE_S = 15.0
STATIC = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
#: Nothing but this origin's own files: even a string that slipped past the page's escaping
#: could not run as a script.
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
NO_ACTIONS = (
    "actions are off: the dashboard was started without a token "
    "(start it with --token, or set semaphore_dashboard_token)"
)


class Host(Protocol):
    """What the handler needs of its server."""

    app: Celery
    board: Board
    token: str | None
    pictures: Pictures


class Handler(BaseHTTPRequestHandler):
    """One request (the server runs each in its own thread)."""

    server_version = f"celery-semaphore-dashboard/{__version__}"

    @property
    def host(self) -> Host:
        """The server, with the board and the token."""
        return cast(Host, self.server)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("dashboard: %s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, kind: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", POLICY)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, doc: Any, **headers: str) -> None:
        body = json.dumps(doc, separators=(",", ":")).encode()
        self._send(status, body, "application/json", **headers)

    def _error(self, status: int, message: str, **headers: str) -> None:
        self._json(status, {"ok": False, "error": message}, **headers)

    def do_GET(self) -> None:
        """Serve the page, its assets and the JSON it reads."""
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        board = self.host.board
        route = url.path
        if route == "/" or route.startswith("/static/"):
            self._static("index.html" if route == "/" else route[len("/static/") :])
        elif route == "/api/config":
            self._json(200, self._config())
        elif route == "/api/gates":
            self._json(200, View.from_query(query).gates(board.snapshot))
        elif route == "/api/gate":
            self._gate(View.from_query({**query, "gate": query.get("name", "")}))
        elif route == "/api/events":
            self._events(View.from_query(query))
        elif route == "/api/explain":
            self._explain(query.get("task_id", "").strip())
        elif route == "/api/graph.svg":
            self._graph(query.get("gate", ""))
        elif route.startswith(ACTIONS):
            self._error(405, "actions are POST requests", Allow="POST")
        else:
            self._error(404, f"no such page: {route}")

    def do_POST(self) -> None:
        """Run an action, once the token is checked."""
        route = urlsplit(self.path).path
        if not route.startswith(ACTIONS):
            self._error(405, "only actions are POST requests", Allow="GET")
            return
        token = self.host.token
        if token is None:
            self._error(403, NO_ACTIONS)
            return
        given = self.headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            self._error(403, f"the token is wrong or missing (send it in {TOKEN_HEADER})")
            return
        try:
            size = int(self.headers.get("Content-Length") or 0)
            if self.headers.get_content_type() != "application/json" or not 0 <= size <= 65536:
                raise ValueError(size)
            body = json.loads(self.rfile.read(size) or b"{}")
            if not isinstance(body, dict):
                raise ValueError(body)
        except ValueError:
            self._error(400, "the body must be a JSON object (application/json) of 64 KiB at most")
            return
        board = self.host.board
        try:
            done = perform(board.runtime, board.snapshot.groups, route[len(ACTIONS) :], body)
        except Refused as exc:
            self._error(exc.status, exc.message)
        except ConfigurationError as exc:
            self._error(400, str(exc))
        except SemaphoreError as exc:
            self._error(409, str(exc))
        except (redis.RedisError, OSError) as exc:
            self._error(503, f"Redis at {board.runtime.url} failed: {type(exc).__name__}")
        else:
            self._json(200, {"ok": True, "message": done})

    def _static(self, name: str) -> None:
        if name not in STATIC:
            self._error(404, "no such file")
            return
        body = (resources.files(__package__) / "static" / name).read_bytes()
        self._send(200, body, STATIC[name])

    def _config(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "app": self.host.app.main or "",
            "redis": self.host.board.runtime.url,
            "actions": self.host.token is not None,
            "why_no_actions": None if self.host.token is not None else NO_ACTIONS,
            "graphviz": shutil.which("dot") is not None,
            "interval_s": self.host.board.interval_s,
            "token_header": TOKEN_HEADER,
        }

    def _gate(self, view: View) -> None:
        board = self.host.board
        message = view.message(board, board.snapshot)
        # A gate no page wanted yet is read in the next pass (or the one after, when a pass
        # was under way as it was asked for).
        for _ in range(2):
            if not (message["detail"] and message["detail"].get("loading")):
                break
            board.wait(message["version"], 3 * board.interval_s)
            message = view.message(board, board.snapshot)
        detail = message["detail"]
        if detail is None or detail["missing"]:
            self._error(404, "no such gate")
        else:
            self._json(200, detail)

    def _events(self, view: View) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Accel-Buffering", "no")  # through nginx, unbuffered
        self.end_headers()
        board, seen = self.host.board, 0  # 0: no pass yet, nothing to send
        try:
            self.wfile.write(b"retry: 2000\n\n")
            while not board.stopped:
                snapshot = board.snapshot
                if snapshot.version != seen:
                    seen = snapshot.version
                    data = json.dumps(view.message(board, snapshot), separators=(",", ":"))
                    self.wfile.write(f"data: {data}\n\n".encode())
                else:
                    self.wfile.write(b": idle\n\n")
                self.wfile.flush()
                board.wait(seen, KEEPALIVE_S)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page went away
        self.close_connection = True

    def _explain(self, task_id: str) -> None:
        if not task_id or len(task_id) > 200:
            self._error(400, "type a task id")
            return
        try:
            self._json(200, explain(task_id, self.host.app).as_dict())
        except UnknownCall as exc:
            self._error(404, str(exc))
        except (redis.RedisError, OSError) as exc:
            self._error(503, f"Redis at {self.host.board.runtime.url} failed: {type(exc).__name__}")

    def _graph(self, gate: str) -> None:
        board = self.host.board
        group = board.snapshot.groups.get(gate)
        if group is None:
            self._error(404, "no such gate")
            return
        try:
            svg = self.host.pictures.svg(board.runtime.group(group), gate)
        except GraphvizMissing as exc:
            self._error(404, str(exc))
            return
        # Under the same policy: opened on its own, the picture runs nothing either.
        self._send(200, svg.encode(), "image/svg+xml")
