"""Config reloads under load: an invalid file is rejected and the old config keeps serving;
a valid one is applied; no request fails either way."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import yaml

from tests.exporter_process import ExporterProcess
from tests.integration.components import wait_until
from tests.reliability.conftest import scale
from tests.reliability.test_crash import ADMIN, security_config
from tests.reliability.test_faults import metric
from tests.reliability.test_load import LUA, wrk

SECONDS = scale(8, 60)


def locks_after(url: str, login: str, ip: str, failures: int) -> bool:
    actions: list[str] = []
    for i in range(failures):
        r = httpx.post(url + "/api/v1/security/report", headers=ADMIN, timeout=10, json={
            "login": login, "remote_ip": ip, "pwhash": f"p{time.monotonic_ns()}",
            "success": False})
        actions += r.json()["actions"]
    return "lock" in actions


def test_reload_invalid_then_valid_under_load(tmp_path, config_file, record):
    script = tmp_path / "policy.lua"
    script.write_text(LUA)
    config = security_config(tmp_path)  # max_login_attempts 3
    path = config_file(config)
    workdir = tmp_path / "exporter"
    workdir.mkdir()
    proc = ExporterProcess(workdir, path).start()
    result: dict[str, dict[str, float]] = {}
    load = threading.Thread(target=lambda: result.update(run=wrk(proc.url, SECONDS, script)))
    try:
        load.start()
        time.sleep(SECONDS / 4)
        path.write_text("security:\n  max_login_attempts: many\n")  # invalid
        proc.signal(signal.SIGHUP)
        wait_until(lambda: metric(proc.url, "a3mailer_exporter_config_last_reload_successful")
                   == 0, 20, "the rejected reload")
        assert locks_after(proc.url, "ann", "192.0.2.1", 3)  # still 3: the old config runs
        time.sleep(SECONDS / 4)
        config["security"]["max_login_attempts"] = 5
        path.write_text(yaml.safe_dump(config))
        r = httpx.post(proc.url + "/-/reload", headers=ADMIN, timeout=10)
        assert r.status_code == 200, r.text
        assert metric(proc.url, "a3mailer_exporter_config_last_reload_successful") == 1
        assert not locks_after(proc.url, "bob", "192.0.2.2", 4)  # 5 now
        assert locks_after(proc.url, "bob", "192.0.2.2", 1)
        load.join(SECONDS + 30)
    finally:
        assert proc.stop() == 0
    run = result["run"]
    assert run["requests"] > 0 and run["non_2xx"] == 0 and run["socket_errors"] == 0, run
    record["reload_under_load"] = {
        "seconds": SECONDS, "requests": run["requests"], "errors": run["non_2xx"] +
        run["socket_errors"], "faults": "invalid config (rejected), then valid (applied)",
        "data_lost": 0}
