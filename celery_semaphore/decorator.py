"""``@gated``: a Celery task whose calls hold capacity of one or more gates while they run."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

from celery import Task, _state
from celery._state import connect_on_app_finalize, get_current_app
from celery.local import Proxy

from .config import check_lease, check_limit, check_name, check_priority
from .errors import ConfigurationError
from .extension import install, install_if_gated
from .guard import GUARD_ATTR, guard
from .requires import send_waiting
from .spec import SPEC_ATTR, GateSpec, check_overflow, check_weight, specs_of

__all__ = ["gated"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_OPTIONS = (
    "limit", "lease", "priority", "key", "key_limit", "key_limits", "weight", "group",
    "max_pending", "on_full", "wait_timeout", "track",
)  # fmt: skip


@overload
def gated(name: F, /) -> F: ...


@overload
def gated(
    name: str | None = None,
    /,
    *,
    limit: int | None = None,
    lease: float | None = None,
    priority: int | None = None,
    key: Callable[..., str] | None = None,
    key_limit: int | Callable[[str], int] | None = None,
    key_limits: Mapping[str, int] | None = None,
    weight: int | Callable[..., int] = 1,
    group: str | None = None,
    max_pending: int | None = None,
    on_full: str | None = None,
    wait_timeout: float | None = None,
    track: bool = False,
) -> Callable[[T], T]: ...


def gated(name: Any = None, /, **options: Any) -> Any:
    """Gate a Celery task: a call reaches the broker only once it holds room of its gate.

    Place it above ``@app.task`` / ``@shared_task`` or below it (on the function); stack
    several for several resources (a call then holds all of them, taken in one atomic step).
    Used bare (``@gated``) the gate is named after the task.

    Args:
        name: the gate's name; tasks that name the same gate share its capacity.
        limit: units of capacity; by default ``semaphore_limits[name]``. It seeds the limit
            stored in Redis, which is the one in force (see ``resize``).
        lease: seconds a hold lasts without a keepalive (at least 1); by default
            ``semaphore_lease``.
        priority: the task's default priority, 0-255 (higher leaves the queue first);
            ``apply_async(priority=...)`` overrides it per call.
        key: a function of the call's arguments returning its key (a tenant, a domain).
        key_limit: at most this many units per key: an int, or a function ``key -> int``.
        key_limits: limits of particular keys, over ``key_limit``.
        weight: units a call takes: an int, or a function of the call's arguments.
        group: the group (Redis hash tag) of the gate; gates stacked on one task must share
            one; by default ``semaphore_groups[name]``, else the gate's own name.
        max_pending: at most this many calls wait for room (per key when the gate has keys);
            ``on_full`` says what happens to a call that finds no room beyond that.
        on_full: ``"park"`` (default: park anyway, warn once a minute), ``"reject"`` (the
            caller's ``.delay()`` raises ``GateFull``), ``"drop"`` (accepted, ends FAILURE with
            ``GateFull`` at once), ``"replace"`` (the newest call replaces the oldest waiting
            one of its key, which ends REVOKED).
        wait_timeout: seconds a call may wait for room; then it ends FAILURE with
            ``WaitTimeout`` (within one tick interval) and never runs.
        track: log each state transition of its calls in one line
            (``fetch[3f2a9c] PARKED->grant->DISPATCHED``); also ``semaphore_track``.

    Returns:
        The task (or function), unchanged apart from its gate.

    Raises:
        TypeError: an unknown option, or what is decorated is neither a task nor a function.
        ConfigurationError: an option with a wrong value (a ``ValueError`` naming the gate).

    Examples:
        >>> @gated("crawler", limit=4)
        ... @app.task
        ... def fetch(url): ...
        >>> result = fetch.delay("https://example.org")  # runs when one of 4 units is free
        >>> @gated("api", limit=20, key=lambda tenant, *a, **kw: tenant, key_limit=2)
        ... @gated("db", limit=5, group="backend")
        ... @app.task
        ... def sync(tenant): ...
    """
    if callable(name) or isinstance(name, (Task, Proxy)):
        return _apply(GateSpec(None), name)
    gate = None if name is None else check_name("a gate name", name)
    return functools.partial(_apply, _spec(gate, options))


def _spec(gate: str | None, options: dict[str, Any]) -> GateSpec:
    where = f"@gated({gate or '<task name>'!r})"
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"{where}: unknown option {unknown[0]!r}; known: {', '.join(_OPTIONS)}")
    label = gate or "<task name>"
    limit = options.get("limit")
    if limit is not None:
        check_limit(label, limit)
    lease = options.get("lease")
    priority = options.get("priority")
    if priority is not None:
        check_priority(where, priority)
    key = options.get("key")
    if key is not None and not callable(key):
        raise TypeError(f"{where}: key must be a function of the call's arguments, got {key!r}")
    key_limit = options.get("key_limit")
    if key_limit is not None and not callable(key_limit):
        check_limit(label, key_limit, "key_limit")
    key_limits = options.get("key_limits") or {}
    if not isinstance(key_limits, Mapping):
        raise TypeError(f"{where}: key_limits must be a dict of key -> limit, got {key_limits!r}")
    pairs = tuple(
        (str(k), check_limit(label, n, f"key limit of {k!r}")) for k, n in key_limits.items()
    )
    if (key_limit is not None or pairs) and key is None:
        raise ConfigurationError(f"{where}: key_limit and key_limits need key= (the key function)")
    weight = options.get("weight", 1)
    if not callable(weight):
        check_weight(label, weight, limit if limit is not None else -1)
    group = options.get("group")
    check_overflow(
        where, options.get("max_pending"), options.get("on_full"), options.get("wait_timeout")
    )
    wait_timeout = options.get("wait_timeout")
    return GateSpec(
        gate=gate,
        limit=limit,
        lease_s=None if lease is None else check_lease(f"{where}: lease", lease),
        priority=priority,
        key=key,
        key_limit=key_limit,
        key_limits=pairs,
        weight=weight,
        group=None if group is None else check_name(f"{where}: group", group),
        max_pending=options.get("max_pending"),
        on_full=options.get("on_full"),
        wait_timeout_s=None if wait_timeout is None else float(wait_timeout),
        track=bool(options.get("track", False)),
    )


def _apply(spec: GateSpec, target: Any) -> Any:
    if isinstance(target, Proxy):
        # A lazy task from @app.task or @shared_task: binding it here registers the task with
        # its app now instead of on first use, which is what lets us install on that app.
        target = target._get_current_object()
    if isinstance(target, Task):
        return _gate_task(spec, target)
    if isinstance(target, type) or not callable(target):
        raise TypeError(
            f"@gated decorates a Celery task or a function, not {target!r}; put it above "
            "@app.task / @shared_task or directly on the task function"
        )
    return _gate_function(spec, target)


def _gate_task(spec: GateSpec, task: Task) -> Task:
    if spec.gate is None:
        spec = dataclasses.replace(
            spec, gate=check_name(f"the gate name of {task.name}", task.name)
        )
    setattr(task, SPEC_ATTR, (spec, *specs_of(task)))
    # An instance attribute: Celery's tracer reads task.run when it builds the tracer.
    task.run = guard(task.run)  # type: ignore[method-assign]
    if not getattr(task.apply_async, GUARD_ATTR, False):
        task.apply_async = _with_requires(task)  # type: ignore[method-assign]
    install(task.app).check_specs(task.name, specs_of(task))
    return task


def _with_requires(task: Task) -> Callable[..., Any]:
    """``apply_async`` that accepts ``requires=``: a call whose first argument comes from its
    requirements skips Celery's argument check, which would see the call without it."""
    original = task.apply_async

    @functools.wraps(original)
    def apply_async(args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        if options.get("requires") and options.get("pass_results", True):
            return send_waiting(task.app, task.name, args or (), kwargs or {}, options)
        return original(args, kwargs, **options)

    setattr(apply_async, GUARD_ATTR, True)
    return apply_async


def _gate_function(spec: GateSpec, fun: Callable[..., Any]) -> Callable[..., Any]:
    inner = getattr(fun, SPEC_ATTR, ())
    wrapper = guard(fun)
    if wrapper is fun:
        wrapper = functools.wraps(fun)(lambda *a, **kw: fun(*a, **kw))
        setattr(wrapper, "__semaphore_guard__", True)  # noqa: B010
    setattr(wrapper, SPEC_ATTR, (spec, *inner))
    # Below @app.task we do not see the app: the app defined in this module is the current
    # one, and any app finalized later with this task gets the extension too.
    connect_on_app_finalize(install_if_gated)
    app = get_current_app()
    if app is not _state.default_app:
        install(app)
    return wrapper
