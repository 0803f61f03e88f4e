"""Celery's in-process test worker, on the private Redis of celery_semaphore's pytest plugin."""

from __future__ import annotations

from typing import Any

import pytest

# pytest-celery 1.x replaces Celery's ``celery_worker`` with a Docker-based one; importing the
# classic fixture here gives this directory the in-process worker again.
from celery.contrib.pytest import celery_worker  # noqa: F401


@pytest.fixture
def celery_config(semaphore_redis_url: str, semaphore_config: dict[str, Any]) -> dict[str, Any]:
    # The plugin's private Redis serves as broker and result backend too; the gates live there
    # under a key prefix of this test alone.
    return {
        "broker_url": semaphore_redis_url,
        "result_backend": semaphore_redis_url,
        **semaphore_config,
    }


@pytest.fixture(scope="session")
def celery_worker_pool() -> str:
    return "threads"  # the default "solo" pool runs one task at a time: nothing to gate


@pytest.fixture(scope="session")
def celery_worker_parameters() -> dict[str, Any]:
    return {"concurrency": 4}  # more threads than the gate's limit
