"""A SQLite table of jobs, and backends that feed it to celery_semaphore's slots."""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

from celery_semaphore import AbstractBackend, TaskBackend

DB = os.environ.get("JOBS_DB", "jobs.sqlite")


def connect(path: str = DB) -> sqlite3.Connection:
    """Open the jobs table, creating it on first use."""
    con = sqlite3.connect(path, timeout=30, isolation_level=None)
    con.execute(
        "create table if not exists jobs (id integer primary key, seconds real not null, "
        "status text not null default 'new', started real, finished real)"
    )
    return con


def add_jobs(count: int, seconds: float = 0.3, path: str = DB) -> None:
    """Queue ``count`` jobs that each take ``seconds``."""
    with connect(path) as con:
        con.executemany("insert into jobs (seconds) values (?)", [(seconds,)] * count)


def counts(path: str = DB) -> dict[str, int]:
    """Jobs per status."""
    with connect(path) as con:
        return dict(con.execute("select status, count(*) from jobs group by status").fetchall())


def peak_concurrency(path: str = DB) -> int:
    """Most jobs that ever ran at once, from their recorded start and end times."""
    with connect(path) as con:
        rows = con.execute(
            "select started, finished from jobs where finished is not null"
        ).fetchall()
        events = sorted([(s, 1) for s, _ in rows] + [(f, -1) for _, f in rows])
    running = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        running += step
        peak = max(peak, running)
    return peak


def do_job(job_id: str, path: str = DB) -> None:
    """The work itself: record the start, sleep, record the end."""
    with connect(path) as con:
        (seconds,) = con.execute("select seconds from jobs where id = ?", (job_id,)).fetchone()
        con.execute("update jobs set started = ? where id = ?", (time.time(), job_id))
        time.sleep(seconds)
        con.execute("update jobs set finished = ? where id = ?", (time.time(), job_id))


class JobsBackend(AbstractBackend):
    """Polls the table for a new job; ``start_callback`` marks it taken and launches it."""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.path = context.get("jobs_db", DB)

    def poll(self) -> str | None:
        with connect(self.path) as con:
            row = con.execute("select id from jobs where status = 'new' order by id").fetchone()
        return str(row[0]) if row else None

    def mark_started(self, task_id: str) -> None:
        with connect(self.path) as con:
            con.execute("update jobs set status = 'running' where id = ?", (task_id,))

    def start_callback(self, task_id: str) -> Any:
        self.mark_started(task_id)
        return self.launch(task_id)

    def launch(self, task_id: str) -> Any:
        """Start the job without blocking: the standalone example passes a launcher."""
        return self.context["launch"](task_id)

    def stop_callback(self, task_id: str) -> None:
        with connect(self.path) as con:
            con.execute(
                "update jobs set status = 'done' where id = ? and status = 'running'", (task_id,)
            )

    def timeout_callback(self, task_id: str) -> None:
        with connect(self.path) as con:
            con.execute("update jobs set status = 'timed out' where id = ?", (task_id,))


class CeleryJobsBackend(JobsBackend, TaskBackend):
    """The same table, each job run by the Celery task ``jobs.run`` on a worker."""

    task_name = "jobs.run"

    def launch(self, task_id: str) -> Any:
        # A signature: the slot sends it under the job's id, and the task's end frees the slot.
        return self.signature(task_id)
