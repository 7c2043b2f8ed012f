"""The real exporter process: start-up, reload by SIGHUP, graceful SIGTERM, TLS, bad config."""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.exporter_process import ROOT, free_port
from tests.integration.components import DribblingHTTPServer

pytestmark = pytest.mark.integration


def metric(url: str, name: str, **labels: str) -> float | None:
    text = httpx.get(url + "/metrics", timeout=10, verify=False).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def wait_for(predicate, timeout: float = 10, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sighup_reload_applies_valid_and_rejects_invalid(exporter_process, config_file, tmp_path):
    token = tmp_path / "admin"
    token.write_text("t0ken-0123456789ab")
    base = {"security": {"admin_token_file": str(token)}}
    path = config_file(base)
    proc = exporter_process(path)
    admin = {"authorization": "Bearer t0ken-0123456789ab"}
    url = proc.url + "/api/v1/metrics/custom/jobs"
    assert httpx.post(url, json={"value": 1}, headers=admin).status_code == 404

    declared = {**base, "monitoring": {"custom_metrics": [
        {"name": "jobs", "type": "gauge", "help": "Jobs waiting"}]}}
    path.write_text(yaml.safe_dump(declared))
    proc.signal(signal.SIGHUP)
    wait_for(lambda: httpx.post(url, json={"value": 3}, headers=admin).status_code == 200,
             what="the reloaded declaration")
    assert metric(proc.url, "a3mailer_custom_jobs") == 3
    assert metric(proc.url, "a3mailer_exporter_config_last_reload_successful") == 1

    path.write_text("monitoring:\n  custom_metrics: not-a-list\n")
    proc.signal(signal.SIGHUP)
    wait_for(lambda: metric(proc.url, "a3mailer_exporter_config_last_reload_successful") == 0,
             what="the rejected reload")
    # the old config keeps running: the declared metric still takes updates
    assert httpx.post(url, json={"value": 4}, headers=admin).status_code == 200
    assert "config reload rejected" in proc.log()

    path.write_text(yaml.safe_dump(declared))
    r = httpx.post(proc.url + "/-/reload", headers=admin)
    assert r.status_code == 200
    assert metric(proc.url, "a3mailer_exporter_config_last_reload_successful") == 1


def test_sigterm_finishes_in_flight_request_and_exits_zero(exporter_process, config_file,
                                                           tmp_path):
    token = tmp_path / "admin"
    token.write_text("t0ken-0123456789ab")
    proc = exporter_process(config_file({
        "security": {"admin_token_file": str(token)},
        "monitoring": {"custom_metrics": [{"name": "jobs", "type": "gauge", "help": "J"}]}}))
    body = b'{"value": 12.5}'
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as conn:
        conn.sendall(b"POST /api/v1/metrics/custom/jobs HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer t0ken-0123456789ab\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body[:5])
        time.sleep(0.3)
        proc.signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.proc.poll() is None  # still draining the request
        conn.sendall(body[5:])
        response = b""
        while chunk := conn.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 200"), response
    assert b'"value":12.5' in response
    assert proc.proc.wait(20) == 0
    assert "exporter stopped" in proc.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(proc.url + "/livez", timeout=2)


def test_tls_listener(exporter_process, config_file, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    proc = exporter_process(config_file({"server": {"tls": {"cert_file": str(cert),
                                                            "key_file": str(key)}}}),
                            scheme="https")
    r = httpx.get(proc.url + "/metrics", verify=ssl.create_default_context(cafile=str(cert)))
    assert r.status_code == 200 and "a3mailer_system_cpu_usage_ratio" in r.text
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{proc.port}/metrics", timeout=2).raise_for_status()


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_bad_config_exits_2_naming_file_line_and_key(config_file, tmp_path):
    path = config_file("monitoring:\n  collection_interval: often\n")
    result = run_cli("run", "--config", str(path), "--listen", f"127.0.0.1:{free_port()}",
                     "--state-dir", str(tmp_path / "s"))
    assert result.returncode == 2
    # the fixture rewrites the file, so find the line rather than assume it
    line = path.read_text().splitlines().index("  collection_interval: often") + 1
    assert f"{path}:{line}: monitoring.collection_interval: bad duration 'often'" in result.stderr


def test_port_in_use_fails_clearly(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("run", "--listen", f"127.0.0.1:{port}", "--state-dir",
                         str(tmp_path / "s"))
    assert result.returncode != 0
    assert "address already in use" in result.stderr.lower()


def test_version_and_console_script():
    result = run_cli("version")
    assert result.returncode == 0 and result.stdout.startswith("a3mailer-exporter ")
    script = ROOT / ".venv" / "bin" / "a3mailer-exporter"
    if script.exists():
        out = subprocess.run([str(script), "version"], capture_output=True, text=True)
        assert out.stdout == result.stdout


def test_state_dir_is_created_and_used(exporter_process):
    proc = exporter_process()
    assert proc.state_dir.is_dir()
    wait_for(lambda: (proc.state_dir / ".health-probe").exists(), what="the state probe")
    doc = httpx.get(proc.url + "/health").json()
    state = [c for c in doc["components"] if c["component"] == "state_dir"][0]
    assert state["details"]["path"] == str(proc.state_dir)


def test_readyz_turns_503_when_the_state_dir_breaks(exporter_process, config_file):
    proc = exporter_process(config_file({"monitoring": {
        "health_check_interval": "1s", "health_check_timeout": "1s", "failure_threshold": 2}}))
    wait_for(lambda: httpx.get(proc.url + "/readyz").status_code == 200, what="ready")
    shutil.rmtree(proc.state_dir)
    proc.state_dir.write_text("now a file")
    r = wait_for(lambda: (lambda r: r if r.status_code == 503 else None)(
        httpx.get(proc.url + "/readyz")), timeout=15, what="503")
    assert r.json()["reasons"][0].startswith("state_dir is unhealthy")
    assert metric(proc.url, "a3mailer_health_status", component="state_dir",
                  status="unhealthy") == 1
    assert httpx.get(proc.url + "/livez").status_code == 200  # alive, just not ready
    proc.state_dir.unlink()
    proc.state_dir.mkdir()
    wait_for(lambda: httpx.get(proc.url + "/readyz").status_code == 200, timeout=15,
             what="ready again")


def test_a_stalwart_that_dribbles_its_answer_leaves_the_exporter_ready_and_reading_logs(
        exporter_process, config_file, tmp_path):
    """Stalwart sending a header line every 0.3s: each poll and readiness check gives up at
    the 0.5s timeout. Before, each one held a thread of Python's default pool for ~30s
    (http.client's 100-header limit) and a new one started every poll, until log
    ingestion and the state_dir and system checks had no thread left: /readyz 503."""
    maillog = tmp_path / "mail.log"
    maillog.write_text("")
    line = ("Dec  1 07:54:43 mx postfix/smtp[2102]: 6C3D520C736: to=<carol@example.org>, "
            "relay=none, delay=30, dsn=4.4.1, status=deferred (connection timed out)\n")
    with DribblingHTTPServer(gap=0.3) as stalwart:
        proc = exporter_process(config_file({"monitoring": {
            "health_check_interval": "1s", "health_check_timeout": "1s",
            "failure_threshold": 2,
            "stalwart": {"enabled": True, "url": stalwart.url, "timeout": "500ms",
                         "interval": "1s"},
            "logs": {"poll_interval": "200ms", "files": [
                {"name": "mail", "path": str(maillog), "format": "maillog",
                 "start_at": "beginning"}]}}}))
        wait_for(lambda: httpx.get(proc.url + "/readyz").status_code == 200, what="ready")

        def lines_read() -> float:
            return sum(metric(proc.url, "a3mailer_log_lines_total", source="mail",
                              result=result) or 0 for result in ("parsed", "ignored",
                                                                 "unparsed"))

        written, statuses, start = 0, [], time.monotonic()
        while time.monotonic() - start < 15:
            with maillog.open("a") as fh:
                fh.write(line)
            written += 1
            statuses.append(httpx.get(proc.url + "/readyz", timeout=5).status_code)
            time.sleep(0.5)
        wait_for(lambda: lines_read() == written, timeout=5, what="every line read")
        assert set(statuses) == {200}
        assert stalwart.connections >= 10  # polled all along
        assert metric(proc.url, "a3mailer_stalwart_up") == 0
        health = {c["component"]: c for c in httpx.get(proc.url + "/health").json()[
            "components"]}
        assert health["state_dir"]["status"] == "healthy"
        assert health["system"]["status"] in ("healthy", "degraded")  # a busy test host
        assert "timed out" not in health["system"]["message"]
        assert health["stalwart"]["status"] == "unhealthy"
        assert "no complete answer within 0.5s" in health["stalwart"]["message"]
