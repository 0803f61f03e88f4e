"""What ``@gated`` says about a task, and what one call of it needs from its gates.

Pure data and validation: no Redis, no Celery app. Precedence, stated once and implemented
here: call option > decorator option > app setting > default.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

from .config import (
    Settings,
    check_lease,
    check_limit,
    check_name,
    check_priority,
    check_seconds,
)
from .errors import ConfigurationError

__all__ = [
    "SPEC_ATTR",
    "CallSpec",
    "GateSpec",
    "TaskGates",
    "call_spec",
    "check_agreement",
    "check_overflow",
    "ON_FULL",
    "check_weight",
    "resolve",
    "specs_of",
]

#: Attribute that carries a task's gate specs (on the task, or on its run function).
SPEC_ATTR = "__semaphore_spec__"
#: No overall limit: only per-key limits apply (stored as -1 in Redis).
UNLIMITED = -1

KeyFn = Callable[..., str]


@dataclasses.dataclass(frozen=True)
class GateSpec:
    """One ``@gated`` decorator.

    Attributes:
        gate: the gate's name; ``None`` means "the task's own name".
        limit: the decorator's limit, or ``None`` to use ``semaphore_limits``.
        lease_s: the decorator's lease, or ``None`` to use ``semaphore_lease``.
        priority: the task's default priority (0-255), or ``None`` for 0.
        key: a function of the call's arguments returning its key (tenant, domain).
        key_limit: the limit per key: an int, or a function ``key -> int``.
        key_limits: limits of particular keys.
        weight: units of the gate a call takes: an int, or a function of its arguments.
        group: the group (Redis hash tag) of the gate, or ``None`` for the setting / the gate.
    """

    gate: str | None
    limit: int | None = None
    lease_s: float | None = None
    priority: int | None = None
    key: KeyFn | None = None
    key_limit: int | Callable[[str], int] | None = None
    key_limits: tuple[tuple[str, int], ...] = ()
    weight: int | Callable[..., int] = 1
    group: str | None = None
    max_pending: int | None = None
    on_full: str | None = None
    wait_timeout_s: float | None = None
    track: bool = False


#: What a call that finds no room does once its gate has ``max_pending`` calls waiting.
ON_FULL = ("park", "reject", "drop", "replace")


def check_overflow(where: str, max_pending: object, on_full: object, wait_timeout: object) -> None:
    """Validate the overflow options (``None`` = not given).

    Raises:
        ValueError / TypeError: naming ``where`` and the option.
    """
    if max_pending is not None and (
        isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1
    ):
        raise ConfigurationError(f"{where}: max_pending must be an int >= 1, got {max_pending!r}")
    if on_full is not None and on_full not in ON_FULL:
        raise ConfigurationError(f"{where}: on_full must be one of {ON_FULL}, got {on_full!r}")
    if wait_timeout is not None:
        check_seconds(f"{where}: wait_timeout", wait_timeout)


def specs_of(task: Any) -> tuple[GateSpec, ...]:
    """The gate specs of a task, outermost decorator first (empty when it is not gated)."""
    specs = getattr(task, SPEC_ATTR, None)
    if specs is None:
        specs = getattr(getattr(task, "run", None), SPEC_ATTR, None)
    return specs if isinstance(specs, tuple) else ()


@dataclasses.dataclass(frozen=True)
class TaskGates:
    """A gated task's gates as this app resolves them: names, group, limits, lease."""

    task: str
    specs: tuple[GateSpec, ...]
    names: tuple[str, ...]
    group: str
    limits: tuple[int, ...]
    lease_s: float

    @property
    def gate(self) -> str:
        """The first gate (the one named in messages and logs)."""
        return self.names[0]


def resolve(task_name: str, specs: tuple[GateSpec, ...], settings: Settings) -> TaskGates:
    """Resolve a task's specs against the settings.

    Raises:
        ConfigurationError: a gate without any limit, a gate stacked twice, or stacked gates
            in different groups.
    """
    names = tuple(
        spec.gate or check_name(f"the gate name of task {task_name}", task_name) for spec in specs
    )
    if len(set(names)) != len(names):
        raise ConfigurationError(f"task {task_name} stacks gate {names} twice; each gate once")
    limits: list[int] = []
    groups: list[str] = []
    for name, spec in zip(names, specs, strict=True):
        limit = spec.limit if spec.limit is not None else settings.limits.get(name)
        if limit is None:
            if spec.key_limit is None and not spec.key_limits and name not in settings.key_limits:
                raise ConfigurationError(
                    f"gate {name!r} has no limit: add it to the semaphore_limits setting "
                    f"(app.conf.semaphore_limits = {{{name!r}: N}}) or pass limit= (or "
                    "key_limit=) to @gated"
                )
            limit = UNLIMITED
        limits.append(limit)
        groups.append(spec.group or settings.groups.get(name) or name)
    if len(set(groups)) > 1:
        together = ", ".join(f"{n!r}: {names[0]!r}" for n in names)
        joined = ", ".join(f"{n!r}: {g!r}" for n, g in zip(names, groups, strict=True))
        raise ConfigurationError(
            f"task {task_name} stacks gates in different groups ({joined}); stacked gates are "
            "granted in one atomic step, so they must share a group: pass the same group= to "
            f"each @gated, or set semaphore_groups = {{{together}}}"
        )
    leases = [s.lease_s for s in specs if s.lease_s is not None]
    lease_s = max(leases) if leases else settings.lease_s
    return TaskGates(
        task_name, specs, names, groups[0], tuple(limits), check_lease("lease", lease_s)
    )


def check_agreement(
    task: str,
    specs: tuple[GateSpec, ...],
    group: str | None,
    other_task: str,
    other_specs: tuple[GateSpec, ...],
    other_group: str | None,
) -> None:
    """Refuse two tasks that configure a gate they share differently.

    ``group`` / ``other_group`` are the resolved groups when known, else ``None`` (then only
    the groups the decorators name are compared).

    Raises:
        ConfigurationError: a shared gate gets two limits, or lives in two groups.
    """
    for spec in specs:
        for other in other_specs:
            if spec.gate is None or spec.gate != other.gate:
                continue
            if None not in (spec.limit, other.limit) and spec.limit != other.limit:
                raise ConfigurationError(
                    f"gate {spec.gate!r} gets limit {spec.limit} from {task} but {other.limit} "
                    f"from {other_task}; give it one limit (or set it only in semaphore_limits)"
                )
            mine = group if group is not None else spec.group
            theirs = other_group if other_group is not None else other.group
            if None not in (mine, theirs) and mine != theirs:
                raise ConfigurationError(
                    f"gate {spec.gate!r} is in group {mine!r} for {task} but in {theirs!r} for "
                    f"{other_task}; a gate lives in one group: set semaphore_groups"
                )


@dataclasses.dataclass(frozen=True)
class CallSpec:
    """What one call needs: per gate its key, weight and key limit; its priority and lease."""

    keys: tuple[str, ...]
    weights: tuple[int, ...]
    key_limits: tuple[int, ...]
    priority: int
    lease_ms: int
    redeliver: bool
    max_pending: int = 0
    on_full: str = "park"
    wait_ms: int = 0

    def to_json(self, names: tuple[str, ...], **extra: Any) -> str:
        """The record acquire.lua stores (see lua/common.lua); ``extra`` adds fields (task,
        track, and a workflow node's needs, on_fail, feeds)."""
        record: dict[str, Any] = {
            **extra,
            "gates": list(names),
            "keys": list(self.keys),
            "weights": list(self.weights),
            "key_limits": list(self.key_limits),
            "priority": self.priority,
            "lease_ms": self.lease_ms,
            "redeliver": self.redeliver,
        }
        if self.max_pending:
            record["max_pending"] = self.max_pending
            record["on_full"] = self.on_full
        if self.wait_ms:
            record["wait_ms"] = self.wait_ms
        return json.dumps(record, separators=(",", ":"))


def call_spec(
    gates: TaskGates,
    settings: Settings,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    priority: object = None,
    redeliver: bool = False,
    max_pending: object = None,
    on_full: object = None,
    wait_timeout: object = None,
) -> CallSpec:
    """Work out what a call needs from its arguments and options.

    Raises:
        ValueError / TypeError: a key function that raises or returns something other than a
            non-empty string, a weight that is not a positive int or exceeds its gate's limit,
            a priority outside 0-255 (each naming the gate and the option).
    """
    keys: list[str] = []
    weights: list[int] = []
    key_limits: list[int] = []
    for name, spec, limit in zip(gates.names, gates.specs, gates.limits, strict=True):
        key = ""
        if spec.key is not None:
            try:
                key = spec.key(*args, **kwargs)
            except Exception as exc:
                raise ValueError(f"gate {name!r}: the key function raised {exc!r}") from exc
            if not isinstance(key, str) or not key or "\x1f" in key:
                raise TypeError(
                    f"gate {name!r}: the key function must return a non-empty string, got {key!r}"
                )
        weight = spec.weight
        if callable(weight):
            try:
                weight = weight(*args, **kwargs)
            except Exception as exc:
                raise ValueError(f"gate {name!r}: the weight function raised {exc!r}") from exc
        check_weight(name, weight, limit)
        weights.append(int(weight))  # type: ignore[arg-type]
        keys.append(key)
        key_limits.append(_key_limit(name, spec, settings, key) if key else 0)
    chosen = priority
    if chosen is None:
        chosen = next((s.priority for s in gates.specs if s.priority is not None), 0)
    check_overflow(f"gate {gates.gate!r}", max_pending, on_full, wait_timeout)
    first = gates.specs[0]
    cap = max_pending if max_pending is not None else first.max_pending
    policy = on_full if on_full is not None else first.on_full
    wait_s = wait_timeout if wait_timeout is not None else first.wait_timeout_s
    return CallSpec(
        keys=tuple(keys),
        weights=tuple(weights),
        key_limits=tuple(key_limits),
        priority=check_priority(f"gate {gates.gate!r}", chosen),
        lease_ms=int(gates.lease_s * 1000),
        redeliver=redeliver,
        max_pending=int(cap or 0),  # type: ignore[call-overload]
        on_full=str(policy or "park"),
        wait_ms=int(float(wait_s) * 1000) if wait_s else 0,  # type: ignore[arg-type]
    )


def check_weight(gate: str, weight: object, limit: int) -> int:
    """Return ``weight`` as a positive int no larger than the gate's limit, or raise."""
    if isinstance(weight, bool) or not isinstance(weight, int):
        raise TypeError(f"gate {gate!r}: weight must be a positive int, got {weight!r}")
    if weight < 1 or (limit != UNLIMITED and weight > limit):
        raise ValueError(
            f"gate {gate!r}: weight must be from 1 to the gate's limit ({limit}), got {weight!r}"
        )
    return weight


def _key_limit(gate: str, spec: GateSpec, settings: Settings, key: str) -> int:
    overrides = dict(spec.key_limits)
    if key in overrides:
        return overrides[key]
    configured = settings.key_limits.get(gate, {})
    if key in configured:
        return configured[key]
    limit = spec.key_limit
    if callable(limit):
        try:
            limit = limit(key)
        except Exception as exc:
            raise ValueError(f"gate {gate!r}: key_limit({key!r}) raised {exc!r}") from exc
        return check_limit(gate, limit, f"key limit of {key!r}")
    return limit or 0
