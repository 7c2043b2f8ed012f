"""Fixtures for integration tests: real components from components.py, each
started in the test's tmp_path and always stopped at teardown (also when the
test fails). Every test under tests/integration gets the ``integration`` mark.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.integration.components import (
    DEFAULT_MAIL_USERS,
    Alertmanager,
    Dovecot,
    MailStack,
    OTLPReceiver,
    Prometheus,
    Redis,
    next_loopback_ip,
)

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark everything below tests/integration, so ``-m "not integration"`` skips it."""
    for item in items:
        if item.path.resolve().is_relative_to(_HERE):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def client_ip() -> str:
    """A fresh 127.0.x.y source address for a client socket (Dovecot penalises per IP)."""
    return next_loopback_ip()


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    """``start(targets=[...], rule_files=[...], alertmanager="host:port", **kw)`` -> running
    Prometheus; all stopped at teardown."""
    started: list[Prometheus] = []

    def start(
        targets: list[Mapping[str, Any]] | None = None,
        rule_files: list[str | Path] | None = None,
        **kwargs: Any,
    ) -> Prometheus:
        prom = Prometheus(
            tmp_path / f"prometheus{len(started)}", targets or [], rule_files or [], **kwargs
        )
        started.append(prom)
        return prom.start()

    yield start
    for prom in started:
        prom.stop()


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[Alertmanager]:
    """Alertmanager routing every alert to its own recording webhook receiver."""
    am = Alertmanager(tmp_path / "alertmanager")
    try:
        yield am.start()
    finally:
        am.stop()


@pytest.fixture
def dovecot_factory(tmp_path: Path) -> Iterator[Callable[..., Dovecot]]:
    """``start(users=None, policy_url=None, **kw)`` -> running Dovecot; all stopped at
    teardown. ``users`` defaults to DEFAULT_MAIL_USERS."""
    started: list[Dovecot] = []

    def start(
        users: Mapping[str, str] | None = None,
        policy_url: str | None = None,
        **kwargs: Any,
    ) -> Dovecot:
        dc = Dovecot(tmp_path / f"dovecot{len(started)}", users, policy_url=policy_url, **kwargs)
        started.append(dc)
        return dc.start()

    yield start
    for dc in started:
        dc.stop()


@pytest.fixture
def dovecot(dovecot_factory: Callable[..., Dovecot]) -> Dovecot:
    """Dovecot with alice@example.test / bob@example.test (passwords in ``.users``)."""
    return dovecot_factory()


@pytest.fixture
def mail_stack(tmp_path: Path) -> Iterator[MailStack]:
    """Postfix (SMTP + submission with AUTH) delivering over LMTP into Dovecot.

    ``mail_stack.users`` maps alice@example.test / bob@example.test to passwords.
    """
    stack = MailStack.start(tmp_path / "mail", dict(DEFAULT_MAIL_USERS))
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def redis_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    """One redis-server for a whole module, for tests that keep apart by key prefix and
    never stop it (starting one per test costs more than most of them)."""
    server = Redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    """redis-server on a free loopback port; ``.url`` is redis://127.0.0.1:<port>/0."""
    server = Redis(tmp_path / "redis")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def otlp_tracing() -> Iterator[tuple[Any, OTLPReceiver]]:
    """This process traced at rate 1.0 into a local OTLP/HTTP receiver: (tracing, receiver).
    The previous monitor and tracer are put back afterwards."""
    from exporter import tracing
    from exporter.performance import PerformanceMonitor

    previous = tracing.installed()
    with OTLPReceiver() as receiver:
        traced = tracing.Tracing(tracing.TracingSettings(
            enabled=True, sampling_rate=1.0, endpoint=receiver.url + tracing.TRACES_PATH,
            batch_timeout=0.1))
        tracing.install(PerformanceMonitor(), traced)
        try:
            yield traced, receiver
        finally:
            tracing.install(*previous)
            traced.shutdown()
