# ruff: noqa: F811 - the imported fixture is a parameter of the tests
"""OIDC bearer-token validation and RFC 7662 introspection against a local OpenID provider
(tests/integration/oidc_server.py: discovery, JWKS and introspection over real HTTP with
keys made here), including key rotation, alg none and HMAC-with-the-public-key."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time

import pytest
from cryptography.hazmat.primitives import serialization

from security.federation.oidc import FederationError, OidcSettings, OidcValidator, check_url
from security.identity import IdentityStats
from tests.integration.components import DribblingHTTPServer
from tests.integration.oidc_server import OidcProvider
from tests.unit.test_identity_http import running  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def provider():
    with OidcProvider() as p:
        p.add_key("rsa-1", "RS256")
        p.add_key("ec-1", "ES256")
        yield p


def settings(provider: OidcProvider, **extra) -> OidcSettings:
    return OidcSettings(**{"issuer": provider.issuer, "audience": ("mail-web",),
                           "jwks_min_refresh_interval": 0.0, "client_id": "exporter",
                           "client_secret": "s3cret", **extra})


@pytest.fixture
async def validator(provider):
    v = OidcValidator(settings(provider), stats=IdentityStats())
    yield v
    await v.close()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def forged(header: dict, claims: dict, signature: bytes = b"") -> str:
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(claims).encode())
    return f"{head}.{body}.{b64(signature)}"


async def test_valid_rs256_and_es256_tokens(provider, validator):
    for kid in ("rsa-1", "ec-1"):
        result = await validator.validate(provider.sign(kid))
        assert result.valid, result
        assert result.claims["sub"] == "user-42" and result.claims["iss"] == provider.issuer
    assert validator.stats.verifications[("oidc", "success")] == 2


async def test_keys_are_cached(provider, validator):
    for _ in range(5):
        assert (await validator.validate(provider.sign("rsa-1"))).valid
    assert validator.jwks_fetches == 1


@pytest.mark.parametrize("claims,reason", [
    ({"exp": int(time.time()) - 3600}, "expired"),
    ({"nbf": int(time.time()) + 3600}, "not_yet_valid"),
    ({"aud": "someone-else"}, "wrong_audience"),
    ({"iss": "https://evil.example/realm"}, "wrong_issuer"),
])
async def test_claims_are_checked(provider, validator, claims, reason):
    result = await validator.validate(provider.sign("rsa-1", provider.claims(**claims)))
    assert (result.valid, result.reason) == (False, reason)
    assert validator.stats.failures[("oidc", reason)] == 1


async def test_a_missing_required_claim_and_leeway(provider, validator):
    claims = provider.claims()
    del claims["sub"]
    assert (await validator.validate(provider.sign("rsa-1", claims))).reason == "missing_claim"
    just_expired = provider.claims(exp=int(time.time()) - 30)  # within the 60 s leeway
    assert (await validator.validate(provider.sign("rsa-1", just_expired))).valid


async def test_alg_none_is_refused(provider, validator):
    token = forged({"alg": "none", "kid": "rsa-1"}, provider.claims())
    assert (await validator.validate(token)).reason == "algorithm_not_allowed"
    token = forged({"alg": "None", "typ": "JWT"}, provider.claims())
    assert (await validator.validate(token)).reason == "algorithm_not_allowed"


async def test_hmac_signed_with_the_public_key_is_refused(provider, validator):
    public = provider.keys["rsa-1"][0].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = b64(json.dumps({"alg": "HS256", "kid": "rsa-1"}).encode())
    body = b64(json.dumps(provider.claims()).encode())
    mac = hmac.new(public, f"{header}.{body}".encode(), hashlib.sha256).digest()
    assert (await validator.validate(f"{header}.{body}.{b64(mac)}")).reason == (
        "algorithm_not_allowed")
    # the same attack with the allowlist naming the key's own algorithm family: the kid
    # points at an RSA key, the header claims ES256: refused before any verification
    ec_header = b64(json.dumps({"alg": "ES256", "kid": "rsa-1"}).encode())
    assert (await validator.validate(f"{ec_header}.{body}.{b64(mac)}")).reason == (
        "key_mismatch")
    with pytest.raises(ValueError):
        OidcSettings(issuer=provider.issuer, audience=("x",), algorithms=("HS256",))


async def test_tampered_and_malformed_tokens(provider, validator):
    head, body, sig = provider.sign("rsa-1").split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["sub"] = "admin"
    tampered = f"{head}.{b64(json.dumps(claims).encode())}.{sig}"
    assert (await validator.validate(tampered)).reason == "bad_signature"
    for junk in ("", "a.b", "not-a-jwt", "x" * 20_000, "...."):
        assert (await validator.validate(junk)).reason == "malformed", junk
    unknown = forged({"alg": "RS256", "kid": "nobody"}, provider.claims(), b"x" * 256)
    assert (await validator.validate(unknown)).reason == "unknown_key"


async def test_key_rotation(provider):
    validator = OidcValidator(settings(provider))
    try:
        assert (await validator.validate(provider.sign("rsa-1"))).valid
        provider.add_key("rsa-2", "RS256")
        token = provider.sign("rsa-2")
        # a new kid fetches the keys again at once
        assert (await validator.validate(token)).valid
        assert validator.jwks_fetches == 2
        provider.retire("rsa-1")
        old = provider.sign("rsa-1")
        validator.settings = settings(provider, jwks_cache_ttl=0.0)  # the cache has aged
        assert (await validator.validate(old)).reason == "unknown_key"
        assert (await validator.validate(provider.sign("rsa-2"))).valid
    finally:
        provider.published = ["rsa-1", "ec-1"]
        await validator.close()


async def test_unknown_kids_refetch_at_most_once_per_interval(provider):
    validator = OidcValidator(settings(provider, jwks_min_refresh_interval=3600.0))
    try:
        assert (await validator.validate(provider.sign("rsa-1"))).valid
        for i in range(10):
            token = forged({"alg": "RS256", "kid": f"made-up-{i}"}, provider.claims(), b"x")
            assert (await validator.validate(token)).reason == "unknown_key"
        assert validator.jwks_fetches == 1
    finally:
        await validator.close()


async def test_an_unreachable_provider(provider):
    dead = OidcValidator(OidcSettings(issuer="http://127.0.0.1:9/realm", audience=("x",),
                                      http_timeout=1.0))
    try:
        assert (await dead.validate(provider.sign("rsa-1"))).reason == "jwks_unavailable"
        with pytest.raises(FederationError):
            await dead.introspect("anything")
    finally:
        await dead.close()


@pytest.mark.parametrize("body", [False, True])
async def test_a_provider_that_dribbles_its_answer_is_cut_off_at_the_timeout(body):
    """httpx's timeout is per read: a provider sending a header line (or a body byte)
    every 0.2 s held a token check for as long as it liked."""
    with DribblingHTTPServer(gap=0.2, body=body) as slow:
        v = OidcValidator(OidcSettings(issuer=slow.url + "/realm", audience=("x",),
                                       http_timeout=0.8))
        try:
            started = time.monotonic()
            with pytest.raises(FederationError, match="no complete answer within 0.8s"):
                await v.discovery()
            took = time.monotonic() - started
        finally:
            await v.close()
    assert 0.7 <= took < 2.0, f"took {took:.2f} s"


async def test_introspection(provider, validator):
    provider.active["live-token"] = {"active": True, "sub": "user-7", "scope": "mail",
                                     "exp": int(time.time()) + 60, "iss": provider.issuer}
    provider.active["old-token"] = {"active": True, "exp": int(time.time()) - 3600}
    answer = await validator.introspect("live-token")
    assert answer["active"] is True and answer["sub"] == "user-7"
    assert await validator.introspect("old-token") == {"active": False}
    assert await validator.introspect("unknown-token") == {"active": False}
    wrong = OidcValidator(settings(provider, client_secret="wrong"))
    try:
        with pytest.raises(FederationError):
            await wrong.introspect("live-token")
    finally:
        await wrong.close()
    assert provider.hits["/introspect"] >= 4


async def test_headers_pyjwt_refuses_are_malformed_not_500(provider, validator):
    """A non-string kid or a crit header raised past the validator (HTTP 500, uncounted)."""
    for header in ({"alg": "RS256", "kid": 5}, {"alg": "RS256", "kid": []},
                   {"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]},
                   {"alg": "RS256", "kid": "rsa-1", "crit": "x"}):
        token = forged(header, provider.claims(), b"x" * 256)
        assert (await validator.validate(token)).reason == "malformed", header
    assert validator.stats.failures[("oidc", "malformed")] >= 4


async def test_bad_provider_data_is_an_outage_or_a_mismatch_never_a_crash():
    with OidcProvider() as p:
        p.add_key("rsa-1", "RS256")
        token = p.sign("rsa-1")
        p.jwks = lambda: {"keys": 5}  # type: ignore[method-assign]
        v = OidcValidator(settings(p))
        try:
            assert (await v.validate(token)).reason == "jwks_unavailable"
            p.jwks = lambda: {"keys": [{"kty": "RSA", "kid": "rsa-1", "e": "AQAB"}]}  # no n
            assert (await v.validate(token)).reason == "key_mismatch"
        finally:
            await v.close()
        # URLs a discovery document may name: refused as an outage (the route's 502)
        remote = OidcValidator(settings(p, jwks_uri="http://198.51.100.7/jwks",
                                        introspection_endpoint="file:///etc/passwd"))
        try:
            assert (await remote.validate(token)).reason == "jwks_unavailable"
            with pytest.raises(FederationError, match="https"):
                await remote.introspect("anything")
        finally:
            await remote.close()


async def test_a_kid_listed_twice_keeps_its_first_key_and_encryption_keys_are_left_out():
    with OidcProvider() as p:
        p.add_key("dup", "RS256")
        p.add_key("second", "RS256")
        first_token, second_token = p.sign("dup"), p.sign("second")
        real = p.jwks()["keys"]
        p.jwks = lambda: {"keys": [  # type: ignore[method-assign]
            real[0], {**real[1], "kid": "dup"}, {**real[1], "use": "enc"}]}
        v = OidcValidator(settings(p))
        try:
            assert (await v.validate(first_token)).valid  # the last one used to win
            assert (await v.validate(second_token)).reason == "unknown_key"
        finally:
            await v.close()


async def test_no_keys_ever_fetched_is_said_as_the_outage_between_attempts():
    """Within jwks_min_refresh_interval after a failed first fetch every token got
    unknown_key, which points at the token instead of the provider."""
    with OidcProvider() as p:
        p.add_key("rsa-1", "RS256")
        token, real = p.sign("rsa-1"), p.jwks

        def down() -> dict:
            raise RuntimeError("JWKS down")  # the handler fails: the client sees an error

        p.jwks = down  # type: ignore[method-assign]
        v = OidcValidator(settings(p, jwks_min_refresh_interval=3600.0))
        try:
            assert (await v.validate(token)).reason == "jwks_unavailable"
            p.jwks = real  # type: ignore[method-assign]
            assert (await v.validate(token)).reason == "jwks_unavailable"
            assert v.jwks_fetches == 0
        finally:
            await v.close()


async def test_a_made_up_kid_does_not_hold_up_cached_keys_while_the_jwks_is_slow():
    with OidcProvider() as p:
        p.add_key("rsa-1", "RS256")
        token, real = p.sign("rsa-1"), p.jwks
        v = OidcValidator(settings(p, http_timeout=10.0))
        try:
            assert (await v.validate(token)).valid
            fetched = threading.Event()

            def slow() -> dict:
                fetched.wait(10)  # until the test has its answer for the cached key
                return real()

            p.jwks = slow  # type: ignore[method-assign]
            made_up = asyncio.create_task(v.validate(
                forged({"alg": "RS256", "kid": "made-up"}, p.claims(), b"x" * 256)))
            while p.hits["/jwks"] < 2:  # the refetch is on its way
                await asyncio.sleep(0.01)
            assert (await v.validate(token)).valid  # it used to wait for the lock
            assert not made_up.done()
            fetched.set()
            assert (await made_up).reason == "unknown_key"
        finally:
            await v.close()


async def test_an_active_introspection_answer_meets_the_jwt_rules(provider, validator):
    now = int(time.time())
    base = {"active": True, "sub": "user-7", "iss": provider.issuer, "exp": now + 60}
    cases = {"other-aud": ({"aud": "some-other-client"}, False),
             "list-aud": ({"aud": ["x", "mail-web"]}, True),
             "future-nbf": ({"nbf": now + 3600}, False),
             "string-exp": ({"exp": str(now - 3600)}, False),
             "bool-nbf": ({"nbf": True}, False)}
    for token, (extra, active) in cases.items():
        provider.active[token] = {**base, **extra}
        assert (await validator.introspect(token))["active"] is active, token


def test_urls_must_be_https_except_on_loopback():
    assert check_url("https://idp.example/x")
    assert check_url("http://127.0.0.1:8080/x") and check_url("http://[::1]/x")
    for bad in ("http://idp.example/x", "ftp://127.0.0.1/", "file:///etc/passwd"):
        with pytest.raises(ValueError):
            check_url(bad)


async def test_the_oidc_routes(provider, running):
    from tests.unit.test_http import ADMIN

    _, client = await running({"security": {"oidc": {
        "enabled": True, "issuer": provider.issuer, "audience": ["mail-web"],
        "jwks_min_refresh_interval": "1ms", "client_id": "exporter",
        "client_secret_env": ""}}})  # no client secret
    r = await client.post("/api/v1/oidc/validate", headers=ADMIN,
                          json={"token": provider.sign("ec-1")})
    assert r.status_code == 200 and r.json()["valid"] is True
    assert r.json()["claims"]["sub"] == "user-42"
    none = forged({"alg": "none"}, provider.claims())
    r = await client.post("/api/v1/oidc/validate", headers=ADMIN, json={"token": none})
    assert r.json() == {"valid": False, "reason": "algorithm_not_allowed"}
    assert (await client.post("/api/v1/oidc/validate", headers=ADMIN, json={})).status_code \
        == 400
    r = await client.post("/api/v1/oidc/introspect", headers=ADMIN, json={"token": "x"})
    assert r.status_code == 502  # no client secret configured: the provider says 401
    text = (await client.get("/metrics")).text
    assert 'a3mailer_identity_verification_failures_total{method="oidc",' \
           'reason="algorithm_not_allowed"} 1.0' in text


async def test_the_oidc_routes_answer_404_when_disabled(running):
    from tests.unit.test_http import ADMIN

    _, client = await running()
    r = await client.post("/api/v1/oidc/validate", headers=ADMIN, json={"token": "x"})
    assert r.status_code == 404 and "security.oidc.enabled" in r.json()["message"]
