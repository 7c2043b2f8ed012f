"""Real components for integration tests: Prometheus, Alertmanager, Dovecot,
Postfix and Redis from the Debian packages, each run as our own child process
on loopback with a private temp directory.

Plain classes, no pytest fixtures (conftest.py builds those), so benchmarks and
scripts can use them too. Every wrapper:

- binds 127.0.0.1 on free ports, never the packaged system service;
- is started by ``start()`` (returns self) and stopped by ``stop()``, which kills
  only the PID we started and waits for it; also usable as a context manager;
- polls for readiness with a deadline and, on failure, raises
  ``ComponentError`` with the tail of the component's own log files.
"""

from __future__ import annotations

import atexit
import base64
import concurrent.futures
import contextlib
import grp
import http.server
import imaplib
import ipaddress
import itertools
import json
import os
import poplib
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
MAIL_DOMAIN = "example.test"
DEFAULT_MAIL_USERS: dict[str, str] = {
    f"alice@{MAIL_DOMAIN}": "alice-secret-1",
    f"bob@{MAIL_DOMAIN}": "bob-secret-2",
}

# Debian puts daemons outside PATH; look there too.
_EXTRA_BIN_DIRS = (
    "/usr/sbin",
    "/sbin",
    "/usr/local/sbin",
    "/usr/lib/dovecot",
    "/usr/lib/postfix/sbin",
)


class ComponentError(RuntimeError):
    """A real component failed to start, answer or stop."""


class GiveUp(Exception):
    """Raised by a wait_until predicate to stop waiting at once (e.g. the process died)."""


# --------------------------------------------------------------------------- helpers


def _missing(message: str) -> None:
    """A missing component fails in CI (it must be installed there) and skips locally."""
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)  # outside CI only: under CI=true the line above fails


def find_binary(name: str) -> str | None:
    """Path of ``name`` on PATH or in the Debian daemon directories, else None."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_BIN_DIRS])
    return shutil.which(name, path=path)


def require_binary(name: str) -> str:
    """Path of a component binary; fail in CI / skip elsewhere when it is missing."""
    found = find_binary(name)
    if found is None:
        _missing(f"required binary {name!r} not found on PATH or in {', '.join(_EXTRA_BIN_DIRS)}")
    assert found is not None
    return found


def require_root(what: str) -> None:
    """Dovecot and Postfix need root here (privilege separation across system users)."""
    if os.geteuid() != 0:
        _missing(f"{what} needs root to run its own instance (it switches to system users)")


_handed_out_ports: set[int] = set()
_port_lock = threading.Lock()


def free_port(host: str = LOOPBACK) -> int:
    """A currently free TCP port on ``host``, never the same one twice per process."""
    with _port_lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port = int(sock.getsockname()[1])
            if port not in _handed_out_ports:
                _handed_out_ports.add(port)
                return port
    raise ComponentError(f"no free port found on {host}")


_loopback_counter = itertools.count(10)


def next_loopback_ip() -> str:
    """A fresh 127.0.x.y source address: Dovecot delays repeated failures per client IP."""
    while True:
        address = ipaddress.IPv4Address("127.0.0.0") + next(_loopback_counter)
        if address.packed[-1] not in (0, 1, 255):
            return str(address)


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> T:
    """Poll ``predicate`` until it returns a truthy value (returned) or time runs out.

    Exceptions raised by the predicate count as "not yet" (except GiveUp, which
    propagates); the last one is reported in the timeout error with ``what``.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except GiveUp:
            raise
        except Exception as exc:  # noqa: BLE001 - "not ready yet"
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise ComponentError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(interval)


def port_open(host: str, port: int) -> bool:
    """True when a TCP connection to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def port_listening(port: int, host: str = LOOPBACK) -> bool:
    """True when a TCP socket listens on host:port, checked via /proc/net/tcp so
    that readiness polling leaves no connect/disconnect lines in the mail logs."""
    try:
        table = Path("/proc/net/tcp").read_text()
    except OSError:
        return port_open(host, port)
    wanted = {f"{socket.htonl(int(ipaddress.IPv4Address(h))):08X}:{port:04X}" for h in (host,)}
    wanted.add(f"00000000:{port:04X}")  # 0.0.0.0
    for line in table.splitlines()[1:]:
        fields = line.split()
        if fields[1] in wanted and fields[3] == "0A":  # 0A = LISTEN
            return True
    return False


def tail(path: Path, lines: int = 40) -> str:
    """Last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"<{path} not readable>"
    return "\n".join(text.splitlines()[-lines:])


def make_traversable(path: Path) -> None:
    """Add o+x (search only, no read) to ``path`` and its ancestors.

    pytest creates tmp_path 0700 below /tmp/pytest-of-root; Dovecot's mail
    processes and Postfix's daemons run as other system users and must reach
    their files there. pytest tightens its base dir again on its next run.
    """
    for directory in [path, *path.parents]:
        st = directory.stat()
        if st.st_uid == os.geteuid() and not st.st_mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def http_json(
    method: str,
    url: str,
    body: Any = None,
    timeout: float = 10.0,
    headers: Mapping[str, str] | None = None,
) -> Any:
    """Tiny JSON-over-HTTP client (stdlib only) for the components' APIs."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise ComponentError(f"{method} {url} -> {exc.code}: {exc.read()[:500]!r}") from exc
    return json.loads(raw) if raw.strip() else None


def http_ok(url: str, headers: Mapping[str, str] | None = None) -> bool:
    """True when GET url answers 200."""
    try:
        request = urllib.request.Request(url, headers=dict(headers or {}))
        with urllib.request.urlopen(request, timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def make_self_signed_cert(directory: Path, common_name: str = "localhost") -> tuple[Path, Path]:
    """An EC P-256 self-signed cert + key (for localhost and 127.0.0.1) via openssl."""
    openssl = require_binary("openssl")
    cert, key = directory / "tls-cert.pem", directory / "tls-key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={common_name}",
            "-addext",
            f"subjectAltName=DNS:{common_name},IP:{LOOPBACK}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def cert_not_after(cert: Path) -> float:
    """The certificate's notAfter as Unix seconds, read by openssl (not by the code tested)."""
    out = subprocess.run([require_binary("openssl"), "x509", "-noout", "-enddate", "-in",
                          str(cert)], check=True, capture_output=True, text=True).stdout
    return float(ssl.cert_time_to_seconds(out.strip().split("=", 1)[1]))


# --------------------------------------------------------------------------- HTTP helper


@dataclass
class RecordedRequest:
    """One request received by a RecordingHTTPServer."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


Responder = Callable[[RecordedRequest], tuple[int, str, bytes | str]]


def _ok_empty(_: RecordedRequest) -> tuple[int, str, bytes | str]:
    return 200, "text/plain", b""


class _QuietHTTPServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the client gave up on a hanging answer (tests do): not an error here
        super().handle_error(request, client_address)


class RecordingHTTPServer:
    """HTTP server in a thread that records every request and answers via ``responder``.

    Serves as Alertmanager's webhook receiver, as a fake scrape target and as a
    fake Dovecot auth-policy endpoint. It binds port 0 itself, so it has no
    port race; ``port`` rebinds a port a stopped one had (a receiver coming back).
    """

    def __init__(self, responder: Responder = _ok_empty, host: str = LOOPBACK,
                 port: int = 0) -> None:
        self.responder = responder
        self.requests: list[RecordedRequest] = []
        self._cond = threading.Condition()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                parsed = urllib.parse.urlsplit(self.path)
                req = RecordedRequest(
                    method=self.command,
                    path=parsed.path,
                    query=urllib.parse.parse_qs(parsed.query),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=self.rfile.read(length) if length else b"",
                )
                with outer._cond:
                    outer.requests.append(req)
                    outer._cond.notify_all()
                try:
                    status, ctype, payload = outer.responder(req)
                except Exception as exc:  # noqa: BLE001 - report to the client
                    status, ctype, payload = 500, "text/plain", repr(exc)
                data = payload.encode() if isinstance(payload, str) else payload
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _handle

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = _QuietHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"http-{self.port}", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def snapshot(self) -> list[RecordedRequest]:
        with self._cond:
            return list(self.requests)

    def wait_for_request(
        self, predicate: Callable[[RecordedRequest], bool] = lambda r: True, timeout: float = 30
    ) -> RecordedRequest:
        """First recorded request (past or future) matching ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for req in self.requests:
                    if predicate(req):
                        return req
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ComponentError(
                        f"timed out after {timeout:g}s waiting for a matching request on "
                        f"{self.url}; got {len(self.requests)} request(s): "
                        f"{[(r.method, r.path) for r in self.requests][-10:]}"
                    )
                self._cond.wait(remaining)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> RecordingHTTPServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def text_responder(
    body: str | Callable[[], str], content_type: str = "text/plain; version=0.0.4"
) -> Responder:
    """Responder serving a fixed (or callable) text body, e.g. a metrics page."""

    def respond(_: RecordedRequest) -> tuple[int, str, bytes | str]:
        return 200, content_type, body() if callable(body) else body

    return respond



class DribblingHTTPServer:
    """An HTTP server that answers every request slowly, in a thread per connection: the
    status line at once, then one header line every ``gap`` seconds and never the end
    of the headers (``body=False``), or all headers at once and then one body byte every
    ``gap`` seconds (``body=True``). Each socket read on the client side gets data well
    within any per-read timeout longer than ``gap``; only a deadline on the whole
    exchange ends it. ``connections`` counts accepted ones, ``open_connections`` those
    still being answered (the client has not hung up yet)."""

    def __init__(self, gap: float = 0.5, body: bool = False, host: str = LOOPBACK) -> None:
        self.gap = gap
        self.body = body
        self.connections = 0
        self.open_connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.1)  # to notice stop()
        self.host = host
        self.port = int(self._listener.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, name=f"dribble-{self.port}",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self.open_connections += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(5)
                conn.recv(65536)  # the request head (small, one segment on loopback)
                if self.body:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                 b"Content-Length: 100000\r\n\r\n")
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\n")
                for n in itertools.count():
                    if self._stop.wait(self.gap):
                        return
                    conn.sendall(b"#" if self.body else f"X-Slow-{n}: {n}\r\n".encode())
        except OSError:
            pass  # the client hung up: what a bounded client does
        finally:
            with self._lock:
                self.open_connections -= 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()

    def __enter__(self) -> DribblingHTTPServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

# --------------------------------------------------------------------------- OTLP receiver


@dataclass
class ReceivedSpan:
    """One span as an OTLP/HTTP receiver decoded it (ids as lower-case hex)."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str  # SPAN_KIND_SERVER, SPAN_KIND_INTERNAL, ...
    attributes: dict[str, Any]
    status: str  # STATUS_CODE_UNSET, STATUS_CODE_OK, STATUS_CODE_ERROR
    start_ns: int
    end_ns: int
    resource: dict[str, Any]
    scope: str
    headers: dict[str, str]  # of the export request that carried it


def _any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def decode_spans(body: bytes, headers: dict[str, str]) -> list[ReceivedSpan]:
    """The spans of an ExportTraceServiceRequest (opentelemetry-proto decodes it)."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
    from opentelemetry.proto.trace.v1 import trace_pb2

    request = trace_service_pb2.ExportTraceServiceRequest()
    request.ParseFromString(body)
    return [
        ReceivedSpan(
            trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
            parent_span_id=span.parent_span_id.hex(), name=span.name,
            kind=trace_pb2.Span.SpanKind.Name(span.kind),
            attributes={a.key: _any_value(a.value) for a in span.attributes},
            status=trace_pb2.Status.StatusCode.Name(span.status.code),
            start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano,
            resource={a.key: _any_value(a.value) for a in resource_spans.resource.attributes},
            scope=scope_spans.scope.name, headers=headers)
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans]


class _SpanStore:
    """The received spans, and waiting for them (under the receiver's condition)."""

    url: str
    spans: list[ReceivedSpan]
    errors: list[str]
    _cond: threading.Condition

    def _keep(self, spans: list[ReceivedSpan]) -> None:
        with self._cond:
            self.spans.extend(spans)
            self._cond.notify_all()

    def wait_for_spans(self, predicate: Callable[[ReceivedSpan], bool], count: int = 1,
                       timeout: float = 30) -> list[ReceivedSpan]:
        """Waits until at least ``count`` received spans match; returns all that do."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                matching = [span for span in self.spans if predicate(span)]
                if len(matching) >= count:
                    return matching
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = sorted({span.name for span in self.spans})
                    raise ComponentError(
                        f"timed out after {timeout:g}s waiting for {count} matching span(s) "
                        f"on {self.url}; got {len(self.spans)} span(s) named {names}, "
                        f"errors {self.errors}")
                self._cond.wait(remaining)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._cond:
            return [span for span in self.spans if span.trace_id == trace_id]


class OTLPReceiver(_SpanStore, RecordingHTTPServer):
    """An OTLP/HTTP trace receiver: accepts protobuf POSTs to /v1/traces, decodes them
    with opentelemetry-proto and keeps every span. Answers 200 with an empty
    ExportTraceServiceResponse, or ``status`` when set (e.g. 503 to refuse)."""

    def __init__(self, host: str = LOOPBACK, port: int = 0) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.status = 200
        self.spans = []
        self.errors = []

        def respond(req: RecordedRequest) -> tuple[int, str, bytes | str]:
            if req.method != "POST" or req.path != "/v1/traces":
                return 404, "text/plain", "not an OTLP traces endpoint"
            if req.headers.get("content-type") != "application/x-protobuf":
                self.errors.append(f"content-type {req.headers.get('content-type')!r}")
                return 415, "text/plain", "protobuf only"
            try:
                decoded = decode_spans(req.body, req.headers)
            except Exception as exc:  # noqa: BLE001 - recorded for the test to see
                self.errors.append(f"undecodable body: {exc}")
                return 400, "text/plain", "bad protobuf"
            if self.status != 200:
                return self.status, "text/plain", "refused"
            self._keep(decoded)
            return (200, "application/x-protobuf",
                    trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

        super().__init__(respond, host, port)


class OTLPGrpcReceiver(_SpanStore):
    """An OTLP/gRPC trace receiver (grpcio's server): TraceService/Export calls decoded
    with opentelemetry-proto, every span kept with the call's metadata as its headers.
    ``refuse``, when set, is the (grpc.StatusCode, trailing metadata) the next calls get
    instead (``refusals`` of them, then the calls succeed again); ``calls`` counts every
    call."""

    SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"

    def __init__(self, host: str = LOOPBACK, credentials: Any = None) -> None:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.spans = []
        self.errors = []
        self.calls = 0
        self.refuse: tuple[Any, tuple[tuple[str, bytes | str], ...]] | None = None
        self.refusals = 0
        self._cond = threading.Condition()

        def export(body: bytes, context: Any) -> bytes:
            with self._cond:
                self.calls += 1
                refuse = self.refuse if self.refusals > 0 else None
                self.refusals -= 1 if refuse else 0
            if refuse is not None:
                context.set_trailing_metadata(refuse[1])
                context.abort(refuse[0], "refused by the test")
            headers = {key: value for key, value in context.invocation_metadata()}
            try:
                decoded = decode_spans(body, headers)
            except Exception as exc:  # noqa: BLE001 - recorded for the test to see
                self.errors.append(f"undecodable body: {exc}")
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad protobuf")
            self._keep(decoded)
            return trace_service_pb2.ExportTraceServiceResponse().SerializeToString()

        handler = grpc.method_handlers_generic_handler(self.SERVICE, {
            "Export": grpc.unary_unary_rpc_method_handler(export)})  # bytes in and out
        self._server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4),
                                   handlers=(handler,))
        if credentials is None:
            self.port = self._server.add_insecure_port(f"{host}:0")
        else:
            self.port = self._server.add_secure_port(f"{host}:0", credentials)
        scheme = "http" if credentials is None else "https"
        self.url = f"{scheme}://{host}:{self.port}"

    def __enter__(self) -> OTLPGrpcReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None)



# --------------------------------------------------------------------------- process base

_running: set[Component] = set()


class Component:
    """Base for wrappers: one child process we own, with log files in ``workdir``."""

    name = "component"
    start_timeout = 30.0

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdout_path = self.workdir / f"{self.name}.stdout.log"
        self.stderr_path = self.workdir / f"{self.name}.stderr.log"

    # subclasses: build config and call _spawn / _wait_ready
    def start(self) -> Component:
        raise NotImplementedError

    def log_files(self) -> list[Path]:
        return [self.stdout_path, self.stderr_path]

    def _diagnostics(self) -> str:
        parts = []
        for path in self.log_files():
            if path.exists():
                parts.append(f"--- {path} ---\n{tail(path)}")
        return "\n".join(parts)

    def _spawn(self, cmd: list[str], *, new_session: bool = False) -> None:
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.workdir,
                start_new_session=new_session,
            )
        _running.add(self)

    def _wait_ready(self, check: Callable[[], Any], what: str) -> None:
        """Poll ``check``; fail fast with logs when the process exits meanwhile."""

        def ready() -> Any:
            if self.proc is not None and self.proc.poll() is not None:
                raise _Exited(self.proc.returncode)
            return check()

        try:
            wait_until(ready, self.start_timeout, what)
        except _Exited as exc:
            self.stop()
            raise ComponentError(
                f"{self.name} exited with code {exc.args[0]} before {what}\n{self._diagnostics()}"
            ) from None
        except ComponentError as exc:
            self.stop()
            raise ComponentError(f"{exc}\n{self._diagnostics()}") from None

    def _terminate(self, timeout: float = 15.0) -> None:
        """SIGTERM our PID, wait; SIGKILL if it does not go."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def stop(self) -> None:
        self._terminate()
        _running.discard(self)

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Exited(GiveUp):
    pass


@atexit.register
def _stop_leftovers() -> None:
    """Safety net: stop whatever a crashed test left running."""
    for component in list(_running):
        with contextlib.suppress(Exception):
            component.stop()


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (PID 1 here may never reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# --------------------------------------------------------------------------- Prometheus


class Prometheus(Component):
    """Our own Prometheus scraping ``targets`` with 1 s intervals.

    ``targets``: dicts with ``job``, ``targets`` (["host:port", ...]) and optional
    ``metrics_path`` (/metrics), ``scheme`` (http), ``scrape_interval`` (1s),
    ``scrape_timeout``, ``basic_auth`` ({"username", "password"}),
    ``bearer_token``, ``params``, ``labels``; any other key is copied into the
    scrape config unchanged (e.g. ``honor_labels``, ``relabel_configs``).
    """

    name = "prometheus"
    start_timeout = 60.0

    def __init__(
        self,
        workdir: Path,
        targets: Iterable[Mapping[str, Any]] = (),
        rule_files: Iterable[str | Path] = (),
        *,
        alertmanager: str | None = None,
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        extra_args: Iterable[str] = (),
    ) -> None:
        super().__init__(workdir)
        self.binary = require_binary("prometheus")
        self.port = free_port()
        self.scrape_targets = [dict(t) for t in targets]
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.alertmanager = alertmanager
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.extra_args = list(extra_args)
        self.config_path = self.workdir / "prometheus.yml"

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _scrape_config(self, target: Mapping[str, Any]) -> dict[str, Any]:
        t = dict(target)
        job = t.pop("job")
        static: dict[str, Any] = {"targets": list(t.pop("targets"))}
        if "labels" in t:
            static["labels"] = t.pop("labels")
        cfg: dict[str, Any] = {
            "job_name": job,
            "metrics_path": t.pop("metrics_path", "/metrics"),
            "scheme": t.pop("scheme", "http"),
            "scrape_interval": t.pop("scrape_interval", self.scrape_interval),
            "static_configs": [static],
        }
        token = t.pop("bearer_token", None)
        if token is not None:
            cfg["authorization"] = {"type": "Bearer", "credentials": token}
        cfg.update(t)  # basic_auth, params, scrape_timeout, tls_config, ...
        return cfg

    def write_config(self) -> None:
        """prometheus.yml, written as JSON (valid YAML) so no YAML library is needed."""
        config: dict[str, Any] = {
            "global": {
                "scrape_interval": self.scrape_interval,
                "evaluation_interval": self.evaluation_interval,
            },
            "scrape_configs": [self._scrape_config(t) for t in self.scrape_targets],
        }
        if self.rule_files:
            config["rule_files"] = [str(p) for p in self.rule_files]
        if self.alertmanager:
            config["alerting"] = {
                "alertmanagers": [
                    {"api_version": "v2", "static_configs": [{"targets": [self.alertmanager]}]}
                ]
            }
        self.config_path.write_text(json.dumps(config, indent=2))

    def start(self) -> Prometheus:
        self.write_config()
        (self.workdir / "data").mkdir(exist_ok=True)
        self._spawn(
            [
                self.binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address={LOOPBACK}:{self.port}",
                "--web.enable-lifecycle",
                *self.extra_args,
            ]
        )
        self._wait_ready(lambda: http_ok(f"{self.url}/-/ready"), f"Prometheus ready on {self.url}")
        return self

    def reload(self) -> None:
        """Rewrite the config from the current attributes and POST /-/reload."""
        self.write_config()
        request = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def _api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        answer = http_json("GET", f"{self.url}{path}" + (f"?{query}" if query else ""))
        if answer.get("status") != "success":
            raise ComponentError(f"Prometheus {path} failed: {answer}")
        return answer["data"]

    def query(self, expr: str) -> list[Any]:
        """Instant query; the result vector (for scalars/strings: [time, value])."""
        return list(self._api("/api/v1/query", query=expr)["result"])

    def wait_for_query(
        self,
        expr: str,
        predicate: Callable[[list[Any]], bool] = bool,
        timeout: float = 60,
    ) -> list[Any]:
        """Poll ``query(expr)`` until ``predicate(result)`` holds; returns the result."""
        last: list[Any] = []

        def check() -> bool:
            nonlocal last
            last = self.query(expr)
            return predicate(last)

        try:
            wait_until(check, timeout, f"query {expr!r}", interval=0.25)
        except ComponentError as exc:
            raise ComponentError(f"{exc}; last result: {last}; targets: {self._brief_targets()}")
        return last

    def targets(self) -> list[dict[str, Any]]:
        """Active targets from /api/v1/targets (labels, health, lastError, ...)."""
        return list(self._api("/api/v1/targets")["activeTargets"])

    def _brief_targets(self) -> list[tuple[str, str, str]]:
        try:
            return [
                (t["labels"].get("job", ""), t["health"], t.get("lastError", ""))
                for t in self.targets()
            ]
        except Exception as exc:  # noqa: BLE001 - only for error text
            return [("?", "?", repr(exc))]

    def wait_target_up(self, job: str, timeout: float = 60) -> list[dict[str, Any]]:
        """Wait until every active target of ``job`` has health "up" (first scrape ~5 s)."""

        def check() -> list[dict[str, Any]]:
            mine = [t for t in self.targets() if t["labels"].get("job") == job]
            return mine if mine and all(t["health"] == "up" for t in mine) else []

        try:
            return wait_until(check, timeout, f"target job {job!r} up", interval=0.25)
        except ComponentError as exc:
            raise ComponentError(f"{exc}; targets: {self._brief_targets()}") from None

    def rules(self) -> list[dict[str, Any]]:
        """Rule groups from /api/v1/rules."""
        return list(self._api("/api/v1/rules")["groups"])

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending and firing) from /api/v1/alerts."""
        return list(self._api("/api/v1/alerts")["alerts"])


# --------------------------------------------------------------------------- Alertmanager


class Alertmanager(Component):
    """Our own Alertmanager that routes every alert to a webhook receiver we run.

    ``config``: None for the default (group by all labels, 1s/1s/1h), a dict
    used verbatim, or a callable ``webhook_url -> dict`` to build one around
    our receiver. ``received()`` lists the webhook payloads. ``basic_auth``
    (user, password): its API wants them (``--web.config.file``).
    """

    name = "alertmanager"

    def __init__(
        self,
        workdir: Path,
        *,
        config: Mapping[str, Any] | Callable[[str], Mapping[str, Any]] | None = None,
        group_wait: str = "1s",
        group_interval: str = "1s",
        repeat_interval: str = "1h",
        extra_args: Iterable[str] = (),
        basic_auth: tuple[str, str] | None = None,
    ) -> None:
        super().__init__(workdir)
        self.basic_auth = basic_auth
        self.binary = require_binary("prometheus-alertmanager")
        self.port = free_port()
        self.webhook = RecordingHTTPServer()
        self.webhook_url = f"{self.webhook.url}/webhook"
        if config is None:
            config = {
                "route": {
                    "receiver": "webhook",
                    "group_by": ["..."],
                    "group_wait": group_wait,
                    "group_interval": group_interval,
                    "repeat_interval": repeat_interval,
                },
                "receivers": [
                    {
                        "name": "webhook",
                        "webhook_configs": [{"url": self.webhook_url, "send_resolved": True}],
                    }
                ],
            }
        elif callable(config):
            config = config(self.webhook_url)
        self.config = dict(config)
        self.config_path = self.workdir / "alertmanager.yml"
        self.extra_args = list(extra_args)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def address(self) -> str:
        """host:port, as Prometheus' alerting config wants it."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        if self.basic_auth is None:
            return {}
        pair = f"{self.basic_auth[0]}:{self.basic_auth[1]}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}

    def start(self) -> Alertmanager:
        self.config_path.write_text(json.dumps(self.config, indent=2))
        (self.workdir / "data").mkdir(exist_ok=True)
        web_args = []
        if self.basic_auth is not None:
            import bcrypt

            user, password = self.basic_auth
            hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
            web = self.workdir / "web.yml"
            web.write_text(json.dumps({"basic_auth_users": {user: hashed}}))
            web_args.append(f"--web.config.file={web}")
        self._spawn(
            [
                self.binary,
                f"--config.file={self.config_path}",
                f"--storage.path={self.workdir / 'data'}",
                f"--web.listen-address={LOOPBACK}:{self.port}",
                "--cluster.listen-address=",
                *web_args,
                *self.extra_args,
            ]
        )
        self._wait_ready(
            lambda: http_ok(f"{self.url}/-/ready", self.auth_headers),
            f"Alertmanager ready on {self.url}",
        )
        return self

    def received(self) -> list[dict[str, Any]]:
        """JSON payloads the webhook receiver got so far."""
        return [r.json() for r in self.webhook.snapshot() if r.method == "POST" and r.body]

    def wait_for_notification(
        self,
        predicate: Callable[[dict[str, Any]], bool] = lambda p: True,
        timeout: float = 30,
    ) -> dict[str, Any]:
        """First webhook payload matching ``predicate`` (already received or future)."""
        req = self.webhook.wait_for_request(
            lambda r: r.method == "POST" and bool(r.body) and predicate(r.json()), timeout
        )
        return dict(req.json())

    def post_alerts(self, alerts: list[dict[str, Any]]) -> None:
        """POST /api/v2/alerts (each: labels, annotations, startsAt/endsAt optional)."""
        http_json("POST", f"{self.url}/api/v2/alerts", alerts, headers=self.auth_headers)

    def alerts(self) -> list[dict[str, Any]]:
        """GET /api/v2/alerts."""
        return list(http_json("GET", f"{self.url}/api/v2/alerts", headers=self.auth_headers))

    def stop(self) -> None:
        super().stop()
        self.webhook.stop()


# --------------------------------------------------------------------------- Dovecot


def _mail_account() -> pwd.struct_passwd:
    """System user that owns the Maildirs (Dovecot refuses UID 0 for mail)."""
    for name in ("vmail", "mail", "dovecot", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ComponentError("no system user for mail storage (tried vmail, mail, dovecot, nobody)")


class Dovecot(Component):
    """Our own Dovecot: IMAP, POP3, LMTP and an auth listener, all inet on 127.0.0.1.

    ``users``: name -> password (plain text, or a pre-hashed "{SCHEME}..." value);
    mail is Maildir under ``workdir/mail/<user>/Maildir`` owned by the ``mail``
    system user. ``auth_port`` is an inet auth-client listener that Postfix
    uses for ``smtpd_sasl_type = dovecot``. ``policy_url`` wires Dovecot's HTTP
    auth policy client (``policy_options`` overrides any ``auth_policy_*``
    setting, keys without the prefix, e.g. {"server_api_header": "..."}).
    ``tls=True`` adds a self-signed cert: STARTTLS plus IMAPS/POP3S ports.
    """

    name = "dovecot"
    start_timeout = 30.0

    def __init__(
        self,
        workdir: Path,
        users: Mapping[str, str] | None = None,
        *,
        policy_url: str | None = None,
        policy_options: Mapping[str, str] | None = None,
        tls: bool = False,
        auth_failure_delay: str | None = None,
        extra_config: str = "",
    ) -> None:
        require_root("Dovecot")
        super().__init__(workdir)
        self.binary = require_binary("dovecot")
        self.users = dict(DEFAULT_MAIL_USERS if users is None else users)
        self.policy_url = policy_url
        self.policy_options = dict(policy_options or {})
        self.policy_nonce = secrets.token_hex(16)
        self.tls = tls
        self.auth_failure_delay = auth_failure_delay
        self.extra_config = extra_config
        self.imap_port = free_port()
        self.pop3_port = free_port()
        self.lmtp_port = free_port()
        self.auth_port = free_port()
        self.imaps_port = free_port() if tls else 0
        self.pop3s_port = free_port() if tls else 0
        self.config_path = self.workdir / "dovecot.conf"
        self.passwd_path = self.workdir / "passwd"
        self.log_path = self.workdir / "dovecot.log"
        self.mail_root = self.workdir / "mail"
        self.cert_path: Path | None = None
        self.key_path: Path | None = None
        self._short_base: Path | None = None
        make_traversable(self.workdir)

    host = LOOPBACK

    @property
    def base_dir(self) -> Path:
        """Runtime dir for Dovecot's unix sockets; kept short (sun_path is 108 bytes)."""
        candidate = self.workdir / "run"
        if len(str(candidate)) <= 75:
            return candidate
        if self._short_base is None:
            self._short_base = Path(tempfile.mkdtemp(prefix="a3m-dc-"))
            self._short_base.chmod(0o755)
        return self._short_base

    def maildir(self, user: str) -> Path:
        """The user's Maildir (cur/new/tmp below it)."""
        return self.mail_root / user.lower() / "Maildir"

    def set_user(self, user: str, password: str) -> None:
        """Add or change a user; Dovecot re-reads the passwd-file on its own."""
        self.users[user] = password
        self.write_passwd()

    def write_passwd(self) -> None:
        lines = []
        for user, password in self.users.items():
            secret = password if password.startswith("{") else "{PLAIN}" + password
            lines.append(f"{user}:{secret}::::::")
        tmp = self.passwd_path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.chmod(0o644)
        tmp.replace(self.passwd_path)

    def _config(self) -> str:
        account = _mail_account()
        tls = ""
        if self.tls:
            tls = (
                f"ssl = yes\nssl_cert = <{self.cert_path}\nssl_key = <{self.key_path}\n"
                "ssl_min_protocol = TLSv1.2\n"
            )
        else:
            tls = "ssl = no\n"
        policy = ""
        if self.policy_url:
            settings = {
                "server_url": self.policy_url,
                "hash_nonce": self.policy_nonce,
                "server_timeout_msecs": "2000",
                "reject_on_fail": "no",
                "request_attributes": (
                    "login=%{requested_username} pwhash=%{hashed_password} remote=%{rip} "
                    "device_id=%{client_id} protocol=%s session_id=%{session}"
                ),
                **self.policy_options,
            }
            policy = "".join(f"auth_policy_{k} = {v}\n" for k, v in settings.items())
        ssl_listener = "    ssl = yes\n" if self.tls else ""
        delay = (
            f"auth_failure_delay = {self.auth_failure_delay}\n" if self.auth_failure_delay else ""
        )
        return f"""\
# generated by tests/integration/components.py
base_dir = {self.base_dir}
state_dir = {self.workdir / "state"}
instance_name = a3m-{self.imap_port}
listen = {LOOPBACK}
protocols = imap pop3 lmtp
log_path = {self.log_path}
auth_verbose = yes
# No stats-writer connections: a stop during their handshake costs 5 s each.
stats_writer_socket_path =
auth_mechanisms = plain login
disable_plaintext_auth = no
{tls}{delay}{policy}
first_valid_uid = {account.pw_uid}
first_valid_gid = {account.pw_gid}
mail_location = maildir:~/Maildir

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.passwd_path}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self.passwd_path}
  default_fields = uid={account.pw_uid} gid={account.pw_gid} home={self.mail_root}/%Lu
}}

service imap-login {{
  inet_listener imap {{
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = {self.imaps_port}
{ssl_listener}  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = {self.pop3s_port}
{ssl_listener}  }}
}}
service lmtp {{
  inet_listener lmtp {{
    port = {self.lmtp_port}
  }}
}}
service auth {{
  inet_listener auth-inet {{
    port = {self.auth_port}
  }}
}}
{self.extra_config}
"""

    def _ports(self) -> list[int]:
        ports = [self.imap_port, self.pop3_port, self.lmtp_port, self.auth_port]
        return ports + ([self.imaps_port, self.pop3s_port] if self.tls else [])

    def start(self) -> Dovecot:
        account = _mail_account()
        for sub in ("state", "mail"):
            (self.workdir / sub).mkdir(exist_ok=True)
        self.base_dir.mkdir(exist_ok=True)
        os.chown(self.mail_root, account.pw_uid, account.pw_gid)
        if self.tls and self.cert_path is None:
            self.cert_path, self.key_path = make_self_signed_cert(self.workdir)
        self.write_passwd()
        self.config_path.write_text(self._config())
        self._spawn([self.binary, "-F", "-c", str(self.config_path)])
        self._wait_ready(
            lambda: all(port_listening(p) for p in self._ports()),
            f"Dovecot listening on {self._ports()}",
        )
        return self

    def log_files(self) -> list[Path]:
        return [self.log_path, *super().log_files()]

    def log(self) -> str:
        """Dovecot's log file so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _stop_master(self) -> None:
        """Kill the master by PID, wait for it and for the listeners to close."""
        self._terminate()
        with contextlib.suppress(ComponentError):
            wait_until(
                lambda: not any(port_listening(p) for p in self._ports()),
                10,
                "Dovecot listeners to close",
            )

    def restart(self) -> Dovecot:
        """Stop and start again on the same directory, config and ports."""
        self._stop_master()
        return self.start()

    def stop(self) -> None:
        self._stop_master()
        _running.discard(self)
        if self._short_base is not None:
            shutil.rmtree(self._short_base, ignore_errors=True)
            self._short_base = None


# --------------------------------------------------------------------------- Postfix


class Postfix(Component):
    """Our own Postfix: master in the foreground (-d) from a private config dir.

    Mail for ``domains`` goes to Dovecot over LMTP (``lmtp_port``; without one
    it is discarded). ``mailboxes`` (addresses) become ``virtual_mailbox_maps``
    so unknown recipients get 550 at RCPT time; empty accepts any address.
    ``sasl_auth_port``: Dovecot's inet auth listener; when set, the submission
    port requires AUTH (PLAIN/LOGIN via Dovecot). ``tls_cert``/``tls_key``
    offer STARTTLS on both ports. ``mynetworks`` is 127.0.0.1/32 only, so a
    client bound to another 127.0.0.x is "outside" for relay decisions.
    ``main``: extra main.cf settings (override defaults); ``master_extra``:
    extra master.cf lines.
    """

    name = "postfix"
    start_timeout = 30.0

    def __init__(
        self,
        workdir: Path,
        *,
        lmtp_port: int | None = None,
        domains: Iterable[str] = (MAIL_DOMAIN,),
        mailboxes: Iterable[str] = (),
        sasl_auth_port: int | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        myhostname: str = f"mx.{MAIL_DOMAIN}",
        main: Mapping[str, str] | None = None,
        master_extra: str = "",
    ) -> None:
        require_root("Postfix")
        super().__init__(workdir)
        self.postfix_binary = require_binary("postfix")
        self.postconf_binary = require_binary("postconf")
        self.daemon_directory = subprocess.run(
            [self.postconf_binary, "-dh", "daemon_directory"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        self.master_binary = str(Path(self.daemon_directory) / "master")
        if not os.access(self.master_binary, os.X_OK):
            _missing(f"Postfix master daemon not found at {self.master_binary}")
        self.smtp_port = free_port()
        self.submission_port = free_port()
        self.lmtp_port = lmtp_port
        self.domains = list(domains)
        self.mailboxes = list(mailboxes)
        self.sasl_auth_port = sasl_auth_port
        self.tls_cert, self.tls_key = tls_cert, tls_key
        self.myhostname = myhostname
        self.main_overrides = dict(main or {})
        self.master_extra = master_extra
        self.config_dir = self.workdir / "conf"
        self.queue_dir = self.workdir / "queue"
        self.data_dir = self.workdir / "data"
        self.maillog_path = self.workdir / "maillog"
        make_traversable(self.workdir)

    host = LOOPBACK

    def _main_cf(self) -> dict[str, str]:
        transport = f"lmtp:inet:{LOOPBACK}:{self.lmtp_port}" if self.lmtp_port else "discard:"
        settings = {
            "compatibility_level": "3.6",
            "config_directory": str(self.config_dir),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "meta_directory": "/etc/postfix",  # postfix-files lives there
            "daemon_directory": self.daemon_directory,
            "command_directory": str(Path(self.postfix_binary).parent),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": str(self.workdir),
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "myhostname": self.myhostname,
            "mydomain": self.domains[0] if self.domains else "localdomain",
            "myorigin": "$mydomain",
            "mydestination": "",
            "mynetworks": f"{LOOPBACK}/32",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "relayhost": "",
            "virtual_mailbox_domains": " ".join(self.domains),
            "virtual_transport": transport,
            "disable_dns_lookups": "yes",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            "biff": "no",
            "smtpd_banner": "$myhostname ESMTP",
            "smtputf8_enable": "no",
        }
        if self.mailboxes:
            settings["virtual_mailbox_maps"] = f"texthash:{self.config_dir / 'vmailbox'}"
        if self.sasl_auth_port:
            settings["smtpd_sasl_type"] = "dovecot"
            settings["smtpd_sasl_path"] = f"inet:{LOOPBACK}:{self.sasl_auth_port}"
        if self.tls_cert and self.tls_key:
            settings.update(
                {
                    "smtpd_tls_cert_file": str(self.tls_cert),
                    "smtpd_tls_key_file": str(self.tls_key),
                    "smtpd_tls_security_level": "may",
                    "smtpd_tls_loglevel": "1",
                }
            )
        settings.update(self.main_overrides)
        return settings

    def _master_cf(self) -> str:
        submission = [
            f"{LOOPBACK}:{self.submission_port} inet n - n - - smtpd",
            "  -o syslog_name=postfix/submission",
        ]
        if self.sasl_auth_port:
            submission += [
                "  -o smtpd_sasl_auth_enable=yes",
                "  -o smtpd_client_restrictions=permit_sasl_authenticated,reject",
                "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject",
            ]
        services = [
            f"{LOOPBACK}:{self.smtp_port} inet n - n - - smtpd",
            *submission,
            # chroot off everywhere ("n" in column 5): no copies of /etc needed
            "pickup    unix  n - n 60    1 pickup",
            "tlsmgr    unix  - - n 1000? 1 tlsmgr",
            "cleanup   unix  n - n -     0 cleanup",
            "qmgr      unix  n - n 300   1 qmgr",
            "rewrite   unix  - - n -     - trivial-rewrite",
            "bounce    unix  - - n -     0 bounce",
            "defer     unix  - - n -     0 bounce",
            "trace     unix  - - n -     0 bounce",
            "verify    unix  - - n -     1 verify",
            "flush     unix  n - n 1000? 0 flush",
            "proxymap  unix  - - n -     - proxymap",
            "proxywrite unix - - n -     1 proxymap",
            "smtp      unix  - - n -     - smtp",
            "relay     unix  - - n -     - smtp",
            "showq     unix  n - n -     - showq",
            "error     unix  - - n -     - error",
            "retry     unix  - - n -     - error",
            "discard   unix  - - n -     - discard",
            "lmtp      unix  - - n -     - lmtp",
            "anvil     unix  - - n -     1 anvil",
            "scache    unix  - - n -     1 scache",
            "postlog   unix-dgram n - n - 1 postlogd",
        ]
        return "\n".join(services) + "\n" + self.master_extra + "\n"

    def start(self) -> Postfix:
        for d in (self.config_dir, self.queue_dir, self.data_dir):
            d.mkdir(exist_ok=True)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.data_dir, postfix_user.pw_uid, postfix_user.pw_gid)
        main = "".join(f"{k} = {v}\n" for k, v in self._main_cf().items())
        (self.config_dir / "main.cf").write_text(main)
        (self.config_dir / "master.cf").write_text(self._master_cf())
        if self.mailboxes:
            (self.config_dir / "vmailbox").write_text("".join(f"{m} OK\n" for m in self.mailboxes))
        # Postfix waits (300 ms steps, ~2 s) until a just-written file looks stable.
        past = time.time() - 60
        for cf in self.config_dir.iterdir():
            os.utime(cf, (past, past))
        self._make_queue_dirs()
        # Its own session: on SIGTERM the master kills its process group, i.e.
        # exactly the daemons it started (otherwise it logs a fatal and sleeps 1 s).
        self._spawn([self.master_binary, "-c", str(self.config_dir), "-d"], new_session=True)
        ports = [self.smtp_port, self.submission_port]
        self._wait_ready(
            lambda: all(port_listening(p) for p in ports), f"Postfix listening on {ports}"
        )
        return self

    def _make_queue_dirs(self) -> None:
        """The queue layout of /etc/postfix/postfix-files, as "postfix check" would create
        it (that command stalls 2 s here trying to reach syslog)."""
        postfix = pwd.getpwnam("postfix")
        postdrop = grp.getgrnam("postdrop").gr_gid
        layout = {
            name: (postfix.pw_uid, 0, 0o700)
            for name in (
                "active",
                "bounce",
                "corrupt",
                "defer",
                "deferred",
                "flush",
                "hold",
                "incoming",
                "private",
                "saved",
                "trace",
            )
        }
        layout["maildrop"] = (postfix.pw_uid, postdrop, 0o730)
        layout["public"] = (postfix.pw_uid, postdrop, 0o710)
        layout["pid"] = (0, 0, 0o755)
        for name, (uid, gid, mode) in layout.items():
            path = self.queue_dir / name
            path.mkdir(exist_ok=True)
            os.chown(path, uid, gid)
            path.chmod(mode)

    def _diagnostics(self) -> str:
        """Postfix's master logs startup errors only to syslog (no /dev/log here), so
        add what we can find out ourselves: busy ports and "postfix check" on a tty."""
        busy = [p for p in (self.smtp_port, self.submission_port) if port_open(LOOPBACK, p)]
        lines = [super()._diagnostics(), f"--- ports already in use: {busy or 'none'}"]
        script = find_binary("script")
        if script:
            with contextlib.suppress(Exception):
                check = subprocess.run(
                    [
                        script,
                        "-qec",
                        f"{self.postfix_binary} -c {self.config_dir} check",
                        "/dev/null",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=20,
                    stdin=subprocess.DEVNULL,
                )
                lines.append(f"--- postfix check (rc={check.returncode}) ---\n{check.stdout}")
        return "\n".join(lines)

    def postconf(self, *args: str) -> str:
        """Run ``postconf -c <our config> args`` (e.g. "-n")."""
        return subprocess.run(
            [self.postconf_binary, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def log_files(self) -> list[Path]:
        return [self.maillog_path, *super().log_files()]

    def log(self) -> str:
        """The maillog so far."""
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


# --------------------------------------------------------------------------- Redis


class Redis(Component):
    """Our own redis-server, daemonized with a pidfile; stopped by that PID."""

    name = "redis"
    start_timeout = 20.0

    def __init__(self, workdir: Path, *, password: str | None = None) -> None:
        super().__init__(workdir)
        self.binary = require_binary("redis-server")
        self.port = free_port()
        self.password = password
        self.pidfile = self.workdir / "redis.pid"
        self.logfile = self.workdir / "redis.log"
        self.pid: int | None = None

    host = LOOPBACK

    @property
    def url(self) -> str:
        auth = f":{urllib.parse.quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{LOOPBACK}:{self.port}/0"

    def log_files(self) -> list[Path]:
        return [self.logfile, *super().log_files()]

    def _ping(self) -> bool:
        with socket.create_connection((LOOPBACK, self.port), timeout=1) as sock:
            if self.password:
                secret = self.password.encode()
                sock.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret))
                if not sock.recv(64).startswith(b"+OK"):
                    return False
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    def start(self) -> Redis:
        cmd = [
            self.binary,
            "--bind",
            LOOPBACK,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "yes",
            "--pidfile",
            str(self.pidfile),
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.logfile),
        ]
        if self.password:
            cmd += ["--requirepass", self.password]
        # a restart after a SIGKILL finds the dead daemon's pidfile: read it, and the new
        # daemon would never be stopped
        self.pidfile.unlink(missing_ok=True)
        # the launcher forks the daemon and exits at once
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            launched = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        if launched.returncode != 0:
            raise ComponentError(
                f"redis-server exited {launched.returncode}\n{self._diagnostics()}"
            )
        _running.add(self)
        try:
            self.pid = wait_until(self._read_pid, self.start_timeout, "redis pidfile")
            wait_until(self._ping, self.start_timeout, f"redis PONG on port {self.port}")
        except ComponentError as exc:
            self.stop()
            raise ComponentError(f"{exc}\n{self._diagnostics()}") from None
        return self

    def _read_pid(self) -> int:
        return int(self.pidfile.read_text().strip())

    def stop(self) -> None:
        pid = self.pid
        if pid is None:
            with contextlib.suppress(OSError, ValueError):
                pid = self._read_pid()
        self.pid = None
        _running.discard(self)
        if pid is None or not pid_alive(pid):
            return
        os.kill(pid, signal.SIGTERM)
        try:
            wait_until(lambda: not pid_alive(pid), 10, f"redis PID {pid} to exit")
        except ComponentError:
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not pid_alive(pid), 5, f"redis PID {pid} to die")


# --------------------------------------------------------------------------- mail stack


@dataclass
class MailStack:
    """Dovecot + Postfix wired together: SMTP -> LMTP -> Maildir, SASL via Dovecot."""

    dovecot: Dovecot
    postfix: Postfix
    users: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        workdir: Path,
        users: Mapping[str, str] | None = None,
        *,
        tls: bool = False,
        policy_url: str | None = None,
        postfix_main: Mapping[str, str] | None = None,
        dovecot_options: Mapping[str, Any] | None = None,
    ) -> MailStack:
        """``dovecot_options``: more keyword arguments of Dovecot (e.g. auth_failure_delay,
        extra_config). Postfix logs to ``postfix.maillog_path`` (maillog_file through
        postlogd), Dovecot to ``dovecot.log_path``."""
        users = dict(DEFAULT_MAIL_USERS if users is None else users)
        dovecot = Dovecot(Path(workdir) / "dovecot", users, tls=tls, policy_url=policy_url,
                          **dict(dovecot_options or {}))
        dovecot.start()
        try:
            postfix = Postfix(
                Path(workdir) / "postfix",
                lmtp_port=dovecot.lmtp_port,
                domains=sorted({u.split("@", 1)[1] for u in users if "@" in u}) or [MAIL_DOMAIN],
                mailboxes=list(users),
                sasl_auth_port=dovecot.auth_port,
                tls_cert=dovecot.cert_path,
                tls_key=dovecot.key_path,
                main=postfix_main,
            ).start()
        except BaseException:
            dovecot.stop()
            raise
        return cls(dovecot=dovecot, postfix=postfix, users=users)

    def stop(self) -> None:
        try:
            self.postfix.stop()
        finally:
            self.dovecot.stop()


# --------------------------------------------------------------------------- mail clients
# Dovecot delays repeated auth failures per client IP, so each client binds its
# own 127.0.0.x source address.


class BoundIMAP4(imaplib.IMAP4):
    def __init__(self, host: str, port: int, source_ip: str) -> None:
        self._source_ip = source_ip
        super().__init__(host, port, timeout=15)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, (self._source_ip, 0))


class BoundPOP3(poplib.POP3):
    def __init__(self, host: str, port: int, source_ip: str) -> None:
        self._source_ip = source_ip
        super().__init__(host, port, timeout=15)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, (self._source_ip, 0))


def imap_login(server: Dovecot, user: str, password: str, source: str) -> str:
    """One IMAP LOGIN from ``source``: "OK", or the server's error text."""
    imap = BoundIMAP4(server.host, server.imap_port, source)
    try:
        return imap.login(user, password)[0]
    except imaplib.IMAP4.error as exc:
        return str(exc)
    finally:
        with contextlib.suppress(imaplib.IMAP4.abort, OSError):
            imap.logout()


def pop3_login(server: Dovecot, user: str, password: str, source: str) -> str:
    """One POP3 USER/PASS from ``source``: the server's "+OK ..." or its error text."""
    client = BoundPOP3(server.host, server.pop3_port, source)
    try:
        client.user(user)
        return client.pass_(password).decode()
    except poplib.error_proto as exc:
        return str(exc)
    finally:
        with contextlib.suppress(poplib.error_proto, OSError):
            client.quit()
