"""urllib openers for requests that carry credentials (an admin token, a provider's auth
header, Stalwart's password): a redirect is answered as the error it is, never followed,
since following it would send the credentials to whoever the Location names."""

from __future__ import annotations

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
