"""``python -m benchmarks.profile``: where the time of a gated call goes, per call (issue 15).

Worker side: a ``celery worker -P solo -c 1`` subprocess runs under ``python -m cProfile``
(the solo pool runs every task in the worker's main thread, the one cProfile watches) and
consumes trivial calls of ``bench.plain`` (``BENCH_GATED=0``: no extension in the process)
or ``bench.gated_free`` (a gate that never fills), all queued before it starts; it is
stopped with SIGTERM once every call recorded itself, and cProfile writes its stats as the
process exits. A profile covers the worker's start and stop too, so each variant runs twice,
with N calls and with a base of n calls: (profile(N) - profile(n)) / (N - n) is the cost of
one call in the steady state, start, stop and first-call costs cancelled.

Submitter side: cProfile in a fresh process around N ``.delay()`` calls (after a warm-up) to
a queue nobody consumes: plain, and gated with a free unit (gate ``free``).

Every variant also runs once more without the profiler, for the wall clock (and CPU) per
call the profiler inflates, and for the Redis server's time per call (``INFO commandstats``).
Functions are summed into categories by module path; C functions and standard-library
helpers (``typing``, ``enum``, ``functools``, ``abc``, ...) count in the category of their
callers, JSON in that of whoever asked for it (celery_semaphore's records, or a message).
Socket calls, redis-py's parsers and hiredis keep categories of their own. cProfile's clock is
the wall clock: a socket call includes the wait for Redis' answer. In the worker's difference,
a function run less than once in 20 calls is start/stop noise, and the epoll wait is idle
time: neither counts in a per-call total.

Each child process (workers, the submitter and the process that queues the batches) imports
``celery_semaphore`` and ``benchmarks.proj`` from ``--source`` (default: this checkout), so a
tree extracted elsewhere (``git archive``) is profiled by this tool unchanged. ``--hiredis``
runs everything twice: once with redis-py's pure-Python parser, once with hiredis, which
redis-py picks up when it is importable (it has no switch of its own): it is installed with
pip into a directory of its own (``--hiredis-dir``) that only the hiredis runs put on their
``PYTHONPATH``; the environment this runs in is left as it was.

Examples::

    python -m benchmarks.profile                     # 3000 calls per variant, about 2 minutes
    python -m benchmarks.profile --calls 1000 --out profile.md
    python -m benchmarks.profile --source /tmp/before --label "before (commit f5d7aaa)"
    python -m benchmarks.profile --hiredis           # both parsers, 1500 calls each: 2 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import pstats
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

__all__ = ["Breakdown", "breakdown", "category_of", "main"]

TOOL = Path(__file__).resolve()
#: The checkout this file belongs to: the default ``--source``.
ROOT = TOOL.parent.parent
#: Where ``--hiredis`` installs hiredis when the environment has none.
HIREDIS_DIR = Path(tempfile.gettempdir()) / "celery-semaphore-profile-hiredis"

# A child runs this file by path (runpy, no directory added to sys.path), so that it imports
# celery_semaphore and benchmarks.proj from --source, even one without this file.
_BOOT = (
    "import runpy, sys; path = sys.argv.pop(1); sys.argv[0] = path; "
    "runpy.run_path(path, run_name='__main__')"
)

Key = tuple[str, int, str]  # pstats: (file, line, function)

# -- categories ----------------------------------------------------------------------------

_POOL = {"get_connection", "release", "_checkpid", "make_connection", "owns_connection",
         "_get_free_connections", "get_encoder"}  # fmt: skip
_PACK = {"pack_command", "pack_commands", "pack"}
_PARSE = {"read_response", "can_read", "parse_response"}
_SEMAPHORE_HEADERS = {"header_of", "group_of_request"}

SOCKET = "socket send/recv (C; includes the wait for Redis)"
PARSING = "redis-py: response parsing (parser, hiredis, callbacks)"
JSON_RECORDS = "JSON of celery_semaphore's records"
SERIALIZATION = "kombu/JSON: message serialization (kombu, json, base64)"
OTHER = "other (stdlib, vine, billiard, ...)"
STARTUP = "importlib, regex compiles (imports at run time)"
EVENT_LOOP = "event loop: kombu hub"
EPOLL = "epoll wait (idle at start and stop included)"
NOISE = "start/stop noise: functions not run on every call"
#: Not in a per-call total: the worker idles in epoll for as long as its start and its stop
#: take, and what only its start and stop run must cancel out between the two profiles.
NOT_PER_CALL = (EPOLL, NOISE)

PACKING = "redis-py: command packing (pack_command, encoder)"
WORKER = "celery: worker, request, trace"

# First match wins: (category, path parts, function names or empty for all).
_RULES: tuple[tuple[str, tuple[str, ...], frozenset[str]], ...] = (
    (
        STARTUP,
        ("<frozen importlib", "/importlib/", "/re/_parser.py", "/re/_compiler.py"),
        frozenset(),
    ),
    ("redis-py: pool checkout/release", ("/redis/connection.py",), frozenset(_POOL)),
    (PACKING, ("/redis/connection.py",), frozenset(_PACK)),
    (PACKING, ("/redis/_parsers/encoders.py",), frozenset()),
    (PARSING, ("/redis/connection.py", "/redis/client.py"), frozenset(_PARSE)),
    (PARSING, ("/redis/_parsers/",), frozenset()),
    ("redis-py: client, Script, retry, connection (other)", ("/redis/",), frozenset()),
    ("celery: signal dispatch", ("/celery/utils/dispatch/",), frozenset()),
    ("logging", ("/logging/", "/celery/utils/log.py"), frozenset()),
    (SERIALIZATION, ("/kombu/serialization.py", "/kombu/utils/json.py", "/base64.py"), frozenset()),
    (EVENT_LOOP, ("/kombu/asynchronous/", "/kombu/utils/eventio.py"), frozenset()),
    (WORKER, ("/celery/worker/", "/celery/app/trace.py", "/celery/concurrency/"), frozenset()),
    ("celery: app, amqp, canvas (other)", ("/celery/",), frozenset()),
    ("kombu: transport, messaging (other)", ("/kombu/",), frozenset()),
    ("the task itself (benchmarks/proj.py)", ("/benchmarks/",), frozenset()),
)


# Standard-library helpers whose time belongs to whoever used them.
_HELPERS = ("/typing.py", "/enum.py", "/functools.py", "/contextlib.py", "/weakref.py",
            "/_weakrefset.py", "/abc.py", "/copy.py", "/collections/__init__.py")  # fmt: skip


def _is_json(filename: str) -> bool:
    return "/json/" in filename and "/site-packages/" not in filename


def _is_helper(filename: str) -> bool:
    if filename.startswith("<frozen "):
        return "importlib" not in filename  # abc, os, _collections_abc, ...
    return filename.endswith(_HELPERS) and "/site-packages/" not in filename


def category_of(key: Key) -> str | None:
    """The category of one function, or ``None`` when it counts in its callers' categories
    (C functions, the standard library's ``json`` and helpers such as ``typing``, ``enum``)."""
    filename, _, name = key
    if name == "<module>":
        return STARTUP
    if filename == "~":
        if "_socket.socket" in name:
            return SOCKET
        if "select.epoll" in name:
            return EPOLL
        if "hiredis" in name:
            return PACKING if "pack_command" in name else PARSING
        return None
    if _is_json(filename) or _is_helper(filename):
        return None
    if "/celery_semaphore/" in filename:
        if name in _SEMAPHORE_HEADERS and filename.endswith("/guard.py"):
            return "celery_semaphore: header reading (guard.header_of, group_of_request)"
        module = filename.rsplit("/celery_semaphore/", 1)[1].removesuffix(".py")
        return f"celery_semaphore: {module.replace('/', '.')}"
    for category, parts, names in _RULES:
        if any(p in filename for p in parts) and (not names or name in names):
            return category
    return OTHER


def _owners(stats: Mapping[Key, Any]) -> dict[Key, dict[str, float]]:
    """Each function's categories, as fractions: its own, or its callers' (weighted by the
    time it spent for each) for a C function, ``json`` or a helper."""
    memo: dict[Key, dict[str, float]] = {}

    def owners(key: Key) -> dict[str, float]:
        if key in memo:
            return memo[key]
        memo[key] = {OTHER: 1.0}  # a cycle of inheriting functions ends here
        own = category_of(key)
        if own is not None:
            memo[key] = {own: 1.0}
            return memo[key]
        callers = stats[key][4] if key in stats else {}
        weights = {c: v[2] for c, v in callers.items() if v[2] > 0}
        total = sum(weights.values())
        if not total:
            weights, total = {c: 1.0 for c in callers}, float(len(callers))
        result: dict[str, float] = defaultdict(float)
        for caller, weight in weights.items():
            for category, share in owners(caller).items():
                result[category] += share * weight / total
        if not result:
            result[OTHER] = 1.0
        if _is_json(key[0]) or "_json" in key[2]:
            # JSON by whoever asked for it: celery_semaphore's records, else a message.
            json_result: dict[str, float] = defaultdict(float)
            for category, share in result.items():
                mine = category.startswith("celery_semaphore") or category == JSON_RECORDS
                json_result[JSON_RECORDS if mine else SERIALIZATION] += share
            result = json_result
        memo[key] = dict(result)
        return memo[key]

    return {key: owners(key) for key in stats}


@dataclass
class Breakdown:
    """A profile reduced to seconds per function and per category, over ``calls`` calls."""

    calls: int
    functions: dict[Key, tuple[float, float]]  # (ncalls, tottime)
    #: The categories each function's time counts in, as fractions (see :func:`_owners`).
    shares: dict[Key, dict[str, float]]
    parser: str = ""

    @property
    def categories(self) -> dict[str, float]:
        """Seconds per category."""
        out: dict[str, float] = defaultdict(float)
        for key, (_, tottime) in self.functions.items():
            for category, share in self.shares[key].items():
                out[category] += tottime * share
        return dict(out)

    @property
    def total(self) -> float:
        """Seconds of the categories that scale with calls (see :data:`NOT_PER_CALL`)."""
        return sum(v for c, v in self.categories.items() if c not in NOT_PER_CALL)

    def owner(self, key: Key) -> str:
        """The category that has the largest share of a function's time."""
        shares = self.shares.get(key) or {"?": 1.0}
        return max(shares.items(), key=lambda item: item[1])[0]

    def minus(self, base: Breakdown) -> Breakdown:
        """This profile less ``base`` (the same process with fewer calls): the calls in
        between. A function that ran less than once in 20 of them counts as start or stop
        noise (:data:`NOISE`), whatever its category."""
        zero = (0.0, 0.0)
        calls = self.calls - base.calls
        functions, shares = {}, {}
        for k in set(self.functions) | set(base.functions):
            (n, t), (n0, t0) = self.functions.get(k, zero), base.functions.get(k, zero)
            functions[k] = (n - n0, t - t0)
            per_call = abs(n - n0) >= 0.05 * calls
            shares[k] = (self.shares.get(k) or base.shares[k]) if per_call else {NOISE: 1.0}
        return Breakdown(calls, functions, shares, self.parser)

    def per_call_us(self, seconds: float) -> float:
        """``seconds`` of this profile per call, in microseconds."""
        return seconds / self.calls * 1e6


def _normal(key: Key) -> Key:
    # A C method's name may hold its type's address, which differs between processes.
    return (key[0], key[1], re.sub(r" at 0x[0-9a-f]+", "", key[2]))


def breakdown(path: Path, calls: int) -> Breakdown:
    """Read cProfile's stats at ``path`` (a run of ``calls`` calls) into a :class:`Breakdown`."""
    stats: dict[Key, Any] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    owners = _owners(stats)
    functions: dict[Key, tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
    shares: dict[Key, dict[str, float]] = {}
    for key, (_, ncalls, tottime, _, _) in stats.items():
        normal = _normal(key)
        before = functions[normal]
        functions[normal] = (before[0] + ncalls, before[1] + tottime)
        shares[normal] = owners[key]
    # The parser that read replies on every call (an import alone runs the others' modules).
    used = " ".join(k[0] for k, v in stats.items() if v[1] >= calls)
    parsers = {"hiredis": "hiredis", "resp3": "pure Python, RESP3", "resp2": "pure Python, RESP2"}
    found = [name for part, name in parsers.items() if f"_parsers/{part}.py" in used]
    return Breakdown(calls, dict(functions), shares, " + ".join(found) or "?")


# -- processes -----------------------------------------------------------------------------


@dataclass
class Timing:
    """A run without (or with) the profiler: wall clock and CPU seconds over ``calls`` calls."""

    calls: int
    wall_s: float
    cpu_s: float | None = None
    #: ``{command: (calls, server µs)}`` per call (INFO commandstats; no profiler).
    server: dict[str, tuple[float, float]] = field(default_factory=dict)

    def wall_us(self) -> float:
        """Wall clock per call, in microseconds."""
        return self.wall_s / self.calls * 1e6

    def cpu_us(self) -> float | None:
        """CPU per call, in microseconds (``None`` when not measured)."""
        return None if self.cpu_s is None else self.cpu_s / self.calls * 1e6


@dataclass
class Side:
    """The figures of one side (worker or submitter) for one variant (plain or gated)."""

    profile: Breakdown
    profiled: Timing
    unprofiled: Timing


@dataclass
class Run:
    """Everything measured with one parser."""

    parser: str
    source: str = ""
    #: Whether redis-py found hiredis in the children (``redis.utils.HIREDIS_AVAILABLE``).
    hiredis: bool = False
    worker: dict[str, Side] = field(default_factory=dict)
    submitter: dict[str, Side] = field(default_factory=dict)


def _start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A private redis-server on a free loopback port, without persistence (as cluster.py)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    args = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(workdir), "--daemonize", "no", "--loglevel", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 10.0
    while True:
        with contextlib.suppress(redis.RedisError, OSError):
            if client.ping():
                return proc, port
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"redis-server did not start on port {port}")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGTERM ``proc``'s process group, then SIGKILL; its exit code, ``None`` if killed."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            return None
    return proc.returncode


class Profiler:
    """One tool run: the private Redis, the source tree and the child processes."""

    def __init__(self, args: argparse.Namespace, workdir: Path, port: int) -> None:
        self.args = args
        self.workdir = workdir
        self.source = Path(args.source).resolve()
        self.run_id = uuid.uuid4().hex[:6]
        base = f"redis://127.0.0.1:{port}"
        self.urls = {"broker": f"{base}/0", "probe": f"{base}/1", "slots": f"{base}/2"}
        self.probe = redis.Redis.from_url(self.urls["probe"])

    def env(self, parser: str, prefix: str, gated: bool) -> dict[str, str]:
        """The environment of a child: the source tree first, hiredis or its blocker next."""
        path = [str(self.source)]
        if parser == "hiredis" and not _base_has_hiredis():
            path.append(str(self.args.hiredis_dir))
        elif parser == "python" and _base_has_hiredis():
            path.append(str(_blocker(self.workdir)))
        env = dict(os.environ)
        env.update(
            BENCH_BROKER=self.urls["broker"],
            BENCH_SLOTS=self.urls["slots"],
            BENCH_PROBE=self.urls["probe"],
            BENCH_PREFIX=prefix,
            BENCH_LIMIT="4",
            # Never full: every call queued in one run holds a unit until it is consumed.
            BENCH_FREE_LIMIT=str(4 * self.args.calls + self.args.warmup + 1000),
            # Longer than any batch waits in the queue: no lease runs out before its start.
            BENCH_LEASE="3600",
            BENCH_GATED="1" if gated else "0",
            PYTHONPATH=os.pathsep.join([*path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        )
        return env

    def child(self, env: dict[str, str], spec: dict[str, Any], name: str) -> dict[str, Any]:
        """Run this file in a child process on ``spec``; returns what it wrote."""
        spec_path = self.workdir / f"{name}.json"
        result_path = self.workdir / f"{name}.result.json"
        spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.run(
                [sys.executable, "-c", _BOOT, str(TOOL), "--child", str(spec_path)],
                cwd=self.source,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=120 + spec.get("calls", 0) * 0.05,
            )
        if proc.returncode != 0:
            raise RuntimeError(f"child {name} failed:\n{_tail(log)}")
        return dict(json.loads(result_path.read_text()))

    def worker(
        self, env: dict[str, str], name: str, queue: str, tag: str, calls: int, stats: Path | None
    ) -> Timing:
        """Run a solo worker on ``queue`` (``stats``: under cProfile) until ``calls`` calls
        recorded themselves under ``tag``, then stop it; returns its timing."""
        cmd = [sys.executable]
        if stats is not None:
            cmd += ["-m", "cProfile", "-o", str(stats)]
        cmd += [
            "-m", "celery", "-A", "benchmarks.proj", "worker", "-P", "solo", "-c", "1",
            "-Q", queue, "-n", f"{name}@%h", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-l", "WARNING",
        ]  # fmt: skip
        log = self.workdir / f"{name}.log"
        before = command_stats(self.probe)
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=self.source,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            first: tuple[int, float] | None = None
            deadline = time.monotonic() + 60.0 + calls * 0.05
            while (done := int(self.probe.llen(tag))) < calls:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker {name} exited:\n{_tail(log)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {name}: {done} of {calls} calls in time")
                if first is None and done:
                    first = (done, _cpu_s(proc.pid))
                time.sleep(0.005)
            cpu = None if first is None else (_cpu_s(proc.pid) - first[1], calls - first[0])
            server = stats_delta(before, command_stats(self.probe), calls)
        finally:
            code = _stop(proc, timeout=60.0)
        if code is None:
            raise RuntimeError(f"worker {name} did not exit on SIGTERM:\n{_tail(log)}")
        if stats is not None and not (stats.exists() and stats.stat().st_size):
            raise RuntimeError(f"worker {name} exited ({code}) without its stats:\n{_tail(log)}")
        spans = [r.split() for r in self.probe.lrange(tag, 0, -1)]
        self.probe.delete(tag)
        starts, ends = [float(s[0]) for s in spans], [float(s[1]) for s in spans]
        # The tasks' own timestamps: the first start to the last end, per call.
        timing = Timing(calls, (max(ends) - min(starts)) * calls / max(1, calls - 1), None, server)
        if cpu is not None and cpu[1] > 0:
            timing.cpu_s = cpu[0] / cpu[1] * calls
        return timing

    def run(self, parser: str) -> Run:
        """Profile both sides with one parser; plain and gated take turns, so that a change
        of the machine's load falls on both alike."""
        args = self.args
        n, base = args.calls, args.base_calls
        run = Run(parser)
        variants = ("plain", "gated")
        prefix = {v: f"prof{self.run_id}{parser[0]}{v[0]}" for v in variants}
        env = {v: self.env(parser, prefix[v], v == "gated") for v in variants}
        counts = {"clock": n, "profiled": n, "base": base}
        batches = {
            v: {k: (f"{prefix[v]}.{k}", f"{prefix[v]}:{k}", c) for k, c in counts.items()}
            for v in variants
        }
        stats = {
            v: {k: self.workdir / f"{prefix[v]}-worker-{k}.prof" for k in ("profiled", "base")}
            for v in variants
        }
        for v in variants:
            # Queued before any worker starts, so each worker consumes a full queue.
            spec = {"gated": v == "gated", "batches": list(batches[v].values())}
            self.child(env[v], {**spec, "calls": sum(counts.values())}, f"{prefix[v]}-queue")
        timings: dict[str, dict[str, Timing]] = {v: {} for v in variants}
        # The runs without the profiler first: they write what bytecode the others would
        # compile and warm the file cache, so that both profiles start alike.
        for kind in ("clock", "profiled", "base"):
            for v in variants:
                path = stats[v].get(kind)
                timings[v][kind] = self.worker(
                    env[v], f"{prefix[v]}-{kind}", *batches[v][kind], path
                )
        for v in variants:
            profile = breakdown(stats[v]["profiled"], n).minus(breakdown(stats[v]["base"], base))
            run.worker[v] = Side(profile, timings[v]["profiled"], timings[v]["clock"])
        for v in variants:
            sub_stats = self.workdir / f"{prefix[v]}-submit.prof"
            spec = {
                "gated": v == "gated",
                "batches": [],
                "submit": {"warmup": args.warmup, "calls": n, "stats": str(sub_stats)},
                "calls": 2 * n,
            }
            out = self.child(env[v], spec, f"{prefix[v]}-submit")
            server = {k: (float(c), float(us)) for k, (c, us) in out["server"].items()}
            run.submitter[v] = Side(
                breakdown(sub_stats, n),
                Timing(n, out["profiled_wall_s"], out["profiled_cpu_s"]),
                Timing(n, out["wall_s"], out["cpu_s"], server),
            )
            run.source = out.get("source") or run.source
            run.hiredis = bool(out["hiredis"])
        return run


def _cpu_s(pid: int) -> float:
    """User plus system CPU seconds of one process (``/proc/<pid>/stat``)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def command_stats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """``{command: (calls, µs)}`` of the server so far (``INFO commandstats``)."""
    info = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in info.items()}


def stats_delta(
    before: Mapping[str, tuple[int, int]], after: Mapping[str, tuple[int, int]], calls: int
) -> dict[str, tuple[float, float]]:
    """Commands and server µs per call between two :func:`command_stats`, less what this
    tool itself sends (``INFO``, the probe's ``LLEN``)."""
    out = {}
    for name, (n, usec) in after.items():
        n0, usec0 = before.get(name, (0, 0))
        if n > n0 and name not in ("info", "llen"):
            out[name] = ((n - n0) / calls, (usec - usec0) / calls)
    return out


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _base_has_hiredis() -> bool:
    return importlib.util.find_spec("hiredis") is not None


def _blocker(workdir: Path) -> Path:
    """A directory whose sitecustomize hides an installed hiredis (the pure-Python runs)."""
    path = workdir / "no-hiredis"
    path.mkdir(exist_ok=True)
    (path / "sitecustomize.py").write_text("import sys\nsys.modules['hiredis'] = None\n")
    return path


def _install_hiredis(target: Path) -> None:
    """``pip install --target`` hiredis once: the environment of this process stays as it is."""
    if (target / "hiredis").is_dir():
        return
    print(f"installing hiredis into {target} (only the hiredis runs use it)", file=sys.stderr)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), "hiredis"],
        check=True,
        timeout=300,
    )


# -- the child process ---------------------------------------------------------------------


def _child(spec_path: str) -> None:
    """In a child: queue the batches of ``spec``, then (``submit``) profile and time
    ``.delay()``; writes a JSON result."""
    import cProfile

    import redis.utils

    from benchmarks.proj import app_from_env, gated_task_name

    spec = json.loads(Path(spec_path).read_text())
    app = app_from_env(os.environ)
    task = app.tasks[gated_task_name("free") if spec["gated"] else "bench.plain"]
    for queue, tag, calls in spec["batches"]:
        for _ in range(calls):
            task.apply_async((0, tag), queue=queue)
    result: dict[str, Any] = {"hiredis": redis.utils.HIREDIS_AVAILABLE}
    module = sys.modules.get("celery_semaphore")
    result["source"] = str(Path(module.__file__).parent) if module and module.__file__ else ""
    submit = spec.get("submit")
    if submit:
        tag = f"{os.environ['BENCH_PREFIX']}:submit"  # never consumed: the default queue
        for _ in range(submit["warmup"]):
            task.delay(0, tag)
        n = submit["calls"]
        profiler = cProfile.Profile()
        wall, cpu = time.perf_counter(), time.process_time()
        profiler.enable()
        for _ in range(n):
            task.delay(0, tag)
        profiler.disable()
        result["profiled_wall_s"] = time.perf_counter() - wall
        result["profiled_cpu_s"] = time.process_time() - cpu
        profiler.dump_stats(submit["stats"])
        server = redis.Redis.from_url(os.environ["BENCH_SLOTS"])
        before = command_stats(server)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            task.delay(0, tag)
        result["wall_s"] = time.perf_counter() - wall
        result["cpu_s"] = time.process_time() - cpu
        result["server"] = stats_delta(before, command_stats(server), n)
    Path(spec["result"]).write_text(json.dumps(result))


# -- the report ----------------------------------------------------------------------------

_HEAD = (
    "| worker plain | worker gated | worker Δ | submitter plain | submitter gated | "
    "submitter Δ |\n|---|---|---|---|---|---|---|"
)


def _us(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.1f}" if sign else f"{value:.1f}"


def _triple(p: float | None, g: float | None, fmt: str = "{:.1f}", bold: bool = False) -> list[str]:
    if p is None or g is None:
        return [_us(p), _us(g), "—"]
    delta = "{:+" + fmt[2:]
    cells = [fmt.format(p), fmt.format(g), delta.format(g - p)]
    return [f"**{c}**" for c in cells] if bold else cells


def _totals(run: Run) -> list[str]:
    def both(get: Any, fmt: str = "{:.1f}") -> str:
        cells: list[str] = []
        for sides in (run.worker, run.submitter):
            cells += _triple(get(sides["plain"]), get(sides["gated"]), fmt)
        return " | ".join(cells)

    def scripts(side: Side, i: int) -> float:
        return side.unprofiled.server.get("evalsha", (0.0, 0.0))[i]

    def commands(side: Side) -> float:
        return sum(n for n, _ in side.unprofiled.server.values())

    rows = (
        ("profile total per call, cProfile clock (profiler on)", lambda s: _total(s)),
        ("wall clock per call, profiler on", lambda s: s.profiled.wall_us()),
        ("**wall clock per call, no profiler**", lambda s: s.unprofiled.wall_us()),
        ("CPU per call, no profiler (worker: /proc, 10 ms ticks)", lambda s: s.unprofiled.cpu_us()),
        ("Redis: server µs per call in scripts (EVALSHA)", lambda s: scripts(s, 1)),
    )
    lines = [f"| Per call (µs) {_HEAD}"]
    lines += [f"| {title} | {both(get)} |" for title, get in rows]
    lines.append(f"| Redis: scripts per call | {both(lambda s: scripts(s, 0), '{:.2f}')} |")
    lines.append(
        f"| Redis: commands per call (the scripts' own included) | {both(commands, '{:.1f}')} |"
    )
    return lines


def _categories(run: Run, fold_us: float = 1.0) -> list[str]:
    per: dict[tuple[str, str], dict[str, float]] = {}
    for side, sides in (("worker", run.worker), ("submitter", run.submitter)):
        for variant, s in sides.items():
            per[(side, variant)] = {
                c: s.profile.per_call_us(v) for c, v in s.profile.categories.items()
            }
    keys = list(per)
    names = {c for values in per.values() for c in values} - set(NOT_PER_CALL)

    def delta(c: str) -> float:
        return sum(
            per[(side, "gated")].get(c, 0.0) - per[(side, "plain")].get(c, 0.0)
            for side in ("worker", "submitter")
        )

    def cells(values: list[float], bold: bool = False) -> str:
        out = []
        for i in (0, 2):
            out += _triple(values[i], values[i + 1], bold=bold)
        return " | ".join(out)

    lines = [f"| Category (µs per call, cProfile clock) {_HEAD}"]
    small = [0.0] * 4
    total = [0.0] * 4
    for c in sorted(names, key=delta, reverse=True):
        values = [per[k].get(c, 0.0) for k in keys]
        total = [t + v for t, v in zip(total, values, strict=True)]
        if max(abs(v) for v in values) < fold_us:
            small = [t + v for t, v in zip(small, values, strict=True)]
        else:
            lines.append(f"| {c} | {cells(values)} |")
    lines.append(f"| smaller categories (each under {fold_us:g} µs) | {cells(small)} |")
    lines.append(f"| **total** | {cells(total, bold=True)} |")
    for c in NOT_PER_CALL:
        values = [per[k].get(c, 0.0) for k in keys]
        lines.append(f"| not in the total: {c} | {cells(values)} |")
    return lines


def _top(side: str, sides: Mapping[str, Side], top: int, roots: tuple[str, ...]) -> list[str]:
    plain, gated = sides["plain"].profile, sides["gated"].profile
    zero = (0.0, 0.0)

    def per_call(b: Breakdown, k: Key) -> tuple[float, float]:
        n, t = b.functions.get(k, zero)
        return n / b.calls, t / b.calls * 1e6

    def diff(k: Key) -> float:
        return per_call(gated, k)[1] - per_call(plain, k)[1]

    # Functions run at least once every other call (not what a start or a stop ran), and
    # not the idle wait.
    keys = [
        k
        for k in set(plain.functions) | set(gated.functions)
        if max(per_call(plain, k)[0], per_call(gated, k)[0]) >= 0.5
        and (gated.owner(k) if k in gated.shares else plain.owner(k)) not in NOT_PER_CALL
    ]
    lines = [
        f"Top {top} functions of the {side} by own time (tottime), gated - plain:",
        "",
        "| Function | its time counts in | calls per call, plain / gated | µs plain | "
        "µs gated | Δ µs |",
        "|---|---|---|---|---|---|",
    ]
    for k in sorted(keys, key=diff, reverse=True)[:top]:
        (pn, pt), (gn, gt) = per_call(plain, k), per_call(gated, k)
        owner = gated.owner(k) if k in gated.shares else plain.owner(k)
        lines.append(
            f"| {_label(k, roots)} | {owner} | {pn:.2f} / {gn:.2f} | {pt:.1f} | {gt:.1f} | "
            f"{gt - pt:+.1f} |"
        )
    return lines


def _label(key: Key, roots: tuple[str, ...]) -> str:
    filename, line, name = key
    if filename == "~":
        return f"`{name}`"
    for root in roots:
        if root and filename.startswith(root + "/"):
            filename = filename[len(root) + 1 :]
            break
    else:
        for marker in ("/site-packages/", "/lib/python3.11/"):
            if marker in filename:
                filename = filename.split(marker, 1)[1]
                break
    return f"`{filename}:{line}({name})`"


def render_run(run: Run, top: int, roots: tuple[str, ...]) -> str:
    """One parser's tables: totals, categories, and the functions that differ most."""
    found = {
        f"{side} {v}": s.profile.parser
        for side, sides in (("worker", run.worker), ("submitter", run.submitter))
        for v, s in sides.items()
    }
    lines = [
        f"### Parser: {'hiredis' if run.hiredis else 'pure Python'}",
        "",
        f"redis-py's `HIREDIS_AVAILABLE` in the children: {run.hiredis}; parser modules seen "
        "in the profiles: " + ", ".join(f"{k}: {v}" for k, v in found.items()) + ".",
        "",
        *_totals(run),
        "",
        *_categories(run),
        "",
    ]
    for side, sides in (("worker", run.worker), ("submitter", run.submitter)):
        lines += [*_top(side, sides, top, roots), ""]
    return "\n".join(lines)


def _compare(runs: list[Run]) -> str:
    a, b = runs
    lines = [
        "### hiredis against the pure-Python parser",
        "",
        "| Per call (µs) | pure Python | hiredis | hiredis - pure Python |",
        "|---|---|---|---|",
    ]
    figures: tuple[tuple[str, Any], ...] = (
        ("wall clock, no profiler", lambda s: s.unprofiled.wall_us()),
        ("CPU, no profiler", lambda s: s.unprofiled.cpu_us()),
        ("profile total", _total),
        ("command packing (profiled)", lambda s: _cat(s, PACKING)),
        ("response parsing (profiled)", lambda s: _cat(s, PARSING)),
    )
    for side in ("worker", "submitter"):
        for variant in ("plain", "gated"):
            for title, get in figures:
                x, y = get(getattr(a, side)[variant]), get(getattr(b, side)[variant])
                diff = None if x is None or y is None else y - x
                lines.append(
                    f"| {side} {variant}: {title} | {_us(x)} | {_us(y)} | {_us(diff, sign=True)} |"
                )
    return "\n".join(lines)


def _total(side: Side) -> float:
    return side.profile.per_call_us(side.profile.total)


def _cat(side: Side, category: str) -> float:
    return side.profile.per_call_us(side.profile.categories.get(category, 0.0))


def _source_label(source: Path) -> str:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read-only: never refresh the index
    try:
        sha = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            env=env,
            timeout=10,
            check=True,
        ).stdout.strip()
        top = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--show-toplevel"],
            capture_output=True,
            text=True,
            env=env,
            timeout=10,
            check=True,
        ).stdout.strip()
        if Path(top).resolve() != source:
            return f"{source} (not a git checkout)"
        dirty = subprocess.run(
            ["git", "-C", str(source), "diff", "--quiet", "HEAD", "--", "celery_semaphore"],
            env=env,
            timeout=10,
        ).returncode
        return f"{source}, commit {sha}" + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"{source} (not a git checkout)"


def render(args: argparse.Namespace, runs: list[Run], elapsed_s: float) -> str:
    """The whole Markdown report."""
    import celery

    source = Path(args.source).resolve()
    roots = (str(source), str(ROOT))
    label = f" — {args.label}" if args.label else ""
    lines = [
        f"## Profile per call: gated minus plain{label}",
        "",
        f"- Source: {_source_label(source)}; celery_semaphore imported from `{runs[0].source}`.",
        f"- {args.calls} trivial calls per variant. Worker: `celery worker -P solo -c 1` under "
        f"`python -m cProfile`, per call = (profile of {args.calls} calls - profile of "
        f"{args.base_calls}) / {args.calls - args.base_calls}. Submitter: cProfile around "
        f"{args.calls} `.delay()` after {args.warmup} unprofiled, to a queue nobody consumes.",
        "- Δ = gated - plain. cProfile's clock is the wall clock and the profiler inflates every "
        "function call: scale by the 'no profiler' rows. Wall clock per call of the worker "
        "from the tasks' own timestamps (first start to last end).",
        f"- Python {platform.python_version()}, Celery {celery.__version__}, redis-py "
        f"{redis.__version__}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
        f"at the end; {elapsed_s:.0f} s in all.",
        "",
    ]
    for run in runs:
        lines += [render_run(run, args.top, roots), ""]
    if len(runs) == 2:
        lines += [_compare(runs), ""]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.profile",
        description="Per-call profile of gated against plain calls, worker and submitter.",
    )
    p.add_argument(
        "--calls",
        type=int,
        default=None,
        help="calls per variant (default 3000; 1500 with --hiredis, which runs everything twice)",
    )
    p.add_argument(
        "--base-calls",
        type=int,
        default=None,
        help="calls of the worker's base run, subtracted (default calls / 10)",
    )
    p.add_argument("--warmup", type=int, default=200, help="unprofiled submits first")
    p.add_argument("--out", type=Path, default=None, help="also write the report here")
    p.add_argument(
        "--source",
        default=str(ROOT),
        help="tree to import celery_semaphore and benchmarks.proj from",
    )
    p.add_argument("--label", default="", help="a title for the report, e.g. 'before'")
    p.add_argument(
        "--hiredis", action="store_true", help="run with the pure-Python parser and with hiredis"
    )
    p.add_argument(
        "--hiredis-dir",
        type=Path,
        default=HIREDIS_DIR,
        help="where hiredis is pip-installed for --hiredis (not the environment)",
    )
    p.add_argument("--top", type=int, default=15, help="functions listed per side")
    p.add_argument("--keep", action="store_true", help="keep the profiles and logs")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.calls is None:
        args.calls = 1500 if args.hiredis else 3000
    if args.base_calls is None:
        args.base_calls = max(20, args.calls // 10)
    if not 0 < args.base_calls < args.calls:
        p.error("--base-calls must be between 0 and --calls")
    return args


@contextlib.contextmanager
def _terminated_as_exit() -> Iterator[None]:
    """SIGTERM ends this process through ``finally`` blocks, which stop what it started."""

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run the profile and print the report; returns the exit status."""
    args = parse(argv)
    if args.child:
        _child(args.child)
        return 0
    source = Path(args.source).resolve()
    if not (source / "celery_semaphore").is_dir() or not (source / "benchmarks/proj.py").exists():
        print(f"{source} holds no celery_semaphore/ and benchmarks/proj.py", file=sys.stderr)
        return 2
    default = "hiredis" if _base_has_hiredis() else "python"
    parsers = ["python", "hiredis"] if args.hiredis else [default]
    if "hiredis" in parsers and not _base_has_hiredis():
        _install_hiredis(args.hiredis_dir)
    workdir = Path(tempfile.mkdtemp(prefix="celery-semaphore-profile-"))
    started = time.monotonic()
    failed = True
    with _terminated_as_exit():
        server, port = _start_redis(workdir)
        try:
            profiler = Profiler(args, workdir, port)
            runs = [profiler.run(parser) for parser in parsers]
            failed = False
        finally:
            _stop(server)
            if failed or args.keep:
                print(f"profiles and logs kept in {workdir}", file=sys.stderr)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    report = render(args, runs, time.monotonic() - started)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
