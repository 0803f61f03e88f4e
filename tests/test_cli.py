"""``celery -A proj semaphore ...`` through Celery's real command line, in subprocesses.

A private redis-server, a threads worker in this process, and the app of tests/cliproj.py in
both (the subprocess builds it from the same ``CS_*`` variables). No beat runs: whatever
starts after a command was started by that command's own script, not by a tick.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from celery import Celery
from celery.result import AsyncResult
from celery.worker import state as worker_state

from celery_semaphore import Semaphore
from celery_semaphore.cli import EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_UNKNOWN, EXIT_USAGE

from . import cliproj
from .conftest import ROOT, threads_worker, wait_for

Run = subprocess.CompletedProcess[str]

STATUS_FIELDS = {
    "gate", "group", "limit", "held", "peak", "holders", "parked", "waiting_time",
    "waiting_requirements", "oldest_parked_s", "paused", "busiest_keys", "counters",
}  # fmt: skip
COUNTER_FIELDS = {
    "granted", "dispatched", "released", "reclaimed", "parked", "rejected", "expired",
    "dropped", "cancelled", "replaced",
}  # fmt: skip
HOLDER_FIELDS = {
    "task_id", "task", "key", "state", "worker", "pid", "held_s", "lease_left_s", "fence",
}  # fmt: skip
PARKED_FIELDS = {"position", "task_id", "task", "priority", "key", "age_s", "waits_for"}
EXPLAIN_FIELDS = {
    "task_id", "task", "group", "gates", "state", "final", "events", "reason", "position",
    "result_state",
}  # fmt: skip


@pytest.fixture
def env(urls: dict[str, str], prefix: str) -> dict[str, str]:
    """The environment of the command: the app of this test (gate ``work`` of 1)."""
    return {
        **os.environ,
        "CS_BROKER": urls["broker"],
        "CS_BACKEND": urls["backend"],
        "CS_SLOTS": urls["slots"],
        "CS_PROBE": urls["probe"],
        "CS_PREFIX": prefix,
        "CS_LIMIT": "1",
    }


@pytest.fixture
def app(env: dict[str, str]) -> Celery:
    return cliproj.create_app(env)


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "tests.cliproj", "semaphore", *args]


def cli(env: Mapping[str, str], *args: str, stdin: str = "") -> Run:
    """Run one ``celery semaphore`` command to its end."""
    return subprocess.run(
        command(*args), cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=60
    )


def spawn(env: Mapping[str, str], *args: str) -> subprocess.Popen[str]:
    """Start one ``celery semaphore`` command; :func:`finish` waits for it."""
    pipes = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    return subprocess.Popen(command(*args), cwd=ROOT, env=env, text=True, **pipes)  # type: ignore[call-overload,no-any-return]


def finish(proc: subprocess.Popen[str]) -> Run:
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def cli_all(env: Mapping[str, str], *commands: tuple[str, ...]) -> list[Run]:
    """Run read-only commands side by side (each costs a Celery start-up)."""
    return [finish(proc) for proc in [spawn(env, *args) for args in commands]]


def on_terminal(env: Mapping[str, str], *args: str, frames: int = 0) -> str:
    """What a command prints to a terminal (``celery ARGS``); with ``frames``, Ctrl-C once it
    redrew that many times."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.cliproj", *args],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE,
    )  # fmt: skip
    os.close(slave)
    out = b""
    try:
        while frames and out.count(b"\x1b[2J") < frames:
            out += os.read(master, 65536)
        if frames:
            proc.send_signal(signal.SIGINT)
        with contextlib.suppress(OSError):  # EIO once the command closed the terminal
            while chunk := os.read(master, 65536):
                out += chunk
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.communicate()
        os.close(master)
    return out.decode()


def ok(run: Run) -> str:
    assert run.returncode == 0, f"{run.args}: exit {run.returncode}\n{run.stderr}"
    return run.stdout


def doc(run: Run) -> Any:
    return json.loads(ok(run))


def flag(app: Celery, name: str) -> None:
    """End the ``cli.hold`` calls waiting for ``name``."""
    probe = app.probe  # type: ignore[attr-defined]
    probe.client.set(probe.key(f"flag:{name}"), 1)


def running(app: Celery) -> int:
    return int(app.probe.value("running"))  # type: ignore[attr-defined]


def started(app: Celery) -> set[str]:
    """The ids of the calls whose body began."""
    probe = app.probe  # type: ignore[attr-defined]
    lines = [x.decode().split() for x in probe.client.lrange(probe.key("log"), 0, -1)]
    return {line[1] for line in lines if line[0] == "start"}


@contextlib.contextmanager
def worker(app: Celery) -> Iterator[None]:
    """A threads worker; every hold still running is ended before it stops."""
    with threads_worker(app, concurrency=8):
        try:
            yield
        finally:
            flag(app, "all")


def holds(app: Celery, flag_name: str, n: int) -> list[AsyncResult]:
    return [app.tasks["cli.hold"].delay(flag_name) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_status_holders_parked_and_explain_show_real_calls_in_every_state(
    app: Celery, env: dict[str, str]
) -> None:
    gate = Semaphore("work", app=app)
    with worker(app):
        ended = app.tasks["proj.work"].delay(1)
        assert ended.get(timeout=10) == 1
        running_call, *parked = holds(app, "a", 4)
        waiting = app.tasks["cli.hold"].apply_async(("a",), countdown=60)
        wait_for(lambda: running(app) == 1, 10, "the first hold to run")
        runs = cli_all(
            env, ("status",), ("status", "--json"), ("holders", "work"),
            ("holders", "work", "--json"), ("parked", "work", "--json"),
            ("parked", "work", "--offset", "1", "--count", "2"),
            ("explain", parked[0].id), *[
                ("explain", call.id, "--json")
                for call in (parked[0], waiting, running_call, ended)
            ],
        )  # fmt: skip
        status, status_json, holders_text, holders_json, parked_json, page = runs[:6]
        explain_text, *explained = runs[6:]

        table = ok(status).splitlines()
        assert table[0].split() == [
            "GATE", "HELD/LIMIT", "PARKED", "WAITING", "OLDEST", "PAUSED", "COUNTERS",
        ]  # fmt: skip
        row = table[1].split()
        assert row[:5] == ["work", "1/1", "3", "1", "time"]
        assert row[6] == "no"
        assert "granted=2" in table[1] and "released=1" in table[1] and "parked=3" in table[1]
        assert "\x1b[" not in ok(status)  # a pipe: no colour

        (work,) = doc(status_json)["gates"]
        assert set(work) == STATUS_FIELDS and set(work["counters"]) == COUNTER_FIELDS
        assert work["oldest_parked_s"] >= 0
        assert {k: work[k] for k in ("gate", "limit", "held", "holders", "parked")} == {
            "gate": "work", "limit": 1, "held": 1, "holders": 1, "parked": 3,
        }  # fmt: skip
        assert (work["waiting_time"], work["paused"], work["busiest_keys"]) == (1, False, [])
        counters = work["counters"]
        assert (counters["granted"], counters["released"], counters["parked"]) == (2, 1, 3)

        assert running_call.id in ok(holders_text).splitlines()[1]
        (holder,) = doc(holders_json)["holders"]
        assert set(holder) == HOLDER_FIELDS
        assert (holder["task_id"], holder["task"], holder["state"]) == (
            running_call.id, "cli.hold", "RUNNING",
        )  # fmt: skip
        assert isinstance(holder["pid"], int) and holder["fence"] >= 1
        assert holder["lease_left_s"] > 0

        listed = doc(parked_json)
        assert {k: listed[k] for k in ("gate", "offset", "count")} == {
            "gate": "work", "offset": 0, "count": 50,
        }  # fmt: skip
        assert all(set(p) == PARKED_FIELDS for p in listed["parked"])
        assert [(p["position"], p["task_id"], p["waits_for"]) for p in listed["parked"]] == [
            (n, call.id, "gate work") for n, call in enumerate(parked, 1)
        ]
        lines = ok(page).splitlines()  # the 2nd and 3rd in line, and where the next page starts
        assert [line.split()[:2] for line in lines[1:3]] == [
            ["2", parked[1].id],
            ["3", parked[2].id],
        ]
        assert lines[3:] == ["(more may follow: --offset 3)"]

        assert ok(explain_text).startswith(f"cli.hold[{parked[0].id}] PARKED in gate work")
        assert "position 1 in the release order" in explain_text.stdout
        stories = [doc(run) for run in explained]
        assert all(set(story) == EXPLAIN_FIELDS for story in stories)
        first, later, runs_now, done = stories
        assert (first["state"], first["position"], first["final"]) == ("PARKED", 1, False)
        assert "gate work is full (1 of 1 units held)" in first["reason"]
        assert (later["state"], later["position"]) == ("WAITING", None)
        assert "waits for its start time" in later["reason"]
        assert runs_now["state"] == "RUNNING" and runs_now["reason"].startswith("runs on ")
        assert (done["state"], done["final"], done["result_state"]) == (
            "SUCCEEDED", True, "SUCCESS",
        )  # fmt: skip
        assert [e["state"] for e in done["events"]][-1] == "SUCCEEDED"
        assert gate.status().parked == 3  # reading changed nothing


def test_resize_from_1_to_3_under_a_backlog_starts_3_at_once(
    app: Celery, env: dict[str, str]
) -> None:
    gate = Semaphore("work", app=app)
    hold = app.tasks["cli.hold"]
    with worker(app):
        calls = [hold.delay(f"r{n}") for n in range(6)]  # released in this order
        wait_for(lambda: running(app) == 1, 10, "the first hold to run")

        assert doc(cli(env, "resize", "work", "3", "--json")) == {
            "gate": "work", "key": None, "limit": 3, "old_limit": 1,
        }  # fmt: skip
        wait_for(lambda: running(app) == 3, 2.0, "3 holds to run within a hop of the resize")
        status = gate.status()
        assert (status.limit, status.held, status.parked) == (3, 3, 3)

        # Lowering stops new grants until the gate is under the new limit; nothing is stopped.
        assert ok(cli(env, "resize", "work", "1")) == "gate work: limit 3 -> 1\n"
        assert (running(app), gate.status().held) == (3, 3)
        flag(app, "r0")
        wait_for(lambda: gate.status().held == 2, 10, "the first hold to give its room back")
        assert (running(app), gate.status().parked) == (2, 3)
        flag(app, "r1")
        flag(app, "r2")
        wait_for(lambda: calls[3].id in started(app), 10, "the next call once under the limit")
        status = gate.status()
        assert (status.held, status.parked, running(app)) == (1, 2, 1)
        assert app.probe.value("peak") == 3  # type: ignore[attr-defined]

        assert ok(cli(env, "resize", "work", "2", "--key", "k1")).startswith(
            "gate work, key 'k1': limit -> 2"
        )
        assert [op.what for op in gate.journal(3)] == [
            "resize work key k1 -> 2", "resize work 3 -> 1", "resize work 1 -> 3",
        ]  # fmt: skip


def test_pause_stops_new_starts_and_resume_starts_them_at_once(
    app: Celery, env: dict[str, str]
) -> None:
    gate = Semaphore("work", app=app)
    with worker(app):
        first, *_ = holds(app, "p1", 1) + holds(app, "p2", 2)
        wait_for(lambda: running(app) == 1, 10, "the first hold to run")

        assert doc(cli(env, "pause", "work", "--json")) == {"gate": "work", "paused": True}
        flag(app, "p1")
        assert first.get(timeout=10) == "p1"
        # Its release found the gate paused: nothing was granted, so nothing will start.
        wait_for(lambda: gate.status().held == 0, 10, "the first hold to give its room back")
        holds(app, "p2", 1)  # a new call parks too
        status = gate.status()
        assert (status.held, status.parked, status.paused, running(app)) == (0, 3, True, 0)
        row = ok(cli(env, "status")).splitlines()[1].split()
        assert (row[:3], row[5]) == (["work", "0/1", "3"], "yes")

        assert ok(cli(env, "resume", "work")) == "gate work resumed\n"
        wait_for(lambda: running(app) == 1, 2.0, "a hold to start within a hop of the resume")
        assert not gate.status().paused


def test_purge_asks_first_then_leaves_nothing_parked_and_every_purged_call_revoked(
    app: Celery, env: dict[str, str]
) -> None:
    gate = Semaphore("work", app=app)
    with worker(app):
        holder, *parked = holds(app, "q", 5)
        wait_for(lambda: running(app) == 1, 10, "the first hold to run")

        declined = cli(env, "purge", "work", stdin="n\n")
        assert declined.returncode == EXIT_FAILED
        assert "Cancel every parked call of gate work (4 parked now)?" in declined.stderr
        assert "Aborted" in declined.stderr and declined.stdout == ""
        assert gate.status().parked == 4

        assert doc(cli(env, "purge", "work", "--yes", "--json")) == {"gate": "work", "purged": 4}
        assert gate.status().parked == 0
        assert {call.state for call in parked} == {"REVOKED"}
        flag(app, "q")
        assert holder.get(timeout=10) == "q"
        wait_for(lambda: gate.status().held == 0, 10, "the holder to give its room back")
        assert started(app) == {holder.id}


def test_cancel_stops_a_parked_call_for_good_and_revokes_a_running_one(
    app: Celery, env: dict[str, str]
) -> None:
    gate = Semaphore("work", app=app)
    with worker(app):
        holder, doomed, survivor = holds(app, "c", 3)
        wait_for(lambda: running(app) == 1, 10, "the first hold to run")

        assert doc(cli(env, "cancel", doomed.id, "--json")) == {
            "task_id": doomed.id, "gate": "work", "was": "PARKED", "action": "cancelled",
        }  # fmt: skip
        assert doomed.state == "REVOKED"
        assert [p.task_id for p in gate.parked()] == [survivor.id]

        revoked = cli(env, "cancel", holder.id, "--terminate")
        assert ok(revoked).startswith(f"call {holder.id} runs: revoked with terminate")
        wait_for(lambda: holder.id in worker_state.revoked, 10, "the worker to get the revoke")
        flag(app, "c")
        wait_for(lambda: gate.status().held + gate.status().parked == 0, 10, "the gate to empty")
        wait_for(lambda: survivor.ready(), 10, "the survivor to end")
        assert doomed.id not in started(app) and survivor.id in started(app)

        again, unknown = cli_all(env, ("cancel", doomed.id), ("cancel", str(uuid.uuid4())))
        assert again.returncode == EXIT_FAILED
        assert f"call {doomed.id} already ended (CANCELLED): nothing to cancel" in again.stderr
        assert unknown.returncode == EXIT_UNKNOWN and "check the task id" in unknown.stderr


def test_errors_go_to_stderr_with_what_to_do_and_their_exit_status(
    env: dict[str, str], app: Celery
) -> None:
    port = free_port()
    away = {**env, "CS_SLOTS": f"redis://:s3cret@127.0.0.1:{port}/0"}
    procs = [
        spawn(env, "holders", "nosuch"), spawn(env, "explain", "no-such-id", "--json"),
        spawn(env, "resize", "work", "0"), spawn(away, "status", "--json"),
        spawn(away, "pause", "work"),
    ]  # fmt: skip
    gate, call, limit, down, op = map(finish, procs)

    assert gate.returncode == EXIT_UNKNOWN and gate.stdout == ""
    assert gate.stderr == "Error: unknown gate 'nosuch'; known gates: work\n"
    assert call.returncode == EXIT_UNKNOWN and call.stdout == ""
    assert call.stderr.startswith("Error: no gate knows call no-such-id: it was not gated")
    assert limit.returncode == EXIT_USAGE
    assert limit.stderr == "Error: the limit of gate 'work' must be a positive integer, got 0\n"
    for run in (down, op):
        assert run.returncode == EXIT_UNAVAILABLE and run.stdout == ""
        assert f"cannot reach the semaphore Redis at redis://:**@127.0.0.1:{port}/0" in run.stderr
        assert "semaphore_redis_url" in run.stderr and "s3cret" not in run.stderr


def test_graph_prints_dot_or_svg_and_says_when_graphviz_is_missing(
    app: Celery, env: dict[str, str], tmp_path: Any
) -> None:
    holder, parked = holds(app, "g", 2)  # no worker: one granted, one parked
    no_dot = {**env, "PATH": str(tmp_path)}
    dot, svg = cli_all(env, ("graph",), ("graph", "work", "--svg"))  # NAME: the only gate
    missing = cli(no_dot, "graph", "work", "--svg")

    assert ok(dot).startswith("digraph gate {\n  rankdir=LR;")
    assert 'label="gate work"' in dot.stdout and '"next parked"' in dot.stdout
    assert holder.id in dot.stdout and parked.id in dot.stdout
    assert "<svg" in ok(svg) and holder.id[:8] in svg.stdout
    assert missing.returncode == EXIT_FAILED and "Graphviz" in missing.stderr


def test_status_watch_refreshes_until_interrupted(env: dict[str, str], app: Celery) -> None:
    proc = subprocess.Popen(
        command("status", "--watch", "--json", "--interval", "0.2"),
        cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        frames = [json.loads(proc.stdout.readline()) for _ in range(2)]  # type: ignore[union-attr]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.communicate()
    assert [[g["gate"] for g in frame["gates"]] for frame in frames] == [["work"], ["work"]]


def serving(env: Mapping[str, str], *args: str, url: str) -> tuple[str, str]:
    """Start a serving command, read ``url`` once it answers, Ctrl-C it; (body, its stderr)."""
    proc = subprocess.Popen(
        command(*args), cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip

    def answer() -> str | None:
        if proc.poll() is not None:
            pytest.fail(f"{args} exited {proc.returncode}: {proc.communicate()}")
        return scrape(url)

    try:
        body = wait_for(answer, 20, f"{url} to answer")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        out, err = proc.communicate()
    return str(body), out + err


def test_metrics_serves_prometheus_text_with_the_calls_made(
    app: Celery, env: dict[str, str]
) -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    with worker(app):
        assert [r.get(timeout=10) for r in [app.tasks["proj.add"].delay(1, n) for n in range(3)]]
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    text, said = serving(env, "metrics", "--port", str(port), url=url)
    assert f"serving Prometheus metrics on {url}" in said
    samples = {
        (s.name, s.labels.get("gate")): s.value
        for family in parser.text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("celery_semaphore_granted_total", "work")] == 3
    assert samples[("celery_semaphore_released_total", "work")] == 3
    assert samples[("celery_semaphore_up", None)] == 1


def test_dashboard_serves_its_page_until_interrupted(app: Celery, env: dict[str, str]) -> None:
    pytest.importorskip("celery_semaphore.dashboard")
    port = free_port()
    page, said = serving(env, "dashboard", "--port", str(port), url=f"http://127.0.0.1:{port}/")
    assert "<html" in page.lower() and f"127.0.0.1:{port}" in said


def scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return None


def test_metrics_and_dashboard_say_what_to_install_when_they_cannot_load(
    env: dict[str, str], app: Celery
) -> None:
    blocked = {**env, "CS_BLOCK_IMPORTS": "prometheus_client,celery_semaphore.dashboard"}
    metrics, board = cli_all(blocked, ("metrics", "--port", "9"), ("dashboard",))
    assert metrics.returncode == EXIT_FAILED
    assert "pip install 'celery-semaphore[prometheus]'" in metrics.stderr
    assert board.returncode == EXIT_FAILED and "dashboard is not available" in board.stderr


def test_colour_and_redrawing_only_on_a_terminal(env: dict[str, str], app: Celery) -> None:
    plain = on_terminal(env, "--no-color", "semaphore", "status")
    watched = on_terminal(env, "semaphore", "status", "--watch", "--interval", "0.2", frames=2)

    assert "\x1b[1mGATE" in watched and "work" in watched
    assert "\x1b[" not in plain and plain.split()[:2] == ["GATE", "HELD/LIMIT"]
    assert watched.count("\x1b[H\x1b[2J") >= 2 and "Ctrl-C stops" in watched
