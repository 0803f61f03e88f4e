"""The task-semaphore model without Celery: two slots in Redis, a loop calling schedule().

Each job runs in a thread here; its end calls ``scheduler.stop``, which frees the slot and
starts the next job at once. ``schedule()`` is the safety net: it stops jobs that time out
and fills any idle slot.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import jobs
import redis

from celery_semaphore import Scheduler

redis_c = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://localhost:6379/0"))


def launch(job_id: str) -> threading.Thread:
    """Run a job without blocking the scheduler; free its slot when it ends."""

    def run() -> None:
        try:
            jobs.do_job(job_id)
        finally:
            scheduler.stop(job_id)

    thread = threading.Thread(target=run, name=f"job-{job_id}", daemon=True)
    thread.start()
    return thread


scheduler = Scheduler({"redis_c": redis_c, "launch": launch}, prefix="db-example").load(
    [
        {"backends": ["JobsBackend"], "slot_cls": "RedisSlot", "slot_id": 1, "timeout": 30},
        {"backends": ["JobsBackend"], "slot_cls": "RedisSlot", "slot_id": 2, "timeout": 30},
    ]
)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=8, help="jobs to add first (default 8)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between visits")
    args = parser.parse_args()
    jobs.add_jobs(args.jobs)
    while True:
        scheduler.schedule()
        status = jobs.counts()
        print(status, flush=True)
        if not status.get("new") and not status.get("running"):
            break
        time.sleep(args.interval)
    print(f"peak concurrency: {jobs.peak_concurrency()} (2 slots)")
