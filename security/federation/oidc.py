"""OAuth 2.0 / OpenID Connect bearer tokens: JWT validation against the issuer's JWKS, and
RFC 7662 introspection.

Signing keys come from the issuer's discovery document (`jwks_uri`) and are cached for
`jwks_cache_ttl`; a token whose `kid` is not in the cache fetches the keys again (key
rotation), at most once per `jwks_min_refresh_interval`, so a flood of made-up key ids
cannot hammer the issuer. When a fetch fails, the keys already cached keep serving; with
none ever fetched, tokens get `jwks_unavailable` until a fetch succeeds. A cached key
answers without waiting for a fetch another token started. Keys whose `use` is not `sig`
are left out; a kid listed twice keeps its first key (logged).

What is refused, before any signature check: an algorithm outside the allowlist (which
only ever holds asymmetric algorithms, so `alg: none` and HS256 with the public key as
the HMAC secret never get that far), and a key whose type or curve does not fit the
token's algorithm. Then the signature, `iss`, `aud` (one of the configured audiences),
`exp`, `nbf` and `iat` (with `leeway`) and the required claims are checked by PyJWT.
Discovery, JWKS and introspection URLs must be https, except on loopback. An active
introspection answer is held to the same rules for the claims it has (`exp`, `nbf`,
`iss`, `aud`); a non-numeric time makes it inactive.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from security.engine import Auditor
from security.identity import IdentityStats, audit_verification

if TYPE_CHECKING:
    import httpx

# httpx and PyJWT (with the cryptography it loads: ~10 MB resident together, about half a
# second to import) are imported when a validator is built (OIDC configured), not at start.

log = logging.getLogger(__name__)

MAX_TOKEN_LENGTH = 16384
ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
              "EdDSA")
_KTY = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
_CURVE = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}


def _reason(exc: Exception) -> str:
    """The answer's reason for one of PyJWT's exceptions, most specific first."""
    import jwt

    reasons = [
        (jwt.ExpiredSignatureError, "expired"),
        (jwt.ImmatureSignatureError, "not_yet_valid"),
        (jwt.InvalidAudienceError, "wrong_audience"),
        (jwt.InvalidIssuerError, "wrong_issuer"),
        (jwt.MissingRequiredClaimError, "missing_claim"),
        (jwt.InvalidSignatureError, "bad_signature"),
        (jwt.InvalidIssuedAtError, "bad_iat"),
        (jwt.DecodeError, "malformed"),
    ]
    return next((r for cls, r in reasons if isinstance(exc, cls)), "invalid")


class FederationError(Exception):
    """The identity provider could not be reached or answered nonsense."""


@dataclass(frozen=True)
class OidcSettings:
    issuer: str
    audience: tuple[str, ...]
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    discovery_url: str = ""
    jwks_uri: str = ""
    jwks_cache_ttl: float = 3600.0
    jwks_min_refresh_interval: float = 30.0
    leeway: float = 60.0
    required_claims: tuple[str, ...] = ("exp", "iat", "sub")
    http_timeout: float = 5.0
    introspection_endpoint: str = ""
    client_id: str = ""
    client_secret: str | None = None

    def __post_init__(self) -> None:
        if not self.issuer:
            raise ValueError("security.oidc: set issuer")
        bad = [a for a in self.algorithms if a not in ASYMMETRIC]
        if bad:
            raise ValueError(f"algorithms not allowed (asymmetric only): {', '.join(bad)}")


@dataclass
class TokenResult:
    valid: bool
    reason: str = "ok"
    claims: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"valid": self.valid}
        if self.valid:
            out["claims"] = self.claims
        else:
            out["reason"] = self.reason
        return out


def check_url(url: str) -> str:
    """`url` when it is https, or http on a loopback host; else ValueError."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return url
    if parts.scheme == "http":
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return url
    raise ValueError(f"{url!r}: an identity provider must be reached over https "
                     "(http only on loopback)")


def key_fits(jwk: dict[str, Any], alg: str) -> bool:
    """Whether a JWK may verify `alg`: its type (and curve) fit, its alg and use agree."""
    if jwk.get("kty") != _KTY.get(alg[:2]):
        return False
    if alg in _CURVE and jwk.get("crv") != _CURVE[alg]:
        return False
    if alg == "EdDSA" and jwk.get("crv") not in ("Ed25519", "Ed448"):
        return False
    return jwk.get("alg", alg) == alg and jwk.get("use", "sig") == "sig"


class OidcValidator:
    def __init__(self, settings: OidcSettings, stats: IdentityStats | None = None,
                 audit: Auditor | None = None, clock: Callable[[], float] = time.time,
                 client: httpx.AsyncClient | None = None):
        import httpx
        import jwt  # noqa: F401  (here, not at the first token)

        self.settings = settings
        self.stats = stats or IdentityStats()
        self.audit = audit
        self.clock = clock
        self.http = client or httpx.AsyncClient(timeout=settings.http_timeout,
                                                follow_redirects=False)
        self.jwks_fetches = 0
        self._discovery: dict[str, Any] | None = None
        self._keys: dict[str, dict[str, Any]] = {}  # kid -> JWK
        self._keys_at = -float("inf")  # monotonic time of the last successful fetch
        self._tried_at = -float("inf")  # ... of the last attempt
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        await self.http.aclose()

    # --- discovery and keys

    async def _get_json(self, url: str, **kwargs: Any) -> dict[str, Any]:
        import httpx

        limit = self.settings.http_timeout
        try:
            # httpx's timeout bounds each read: a provider sending a byte now and then
            # would hold the token check; this bounds the whole exchange
            async with asyncio.timeout(limit):
                response = await self.http.request(kwargs.pop("method", "GET"),
                                                   check_url(url), **kwargs)
            response.raise_for_status()
            value = response.json()
        except TimeoutError:
            raise FederationError(f"{urlsplit(url).netloc}: no complete answer within "
                                  f"{limit:g}s") from None
        except (httpx.HTTPError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FederationError(f"{urlsplit(url).netloc}: {exc}") from None
        except ValueError as exc:  # check_url: a URL the discovery document named
            raise FederationError(str(exc)) from None
        if not isinstance(value, dict):
            raise FederationError(f"{urlsplit(url).netloc}: expected a JSON object")
        return value

    async def discovery(self) -> dict[str, Any]:
        """The issuer's discovery document (fetched once; checked to name the issuer)."""
        if self._discovery is None:
            s = self.settings
            url = s.discovery_url or s.issuer.rstrip("/") + "/.well-known/openid-configuration"
            doc = await self._get_json(url)
            if doc.get("issuer") != s.issuer:
                raise FederationError(f"discovery names issuer {doc.get('issuer')!r}, "
                                      f"not {s.issuer!r}")
            self._discovery = doc
        return self._discovery

    async def _fetch_keys(self) -> None:
        self._tried_at = time.monotonic()
        uri = self.settings.jwks_uri or (await self.discovery()).get("jwks_uri")
        if not isinstance(uri, str):
            raise FederationError("the discovery document has no jwks_uri")
        jwks = await self._get_json(uri)
        self.jwks_fetches += 1
        listed = jwks.get("keys", [])
        if not isinstance(listed, list):
            raise FederationError(f"{urlsplit(uri).netloc}: the JWKS has no list of keys")
        keys: dict[str, dict[str, Any]] = {}
        for jwk in listed:
            if not (isinstance(jwk, dict) and jwk.get("kty") in ("RSA", "EC", "OKP")):
                continue
            if jwk.get("use", "sig") != "sig":  # an encryption key is never a signer
                continue
            kid = str(jwk.get("kid", ""))
            if kid in keys:  # which one signs is ambiguous: the first stays, and it is said
                log.warning("the JWKS lists kid %r twice; the first key is used", kid)
                continue
            keys[kid] = jwk
        self._keys, self._keys_at = keys, time.monotonic()

    async def _key(self, kid: str, alg: str) -> dict[str, Any] | None:
        """The JWK for `kid`, fetching the set when stale or when the kid is new.

        A cached key answers without the lock: a token naming a made-up kid must not hold
        up the others while the JWKS endpoint is slow. With no key ever fetched, the
        answer is the outage (FederationError), also between two attempts."""
        s = self.settings
        found = self._find(kid, alg)
        if found is not None and time.monotonic() - self._keys_at < s.jwks_cache_ttl:
            return found
        async with self._lock:
            now = time.monotonic()
            stale = now - self._keys_at >= s.jwks_cache_ttl
            unknown = self._find(kid, alg) is None
            if (stale or unknown) and now - self._tried_at >= s.jwks_min_refresh_interval:
                try:
                    await self._fetch_keys()
                except FederationError:
                    if not self._keys:
                        raise
            elif not self._keys and self._keys_at == -float("inf"):
                raise FederationError("no JWKS fetched yet; the last attempt failed")
        return self._find(kid, alg)

    def _find(self, kid: str, alg: str) -> dict[str, Any] | None:
        if kid:
            return self._keys.get(kid)
        fitting = [k for k in self._keys.values() if key_fits(k, alg)]
        return fitting[0] if len(fitting) == 1 else None

    # --- validation

    async def validate(self, token: str) -> TokenResult:
        """Checks a bearer JWT; counted, and audited as auth.success / auth.failure."""
        result = await self._validate(token)
        self.stats.verified("oidc", result.valid, "" if result.valid else result.reason)
        subject = str(result.claims.get("sub", "")) if result.valid else "unknown"
        audit_verification(self.audit, "oidc", result.valid, subject,
                           {} if result.valid else {"reason": result.reason})
        return result

    async def _validate(self, token: str) -> TokenResult:
        import jwt

        s = self.settings
        if len(token) > MAX_TOKEN_LENGTH:
            return TokenResult(False, "malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:  # DecodeError, and a kid or crit PyJWT refuses
            return TokenResult(False, "malformed")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in s.algorithms:
            return TokenResult(False, "algorithm_not_allowed")
        if not s.audience:
            return TokenResult(False, "no_audience_configured")
        kid = header.get("kid", "")
        try:
            jwk = await self._key(kid if isinstance(kid, str) else "", alg)
        except FederationError:
            return TokenResult(False, "jwks_unavailable")
        if jwk is None:
            return TokenResult(False, "unknown_key")
        if not key_fits(jwk, alg):
            return TokenResult(False, "key_mismatch")
        try:
            key = jwt.PyJWK(jwk, algorithm=alg).key
            claims = jwt.decode(token, key, algorithms=[alg], audience=list(s.audience),
                                issuer=s.issuer, leeway=s.leeway,
                                options={"require": list(s.required_claims)})
        except (jwt.PyJWKError, jwt.InvalidKeyError):  # a JWK the provider got wrong
            return TokenResult(False, "key_mismatch")
        except jwt.InvalidTokenError as exc:
            return TokenResult(False, _reason(exc))
        return TokenResult(True, "ok", claims)

    # --- RFC 7662

    def _unusable(self, answer: dict[str, Any]) -> str:
        """Why an active introspection answer is no good here ('' when it is): the same
        time, issuer and audience rules as a JWT's, for each claim the answer has."""
        s, now = self.settings, self.clock()
        times = {name: answer.get(name) for name in ("exp", "nbf")}
        if any(v is not None and (isinstance(v, bool) or not isinstance(v, int | float))
               for v in times.values()):
            return "malformed"
        if times["exp"] is not None and times["exp"] + s.leeway < now:
            return "expired"
        if times["nbf"] is not None and times["nbf"] - s.leeway > now:
            return "not_yet_valid"
        iss = answer.get("iss")
        if iss is not None and iss != s.issuer:
            return "wrong_issuer"
        aud = answer.get("aud")
        if aud is not None and s.audience:
            listed = aud if isinstance(aud, list) else [aud]
            if not set(map(str, listed)) & set(s.audience):
                return "wrong_audience"
        return ""

    async def introspect(self, token: str) -> dict[str, Any]:
        """The introspection answer ({"active": false} for any inactive or unusable token).

        Raises FederationError when the endpoint cannot be asked."""
        s = self.settings
        endpoint = s.introspection_endpoint or (await self.discovery()).get(
            "introspection_endpoint")
        if not isinstance(endpoint, str) or not endpoint:
            raise FederationError("no introspection endpoint (configure "
                                  "introspection_endpoint)")
        auth = (s.client_id, s.client_secret or "") if s.client_id else None
        try:
            answer = await self._get_json(endpoint, method="POST", auth=auth, data={
                "token": token, "token_type_hint": "access_token"})
        except FederationError:
            self.stats.verified("introspection", False, "unavailable")
            raise
        active = answer.get("active") is True
        reason = "" if active else "inactive"
        if active:
            reason = self._unusable(answer)
            active = not reason
        self.stats.verified("introspection", active, reason)
        subject = str(answer.get("sub", "")) if active else "unknown"
        audit_verification(self.audit, "introspection", active, subject,
                           {} if active else {"reason": reason})
        return {**answer, "active": True} if active else {"active": False}
