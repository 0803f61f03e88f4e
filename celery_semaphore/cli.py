"""``celery -A proj semaphore ...``: operate the gates from Celery's own command line.

A thin layer over the admin API (:class:`~celery_semaphore.Semaphore`, :func:`gates`,
:func:`explain`), registered through the ``celery.commands`` entry point::

    celery -A proj semaphore status [--watch [--interval S]] [--json]
    celery -A proj semaphore holders NAME [--json]
    celery -A proj semaphore parked NAME [--offset N] [--count N] [--json]
    celery -A proj semaphore explain TASK_ID [--json]
    celery -A proj semaphore resize NAME N [--key K] [--json]  # --key K with N 0: configured
    celery -A proj semaphore pause NAME [--json]
    celery -A proj semaphore resume NAME [--json]
    celery -A proj semaphore cancel TASK_ID [--terminate] [--json]
    celery -A proj semaphore purge NAME [--yes] [--json]
    celery -A proj semaphore graph [NAME] [--svg]  # NAME may be left out when one gate is known
    celery -A proj semaphore metrics --port N [--host 127.0.0.1]  # the prometheus extra
    celery -A proj semaphore dashboard [--host 127.0.0.1] [--port 5566] [--token T]

Tables go to stdout, coloured only on a terminal (never with ``celery --no-color``).
``status --watch`` redraws in place every ``--interval`` seconds (default 1) until Ctrl-C; on
a pipe it appends one table per refresh, each followed by a blank line. ``purge`` asks on
stderr (``--yes`` does not ask; no answer, as on a closed stdin, declines). ``metrics`` and
``dashboard`` serve until Ctrl-C. Errors go to stderr as ``Error: what happened; what to
do`` (also with ``--json``), with an exit status:

- 0: done; 1: not done (nothing to cancel, Graphviz or an optional extra missing, purge
  declined, a port that cannot be served); 2: bad usage (click's, and a bad limit);
- 3: unknown gate (the message lists the known ones) or unknown task id;
- 69 (``EX_UNAVAILABLE``, as Celery's own commands): the gates' Redis is unreachable (the
  message names its URL, password masked), or the broker is, for an operation that sends.

``--json`` prints one document, indented (``status --watch --json``: one line per refresh).
The shapes below are stable: fields may be added, none is renamed or removed. Durations are
seconds (floats); times are ISO 8601 in UTC.

- ``status``: ``{"gates": [{"gate", "group", "limit" (null: not set yet; -1: per-key limits
  only), "held" (units), "peak", "holders" (calls), "parked", "waiting_time",
  "waiting_requirements", "oldest_parked_s" (null: none parked), "paused",
  "busiest_keys": [[key, units], ...], "counters": {"granted", "dispatched", "released",
  "reclaimed", "parked", "rejected", "expired", "dropped", "cancelled", "replaced"}}]}``;
  ``holders``, ``parked`` and the waiting counts are those of the gate's group.
- ``holders``: ``{"gate", "holders": [{"task_id", "task", "key" ("" when not keyed), "state"
  (DISPATCHED or RUNNING), "worker", "pid" (null when unknown), "held_s", "lease_left_s",
  "fence"}]}``
- ``parked``: ``{"gate", "offset", "count", "parked": [{"position" (1: the next one),
  "task_id", "task", "priority", "key", "age_s", "waits_for" ("gate NAME" or
  "key NAME/KEY")}]}``
- ``explain``: ``{"task_id", "task", "group", "gates": [...], "state" (WAITING, PARKED,
  DISPATCHED, RUNNING, RETRYING, or a final one such as SUCCEEDED, FAILED, CANCELLED),
  "final", "events": [{"at", "state", "event"}], "reason" (in words), "position" (null
  unless parked), "result_state" (Celery's)}``
- ``resize``: ``{"gate", "key" (null: the gate's own limit), "limit", "old_limit" (null for
  a key, or when none was set)}``
- ``pause`` and ``resume``: ``{"gate", "paused"}``
- ``cancel``: ``{"task_id", "gate", "was" (WAITING, PARKED, DISPATCHED or RUNNING),
  "action"}``; action ``cancelled``: it will not run and its result is REVOKED; ``revoked``
  or ``terminated`` (``--terminate``): it runs, and was revoked with Celery
- ``purge``: ``{"gate", "purged"}``: how many parked calls were cancelled (each REVOKED)
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import click
import redis
from celery import Celery
from celery.bin.base import CeleryCommand
from kombu.exceptions import OperationalError

from . import cli_format as fmt
from .admin import known_gates
from .cli_format import EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_UNKNOWN, EXIT_USAGE, CommandError
from .errors import ConfigurationError, RedisUnavailable
from .explain import UnknownCall
from .explain import explain as explain_call
from .extension import install
from .graph import GraphvizMissing, to_svg
from .operations import gates
from .semaphore import Semaphore

__all__ = ["EXIT_FAILED", "EXIT_UNAVAILABLE", "EXIT_UNKNOWN", "EXIT_USAGE", "semaphore"]


class Session:
    """One command's app, and how it prints."""

    def __init__(self, ctx: click.Context) -> None:
        self.app: Celery = ctx.obj.app
        self.colour = fmt.wants_colour(sys.stdout, bool(getattr(ctx.obj, "no_color", False)))

    @property
    def url(self) -> str:
        return install(self.app).url

    def known(self) -> dict[str, str]:
        return known_gates(install(self.app))

    def gate(self, name: str) -> Semaphore:
        """The gate ``name``, refused with the list of known gates when nothing knows it."""
        known = self.known()
        if name not in known:
            listed = ", ".join(known) or "none (no task is gated and no limit is configured)"
            raise CommandError(f"unknown gate {name!r}; known gates: {listed}", EXIT_UNKNOWN)
        return Semaphore(name, app=self.app)

    def emit(self, as_json: bool, doc: dict[str, Any], text: str, indent: int | None = 2) -> None:
        click.echo(json.dumps(doc, indent=indent) if as_json else text, color=self.colour)


@click.group(name="semaphore")
def semaphore() -> None:
    """Operate the gates of celery_semaphore: look, resize, pause, cancel, purge."""
    fmt.log_to_stderr()


def command(fn: Callable[..., None]) -> click.Command:
    """A subcommand of ``semaphore`` given a :class:`Session`; Redis and lookup failures end
    it as a :class:`CommandError` with their exit status."""

    @functools.wraps(fn)
    def run(ctx: click.Context, **params: Any) -> None:
        session = Session(ctx)
        try:
            fn(session, **params)
        except (RedisUnavailable, redis.ConnectionError, redis.TimeoutError) as exc:
            raise CommandError(
                f"cannot reach the semaphore Redis at {session.url} "
                f"({getattr(exc, 'cause', None) or exc}); check that the server runs and that "
                "semaphore_redis_url names it",
                EXIT_UNAVAILABLE,
            ) from exc
        except UnknownCall as exc:
            raise CommandError(f"{exc}; check the task id", EXIT_UNKNOWN) from exc
        except ConfigurationError as exc:
            raise CommandError(str(exc), EXIT_USAGE) from exc
        except redis.RedisError as exc:
            raise CommandError(f"the semaphore Redis at {session.url} answered: {exc}") from exc
        except OperationalError as exc:  # kombu's: publishing what was handed room, a revoke
            broker = session.app.connection_for_write().as_uri()  # without its password
            raise CommandError(
                f"cannot reach the broker at {broker} ({exc}); check that it runs. A change "
                "made in Redis stands: the tick sends the calls it handed room later",
                EXIT_UNAVAILABLE,
            ) from exc

    return semaphore.command(cls=CeleryCommand)(click.pass_context(run))


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (a stable shape).")
name_arg = click.argument("name")


@command
@click.option("--watch", is_flag=True, help="Redraw every --interval seconds until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True)
@json_option
def status(s: Session, watch: bool, interval: float, as_json: bool) -> None:
    """Every gate: held, parked, waiting, paused.

    One row per gate: units held of the limit, calls parked and waiting (for a start time or
    requirements), the oldest parked call's age, paused or not, and its counters."""
    tty = sys.stdout.isatty()
    try:
        while True:
            found = gates(s.app)
            text = fmt.status_text(found, s.colour, s.url)
            text = fmt.watch_frame(text, interval, tty) if watch else text
            s.emit(as_json, {"gates": [g.as_dict() for g in found]}, text, None if watch else 2)
            if not watch:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return


@command
@name_arg
@json_option
def holders(s: Session, name: str, as_json: bool) -> None:
    """The calls holding gate NAME.

    Task id and name, key, state, worker and pid, held for, lease left, fence."""
    found = s.gate(name).holders()
    doc = {"gate": name, "holders": fmt.jsonable(found)}
    s.emit(as_json, doc, fmt.holders_text(name, found, s.colour))


@command
@name_arg
@click.option("--offset", type=click.IntRange(min=0), default=0, help="Calls to skip.")
@click.option("--count", type=click.IntRange(1, 1000), default=50, show_default=True)
@json_option
def parked(s: Session, name: str, offset: int, count: int, as_json: bool) -> None:
    """The calls waiting for gate NAME, in order.

    A page of the parked calls, in the order they will be handed room."""
    found = s.gate(name).parked(offset, count)
    doc = {"gate": name, "offset": offset, "count": count, "parked": fmt.jsonable(found)}
    s.emit(as_json, doc, fmt.parked_text(name, found, s.colour, offset, count))


@command
@click.argument("task_id")
@json_option
def explain(s: Session, task_id: str, as_json: bool) -> None:
    """Why call TASK_ID is not running.

    Its state and history, its gate, its place in line and what it waits for (a full or
    paused gate, its start time, a requirement, a full key), or how and when it ended."""
    story = explain_call(task_id, s.app)
    s.emit(as_json, story.as_dict(), str(story))


@command
@name_arg
@click.argument("limit", metavar="N", type=click.IntRange(min=0))
@click.option("--key", help="Resize this key of a keyed gate (N 0: back to its configured limit).")
@json_option
def resize(s: Session, name: str, limit: int, key: str | None, as_json: bool) -> None:
    """Set the limit of gate NAME to N, live.

    Raising it hands the new room to parked calls at once; lowering it stops new grants until
    fewer hold the gate (nothing running is stopped)."""
    old = s.gate(name).resize(limit, key=key)
    doc = {"gate": name, "key": key, "limit": limit, "old_limit": old}
    s.emit(as_json, doc, fmt.resize_text(name, limit, key, old))


@command
@name_arg
@json_option
def pause(s: Session, name: str, as_json: bool) -> None:
    """Stop handing out room of gate NAME.

    Parked calls stay parked and new calls park too, until `resume NAME`."""
    s.gate(name).pause()
    text = f"gate {name} paused: calls park until `resume {name}`"
    s.emit(as_json, {"gate": name, "paused": True}, text)


@command
@name_arg
@json_option
def resume(s: Session, name: str, as_json: bool) -> None:
    """Hand out room of gate NAME again, at once."""
    s.gate(name).resume()
    s.emit(as_json, {"gate": name, "paused": False}, f"gate {name} resumed")


@command
@click.argument("task_id")
@click.option("--terminate", is_flag=True, help="Kill it if it runs (Celery's revoke).")
@json_option
def cancel(s: Session, task_id: str, terminate: bool, as_json: bool) -> None:
    """Cancel call TASK_ID.

    A call that waits never runs and ends REVOKED (its dependents are cancelled too); a call
    that runs is revoked with Celery (killed only with --terminate) and gives its room back
    at its end."""
    story = explain_call(task_id, s.app)
    gate = next(iter(story.gates), None) or next(
        (g for g, group in s.known().items() if group == story.group), story.group
    )
    was = "" if story.final else Semaphore(gate, app=s.app).cancel(task_id, terminate=terminate)
    if not was:
        raise CommandError(f"call {task_id} already ended ({story.state}): nothing to cancel")
    action = ("terminated" if terminate else "revoked") if was == "running" else "cancelled"
    was = fmt.PUBLIC_STATE.get(was, was.upper())
    doc = {"task_id": task_id, "gate": gate, "was": was, "action": action}
    s.emit(as_json, doc, fmt.cancel_text(task_id, gate, was, action))


@command
@name_arg
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
def purge(s: Session, name: str, yes: bool, as_json: bool) -> None:
    """Cancel every parked call of gate NAME.

    None of them runs; each ends REVOKED. Asks first, unless --yes."""
    gate = s.gate(name)
    if not yes:
        question = f"Cancel every parked call of gate {name} ({gate.status().parked} parked now)?"
        click.confirm(question, abort=True, err=True)
    n = gate.purge()
    s.emit(as_json, {"gate": name, "purged": n}, f"purged {n} parked calls of gate {name}")


@command
@click.argument("name", required=False)
@click.option("--svg", is_flag=True, help="Render SVG with Graphviz's dot.")
def graph(s: Session, name: str | None, svg: bool) -> None:
    """Gate NAME as Graphviz DOT (or SVG).

    Its holders, its next parked calls and their requirements. NAME may be left out when
    only one gate is known."""
    if name is None:
        known = list(s.known())
        if len(known) != 1:
            raise CommandError(
                f"name a gate; known gates: {', '.join(known) or 'none'}", EXIT_USAGE
            )
        name = known[0]
    dot = s.gate(name).to_dot()
    try:
        click.echo(to_svg(dot) if svg else dot, nl=False)
    except GraphvizMissing as exc:
        raise CommandError(f"{exc}; without --svg the DOT text is printed") from exc


def _serve(what: str, url: str, serve: Callable[[], object]) -> None:
    try:
        serve()  # returns at Ctrl-C
    except KeyboardInterrupt:
        return
    except OSError as exc:
        raise CommandError(f"cannot serve {what} on {url}: {exc}") from exc


@command
@click.option("--port", type=click.IntRange(0, 65535), required=True, help="Port to listen on.")
@click.option("--host", default="127.0.0.1", show_default=True)
def metrics(s: Session, port: int, host: str) -> None:
    """Serve Prometheus metrics until stopped.

    Needs the prometheus extra: pip install 'celery-semaphore[prometheus]'."""
    try:
        from .prometheus import serve
    except ImportError as exc:
        raise CommandError(
            f"the metrics server needs prometheus_client: pip install "
            f"'celery-semaphore[prometheus]' ({exc})"
        ) from exc
    url = f"http://{host}:{port}/metrics"
    click.echo(f"serving Prometheus metrics on {url}; Ctrl-C stops", err=True)
    _serve("Prometheus metrics", url, lambda: serve(s.app, host, port))


@command
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=5566, show_default=True)
@click.option("--token", help="Turn the actions on, for requests that carry this token.")
def dashboard(s: Session, host: str, port: int, token: str | None) -> None:
    """Serve the gates' web dashboard until stopped.

    Read-only unless a token is given (--token, else the semaphore_dashboard_token setting)."""
    try:  # by name: the dashboard is optional, and mypy must not need it
        serve = importlib.import_module("celery_semaphore.dashboard").serve
    except (ImportError, AttributeError) as exc:
        raise CommandError(f"the dashboard is not available in this install ({exc})") from exc
    url = f"http://{host}:{port}/"  # the dashboard says where it serves, and warns off loopback
    _serve("the dashboard", url, lambda: serve(s.app, host=host, port=port, token=token))
