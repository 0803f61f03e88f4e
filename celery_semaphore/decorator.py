"""``@gated``: mark a Celery task as holding a slot of a semaphore while it runs."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, TypeVar, overload

from celery import Task, _state
from celery._state import connect_on_app_finalize, get_current_app
from celery.local import Proxy

from .config import check_limit, check_seconds
from .errors import ConfigurationError

__all__ = ["SPEC_ATTR", "GateSpec", "gated", "spec_of"]

#: Attribute that carries a task's :class:`GateSpec` (on the task, or on its run function).
SPEC_ATTR = "__semaphore_spec__"

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class GateSpec:
    """What ``@gated`` said about a task.

    Attributes:
        gate: the semaphore's name; ``None`` means "the task's own name".
        limit: the decorator's limit, or ``None`` to use ``semaphore_limits``.
        lease_s: the decorator's lease, or ``None`` to use ``semaphore_lease``.
    """

    gate: str | None
    limit: int | None = None
    lease_s: float | None = None


def spec_of(task: Any) -> GateSpec | None:
    """Return the GateSpec of a task (above or below placement), or ``None`` if it is not gated."""
    spec = getattr(task, SPEC_ATTR, None)
    if spec is None:
        spec = getattr(getattr(task, "run", None), SPEC_ATTR, None)
    return spec if isinstance(spec, GateSpec) else None


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or "{" in name or "}" in name:
        raise ConfigurationError(
            f"a semaphore name must be a non-empty string without braces, got {name!r}"
        )
    return name


@overload
def gated(name: F, /) -> F: ...


@overload
def gated(
    name: str | None = None, /, *, limit: int | None = None, lease: float | None = None
) -> Callable[[T], T]: ...


def gated(name: Any = None, /, *, limit: int | None = None, lease: float | None = None) -> Any:
    """Gate a Celery task: a call reaches the broker only once it holds a slot.

    Place it above ``@app.task`` / ``@shared_task`` or below it (on the function). Used bare
    (``@gated``) the semaphore is named after the task.

    Args:
        name: the semaphore's name; tasks that name the same semaphore share its slots.
        limit: number of slots; by default ``semaphore_limits[name]`` from the app config.
        lease: seconds a slot stays held without a keepalive; by default ``semaphore_lease``.

    Returns:
        The task (or function), unchanged apart from its gate.

    Raises:
        TypeError: what is decorated is neither a Celery task nor a function.
        ConfigurationError: ``limit`` is not a positive integer or ``lease`` is not positive.

    Examples:
        >>> @gated("crawler", limit=4)
        ... @app.task
        ... def fetch(url): ...
        >>> result = fetch.delay("https://example.org")  # runs when one of 4 slots is free
    """
    if callable(name) or isinstance(name, (Task, Proxy)):
        return _apply(GateSpec(None), name)
    spec = GateSpec(
        None if name is None else _check_name(name),
        None if limit is None else check_limit(name or "<task name>", limit),
        None if lease is None else check_seconds("lease", lease),
    )
    return functools.partial(_apply, spec)


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
    from .extension import install  # the extension imports this module

    if spec.gate is None:
        spec = dataclasses.replace(spec, gate=task.name)
    setattr(task, SPEC_ATTR, spec)
    # An instance attribute: Celery's tracer reads task.run when it builds the tracer.
    task.run = guard(task.run)  # type: ignore[method-assign]
    install(task.app).register(task.name, spec)
    return task


def _gate_function(spec: GateSpec, fun: Callable[..., Any]) -> Callable[..., Any]:
    from .extension import install, install_if_gated

    wrapper = guard(fun)
    setattr(wrapper, SPEC_ATTR, spec)
    # Below @app.task we do not see the app: the app defined in this module is the current
    # one, and any app finalized later with this task gets the extension too.
    connect_on_app_finalize(install_if_gated)
    app = get_current_app()
    if app is not _state.default_app:
        install(app)
    return wrapper


def guard(run: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a task's run so that a run the gate refused (see ``signals``) does not execute."""
    from .signals import refuse_if_denied

    @functools.wraps(run)
    def gated_run(*args: Any, **kwargs: Any) -> Any:
        refuse_if_denied()
        return run(*args, **kwargs)

    return gated_run
