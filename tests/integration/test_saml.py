# ruff: noqa: F811 - the imported fixture is a parameter of the tests
"""The SAML service provider against Responses signed by a test IdP (pysaml2's IdP side with
a key made here, signatures by Debian's xmlsec1): valid, tampered, wrapped (XSW),
expired, wrong audience and recipient, unknown and replayed."""

from __future__ import annotations

import base64
import re
import shutil
import zlib
from urllib.parse import parse_qs, urlsplit

import pytest

from security.federation.saml import SamlServiceProvider
from security.identity import IdentityStats
from security.store.memory import MemoryStore
from tests.integration.components import _missing
from tests.integration.saml_idp import ACS_URL, IDP_ENTITY, SP_ENTITY, SSO_URL, SamlPair
from tests.unit.test_identity_http import running  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration
ASSERTION = re.compile(r"<(ns\d+):Assertion .*?</\1:Assertion>", re.S)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    if shutil.which("xmlsec1") is None:
        _missing("xmlsec1 is not installed (scripts/install-system-deps.sh)")
    return SamlPair.make(tmp_path_factory.mktemp("saml"))


@pytest.fixture
def sp(pair):
    return SamlServiceProvider(pair.sp_settings(), MemoryStore(), stats=IdentityStats())


def b64(xml: str) -> str:
    return base64.b64encode(xml.encode()).decode()


async def test_metadata_and_authn_request(sp):
    metadata = sp.metadata()
    assert f'entityID="{SP_ENTITY}"' in metadata and ACS_URL in metadata
    request = await sp.authn_request("back-to-inbox")
    url = urlsplit(request["url"])
    assert request["url"].startswith(SSO_URL) and request["binding"] == "HTTP-Redirect"
    query = parse_qs(url.query)
    assert query["RelayState"] == ["back-to-inbox"]
    xml = zlib.decompress(base64.b64decode(query["SAMLRequest"][0]), -15).decode()
    assert f'ID="{request["request_id"]}"' in xml and ACS_URL in xml and SP_ENTITY in xml
    assert await sp.store.get_record("saml_request", request["request_id"], 0) is not None


async def test_a_signed_response_is_accepted_once(pair, sp):
    request = await sp.authn_request()
    response = pair.respond(request["request_id"])
    result = await sp.acs(response, "rs")
    assert result.valid, result
    assert (result.name_id, result.issuer) == ("alice@example.org", IDP_ENTITY)
    assert result.attributes["mail"] == ["alice@example.org"]
    assert result.in_response_to == request["request_id"] and result.relay_state == "rs"
    replay = await sp.acs(response)
    assert (replay.valid, replay.reason) == (False, "replayed")
    assert sp.stats.verifications == {("saml", "success"): 1, ("saml", "failure"): 1}


async def test_unsolicited_responses_are_refused_unless_allowed_and_never_replayed(pair):
    strict = SamlServiceProvider(pair.sp_settings(), MemoryStore())
    assert (await strict.acs(pair.respond(None))).reason == "unsolicited"
    lenient = SamlServiceProvider(pair.sp_settings(allow_unsolicited=True), MemoryStore())
    response = pair.respond(None)
    assert (await lenient.acs(response)).valid
    assert (await lenient.acs(response)).reason == "replayed"


async def test_an_unknown_request_id_is_refused(pair, sp):
    assert (await sp.acs(pair.respond("id-never-sent"))).reason == "unknown_request"


async def test_an_expired_assertion(pair, sp):
    request = await sp.authn_request()
    expired = pair.respond(request["request_id"], lifetime_minutes=-10)
    assert (await sp.acs(expired)).reason == "expired"


async def test_wrong_audience_and_recipient(pair, sp):
    request = await sp.authn_request()
    other = pair.respond(request["request_id"], audience="https://other.example/sp")
    assert (await sp.acs(other)).reason == "wrong_audience"
    elsewhere = pair.respond(request["request_id"], destination="https://evil.example/acs")
    assert (await sp.acs(elsewhere)).reason == "wrong_recipient"
    assert (await sp.acs(pair.respond(request["request_id"]))).valid  # still outstanding


async def test_a_signed_assertion_for_another_recipient_or_no_audience_is_refused(pair, sp):
    """Both passed: pysaml2 checks the Recipient only with conversation info and the
    audience only when there is an AudienceRestriction. The signatures here are genuine
    (the IdP's key), so only those checks can refuse them."""
    request = await sp.authn_request()
    elsewhere = pair.respond(request["request_id"], recipient="https://evil.example/acs")
    assert (await sp.acs(elsewhere)).reason == "wrong_recipient"
    xml = pair.respond_xml(request["request_id"])
    unrestricted = re.sub(r"<(\w+:)?AudienceRestriction>.*?</(\w+:)?AudienceRestriction>", "",
                          xml, flags=re.S)
    assert unrestricted != xml
    assert (await sp.acs(b64(pair.resign_assertion(unrestricted)))).reason == "wrong_audience"
    assert (await sp.acs(b64(pair.resign_assertion(xml)))).valid  # re-signing keeps it good


async def test_entity_declarations_are_malformed_not_500(pair, sp):
    request = await sp.authn_request()
    body = pair.respond_xml(request["request_id"]).split("?>", 1)[-1]
    for doctype in ('<!DOCTYPE r [<!ENTITY x "y">]>',
                    '<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>',
                    '<!DOCTYPE r [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;">]>'):
        result = await sp.acs(b64(doctype + body))
        assert (result.valid, result.reason) == (False, "malformed"), doctype
    assert sp.stats.failures[("saml", "malformed")] == 3


async def test_a_tampered_assertion_fails_its_signature(pair, sp):
    request = await sp.authn_request()
    xml = pair.respond_xml(request["request_id"])
    tampered = xml.replace(">alice@example.org</", ">admin@example.org</", 1)
    assert tampered != xml
    assert (await sp.acs(b64(tampered))).reason == "bad_signature"


async def test_unsigned_responses_are_refused(pair, sp):
    request = await sp.authn_request()
    unsigned = pair.respond(request["request_id"], sign_assertion=False)
    assert (await sp.acs(unsigned)).reason == "wrapped_or_unsigned"


async def test_xml_signature_wrapping_is_refused(pair, sp):
    request = await sp.authn_request()
    xml = pair.respond_xml(request["request_id"])
    signed = ASSERTION.search(xml)[0]
    prefix = ASSERTION.search(xml)[1]
    evil = re.sub(r"<ns\d+:Signature .*?</ns\d+:Signature>", "", signed, flags=re.S)
    evil = evil.replace(">alice@example.org</", ">admin@example.org</")
    evil = re.sub(r'ID="[^"]+"', 'ID="id-evil"', evil, count=1)
    attacks = {
        # the evil assertion first, the signed one after it
        "sibling": xml.replace(signed, evil + signed),
        # the signed assertion hidden inside the evil one
        "nested": xml.replace(signed, evil.replace(f"</{prefix}:Assertion>",
                                                   signed + f"</{prefix}:Assertion>")),
        # the signed assertion moved into the Response's Extensions
        "extensions": xml.replace(signed, f'<ns0:Extensions>{signed}</ns0:Extensions>' + evil),
        # the evil assertion alone, carrying the signature of the original
        "stolen_signature": xml.replace(signed, re.sub(
            r'ID="[^"]+"', 'ID="id-evil"', signed.replace(">alice@example.org</",
                                                           ">admin@example.org</"), count=1)),
    }
    for name, attack in attacks.items():
        result = await sp.acs(b64(attack))
        assert not result.valid and result.reason in ("wrapped_or_unsigned", "bad_signature"), (
            name, result)
        assert result.name_id == ""
    assert (await sp.acs(b64(xml))).valid  # the genuine one still works


async def test_malformed_input(sp):
    for junk in ("", "not base64!!", base64.b64encode(b"<notxml").decode(),
                 base64.b64encode(b"<a/>").decode(), "A" * 600_000):
        result = await sp.acs(junk)
        assert not result.valid and result.reason in ("malformed", "wrapped_or_unsigned"), junk


async def test_the_saml_routes(pair, running):
    from tests.unit.test_http import ADMIN

    settings = pair.sp_settings()
    exporter, client = await running({"security": {"saml": {
        "enabled": True, "entity_id": settings.entity_id, "acs_url": settings.acs_url,
        "idp_metadata_file": settings.idp_metadata_file}}})
    r = await client.get("/api/v1/saml/metadata", headers=ADMIN)
    assert r.status_code == 200 and SP_ENTITY in r.text
    assert r.headers["content-type"].startswith("application/samlmetadata+xml")
    r = await client.post("/api/v1/saml/authn-request", headers=ADMIN,
                          json={"relay_state": "inbox"})
    assert r.status_code == 201 and r.json()["url"].startswith(SSO_URL)
    response = pair.respond(r.json()["request_id"])
    r = await client.post("/api/v1/saml/acs", headers=ADMIN,
                          json={"saml_response": response, "relay_state": "inbox"})
    assert r.json()["valid"] is True and r.json()["name_id"] == "alice@example.org"
    r = await client.post("/api/v1/saml/acs", headers=ADMIN, json={"saml_response": response})
    assert r.json() == {"valid": False, "reason": "replayed"}
    assert (await client.post("/api/v1/saml/acs", headers=ADMIN, json={})).status_code == 400
    records, _ = exporter.audit.query(types=["auth.success"], limit=5)
    assert records[0]["actor"] == "saml" and records[0]["subject"] == "alice@example.org"
    text = (await client.get("/metrics")).text
    assert "alice" not in text
