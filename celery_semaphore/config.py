"""Every ``semaphore_*`` setting, its default and its validation, in one place.

Precedence, implemented once in :func:`resolve`: decorator option > app setting > default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .errors import ConfigurationError

__all__ = ["DEFAULTS", "Settings", "check_limit", "check_seconds"]

#: Setting name -> default. The README's settings table mirrors this mapping.
DEFAULTS: dict[str, Any] = {
    "semaphore_redis_url": None,  # None: the broker URL when it is a redis:// URL
    "semaphore_limits": {},
    "semaphore_lease": 30.0,
    "semaphore_tick_interval": 5.0,
    "semaphore_key_prefix": "semaphore",
    "semaphore_redis_timeout": 5.0,
    "semaphore_slots": [],
    "semaphore_dedupe_window": 3600.0,
    "semaphore_dropped_after": 60.0,
    "semaphore_duplicates": "refuse",
}


def check_limit(gate: str, value: object) -> int:
    """Return ``value`` as a limit, or raise naming the semaphore.

    Raises:
        ConfigurationError: ``value`` is not a positive integer.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"the limit of semaphore {gate!r} must be a positive integer, got {value!r}"
        )
    return value


def check_seconds(name: str, value: object) -> float:
    """Return ``value`` as a positive number of seconds, or raise naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The extension's settings, read once from ``app.conf``.

    Attributes:
        redis_url: where slots live.
        limits: semaphore name -> number of slots.
        lease_s: how long a slot stays held without a keepalive.
        tick_interval_s: how often beat runs ``celery_semaphore.tick``.
        key_prefix: first part of every Redis key.
        redis_timeout_s: socket connect and read timeout towards Redis.
        slots: slot configurations for the :class:`~celery_semaphore.Scheduler`.
        dedupe_window_s: how long a call delivered more than once is remembered after its end.
        duplicates: ``"refuse"`` or ``"allow"`` a second live execution of one call.
        dropped_after_s: grace after a dead holder's lease expired before its call, if no
            result arrived and no redelivery is coming, is recorded as ``CallDropped``.
    """

    redis_url: str
    limits: Mapping[str, int]
    lease_s: float
    tick_interval_s: float
    key_prefix: str
    redis_timeout_s: float
    slots: tuple[Mapping[str, Any], ...]
    dedupe_window_s: float = 3600.0
    duplicates: str = "refuse"
    dropped_after_s: float = 60.0

    @classmethod
    def from_conf(cls, conf: Any) -> Settings:
        """Read and validate the settings from a Celery ``app.conf``.

        Raises:
            ConfigurationError: a setting has a wrong type or value.
        """

        def get(name: str) -> Any:
            # app.conf.get honours CELERY_SEMAPHORE_* through namespaces too.
            return conf.get(name, DEFAULTS[name])

        limits = get("semaphore_limits") or {}
        if not isinstance(limits, Mapping):
            raise ConfigurationError(
                f"semaphore_limits must be a dict of semaphore name -> limit, got {limits!r}"
            )
        url = get("semaphore_redis_url")
        if url is None:
            broker = conf.get("broker_url") or ""
            if isinstance(broker, str) and broker.startswith(("redis://", "rediss://", "unix://")):
                url = broker
            else:
                raise ConfigurationError(
                    "set semaphore_redis_url to the Redis that holds the slots "
                    "(the broker is not Redis, so it cannot be used as the default)"
                )
        if not isinstance(url, str) or "://" not in url:
            raise ConfigurationError(f"semaphore_redis_url must be a redis:// URL, got {url!r}")
        prefix = get("semaphore_key_prefix")
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ConfigurationError(
                f"semaphore_key_prefix must be a non-empty string without braces, got {prefix!r}"
            )
        slots = get("semaphore_slots") or []
        if not isinstance(slots, (list, tuple)):
            raise ConfigurationError(f"semaphore_slots must be a list of slot dicts, got {slots!r}")
        duplicates = get("semaphore_duplicates")
        if duplicates not in ("refuse", "allow"):
            raise ConfigurationError(
                f"semaphore_duplicates must be 'refuse' or 'allow', got {duplicates!r}"
            )
        return cls(
            redis_url=url,
            limits={str(name): check_limit(str(name), n) for name, n in limits.items()},
            lease_s=check_seconds("semaphore_lease", get("semaphore_lease")),
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
        )
