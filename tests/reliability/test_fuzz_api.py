"""schemathesis against /openapi.json of the real exporter process: every route, generated
requests (valid and not), no 5xx, responses as documented, and auth enforced."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.exporter_process import ExporterProcess
from tests.reliability.conftest import scale

TOKEN = "fuzz-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = scale(25, 150)


def fuzz_config(workdir: Path) -> Path:
    token = workdir / "admin.token"
    token.write_text(TOKEN)
    secret = workdir / "webhook.secret"
    secret.write_text("webhook-secret")
    config = {
        "server": {"state_dir": str(workdir / "state")},
        "monitoring": {"custom_metrics": [
            {"name": "jobs", "type": "gauge", "help": "Jobs waiting", "labels": ["queue"]}]},
        "security": {
            "admin_token_file": str(token),
            # the limits would answer 429 to a fuzzer's volume; they have their own tests
            "enable_rate_limiting": False,
            "stalwart_webhook": {"secret_file": str(secret)},
        },
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExporterProcess]:
    workdir = tmp_path_factory.mktemp("fuzz")
    proc = ExporterProcess(workdir, fuzz_config(workdir)).start()
    yield proc
    assert proc.proc is not None and proc.proc.poll() is None, "the exporter died under fuzzing"
    assert proc.stop() == 0
    assert "Traceback" not in proc.log(), proc.log()[-4000:]


def _operations() -> list[tuple[str, str]]:
    """Every operation of the document, as the in-process app builds it (at collection)."""
    from exporter.config import load_config
    from exporter.http.openapi import openapi_document

    paths = openapi_document(load_config())["paths"]
    return [(method.upper(), path) for path, ops in paths.items() for method in ops]


@pytest.fixture(scope="module")
def api_schema(fuzzed: ExporterProcess) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")


@pytest.mark.parametrize(("method", "path"), _operations())
def test_every_route_survives_generated_requests(api_schema: schemathesis.BaseSchema,
                                                 method: str, path: str) -> None:
    """No 5xx; status codes, content types and bodies as /openapi.json documents them.

    Not checked: that every schema-valid request is accepted (a CIDR or an address is a
    string to the document, and the server answers a bad one with 400, as it should).
    (schemathesis's own pytest plugin does not run on pytest 9.2, so each operation's
    strategy is driven by hypothesis here.)"""
    operation = api_schema[path][method]

    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=ADMIN, timeout=10,
                               excluded_checks=[positive_data_acceptance])

    fuzz()


def test_admin_routes_refuse_missing_and_wrong_credentials(fuzzed: ExporterProcess) -> None:
    document = httpx.get(fuzzed.url + "/openapi.json").json()
    checked = 0
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if not operation.get("security"):
                continue
            url = fuzzed.url + path.replace("{account}", "alice").replace("{name}", "jobs")
            for headers in ({}, {"Authorization": "Bearer wrong-token"},
                            {"Authorization": f"Basic {TOKEN}"}):
                r = httpx.request(method, url, headers=headers, json={})
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.json()["error"], r.text
            checked += 1
    assert checked >= 12  # every admin route of /openapi.json was tried
