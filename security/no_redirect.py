"""urllib openers for requests that carry credentials (an admin token, a provider's auth
header, Stalwart's password): a redirect is answered as the error it is, never followed,
since following it would send the credentials to whoever the Location names.

`open_within` also bounds the whole exchange in time. urllib's own timeout bounds each
socket operation alone: a server that sends a header line or a body byte now and then
holds the caller, and the thread it runs in, for as long as it likes. The OTLP/HTTP
span sender's kept-alive connection (`bounded_connection`) is bounded the same way."""

from __future__ import annotations

import http.client
import io
import time
import urllib.request
from typing import Any


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        return None  # urllib then raises HTTPError with the 3xx status


def opener(*, proxies_from_environment: bool = True) -> urllib.request.OpenerDirector:
    """An opener that never follows redirects; without the environment's HTTP(S)_PROXY
    when the server sits next to the exporter."""
    handlers: list[Any] = [NoRedirect()]
    if not proxies_from_environment:
        handlers.insert(0, urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers)


def open_within(request: urllib.request.Request, seconds: float, *,
                proxies_from_environment: bool = True) -> Any:
    """opener().open(request), with `seconds` for everything: connecting, sending, the
    status line and headers, and every read of the body after it returns. Past the
    deadline a read raises TimeoutError (before the response: also TimeoutError, or
    URLError with a TimeoutError reason while connecting or sending); an HTTP status
    other than 2xx raises HTTPError, as urllib does."""
    deadline = time.monotonic() + seconds
    handlers: list[Any] = [NoRedirect(), _HTTPHandler(deadline), _HTTPSHandler(deadline)]
    if not proxies_from_environment:
        handlers.insert(0, urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers).open(request, timeout=seconds)


class _DeadlineReader(io.RawIOBase):
    """The socket's reads, each with the time left before the deadline as its timeout."""

    def __init__(self, sock: Any, deadline: float):
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)  # holds the socket open, as http.client's
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        self._sock.settimeout(_remaining(self._deadline))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineSocket:
    """A connected socket whose sends and reads (through makefile) end at the deadline
    (which a kept-alive connection moves on for each request it makes)."""

    def __init__(self, sock: Any, deadline: float):
        self._sock = sock
        self.deadline = deadline

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self.deadline))

    def sendall(self, data: Any, *args: Any) -> None:
        self._sock.settimeout(_remaining(self.deadline))
        self._sock.sendall(data, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("deadline passed")
    return remaining


class _Bounded:
    """An http.client connection whose socket is wrapped in _DeadlineSocket once connected
    (after the TLS handshake, which the connect timeout bounds per read). Setting
    `deadline` moves it on for the connection's next exchange."""

    sock: Any

    def __init__(self, *args: Any, deadline: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    @property
    def deadline(self) -> float:
        return self._deadline

    @deadline.setter
    def deadline(self, deadline: float) -> None:
        self._deadline = deadline
        if isinstance(self.sock, _DeadlineSocket):
            self.sock.deadline = deadline

    def connect(self) -> None:
        _remaining(self._deadline)
        super().connect()  # type: ignore[misc]
        self.sock = _DeadlineSocket(self.sock, self._deadline)


class _BoundedHTTP(_Bounded, http.client.HTTPConnection):
    pass


class _BoundedHTTPS(_Bounded, http.client.HTTPSConnection):
    pass


def bounded_connection(host: str, port: int, deadline: float, *, https: bool = False,
                       context: Any = None) -> http.client.HTTPConnection:
    """A kept-alive http.client connection (it follows no redirect: http.client never
    does) whose exchanges each end at `deadline`, set anew before each request."""
    if https:
        return _BoundedHTTPS(host, port, context=context, deadline=deadline,
                             timeout=_remaining(deadline))
    return _BoundedHTTP(host, port, deadline=deadline, timeout=_remaining(deadline))


_BOUNDED: dict[Any, Any] = {http.client.HTTPConnection: _BoundedHTTP,
                            http.client.HTTPSConnection: _BoundedHTTPS}


class _Deadline:
    """Handler mixin: connections made through it end at one deadline."""

    def __init__(self, deadline: float):
        super().__init__()
        self.deadline = deadline

    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
        return super().do_open(_BOUNDED[http_class], req,  # type: ignore[misc]
                               deadline=self.deadline, **kwargs)


class _HTTPHandler(_Deadline, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_Deadline, urllib.request.HTTPSHandler):
    pass
