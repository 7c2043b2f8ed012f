"""HTTP probe: JMAP's /.well-known/jmap and A3Mailer/Stalwart's /healthz/live, /healthz/ready.

One HTTP/1.1 GET with `Connection: close` over a Session (so connect and TLS are
timed like the mail protocols), Basic auth from the credentials file when given
(a JMAP session resource needs it). Success when the status is in expect_status;
redirects are not followed (list 3xx codes in expect_status to accept them). For
a JSON answer of a JMAP session, the capability names go into the details.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from exporter import tracing
from exporter.probes.session import ProbeFailed, Session, run_probe
from exporter.probes.target import Credentials, ProbeResult, Target

MAX_HEADERS = 100
MAX_BODY = 1024 * 1024  # read at most this much of a body
USER_AGENT = "a3mailer-exporter"


def parse_status_line(line: str) -> tuple[int, str]:
    """'HTTP/1.1 503 Service Unavailable' -> (503, 'Service Unavailable')."""
    version, _, rest = line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ProbeFailed(f"not an HTTP response: {line[:100]!r}")
    return int(code), reason


def request_bytes(target: Target, credentials: Credentials | None) -> bytes:
    default_port = 443 if target.tls == "implicit" else 80
    host = target.server_name or target.host
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    if target.port != default_port:
        host = f"{host}:{target.port}"
    lines = [f"GET {target.path} HTTP/1.1", f"Host: {host}", f"User-Agent: {USER_AGENT}",
             "Accept: application/json, */*", "Connection: close"]
    # a traced probe's trace continues into the server (W3C traceparent and baggage)
    lines += [f"{name}: {value}" for name, value in tracing.outgoing_headers().items()]
    if credentials is not None:
        token = base64.b64encode(f"{credentials.username}:{credentials.password}".encode())
        lines.append("Authorization: Basic " + token.decode())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


async def read_body(session: Session, headers: dict[str, str]) -> bytes:
    """Content-Length, chunked, or until the server closes; at most MAX_BODY bytes."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while len(body) < MAX_BODY:
            size_text = (await session.readline()).split(";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ProbeFailed(f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                break
            wanted = min(size, MAX_BODY - len(body))
            body += await session.read_exactly(wanted)
            if wanted < size:  # MAX_BODY reached inside the chunk: the rest is not read,
                break          # as with Content-Length (the connection closes after)
            await session.readline()  # the CRLF after the chunk
        return body
    length = headers.get("content-length", "")
    if length.isdigit():
        return await session.read_exactly(min(int(length), MAX_BODY))
    return await session.read_to_eof(MAX_BODY)


def jmap_capabilities(body: bytes, content_type: str) -> list[str] | None:
    """The capability URIs of a JMAP session object, or None when the body is not one."""
    if "json" not in content_type:
        return None
    try:
        document: Any = json.loads(body)
    except ValueError:
        return None
    if isinstance(document, dict) and isinstance(document.get("capabilities"), dict):
        return sorted(document["capabilities"])
    return None


async def probe(target: Target) -> ProbeResult:
    async def dialog(session: Session, credentials: Credentials | None) -> None:
        details = session.result.details
        with session.timed("response"):
            await session.send(request_bytes(target, credentials))
            code, reason = parse_status_line(await session.readline())
            headers: dict[str, str] = {}
            for _ in range(MAX_HEADERS):
                line = await session.readline()
                if not line:
                    break
                name, sep, value = line.partition(":")
                if not sep:
                    raise ProbeFailed(f"bad HTTP header line: {line[:100]!r}")
                headers[name.strip().lower()] = value.strip()
            else:
                raise ProbeFailed(f"more than {MAX_HEADERS} HTTP headers")
            body = await read_body(session, headers)
        details["status_code"] = code
        details["content_type"] = headers.get("content-type", "")
        capabilities = jmap_capabilities(body, details["content_type"])
        if capabilities is not None:
            details["jmap_capabilities"] = capabilities
        if code not in target.expect_status:
            expected = ", ".join(str(s) for s in target.expect_status)
            raise ProbeFailed(f"HTTP status {code} {reason}".strip() + f", expected {expected}")

    return await run_probe(target, dialog)
