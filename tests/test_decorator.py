"""@gated, install() and the settings: placement, validation, idempotence, no side effects."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from celery import Celery, shared_task

from celery_semaphore import ConfigurationError, SemaphoreError, gated, install, runtime_for
from celery_semaphore.config import Settings
from celery_semaphore.publish import Publisher
from celery_semaphore.spec import specs_of


def new_app(**conf: object) -> Celery:
    app = Celery("decorator-tests", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.update({"semaphore_redis_url": "redis://127.0.0.1:1/0"}, **conf)
    return app


def test_importing_the_package_connects_nothing() -> None:
    code = textwrap.dedent(
        """
        from celery import signals
        before = {s: len(s.receivers) for s in (signals.task_prerun, signals.task_postrun)}
        import celery_semaphore
        after = {s: len(s.receivers) for s in (signals.task_prerun, signals.task_postrun)}
        assert before == after, (before, after)
        from celery._state import _on_app_finalizers
        assert not any("semaphore" in repr(f) for f in _on_app_finalizers)
        print("clean")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "clean"


def test_gated_above_a_task_marks_it_and_installs_on_its_app() -> None:
    app = new_app()

    @gated("reports", limit=2, lease=12)
    @app.task(name="t.above", shared=False)
    def above() -> None: ...

    (spec,) = specs_of(above)
    assert (spec.gate, spec.limit, spec.lease_s) == ("reports", 2, 12.0)
    gates = runtime_for(app).gates_of("t.above")
    assert (gates.names, gates.limits, gates.lease_s) == (("reports",), (2,), 12.0)
    assert gates.group == "reports"


def test_gated_below_a_task_marks_its_function_and_installs_on_the_current_app() -> None:
    app = new_app()
    app.set_current()

    @app.task(name="t.below", shared=False)
    @gated("reports", limit=2)
    def below() -> None: ...

    assert runtime_for(app) is not None
    assert below.name == "t.below"  # first use binds the lazy task, as .delay() would
    assert runtime_for(app).gates_of("t.below").names == ("reports",)


def test_bare_gated_names_the_gate_after_the_task() -> None:
    app = new_app(semaphore_limits={"t.bare": 1})

    @gated
    @app.task(name="t.bare", shared=False)
    def bare() -> None: ...

    assert runtime_for(app).gates_of("t.bare").names == ("t.bare",)
    assert runtime_for(app).gates_of("t.bare").limits == (1,)


def test_gated_above_shared_task_binds_the_current_apps_task() -> None:
    app = new_app()
    app.set_current()

    @gated("shared", limit=1)
    @shared_task(name="t.shared")
    def shared() -> None: ...

    assert specs_of(app.tasks["t.shared"])[0].gate == "shared"


@pytest.mark.parametrize("target", [42, "text", int, None])
def test_gated_on_something_that_is_neither_a_task_nor_a_function_is_a_type_error(
    target: object,
) -> None:
    with pytest.raises(TypeError, match="Celery task or a function"):
        gated("x")(target)


@pytest.mark.parametrize("limit", [0, -1, 2.5, "3", True])
def test_a_limit_that_is_not_a_positive_integer_names_the_gate(limit: object) -> None:
    with pytest.raises(ValueError, match="gate 'crawler'"):
        gated("crawler", limit=limit)  # type: ignore[arg-type]


def test_a_bad_limit_in_the_settings_names_the_gate() -> None:
    with pytest.raises(ConfigurationError, match="gate 'crawler'"):
        Settings.from_conf(new_app(semaphore_limits={"crawler": 0}).conf)


def test_a_gate_without_a_limit_is_an_error_naming_semaphore_limits() -> None:
    app = new_app()

    @gated("nolimit")
    @app.task(name="t.nolimit", shared=False)
    def nolimit() -> None: ...

    with pytest.raises(ConfigurationError, match="semaphore_limits") as info:
        nolimit.delay()
    assert isinstance(info.value, SemaphoreError)
    assert "nolimit" in str(info.value)


def test_two_different_limits_for_one_gate_are_refused() -> None:
    app = new_app()

    @gated("shared-gate", limit=2)
    @app.task(name="t.one", shared=False)
    def one() -> None: ...

    with pytest.raises(ConfigurationError, match="one limit"):

        @gated("shared-gate", limit=3)
        @app.task(name="t.two", shared=False)
        def two() -> None: ...


def test_install_is_idempotent() -> None:
    app = new_app()
    first = install(app)
    assert install(app) is first
    assert isinstance(app.amqp.send_task_message, Publisher)
    assert app.amqp.send_task_message.runtime is first
    assert sum(1 for step in app.steps["worker"] if step.__name__ == "Keepalive") == 1


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("semaphore_lease", 0, "semaphore_lease"),
        ("semaphore_lease", float("nan"), "semaphore_lease"),
        ("semaphore_lease", 0.0004, "at least 1"),
        ("semaphore_limit_source", "mine", "semaphore_limit_source"),
        ("semaphore_groups", {"a": "{b}"}, "semaphore_groups"),
        ("semaphore_key_limits", {"api": {"acme": 0}}, "key limit"),
        ("semaphore_max_dispatches", 0, "semaphore_max_dispatches"),
        ("semaphore_tick_interval", "fast", "semaphore_tick_interval"),
        ("semaphore_prefetch", -1, "semaphore_prefetch"),
        ("semaphore_prefetch", True, "semaphore_prefetch"),
        ("semaphore_limits", [("a", 1)], "semaphore_limits"),
        ("semaphore_key_prefix", "{x}", "semaphore_key_prefix"),
        ("semaphore_redis_url", "localhost", "semaphore_redis_url"),
    ],
)
def test_wrong_settings_get_an_error_naming_the_setting(
    setting: str, value: object, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_conf(new_app(**{setting: value}).conf)


def test_the_redis_url_defaults_to_a_redis_broker_and_is_required_otherwise() -> None:
    app = Celery("x", broker="redis://127.0.0.1:6379/3", set_as_current=False)
    assert Settings.from_conf(app.conf).redis_url == "redis://127.0.0.1:6379/3"
    app = Celery("x", broker="amqp://guest@127.0.0.1//", set_as_current=False)
    with pytest.raises(ConfigurationError, match="semaphore_redis_url"):
        Settings.from_conf(app.conf)


def test_django_style_namespaced_settings_are_honoured() -> None:
    class Config:
        CELERY_SEMAPHORE_LIMITS = {"crawler": 7}
        CELERY_SEMAPHORE_REDIS_URL = "redis://127.0.0.1:6379/4"

    app = Celery("x", set_as_current=False)
    app.config_from_object(Config, namespace="CELERY")
    settings = Settings.from_conf(app.conf)
    assert settings.limits == {"crawler": 7}
    assert settings.redis_url == "redis://127.0.0.1:6379/4"


def test_a_gated_call_under_task_protocol_1_is_refused_not_sent_ungated() -> None:
    app = new_app(task_protocol=1, semaphore_limits={"p1": 1})

    @gated("p1")
    @app.task(name="t.p1", shared=False)
    def p1() -> None: ...

    with pytest.raises(ConfigurationError, match="task protocol 2"):
        p1.delay()


ORDER_CHECK = """
from celery import Celery, shared_task
from celery_semaphore import gated, runtime_for

@shared_task(name="order.check")
@gated("reports", limit=2)
def build(n):
    return n

app = Celery("order", broker="memory://", set_as_current=False)
app.conf.semaphore_redis_url = "redis://127.0.0.1:1/0"
app.finalize()
print(type(app.amqp.send_task_message).__name__ if runtime_for(app) else "not installed")
"""


def test_a_shared_task_above_gated_is_gated_whatever_order_celery_finalizes_in(
    tmp_path: Any,
) -> None:
    # Celery runs its finalize hooks from a set: their order changes with the hash seed. The
    # app must get the extension in every order (it once did in about half of them).
    script = tmp_path / "order_check.py"
    script.write_text(ORDER_CHECK)
    seen = set()
    for seed in range(8):
        done = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        seen.add(done.stdout.strip())
    assert seen == {"Publisher"}
