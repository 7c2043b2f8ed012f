"""A local OpenID provider on loopback for the OIDC tests: discovery, JWKS and RFC 7662
introspection over real HTTP, with signing keys made in the test.

`OidcProvider.start()` returns self; `add_key()` makes a key (RSA or EC) and publishes it,
`retire()` takes one out of the JWKS (rotation), `sign()` issues a JWT, `active` maps
tokens to introspection answers; `hits` counts requests per path.
"""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.integration.components import LOOPBACK, free_port


class OidcProvider:
    def __init__(self, client_id: str = "exporter", client_secret: str = "s3cret"):
        self.port = free_port()
        self.issuer = f"http://{LOOPBACK}:{self.port}/realm"
        self.client_id, self.client_secret = client_id, client_secret
        self.keys: dict[str, tuple[Any, str]] = {}  # kid -> (private key, alg)
        self.published: list[str] = []
        self.active: dict[str, dict[str, Any]] = {}
        self.hits: Counter[str] = Counter()
        self._server: http.server.ThreadingHTTPServer | None = None

    def add_key(self, kid: str, alg: str = "RS256") -> Any:
        key = (rsa.generate_private_key(public_exponent=65537, key_size=2048)
               if alg.startswith(("RS", "PS")) else ec.generate_private_key(ec.SECP256R1()))
        self.keys[kid] = (key, alg)
        self.published.append(kid)
        return key

    def retire(self, kid: str) -> None:
        self.published.remove(kid)

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid in self.published:
            key, alg = self.keys[kid]
            to_jwk = RSAAlgorithm.to_jwk if alg.startswith(("RS", "PS")) else ECAlgorithm.to_jwk
            jwk = to_jwk(key.public_key(), as_dict=True)
            out.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
        return {"keys": out}

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        return {"iss": self.issuer, "aud": "mail-web", "sub": "user-42", "iat": now,
                "nbf": now, "exp": now + 300, **overrides}

    def sign(self, kid: str, claims: dict[str, Any] | None = None,
             headers: dict[str, Any] | None = None) -> str:
        key, alg = self.keys[kid]
        return jwt.encode(claims or self.claims(), key, algorithm=alg,
                          headers={"kid": kid, **(headers or {})})

    def start(self) -> OidcProvider:
        provider = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                provider.hits[self.path] += 1
                base = f"http://{LOOPBACK}:{provider.port}"
                if self.path == "/realm/.well-known/openid-configuration":
                    self._json(200, {"issuer": provider.issuer, "jwks_uri": f"{base}/jwks",
                                     "introspection_endpoint": f"{base}/introspect"})
                elif self.path == "/jwks":
                    self._json(200, provider.jwks())
                else:
                    self._json(404, {"error": "not_found"})

            def do_POST(self) -> None:
                provider.hits[self.path] += 1
                length = int(self.headers.get("content-length", "0"))
                form = parse_qs(self.rfile.read(length).decode())
                expected = base64.b64encode(
                    f"{provider.client_id}:{provider.client_secret}".encode()).decode()
                if self.headers.get("authorization") != f"Basic {expected}":
                    self._json(401, {"error": "invalid_client"})
                    return
                token = form.get("token", [""])[0]
                self._json(200, provider.active.get(token, {"active": False}))

        self._server = http.server.ThreadingHTTPServer((LOOPBACK, self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> OidcProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
