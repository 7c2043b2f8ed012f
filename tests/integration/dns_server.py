"""Real DNS pieces for the mail DNS / DNSBL tests, all on loopback.

- ``Nsd``: our own NSD (Debian's ``nsd``, an authoritative server) serving test
  zones given as zone-file text, on a free loopback port, foreground, no
  privilege drop, state and logs in its workdir.
- ``SilentDnsServer``: a bound UDP socket that never answers (a dead resolver).
- ``DelayedDnsServer``: a UDP server that answers every query correctly, but
  only after ``delay`` seconds (a slow resolver): it forwards to an upstream
  (our NSD) late.
- ``PolicyHttpsServer``: an HTTPS server for MTA-STS policy files, chosen by the
  Host header (``mta-sts.<domain>``).
- ``make_test_ca``: a throwaway CA and a server certificate for given names.

Plain classes in the style of components.py: ``start()`` returns self,
``stop()`` stops only what we started, usable as context managers.
"""

from __future__ import annotations

import http.server
import socket
import ssl
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rdatatype

from tests.integration.components import (
    LOOPBACK,
    Component,
    ComponentError,
    free_port,
    require_binary,
)


def dns_answers(port: int, name: str, rdtype: str = "SOA", host: str = LOOPBACK,
                timeout: float = 0.5) -> bool:
    """True when host:port answers a UDP query for name/rdtype (any rcode)."""
    query = dns.message.make_query(name, dns.rdatatype.from_text(rdtype))
    dns.query.udp(query, host, timeout=timeout, port=port)
    return True


class Nsd(Component):
    """NSD serving ``zones`` (origin -> zone file text) on 127.0.0.1:<free port>.

    Names outside every served zone are answered REFUSED (an authoritative
    server does not recurse); names inside a zone but absent are NXDOMAIN.
    """

    name = "nsd"
    start_timeout = 20.0

    def __init__(self, workdir: Path, zones: Mapping[str, str]) -> None:
        super().__init__(workdir)
        if not zones:
            raise ValueError("Nsd needs at least one zone")
        self.binary = require_binary("nsd")
        self.zones = {origin.rstrip(".") + ".": text for origin, text in zones.items()}
        self.host = LOOPBACK
        self.port = free_port()
        self.conf_path = self.workdir / "nsd.conf"
        self.logfile = self.workdir / "nsd.log"

    def log_files(self) -> list[Path]:
        return [self.logfile, *super().log_files()]

    def _config(self) -> str:
        w = self.workdir
        lines = [
            "server:",
            f"  ip-address: {self.host}",
            f"  port: {self.port}",
            "  do-ip6: no",
            "  server-count: 1",
            "  reuseport: no",
            '  username: ""',
            '  chroot: ""',
            f'  zonesdir: "{w}"',
            '  database: ""',
            f'  zonelistfile: "{w}/zone.list"',
            f'  xfrdfile: "{w}/xfrd.state"',
            f'  xfrdir: "{w}"',
            f'  pidfile: "{w}/nsd.pid"',
            f'  logfile: "{self.logfile}"',
            "  verbosity: 1",
            "  hide-version: yes",
            "  zonefiles-write: 0",
            "remote-control:",
            "  control-enable: no",
        ]
        for index, origin in enumerate(self.zones):
            lines += ["zone:", f"  name: {origin}", f'  zonefile: "zone{index}.db"']
        return "\n".join(lines) + "\n"

    def start(self) -> Nsd:
        for index, text in enumerate(self.zones.values()):
            (self.workdir / f"zone{index}.db").write_text(text)
        self.conf_path.write_text(self._config())
        checkconf = require_binary("nsd-checkconf")
        checked = subprocess.run([checkconf, str(self.conf_path)], capture_output=True,
                                 text=True)
        if checked.returncode != 0:
            raise ComponentError(f"nsd-checkconf rejected the config: {checked.stderr}")
        self._spawn([self.binary, "-d", "-c", str(self.conf_path)])
        first = next(iter(self.zones))
        self._wait_ready(lambda: dns_answers(self.port, first),
                         f"nsd answering {first} SOA on port {self.port}")
        return self


class SilentDnsServer:
    """A UDP socket bound on loopback that reads nothing and answers nothing."""

    def __init__(self, host: str = LOOPBACK) -> None:
        self.host = host
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, 0))
        self.port = int(self._sock.getsockname()[1])

    def stop(self) -> None:
        self._sock.close()

    def __enter__(self) -> SilentDnsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class DelayedDnsServer:
    """A slow resolver: every UDP query is answered by ``upstream``, ``delay`` seconds late."""

    def __init__(self, upstream_port: int, delay: float, host: str = LOOPBACK) -> None:
        self.host = host
        self.delay = delay
        self.upstream_port = upstream_port
        self.queries = 0
        self._stopping = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, 0))
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, name=f"slow-dns-{self.port}",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                data, client = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.queries += 1
            threading.Thread(target=self._answer_late, args=(data, client), daemon=True).start()

    def _answer_late(self, data: bytes, client: Any) -> None:
        if self._stopping.wait(self.delay):
            return
        try:
            query = dns.message.from_wire(data)
            response = dns.query.udp(query, self.host, timeout=2, port=self.upstream_port)
            self._sock.sendto(response.to_wire(), client)
        except Exception:  # noqa: BLE001 - a late answer that fails is just no answer
            return

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def __enter__(self) -> DelayedDnsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_test_ca(directory: Path, names: list[str]) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for ``names`` signed by it.

    Returns (ca_cert, server_cert, server_key) paths; the CA file is what the
    exporter's ``mta_sts_ca_file`` points at.
    """
    openssl = require_binary("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca-key.pem", directory / "ca.pem"
    key, csr, cert = directory / "key.pem", directory / "server.csr", directory / "cert.pem"
    ext = directory / "server.ext"
    sans = ",".join(f"DNS:{n}" for n in names)
    ext.write_text(f"subjectAltName={sans}\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        [openssl, "req", "-x509", *ec, "-days", "2", "-subj", "/CN=a3mailer test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-keyout", str(ca_key), "-out", str(ca_cert)],
        [openssl, "req", "-new", *ec, "-subj", f"/CN={names[0]}", "-keyout", str(key),
         "-out", str(csr)],
        [openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert)],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            raise ComponentError(f"openssl failed: {' '.join(step[:3])}: {done.stderr}")
    return ca_cert, cert, key


class PolicyHttpsServer:
    """HTTPS on 127.0.0.1:<port>: GET /.well-known/mta-sts.txt answers ``policies[host]``.

    ``policies`` maps the policy host (``mta-sts.<domain>``) to (status,
    content type, body); unknown hosts get 404. Every request's Host is kept
    in ``hosts``.
    """

    def __init__(self, cert: Path, key: Path,
                 policies: Mapping[str, tuple[int, str, str]], host: str = LOOPBACK) -> None:
        self.policies = dict(policies)
        self.hosts: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()
                outer.hosts.append(host)
                status, ctype, body = outer.policies.get(host, (404, "text/plain", "no policy"))
                if self.path != "/.well-known/mta-sts.txt":
                    status, ctype, body = 404, "text/plain", "not found"
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self._server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name=f"https-{self.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> PolicyHttpsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def closed_udp_port(host: str = LOOPBACK) -> int:
    """A UDP port on ``host`` that nothing listens on (queries get ICMP port unreachable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
