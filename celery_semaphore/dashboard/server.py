"""Serve the dashboard: :func:`serve` for ``celery semaphore dashboard``, :func:`make_server`
for running it in a thread (tests, or an app that embeds it).

The standard library's threading HTTP server is enough here: one page, a few JSON routes and
one event stream per open page, all read from memory; it adds nothing to install beside the
workers.
"""

from __future__ import annotations

import ipaddress
import socket
from http.server import ThreadingHTTPServer

from celery import Celery
from celery.utils.log import get_logger

from .board import Board
from .handler import Handler
from .picture import Pictures

__all__ = ["DashboardServer", "make_server", "serve", "token_of"]

logger = get_logger(__name__)

#: The setting that turns actions on when no token is passed.
TOKEN_SETTING = "semaphore_dashboard_token"


def token_of(app: Celery, token: str | None) -> str | None:
    """The token in force: the one passed, else ``semaphore_dashboard_token``, else none."""
    value = token if token is not None else app.conf.get(TOKEN_SETTING)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{TOKEN_SETTING} must be a non-empty string (unset: actions off)")
    return value


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DashboardServer(ThreadingHTTPServer):
    """The dashboard's HTTP server, its snapshot (:attr:`board`) and its token."""

    daemon_threads = True  # an open event stream does not keep the process alive

    def __init__(self, app: Celery, host: str, port: int, token: str | None) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.app = app
        self.token = token_of(app, token)
        self.board = Board(app)
        self.pictures = Pictures()
        super().__init__((host, port), Handler)
        self.board.start()

    @property
    def url(self) -> str:
        """The address to open in a browser."""
        host, port = str(self.server_address[0]), int(self.server_address[1])
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    def shutdown(self) -> None:
        """Stop serving (from another thread than :meth:`serve_forever`'s) and reading Redis,
        and close the socket."""
        self.board.stop()
        super().shutdown()
        self.server_close()


def make_server(
    app: Celery, host: str = "127.0.0.1", port: int = 5566, token: str | None = None
) -> DashboardServer:
    """Bind the dashboard of ``app``'s gates and start reading them; serve with
    ``serve_forever()`` (in a thread of its own, if need be), stop with ``shutdown()``.

    Args:
        app: the Celery app whose gates are shown.
        host: the address to bind (loopback by default; anything else warns without a token).
        port: the port (0: any free one; see ``.url``).
        token: turns the actions on, each POST carrying it; by default
            ``semaphore_dashboard_token``; without one the dashboard only reads.
    """
    server = DashboardServer(app, host, port, token)
    if server.token is None and not _loopback(host):
        logger.warning(
            "celery_semaphore dashboard: bound to %s without a token: whoever reaches it sees "
            "every gate, task id and key (the actions stay off)",
            host,
        )
    elif server.token is not None and not _loopback(host):
        logger.warning(
            "celery_semaphore dashboard: bound to %s: the token crosses the network in clear "
            "text unless a TLS proxy stands in front",
            host,
        )
    return server


def serve(app: Celery, host: str = "127.0.0.1", port: int = 5566, token: str | None = None) -> None:
    """Serve the dashboard of ``app``'s gates until interrupted (Ctrl-C).

    Args:
        app: the Celery app whose gates are shown.
        host: the address to bind (loopback by default).
        port: the port.
        token: turns the actions on (see :func:`make_server`).

    Examples:
        >>> serve(app, port=5566, token=os.environ["DASHBOARD_TOKEN"])  # doctest: +SKIP
    """
    server = make_server(app, host, port, token)
    actions = "actions on (token required)" if server.token else "read-only (no token)"
    print(
        f"celery_semaphore dashboard at {server.url} for the gates in {server.board.runtime.url}, "
        f"{actions}; Ctrl-C to stop",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.board.stop()
        server.server_close()
