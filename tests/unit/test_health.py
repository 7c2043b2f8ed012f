"""Health engine: streak rules, timeouts, readiness."""

from __future__ import annotations

import asyncio
import contextlib
import time

from exporter.health import CheckResult, HealthEngine, Status


def scripted(results: list[Status]):
    """A check that returns the given statuses in order (the last one repeats)."""
    queue = list(results)

    async def check() -> CheckResult:
        status = queue.pop(0) if len(queue) > 1 else queue[0]
        return CheckResult(status, f"said {status}")

    return check


async def run_rounds(engine: HealthEngine, rounds: int) -> list[Status]:
    seen = []
    for _ in range(rounds):
        await engine.run_once()
        seen.append(engine.components["c"].status)
    return seen


async def test_first_result_is_taken_at_once():
    engine = HealthEngine(10, 1, failure_threshold=3, success_threshold=1)
    engine.register("c", scripted([Status.UNHEALTHY]))
    assert engine.components["c"].status is Status.UNKNOWN
    assert await run_rounds(engine, 1) == [Status.UNHEALTHY]


async def test_worse_status_needs_failure_threshold_in_a_row():
    engine = HealthEngine(10, 1, failure_threshold=3, success_threshold=1)
    H, U = Status.HEALTHY, Status.UNHEALTHY
    engine.register("c", scripted([H, U, U, H, U, U, U]))
    # the healthy in the middle breaks the streak
    assert await run_rounds(engine, 7) == [H, H, H, H, H, H, U]


async def test_better_status_needs_success_threshold_in_a_row():
    engine = HealthEngine(10, 1, failure_threshold=1, success_threshold=2)
    H, U = Status.HEALTHY, Status.UNHEALTHY
    engine.register("c", scripted([U, H, U, H, H]))
    assert await run_rounds(engine, 5) == [U, U, U, U, H]


async def test_pending_change_is_reported_in_details():
    engine = HealthEngine(10, 1, failure_threshold=3, success_threshold=1)
    engine.register("c", scripted([Status.HEALTHY, Status.DEGRADED]))
    await run_rounds(engine, 2)
    doc = engine.report()["components"][0]
    assert doc["status"] == "healthy"
    assert doc["message"] == "said degraded"
    assert doc["details"] == {"pending_status": "degraded", "pending_count": 1}
    assert set(doc) >= {"component", "status", "message", "response_time_ms", "details",
                        "timestamp"}


async def test_timeout_and_exception_count_as_unhealthy():
    engine = HealthEngine(10, 0.05, failure_threshold=1, success_threshold=1)

    async def slow() -> CheckResult:
        await asyncio.sleep(1)
        return CheckResult(Status.HEALTHY)

    async def broken() -> CheckResult:
        raise RuntimeError("disk on fire")

    engine.register("slow", slow)
    engine.register("broken", broken)
    await engine.run_once()
    assert engine.components["slow"].status is Status.UNHEALTHY
    assert "timed out after 0.05s" in engine.components["slow"].message
    assert engine.components["broken"].message == "check failed: disk on fire"


async def test_ready_only_when_critical_components_are_healthy():
    engine = HealthEngine(10, 1, failure_threshold=1, success_threshold=1)
    engine.register("store", scripted([Status.HEALTHY, Status.UNHEALTHY]), critical=True)
    engine.register("system", scripted([Status.DEGRADED]))
    assert engine.ready() == (False, ["store is unknown: not checked yet"])
    await engine.run_once()
    assert engine.ready() == (True, [])
    assert engine.overall() is Status.DEGRADED
    await engine.run_once()
    ready, reasons = engine.ready()
    assert not ready and reasons == ["store is unhealthy: said unhealthy"]


async def test_reregistering_keeps_status():
    engine = HealthEngine(10, 1)
    engine.register("c", scripted([Status.DEGRADED]))
    await engine.run_once()
    engine.register("c", scripted([Status.HEALTHY]))
    assert engine.components["c"].status is Status.DEGRADED


async def test_metrics_state_set():
    engine = HealthEngine(10, 1)
    engine.register("c", scripted([Status.DEGRADED]))
    await engine.run_once()
    families = {f.name: f for f in engine.collect()}
    states = {s.labels["status"]: s.value for s in families["a3mailer_health_status"].samples}
    assert states == {"healthy": 0, "degraded": 1, "unhealthy": 0, "unknown": 0}
    assert families["a3mailer_exporter_ready"].samples[0].value == 1.0


async def test_stop_right_after_a_wake_is_not_lost():
    """Python 3.11's wait_for swallows a cancellation that arrives as the awaited event is
    set; the loop must still stop (a reload wakes it just before a SIGTERM)."""
    engine = HealthEngine(3600.0, 1.0)
    for _ in range(50):
        task = asyncio.create_task(engine.run_forever())
        await asyncio.sleep(0)  # the first round runs, the loop waits on its event
        await asyncio.sleep(0)
        engine.wake()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 2.0)
        assert task.cancelled() or task.done()


async def test_a_reload_keeps_the_system_checks_cpu_reading_going(config_file):
    """The CPU share read after a reload covers the time since the reading before it, not
    the moment since the reload (a new reader's first share, about 0 %: lowering
    cpu_usage_threshold once turned the component healthy, then degraded)."""
    from exporter.config import load_config
    from exporter.service import Exporter

    config = {"security": {"enabled": False}}
    exporter = Exporter(load_config(config_file(config)))
    await exporter.health.check_one(exporter.health.components["system"])  # a share starts
    busy_until = time.process_time() + 0.4
    while time.process_time() < busy_until:  # one of the two cores busy
        pass
    config["monitoring"] = {"alert_thresholds": {"cpu_usage_threshold": 95}}
    config_file(config)
    assert exporter.reload() == []
    system = exporter.health.components["system"]
    await exporter.health.check_one(system)
    assert system.details["cpu_usage_percent"] > 20, system.details
