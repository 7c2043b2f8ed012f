"""Hypothesis against every wire parser and the config loader: arbitrary input gives a
value or the parser's own error, never another exception. (Log-line parsers have their
property tests in tests/unit/test_logs.py.)"""

from __future__ import annotations

import json
import string
import tempfile
import time
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.collectors.queues import PostqueueParser, QueueCheckError, parse_stalwart_queue
from exporter.collectors.stalwart import StalwartClient, StalwartError, StalwartMetrics
from exporter.config import ConfigError, load_config
from security.protocols import dovecot, postfix, stalwart
from tests.reliability.conftest import scale

FUZZ = settings(max_examples=scale(150, 5000), deadline=None, database=None,
                suppress_health_check=list(HealthCheck))

# JSON-ish values, so the parsers see plausible shapes as well as noise
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=6),
    max_leaves=20)
dovecot_fields = st.dictionaries(
    st.sampled_from(["login", "remote", "pwhash", "protocol", "session_id", "tls", "success",
                     "policy_reject", "local", "device_id"]) | st.text(max_size=8),
    json_values, max_size=10)


@FUZZ
@given(command=st.none() | st.sampled_from(["allow", "report", ""]) | st.text(max_size=10),
       body=st.binary(max_size=512) | dovecot_fields.map(lambda d: json.dumps(d).encode()))
def test_dovecot_policy_request(command: str | None, body: bytes) -> None:
    try:
        kind, attempt, fields = dovecot.parse_request(command, body)
    except dovecot.PolicyRequestError:
        return
    assert kind in ("allow", "report")
    assert attempt.remote_ip and isinstance(fields, dict)


policy_lines = st.lists(
    st.one_of(
        st.binary(max_size=80),
        st.tuples(st.sampled_from(["request", "protocol_state", "client_address",
                                   "sasl_username", "recipient", "sender"]) | st.text(max_size=10),
                  st.text(max_size=40)).map(lambda kv: f"{kv[0]}={kv[1]}".encode("utf-8",
                                                                                 "surrogatepass")),
    ), max_size=12)


@FUZZ
@given(lines=policy_lines)
def test_postfix_policy_request(lines: list[bytes]) -> None:
    try:
        request = postfix.parse_request(lines)
    except postfix.PolicyRequestError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in request.items())


events = st.lists(st.dictionaries(
    st.sampled_from(["id", "createdAt", "type", "data"]) | st.text(max_size=6), json_values,
    max_size=5), max_size=4)


@FUZZ
@given(body=st.binary(max_size=512) | events.map(
    lambda e: json.dumps({"events": e}).encode()))
def test_stalwart_webhook_batch(body: bytes) -> None:
    try:
        batch = stalwart.parse_batch(body)
    except stalwart.WebhookError:
        return
    for event in batch:
        event.attempt()  # must not raise either
        assert isinstance(event.remote_ip, str)


metric_lines = st.lists(st.one_of(
    st.text(max_size=60),
    st.tuples(st.sampled_from(["# TYPE ", "# HELP ", ""]),
              st.text(alphabet=string.ascii_letters + "_:{}=\",. 0123456789+-e", max_size=40)
              ).map("".join)), max_size=15).map("\n".join)


@FUZZ
@given(text=metric_lines)
def test_stalwart_metrics_text(text: str) -> None:
    metrics = StalwartMetrics(StalwartClient("http://127.0.0.1:1", 1.0), 50)
    try:
        snapshot = metrics.convert(text)
    except StalwartError:
        return
    assert all(s.spec.name.startswith("a3mailer_stalwart_") for s in snapshot.series)


postqueue_lines = st.lists(st.binary(max_size=120) | st.dictionaries(
    st.sampled_from(["queue_name", "queue_id", "arrival_time", "message_size", "recipients",
                     "sender"]), json_values, max_size=6).map(lambda d: json.dumps(d).encode()),
    max_size=10)


@FUZZ
@given(lines=postqueue_lines)
def test_postqueue_json_lines(lines: list[bytes]) -> None:
    parser = PostqueueParser(time.time())
    for line in lines:
        parser.feed(line)
    snapshot = parser.finish()
    assert snapshot.total >= 0
    assert all(stats.messages >= 0 for stats in snapshot.queues.values())


@FUZZ
@given(body=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_stalwart_queue_answer(body: bytes) -> None:
    try:
        snapshot = parse_stalwart_queue(body, "http://127.0.0.1:1/api/queue/messages")
    except (QueueCheckError, StalwartError):
        return
    assert snapshot.total >= 0


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["monitoring", "security", "server", "probes", "alert_thresholds",
                         "cpu_usage_threshold", "enabled", "interval", "name", "domains",
                         "files", "logs", "queues", "postfix"]) | st.text(max_size=10),
        inner, max_size=5),
    max_leaves=25)


@FUZZ
@given(document=st.text(max_size=300) | yaml_values.map(
    lambda v: yaml.safe_dump(v, allow_unicode=True)))
def test_config_loader(document: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(document, encoding="utf-8", errors="surrogatepass")
        try:
            config = load_config(path)
        except ConfigError as exc:
            assert exc.problems and all(str(p).startswith(str(path)) for p in exc.problems)
            return
        assert config["monitoring"]["collection_interval"]
