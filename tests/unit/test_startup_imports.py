"""What the exporter loads at start on its embedded default config.

Idle RSS is a target (issue 2: under 60 MB), and most of it is code: these packages
are imported by the feature that needs them, when it is configured (so its first use
under load does not wait for an import) or, for MFA sealing, at first use; an exporter
that runs none of those features never pays for them. The check runs the real start-up
and one /metrics scrape through the ASGI app in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# package -> what loads it (and its resident cost, measured 2026-12-01)
ON_FIRST_USE = {
    "cryptography": "MFA sealing, at the first TOTP enroll or verify (6.6 MB)",
    "httpx": "the Alertmanager push and OIDC, when configured (5.3 MB, more with rich)",
    "jwt": "OIDC token validation, when configured (2.5 MB)",
    "dns": "DNS checks, DNSBL ip_sets, when configured (3.6 MB)",
    "saml2": "the SAML service provider (~17 MB with xmlschema)",
    "webauthn": "WebAuthn (~12 MB)",
    "zxcvbn": "the password strength check (~12 MB)",
}

SCRIPT = r"""
import asyncio, json, sys
from exporter.config import load_config
from exporter.http import create_app
from exporter.service import Exporter
import uvicorn  # the server `run` starts

async def scrape(app):
    sent = []
    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}
    async def send(message):
        sent.append(message)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": "/metrics", "raw_path": b"/metrics",
             "query_string": b"", "root_path": "", "headers": [(b"host", b"127.0.0.1")],
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 9000)}
    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

async def main():
    exporter = Exporter(load_config(sys.argv[2] if len(sys.argv) > 2 else None,
                                    {"server": {"state_dir": sys.argv[1]}}))
    app = create_app(exporter)
    await exporter.start()
    try:
        status, body = await scrape(app)
    finally:
        await exporter.stop()
    return status, body

status, body = asyncio.run(main())
print(json.dumps({"status": status, "has_metrics": b"a3mailer_exporter_build_info" in body,
                  "modules": sorted({name.split(".")[0] for name in sys.modules})}))
"""


def start_and_scrape(tmp_path: Path, *config: str) -> set[str]:
    """The top-level modules loaded after start-up and one scrape."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "state"), *config],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["status"] == 200 and seen["has_metrics"]
    modules = set(seen["modules"])
    assert {"exporter", "security", "prometheus_client", "uvicorn"} <= modules  # it ran
    return modules


def test_default_start_does_not_load_first_use_packages(tmp_path: Path):
    modules = start_and_scrape(tmp_path)
    loaded = {name: why for name, why in ON_FIRST_USE.items() if name in modules}
    assert not loaded, f"imported at start, though only needed for: {loaded}"


def test_configured_features_load_their_packages_at_start(tmp_path: Path):
    # every address is loopback's discard port: nothing leaves the machine
    config = tmp_path / "config.yaml"
    config.write_text("""
monitoring:
  dns:
    nameservers: [127.0.0.1]
    port: 9
    domains: [{name: example.org}]
alerting:
  engine:
    alertmanager: {url: "http://127.0.0.1:9"}
security:
  oidc: {enabled: true, issuer: "http://127.0.0.1:9", audience: [mail]}
""", encoding="utf-8")
    modules = start_and_scrape(tmp_path, str(config))
    assert {"httpx", "jwt", "dns"} <= modules
    assert not {"saml2", "webauthn", "zxcvbn"} & modules
