"""The same jobs under Celery: beat's tick fills three slots, workers run the jobs.

Run a worker and beat (see README.md); add jobs with ``python -c "import jobs;
jobs.add_jobs(10)"``. A job's end frees its slot in the worker, which starts the next job
at once; the tick every second is the safety net.
"""

from __future__ import annotations

import os

import jobs
from celery import Celery

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")

app = Celery("db_example", broker=REDIS_URL)
app.conf.update(
    semaphore_redis_url=REDIS_URL,
    semaphore_key_prefix="db-example",
    semaphore_tick_interval=1.0,
    semaphore_slots=[
        {
            "slot_id": n,
            "backends": ["CeleryJobsBackend"],
            "slot_cls": "RedisSlot",
            "timeout": 30,
            "semaphore": "jobs",
        }
        for n in (1, 2, 3)
    ],
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
)
# The scheduler model needs the extension on this app even though no task is @gated.
__import__("celery_semaphore").install(app)


@app.task(name="jobs.run")
def run(job_id: str) -> None:
    """Do one job; the worker's signal handlers free its slot when it ends."""
    jobs.do_job(job_id)
