"""The mail-monitoring sections of the config, and how the exporter builds, scrapes,
health-checks and reloads them (in process, against local fake servers)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml

from exporter.config import load_config
from exporter.exposition import render_text
from exporter.health import Status
from exporter.service import Exporter
from tests.unit.test_config import problems, write


def test_defaults_run_no_mail_source():
    mon = load_config()["monitoring"]
    assert mon["probes"] == [] and mon["delivery"]["enabled"] is False
    assert mon["dns"]["domains"] == [] and mon["dnsbl"]["ip_sets"] == []
    assert mon["queues"]["postfix"]["enabled"] is False
    assert mon["stalwart"]["enabled"] is False and mon["logs"]["files"] == []
    assert mon["dnsbl"]["zones"][0] == "zen.spamhaus.org"


def test_probe_items_are_checked_with_file_line_and_path(tmp_path):
    path = write(tmp_path, """
        monitoring:
          probes:
            - {name: bad, protocol: gopher, host: x}
            - {protocol: smtp, host: x}
            - {name: t, protocol: smtp, host: x, tls: starttls, timeout: 5}
            - {name: t2, protocol: smtp, host: x, colour: blue}
    """)
    found = problems(path)
    assert any(p.startswith(f"{path}:3: monitoring.probes[0].protocol:") and "gopher" in p
               for p in found)
    assert any(p.startswith(f"{path}:4: monitoring.probes[1]") and "name" in p for p in found)
    assert any(p.startswith(f"{path}:5: monitoring.probes[2].timeout:") for p in found)
    assert any(p.startswith(f"{path}:6: monitoring.probes[3].colour: unknown key") for p in found)


def test_probe_semantics_are_checked_by_the_code_that_builds_them(tmp_path):
    path = write(tmp_path, """
        monitoring:
          probes:
            - {name: smtp, protocol: smtp, host: mx.example.test}
            - {name: web, protocol: http, host: 127.0.0.1, tls: starttls}
            - {name: smtp, protocol: imap, host: mx.example.test}
            - {name: dns, protocol: pop3, host: mx.example.test}
    """)
    found = problems(path)
    assert found[:3] == [
        f"{path}:4: monitoring.probes[1]: probe web: http has no STARTTLS; use tls: implicit "
        "for https",
        f"{path}:5: monitoring.probes[2].name: probe name 'smtp' used twice",
        f"{path}:6: monitoring.probes[3].name: 'dns' is the name of a built-in health "
        "component; choose another"]


def test_probe_credentials_are_read_at_load_and_every_copy_of_a_name_is_counted(tmp_path):
    """A missing credentials_file passed check-config and failed at the first run; a name
    used by a probe with an error of its own was not counted, so a third copy showed only
    once the first was fixed."""
    (tmp_path / "bad.creds").write_text("no colon here\n")
    (tmp_path / "good.creds").write_text("probe:s3cret\n")
    path = write(tmp_path, f"""
        monitoring:
          probes:
            - {{name: h, protocol: http, host: 127.0.0.1, tls: starttls}}
            - {{name: h, protocol: smtp, host: mx.example.test}}
            - {{name: a, protocol: imap, host: mx.example.test,
                credentials_file: {tmp_path}/missing}}
            - {{name: b, protocol: imap, host: mx.example.test,
                credentials_file: {tmp_path}/bad.creds}}
            - {{name: c, protocol: imap, host: mx.example.test,
                credentials_file: {tmp_path}/good.creds}}
    """)
    found = problems(path)
    assert found == [
        f"{path}:3: monitoring.probes[0]: probe h: http has no STARTTLS; use tls: implicit "
        "for https",
        f"{path}:4: monitoring.probes[1].name: probe name 'h' used twice",
        f"{path}:6: monitoring.probes[2].credentials_file: cannot read credentials_file "
        f"{tmp_path}/missing: No such file or directory",
        f"{path}:8: monitoring.probes[3].credentials_file: {tmp_path}/bad.creds must hold one "
        "line user:password"]
    assert "s3cret" not in "".join(found)


def test_mail_section_schema_errors(tmp_path):
    path = write(tmp_path, """
        monitoring:
          logs:
            files:
              - {name: x, path: /var/log/x.log, format: syslog}
          dns:
            domains: [{name: "exa mple.com"}]
          dnsbl:
            ip_sets: [{name: out, ips: [192.0.2.300]}]
          stalwart:
            url: ftp://mail.example.test
    """)
    found = problems(path)
    assert any(p.startswith(f"{path}:4: monitoring.logs.files[0].format:") for p in found)
    assert any(p.startswith(f"{path}:6: monitoring.dns.domains[0].name:") for p in found)
    assert any(p.startswith(f"{path}:8: monitoring.dnsbl.ip_sets[0].ips[0]:") for p in found)
    assert any(p.startswith(f"{path}:10: monitoring.stalwart.url:") for p in found)


def test_mail_section_semantic_errors(tmp_path):
    path = write(tmp_path, """
        monitoring:
          delivery:
            enabled: true
            from_address: probe@
          logs:
            files:
              - {name: mail, path: /var/log/mail.log, format: maillog}
              - {name: mail, path: /var/log/other.log, format: postfix}
          stalwart:
            password_file: /nonexistent/secret
    """)
    found = problems(path)
    # every required key at once, each on its own key (they came one at a time, on the
    # section)
    assert (f"{path}:2: monitoring.delivery.credentials_file: is required when enabled"
            in found)
    assert f"{path}:2: monitoring.delivery.to_address: is required when enabled" in found
    assert (f"{path}:4: monitoring.delivery.from_address: is not an e-mail address"
            in found)
    assert f"{path}:8: monitoring.logs.files[1].name: log file name 'mail' used twice" in found
    assert any(p.startswith(f"{path}:10: monitoring.stalwart.password_file: cannot read secret")
               for p in found)


# --------------------------------------------------------------------------- wiring


async def _silent_server() -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 fake.example.test ESMTP ready\r\n")
        await writer.drain()
        while line := await reader.readline():
            if line.upper().startswith(b"EHLO"):
                writer.write(b"250-fake.example.test\r\n250 PIPELINING\r\n")
            elif line.upper().startswith(b"QUIT"):
                writer.write(b"221 bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"502 no\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def mail_config(tmp_path: Path, port: int, log_file: Path, **monitoring) -> Path:
    data = {
        "server": {"state_dir": str(tmp_path / "state")},
        "monitoring": {
            "probes": [{"name": "mx", "protocol": "smtp", "host": "127.0.0.1", "port": port,
                        "interval": "1h", "timeout": "2s"},
                       {"name": "closed", "protocol": "imap", "host": "127.0.0.1", "port": 1,
                        "interval": "1h", "timeout": "2s"}],
            "logs": {"poll_interval": "1h",
                     "files": [{"name": "mail", "path": str(log_file), "format": "maillog",
                                "start_at": "beginning"}]},
            "queues": {"postfix": {"enabled": True,
                                   "postqueue_path": str(tmp_path / "no-postqueue")}},
            **monitoring,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def test_exporter_runs_scrapes_and_health_checks_mail_sources(tmp_path):
    server, port = await _silent_server()
    log_file = tmp_path / "mail.log"
    log_file.write_text(
        "Nov 30 10:00:00 mx dovecot: imap-login: Disconnected (auth failed, 1 attempts in 2 "
        "secs): user=<eve@example.test>, method=PLAIN, rip=203.0.113.9, lip=192.0.2.1, "
        "session=<abc>\n")
    exporter = Exporter(load_config(mail_config(tmp_path, port, log_file)))
    try:
        await exporter.start()
        deadline = asyncio.get_running_loop().time() + 10
        while any(run.last.runs == 0 for run in exporter.mail.probes.schedules()) or (
                exporter.mail.queues["postfix"].last.runs == 0):
            assert asyncio.get_running_loop().time() < deadline, "sources never ran"
            await asyncio.sleep(0.05)
        await exporter.mail.logs.poll_once()
        await exporter.health.run_once()
        text = render_text(exporter.scrape.collect()).decode()
        assert 'a3mailer_probe_success{probe="mx",protocol="smtp"} 1.0' in text
        assert 'a3mailer_probe_success{probe="closed",protocol="imap"} 0.0' in text
        assert 'a3mailer_queue_check_success{source="postfix"} 0.0' in text
        assert ('a3mailer_auth_events_total{source="mail",service="imap",result="failure"} 1.0'
                in text)
        for collector in ("probes", "queues", "logs"):
            assert f'a3mailer_exporter_collector_success{{collector="{collector}"}} 1.0' in text
        components = exporter.health.components
        assert components["mx"].status is Status.HEALTHY
        assert components["closed"].status is Status.UNHEALTHY
        assert "refused" in components["closed"].message
        assert components["queues"].status is Status.DEGRADED
        assert not components["closed"].critical  # a mail service down keeps us ready
        assert exporter.health.ready()[0]
        # the logged failure reached the security engine (an anonymous distinct failure)
        attempts = exporter.security.stats.attempts
        assert attempts[("imap", "failure")] == 1
    finally:
        await exporter.stop()
        server.close()
        await server.wait_closed()


async def test_reload_keeps_unchanged_sources_and_drops_removed_ones(tmp_path):
    server, port = await _silent_server()
    log_file = tmp_path / "mail.log"
    log_file.write_text("")
    path = mail_config(tmp_path, port, log_file)
    exporter = Exporter(load_config(path))
    try:
        await exporter.start()
        mx_run = exporter.mail.probes.runs["mx"]
        postfix = exporter.mail.queues["postfix"]
        data = yaml.safe_load(path.read_text())
        data["monitoring"]["probes"] = data["monitoring"]["probes"][:1]  # "closed" removed
        data["monitoring"]["dnsbl"] = {"ip_sets": [{"name": "out", "ips": ["192.0.2.1"]}],
                                       "nameservers": ["127.0.0.1"], "port": 1,
                                       "interval": "1h", "timeout": "1s"}
        path.write_text(yaml.safe_dump(data))
        assert exporter.reload() == []
        assert exporter.mail.probes.runs["mx"] is mx_run  # its schedule and last result kept
        assert exporter.mail.queues["postfix"] is postfix
        assert "closed" not in exporter.health.components
        assert {"mx", "queues", "dnsbl"} <= set(exporter.health.components)
        assert exporter.mail.dnsbl is not None and exporter.mail.dnsbl.periodic._task is not None
        names = {c.name for c in exporter.scrape.collectors}
        assert {"probes", "dnsbl", "queues", "logs"} <= names

        data["monitoring"]["probes"].append({"name": "mx", "protocol": "pop3", "host": "x"})
        path.write_text(yaml.safe_dump(data))
        problems = exporter.reload()
        assert problems and "used twice" in problems[0]
        assert exporter.mail.probes.runs["mx"] is mx_run  # the old config keeps running
    finally:
        await exporter.stop()
        server.close()
        await server.wait_closed()
    assert all(run._task is None for run in exporter.mail.probes.schedules())
