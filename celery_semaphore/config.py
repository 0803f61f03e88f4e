"""Every ``semaphore_*`` setting, its default and its validation, in one place.

Precedence, implemented once in :func:`celery_semaphore.spec.resolve`: call option >
decorator option > app setting > default.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from .connect import check_url
from .errors import ConfigurationError

__all__ = [
    "DEFAULTS",
    "MIN_LEASE_S",
    "Settings",
    "check_count",
    "check_flag",
    "check_history_ttl",
    "check_limit",
    "check_name",
    "check_priority",
    "check_seconds",
    "check_lease",
]

#: Setting name -> default. The README's settings table mirrors this mapping.
DEFAULTS: dict[str, Any] = {
    "semaphore_redis_url": None,  # None: the broker URL when it is a redis:// URL
    "semaphore_limits": {},
    "semaphore_key_limits": {},
    "semaphore_groups": {},
    "semaphore_limit_source": "redis",
    "semaphore_lease": 30.0,
    "semaphore_tick_interval": 5.0,
    "semaphore_key_prefix": "semaphore",
    "semaphore_redis_timeout": 5.0,
    "semaphore_slots": [],
    "semaphore_dedupe_window": 3600.0,
    "semaphore_dropped_after": 60.0,
    "semaphore_duplicates": "refuse",
    "semaphore_max_dispatches": 5,
    "semaphore_history_ttl": 3600.0,
    "semaphore_track": False,
    "semaphore_report_waiting": True,
    "semaphore_broker_push": True,
    "semaphore_prefetch": 0,
    "semaphore_redis_cluster": False,
    "semaphore_redis_wait_replicas": 0,
}

#: The shortest lease accepted: a keepalive renews every third of it, and a lease shorter than
#: a second would be lost to an ordinary pause of the worker's main process.
MIN_LEASE_S = 1.0
#: Characters a gate, group or prefix name may not contain: braces (hash tags), the comma and
#: control characters (separators in the Redis records).
_FORBIDDEN = set("{},") | {chr(c) for c in range(32)}


def check_name(what: str, value: object) -> str:
    """Return ``value`` as a gate / group / prefix name, or raise naming ``what``."""
    if not isinstance(value, str) or not value or _FORBIDDEN & set(value):
        raise ConfigurationError(
            f"{what} must be a non-empty string without braces, commas or control characters, "
            f"got {value!r}"
        )
    return value


def check_limit(gate: str, value: object, what: str = "limit") -> int:
    """Return ``value`` as a limit, or raise naming the gate.

    Raises:
        ConfigurationError: ``value`` is not a positive integer.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"the {what} of gate {gate!r} must be a positive integer, got {value!r}"
        )
    return value


def check_seconds(name: str, value: object, minimum: float = 0.0) -> float:
    """Return ``value`` as a finite positive number of seconds (at least ``minimum``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
        or value < minimum
    ):
        floor = f" of at least {minimum:g}" if minimum else ""
        raise ConfigurationError(
            f"{name} must be a finite positive number of seconds{floor}, got {value!r}"
        )
    return float(value)


def check_lease(name: str, value: object) -> float:
    """Return ``value`` as a lease in seconds: finite and at least :data:`MIN_LEASE_S`."""
    return check_seconds(name, value, MIN_LEASE_S)


def check_history_ttl(value: object) -> float:
    """Return ``value`` as the seconds an ended call's history is kept (0: not kept)."""
    if value == 0 and not isinstance(value, bool):
        return 0.0
    return check_seconds("semaphore_history_ttl", value)


def check_count(name: str, value: object) -> int:
    """Return ``value`` as an int >= 0, or raise naming the setting."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{name} must be an int >= 0, got {value!r}")
    return value


def check_flag(name: str, value: object) -> bool:
    """Return ``value`` as a bool, or raise naming the setting."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True or False, got {value!r}")
    return value


def check_priority(where: str, value: object) -> int:
    """Return ``value`` as a priority, an int from 0 to 255 (Celery's message priority range)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise ConfigurationError(f"{where}: priority must be an int from 0 to 255, got {value!r}")
    return value


def _mapping(name: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{name} must be a dict, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Settings:
    """The extension's settings, read once from ``app.conf``.

    Attributes:
        redis_url: where the gates live.
        redis_url_is_broker: the URL was taken from the broker (no semaphore_redis_url).
        limits: gate name -> limit (seeds the limit stored in Redis).
        key_limits: gate name -> {key: limit} overrides of per-key limits.
        groups: gate name -> group (hash tag); gates stacked on one task share a group.
        limit_source: ``"redis"`` (the stored limit is in force; configuration only seeds it)
            or ``"config"`` (this process writes its configured limits on first use).
        lease_s: how long a hold lasts without a keepalive.
        tick_interval_s: how often beat runs ``celery_semaphore.tick``.
        key_prefix: first part of every Redis key.
        redis_timeout_s: socket connect and read timeout towards Redis.
        slots: slot configurations for the :class:`~celery_semaphore.Scheduler`.
        dedupe_window_s: how long a call that must not start again is remembered.
        duplicates: ``"refuse"`` or ``"allow"`` a second live execution of one call.
        dropped_after_s: grace after a dead holder's lease expired before its call, if no
            result arrived and no redelivery is coming, is recorded as ``CallDropped``.
        max_dispatches: how many times a call is handed room without starting before it is
            recorded as ``NeverStarted``.
        prefetch: how many calls waiting in a full gate are sent to the broker ahead of their
            grant (broker push only), each held by a worker until a release grants it.
    """

    redis_url: str
    limits: Mapping[str, int]
    lease_s: float
    tick_interval_s: float
    key_prefix: str
    redis_timeout_s: float
    slots: tuple[Mapping[str, Any], ...] = ()
    dedupe_window_s: float = DEFAULTS["semaphore_dedupe_window"]
    duplicates: str = DEFAULTS["semaphore_duplicates"]
    dropped_after_s: float = DEFAULTS["semaphore_dropped_after"]
    key_limits: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict)
    groups: Mapping[str, str] = dataclasses.field(default_factory=dict)
    limit_source: str = DEFAULTS["semaphore_limit_source"]
    max_dispatches: int = DEFAULTS["semaphore_max_dispatches"]
    history_ttl_s: float = DEFAULTS["semaphore_history_ttl"]
    track: bool = DEFAULTS["semaphore_track"]
    report_waiting: bool = DEFAULTS["semaphore_report_waiting"]
    broker_push: bool = DEFAULTS["semaphore_broker_push"]
    prefetch: int = DEFAULTS["semaphore_prefetch"]
    redis_cluster: bool = DEFAULTS["semaphore_redis_cluster"]
    wait_replicas: int = DEFAULTS["semaphore_redis_wait_replicas"]
    redis_url_is_broker: bool = False

    @classmethod
    def from_conf(cls, conf: Any) -> Settings:
        """Read and validate the settings from a Celery ``app.conf``.

        Raises:
            ConfigurationError: a setting has a wrong type or value.
        """

        def get(name: str) -> Any:
            # app.conf.get honours CELERY_SEMAPHORE_* through namespaces too.
            return conf.get(name, DEFAULTS[name])

        limits = _mapping("semaphore_limits", get("semaphore_limits") or {})
        url, from_broker = get("semaphore_redis_url"), False
        if url is None:
            broker = conf.get("broker_url") or ""
            if isinstance(broker, str) and broker.startswith(("redis://", "rediss://", "unix://")):
                url, from_broker = broker, True
            else:
                raise ConfigurationError(
                    "set semaphore_redis_url to the Redis that holds the gates "
                    "(the broker is not Redis, so it cannot be used as the default)"
                )
        url = check_url(url)
        prefix = check_name("semaphore_key_prefix", get("semaphore_key_prefix"))
        slots = get("semaphore_slots") or []
        if not isinstance(slots, (list, tuple)):
            raise ConfigurationError(f"semaphore_slots must be a list of slot dicts, got {slots!r}")
        duplicates = get("semaphore_duplicates")
        if duplicates not in ("refuse", "allow"):
            raise ConfigurationError(
                f"semaphore_duplicates must be 'refuse' or 'allow', got {duplicates!r}"
            )
        source = get("semaphore_limit_source")
        if source not in ("redis", "config"):
            raise ConfigurationError(
                f"semaphore_limit_source must be 'redis' or 'config', got {source!r}"
            )
        key_limits = {
            check_name("a gate name in semaphore_key_limits", gate): {
                str(key): check_limit(gate, n, f"key limit of {key!r}")
                for key, n in _mapping(f"semaphore_key_limits[{gate!r}]", per_key).items()
            }
            for gate, per_key in _mapping(
                "semaphore_key_limits", get("semaphore_key_limits") or {}
            ).items()
        }
        groups = {
            check_name("a gate name in semaphore_groups", gate): check_name(
                f"the group of gate {gate!r} in semaphore_groups", group
            )
            for gate, group in _mapping("semaphore_groups", get("semaphore_groups") or {}).items()
        }
        max_dispatches = get("semaphore_max_dispatches")
        if (
            isinstance(max_dispatches, bool)
            or not isinstance(max_dispatches, int)
            or max_dispatches < 1
        ):
            raise ConfigurationError(
                f"semaphore_max_dispatches must be a positive integer, got {max_dispatches!r}"
            )
        return cls(
            redis_url=url,
            redis_url_is_broker=from_broker,
            limits={
                check_name("a gate name in semaphore_limits", name): check_limit(name, n)
                for name, n in limits.items()
            },
            key_limits=key_limits,
            groups=groups,
            limit_source=source,
            lease_s=check_lease("semaphore_lease", get("semaphore_lease")),
            tick_interval_s=check_seconds(
                "semaphore_tick_interval", get("semaphore_tick_interval")
            ),
            key_prefix=prefix,
            redis_timeout_s=check_seconds(
                "semaphore_redis_timeout", get("semaphore_redis_timeout")
            ),
            slots=tuple(slots),
            dedupe_window_s=check_seconds(
                "semaphore_dedupe_window", get("semaphore_dedupe_window")
            ),
            duplicates=duplicates,
            dropped_after_s=check_seconds(
                "semaphore_dropped_after", get("semaphore_dropped_after")
            ),
            max_dispatches=max_dispatches,
            history_ttl_s=check_history_ttl(get("semaphore_history_ttl")),
            track=check_flag("semaphore_track", get("semaphore_track")),
            report_waiting=check_flag("semaphore_report_waiting", get("semaphore_report_waiting")),
            broker_push=check_flag("semaphore_broker_push", get("semaphore_broker_push")),
            prefetch=check_count("semaphore_prefetch", get("semaphore_prefetch")),
            redis_cluster=check_flag("semaphore_redis_cluster", get("semaphore_redis_cluster")),
            wait_replicas=check_count(
                "semaphore_redis_wait_replicas", get("semaphore_redis_wait_replicas")
            ),
        )
