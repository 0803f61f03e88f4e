"""The dashboard in a real headless Chromium, against a real Redis with real running and
parked calls of in-process workers.

The calls of ``dash.hold`` run until the test lets them end (a threading semaphore: the
threads worker runs in this process), so what the page shows can be compared exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import types
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from celery import Celery
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from celery_semaphore import Semaphore, gated
from celery_semaphore.admin import BUCKETS_S, Histogram
from celery_semaphore.dashboard import DashboardServer, make_server
from celery_semaphore.dashboard.history import History, quantile
from celery_semaphore.server import free_port

from .conftest import ROOT, threads_worker, wait_for

#: Where the page's screenshot goes: docs/dashboard.png (the README's) only when asked for with
#: CELERY_SEMAPHORE_SCREENSHOT=1, so that a test run leaves the checkout as it was.
SCREENSHOT = (
    ROOT / "docs" / "dashboard.png"
    if os.environ.get("CELERY_SEMAPHORE_SCREENSHOT") == "1"
    else Path(tempfile.gettempdir()) / "celery-semaphore-dashboard.png"
)
XSS_GATE = "<script>alert(1)</script>"
XSS_KEY = "<img src=x onerror=alert(2)>"


def _chromium() -> tuple[str, str] | None:
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
    )
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module (it starts in about a second)."""
    found = _chromium()
    if found is None:
        pytest.skip("needs Chromium and its driver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,1000")
    driver = webdriver.Chrome(service=webdriver.ChromeService(found[1]), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def dashboard(app: Celery, browser: Any, token: str | None = None) -> Iterator[DashboardServer]:
    """The dashboard of ``app`` on a free port, served from a thread."""
    server = make_server(app, "127.0.0.1", 0, token)
    server.board.history.sample_s = 0.5  # a chart with some points within the test
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        browser.get("about:blank")  # closes the page's event stream
        server.shutdown()
        thread.join(10)


def add_tasks(app: Celery) -> types.SimpleNamespace:
    """``dash.hold`` (gate work) and ``dash.tenant`` (gate tenants, keyed): each runs until
    ``go.release()``; ``running`` / ``peak`` count them as they run."""
    go = threading.Semaphore(0)
    lock = threading.Lock()
    seen = types.SimpleNamespace(running=0, peak=0)

    def held() -> None:
        with lock:
            seen.running += 1
            seen.peak = max(seen.peak, seen.running)
        try:
            go.acquire(timeout=60)
        finally:
            with lock:
                seen.running -= 1

    @gated("work")
    @app.task(name="dash.hold", shared=False)
    def hold(n: int) -> int:
        held()
        return n

    @gated("tenants", limit=2, key=lambda tenant: tenant, key_limit=1)
    @app.task(name="dash.tenant", shared=False)
    def tenant(tenant: str) -> str:
        held()
        return tenant

    return types.SimpleNamespace(hold=hold, tenant=tenant, go=go, seen=seen)


def row(driver: Any, gate: str) -> dict[str, str] | None:
    """The cells of a gate's row as the page shows them, by column (None: no such row)."""
    return driver.execute_script(
        "const r = [...document.querySelectorAll('#gates tbody tr')]"
        "  .find((r) => r.dataset.gate === arguments[0]);"
        "return r ? Object.fromEntries([...r.cells].map("
        "  (c) => [c.className.split(' ').pop(), c.innerText])) : null;",
        gate,
    )


def shows(driver: Any, gate: str, timeout: float = 10.0, **cells: str) -> dict[str, str]:
    """Wait until the row of ``gate`` shows ``cells`` (e.g. use="2 / 2", parked="4")."""

    def match(d: Any) -> dict[str, str] | None:
        found = row(d, gate)
        return found if found and all(found.get(k) == v for k, v in cells.items()) else None

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(match)
    except TimeoutException:
        pytest.fail(f"row {gate!r} shows {row(driver, gate)}, not {cells} after {timeout}s")


def text(driver: Any, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def texts(driver: Any, css: str) -> list[str]:
    """The visible text of everything ``css`` finds, read at once (the page redraws its
    tables on every update, so elements found one by one may be gone by the next call)."""
    return list(
        driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map((e) => e.innerText);", css
        )
    )


def click(driver: Any, css: str) -> None:
    """Click what ``css`` finds, again should the page redraw it in between."""
    WebDriverWait(driver, 10, 0.05, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: d.find_element(By.CSS_SELECTOR, css).click() or True
    )


def until(driver: Any, check: Callable[[Any], Any], timeout: float = 10.0) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(check)


def call(server: DashboardServer, verb: str, body: Any = None, token: str | None = None) -> int:
    """Send an action as any client could (a GET when ``body`` is None); the HTTP status."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["X-Semaphore-Token"] = token
    request = urllib.request.Request(
        f"{server.url}api/action/{verb}",
        data=None if body is None else json.dumps(body).encode(),
        headers=headers,
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.slow
def test_the_page_lists_the_gates_with_their_numbers_and_follows_a_release(
    make_app: Callable[..., Celery], browser: Any
) -> None:
    app = make_app(limit=2, semaphore_history_ttl=60.0)
    t = add_tasks(app)
    gate = Semaphore("work", app=app)
    try:
        with threads_worker(app), dashboard(app, browser) as server:
            calls = [t.hold.delay(n) for n in range(6)]
            wait_for(lambda: t.seen.running == 2 and gate.status().parked == 4, 20, "2 + 4")
            browser.get(server.url)
            cells = shows(browser, "work", use="2 / 2", parked="4", paused="no", granted="2")
            assert (cells["waiting"], cells["released"]) == ("0", "0")

            # One call ends: the next parked call is handed its unit, and the open page shows
            # it within two seconds of the release (a read pass a second, then pushed).
            t.go.release()
            shows(browser, "work", timeout=2.0, use="2 / 2", parked="3", released="1")
            assert gate.status().parked == 3

            # Explain a parked call typed into the search box.
            browser.find_element(By.ID, "explain-id").send_keys(calls[-1].id)
            browser.find_element(By.CSS_SELECTOR, "#explain-form button").click()
            until(browser, lambda d: "parked: gate work is full" in text(d, "x-reason"))
            assert "PARKED" in text(browser, "x-title")

            click(browser, "#gates tr[data-gate='work']")
            until(browser, lambda d: len(texts(d, "#d-parked td.id")) == 3)
            assert texts(browser, "#d-parked td.id") == [c.task_id for c in gate.parked()]
            holders = sorted(h.task_id for h in gate.holders())
            assert sorted(texts(browser, "#d-holders td.id")) == holders
            if shutil.which("dot"):
                browser.find_element(By.ID, "d-graph-draw").click()
                until(
                    browser,
                    lambda d: d.execute_script(
                        "const i = document.getElementById('d-graph');"
                        "return !i.hidden && i.naturalWidth > 0;"
                    ),
                )
            t.go.release(10)
            assert sorted(r.get(timeout=20) for r in calls) == list(range(6))
            shows(browser, "work", use="0 / 2", parked="0", released="6")
    finally:
        t.go.release(100)


@pytest.mark.slow
def test_actions_are_refused_without_the_token(
    make_app: Callable[..., Celery], browser: Any
) -> None:
    app = make_app(limit=2)
    hold = Semaphore("work", app=app).acquire()
    assert hold is not None
    try:
        with dashboard(app, browser) as server:
            # Started without a token: every action is refused, whatever the client sends.
            for verb in ("resize", "pause", "purge", "check"):
                assert call(server, verb, {"gate": "work", "limit": 5}) == 403
                assert call(server, verb, {"gate": "work", "limit": 5}, token="") == 403
                assert call(server, verb, {"gate": "work", "limit": 5}, token="x") == 403
            browser.get(server.url)
            shows(browser, "work", use="1 / 2")
            click(browser, "#gates tr[data-gate='work']")
            until(browser, lambda d: "started without a token" in text(d, "d-actions-note"))
            until(browser, lambda d: len(texts(d, "#d-holders td.id")) == 1)  # and its Cancel
            buttons = browser.execute_script(
                "return [...document.querySelectorAll('button.action')]"
                "  .map((b) => [b.innerText, b.disabled, b.title]);"
            )
            assert sorted(name for name, *_ in buttons) == [
                "Cancel", "Pause", "Purge…", "Resize", "Resume",
            ]  # fmt: skip
            for _, disabled, why in buttons:
                assert disabled and why.startswith("Actions are off: the dashboard was started")
        with dashboard(app, browser, token="s3cret") as server:
            assert call(server, "pause", {"gate": "work"}) == 403
            assert call(server, "pause", {"gate": "work"}, token="s3cret!") == 403
            assert call(server, "pause", None, token="s3cret") == 405  # a GET never acts
            assert call(server, "check", {}, token="s3cret") == 200
            assert not Semaphore("work", app=app).status().paused
    finally:
        hold.release()


@pytest.mark.slow
def test_a_resize_from_the_page_lets_more_calls_run_at_once(
    make_app: Callable[..., Celery], browser: Any
) -> None:
    app = make_app(limit=2)
    t = add_tasks(app)
    gate = Semaphore("work", app=app)
    reports = Semaphore("reports", app=app, limit=3)
    holds = [reports.acquire(), reports.acquire()]
    try:
        with threads_worker(app), dashboard(app, browser, token="s3cret") as server:
            calls = [t.hold.delay(n) for n in range(12)]
            wait_for(lambda: t.seen.running == 2 and gate.status().parked == 10, 20, "2 + 10")
            browser.get(f"{server.url}#gate=work")
            until(browser, lambda d: "until you enter" in text(d, "actions-note"))
            assert not browser.find_element(By.ID, "d-resize").is_enabled()
            browser.find_element(By.ID, "token").send_keys("s3cret")
            browser.find_element(By.ID, "token-use").click()
            until(browser, lambda d: text(d, "actions-note") == "Actions are on.")
            shows(browser, "work", use="2 / 2", parked="10")
            shows(browser, "reports", use="2 / 3", parked="0")

            limit = browser.find_element(By.ID, "d-limit")
            limit.clear()
            limit.send_keys("4")
            browser.find_element(By.ID, "d-resize").click()
            until(browser, lambda d: "resized from 2 to 4" in text(d, "d-result"))
            # The parked calls were handed the new room at once: four run now, and no more.
            wait_for(lambda: t.seen.running == 4, 10, "four calls running")
            shows(browser, "work", use="4 / 4", parked="8")
            assert t.seen.peak == 4 and gate.status().held == 4
            until(browser, lambda d: len(texts(d, "#d-holders td.id")) == 4)
            until(browser, lambda d: len(texts(d, "#d-parked td.id")) == 8)
            until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#c-load polyline"))
            screenshot(browser)

            # Purge, confirmed on the page: the parked calls never run.
            browser.find_element(By.ID, "d-purge").click()
            assert "Cancel 8 parked calls" in text(browser, "d-confirm-text")
            browser.find_element(By.ID, "d-purge-yes").click()
            until(browser, lambda d: "8 parked calls cancelled" in text(d, "d-result"))
            shows(browser, "work", use="4 / 4", parked="0")
            assert {r.state for r in calls[6:]} == {"REVOKED"}
            t.go.release(4)
            assert sorted(r.get(timeout=20) for r in calls[:4]) == [0, 1, 2, 3]
            assert t.seen.peak == 4
    finally:
        t.go.release(100)
        for hold in holds:
            if hold:
                hold.release()


def screenshot(driver: Any) -> None:
    """Save the whole page (see SCREENSHOT)."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(int(height) + 40, 1500))
    try:
        SCREENSHOT.parent.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(SCREENSHOT))
    finally:
        driver.set_window_size(1280, 1000)


@pytest.mark.slow
def test_names_and_keys_from_redis_show_as_text_and_never_run(
    make_app: Callable[..., Celery], browser: Any
) -> None:
    app = make_app(limit=2)
    t = add_tasks(app)
    hold = Semaphore(XSS_GATE, app=app, limit=1).acquire()
    try:
        with threads_worker(app), dashboard(app, browser) as server:
            call = t.tenant.delay(XSS_KEY)
            wait_for(lambda: t.seen.running == 1, 20, "the tenant call running")
            browser.get(server.url)
            shows(browser, XSS_GATE, name=XSS_GATE, use="1 / 1")
            shows(browser, "tenants", use="1 / 2")
            browser.find_element(By.ID, "filter").send_keys("script>")
            until(browser, lambda d: texts(d, "#gates tbody td.name") == [XSS_GATE])
            click(browser, "#gates tbody tr")
            until(browser, lambda d: text(d, "d-name") == XSS_GATE)
            until(browser, lambda d: texts(d, "#d-holders td.id"))

            browser.find_element(By.ID, "filter").clear()
            browser.find_element(By.ID, "filter").send_keys("tenants")
            browser.find_element(By.ID, "d-close").click()
            shows(browser, "tenants", use="1 / 2")
            click(browser, "#gates tr[data-gate='tenants']")
            until(browser, lambda d: texts(d, "#d-keys td.key") == [XSS_KEY])
            until(browser, lambda d: texts(d, "#d-holders td.key") == [XSS_KEY])
            # Nothing ran: no alert, no element made of the names, only the page's own script.
            with pytest.raises(NoAlertPresentException):
                browser.switch_to.alert.text  # noqa: B018
            assert browser.execute_script(
                "return [document.scripts.length, document.querySelectorAll('img').length]"
            ) == [1, 1]
            t.go.release()
            assert call.get(timeout=20) == XSS_KEY
    finally:
        t.go.release(100)
        if hold:
            hold.release()


@pytest.mark.slow
def test_serve_runs_until_interrupted_and_never_shows_the_redis_password(
    redis_base: str, prefix: str
) -> None:
    where = urlsplit(redis_base)
    admin = redis.Redis.from_url(f"{redis_base}/0")
    user, password = f"dash-{prefix}", f"pw-{prefix}-never-shown"
    admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")
    url = f"redis://{user}:{password}@{where.hostname}:{where.port}/0"
    port = free_port()
    script = f"""
        from celery import Celery
        from celery_semaphore.dashboard import serve
        app = Celery("dash", broker="memory://")
        app.conf.update(
            semaphore_redis_url={url!r}, semaphore_key_prefix={prefix!r},
            semaphore_limits={{"work": 2}}, semaphore_dashboard_token="t0ken",
        )
        serve(app, port={port})
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert f"at http://127.0.0.1:{port}/ " in banner and "actions on" in banner
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/config", timeout=10) as r:
            config = json.load(r)
        assert config["redis"] == f"redis://{user}:**@{where.hostname}:{where.port}/0"
        assert config["actions"] is True
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/events", timeout=10) as r:
            event = next(line for line in r if line.startswith(b"data: "))
        assert [g["gate"] for g in json.loads(event[6:])["gates"]["rows"]] == ["work"]
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        admin.execute_command("ACL", "DELUSER", user)
    assert proc.returncode == 0, err
    assert password not in banner + out + err + json.dumps(config) + event.decode()


def test_a_dashboard_bound_beyond_loopback_without_a_token_warns(
    make_app: Callable[..., Celery], caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    for host, token, warned in (("127.0.0.1", None, False), ("0.0.0.0", None, True)):
        caplog.clear()
        server = make_server(app, host, 0, token)
        server.server_close()
        server.board.stop()
        assert ("without a token" in caplog.text) is warned, caplog.text
    with pytest.raises(ValueError, match="semaphore_dashboard_token"):
        make_server(make_app(semaphore_dashboard_token=""), "127.0.0.1", 0, None)
    server = make_server(make_app(semaphore_dashboard_token="from-settings"), "127.0.0.1", 0, None)
    server.server_close()
    server.board.stop()
    assert server.token == "from-settings"


def test_wait_percentiles_count_the_calls_granted_in_the_minute_before() -> None:
    def waits(**per_bucket: int) -> Histogram:
        """A wait histogram holding ``n`` calls in bucket ``b<i>`` (i: index in BUCKETS_S)."""
        bounds = (*BUCKETS_S, float("inf"))
        counts = [per_bucket.get(f"b{i}", 0) for i in range(len(bounds))]
        cumulative = [sum(counts[: i + 1]) for i in range(len(bounds))]
        return Histogram(tuple(zip(bounds, cumulative, strict=True)), 0.0, cumulative[-1])

    history = History(sample_s=5.0)
    history.record(0.0, {"g": (1, 4, waits(b0=7))})  # its past: no baseline to count from
    history.record(5.0, {"g": (2, 3, waits(b0=107))})  # 100 granted within 5 ms
    history.record(10.0, {"g": (2, 0, waits(b0=107, b8=100))})  # 100 waited 1-2.5 s
    series = history.series("g", now=10.0)
    assert series["ago_s"] == [10.0, 5.0, 0.0]
    assert (series["held"], series["parked"]) == ([1, 2, 2], [4, 3, 0])
    assert series["p50"][:2] == [None, pytest.approx(0.0025)]
    assert series["p50"][2] == pytest.approx(0.005)
    assert series["p99"][2] == pytest.approx(1 + 1.5 * 98 / 100)
    # More than a minute on, only the calls granted since count: none.
    history.record(75.0, {"g": (0, 0, waits(b0=107, b8=100))})
    assert history.series("g", now=75.0)["p50"][-1] is None
    assert quantile(0.5, [(1.0, 0), (float("inf"), 0)]) is None
