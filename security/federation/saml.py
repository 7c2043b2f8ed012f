"""SAML 2.0 service provider: SP metadata, AuthnRequests (HTTP-Redirect) and validation of
the signed Responses the IdP posts to the web front end, which hands them to acs().

pysaml2 does the protocol work and Debian's xmlsec1 checks the XML signatures; pysaml2
checks the audience (our entity id) when the assertion has one, the destination (our ACS
URL), NotBefore / NotOnOrAfter (with `accepted_time_diff`) and InResponseTo against the
requests we sent. Around it:
- the assertion must have an AudienceRestriction naming our entity id and a bearer
  SubjectConfirmation whose Recipient is our ACS URL (pysaml2 passes an assertion with
  no restriction, and any Recipient unless given the request's conversation info);
- a document with entity declarations or external references is `malformed` (defusedxml);
- before pysaml2 sees a document, it must hold exactly one Assertion, and the
  signature over it (or over the Response) must reference that element's ID: the
  usual XML signature wrapping tricks (a second, unsigned assertion beside or inside a
  signed one) are refused outright;
- outstanding request ids live in the store for `request_lifetime` and are used once;
- each assertion id is remembered in the store until its NotOnOrAfter, so a replayed
  Response is refused, also on another replica sharing Redis.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from defusedxml import ElementTree
from saml2 import BINDING_HTTP_POST, BINDING_HTTP_REDIRECT
from saml2.client import Saml2Client
from saml2.config import SPConfig
from saml2.metadata import create_metadata_string
from saml2.response import (
    IncorrectlySigned,
    StatusError,
    UnsolicitedResponse,
    VerificationError,
)
from saml2.saml import SCM_BEARER
from saml2.sigver import SignatureError, SigverError
from saml2.validate import ResponseLifetimeExceed, ToEarly

from security.engine import Auditor
from security.identity import IdentityStats, audit_verification
from security.store import Record, Store

log = logging.getLogger(__name__)
REQUEST_KIND = "saml_request"
ASSERTION_KIND = "saml_assertion"
MAX_RESPONSE_BYTES = 512 * 1024
_NS = {"samlp": "urn:oasis:names:tc:SAML:2.0:protocol",
       "saml": "urn:oasis:names:tc:SAML:2.0:assertion",
       "ds": "http://www.w3.org/2000/09/xmldsig#"}
_REASONS: list[tuple[type[BaseException], str]] = [
    (ResponseLifetimeExceed, "expired"),
    (ToEarly, "not_yet_valid"),
    (UnsolicitedResponse, "unsolicited"),
    (IncorrectlySigned, "bad_signature"),
    (SignatureError, "bad_signature"),
    (SigverError, "bad_signature"),
    (StatusError, "idp_error"),
    (VerificationError, "invalid"),
]


@dataclass(frozen=True)
class SamlSettings:
    entity_id: str
    acs_url: str
    idp_metadata_file: str
    sp_key_file: str = ""
    sp_cert_file: str = ""
    want_assertions_signed: bool = True
    want_response_signed: bool = False
    request_lifetime: float = 300.0
    accepted_time_diff: float = 60.0
    allow_unsolicited: bool = False
    xmlsec_binary: str = "/usr/bin/xmlsec1"


@dataclass
class SamlResult:
    valid: bool
    reason: str = "ok"
    name_id: str = ""
    issuer: str = ""
    attributes: dict[str, list[str]] = field(default_factory=dict)
    session_index: str = ""
    in_response_to: str = ""
    relay_state: str = ""

    def as_dict(self) -> dict[str, Any]:
        if not self.valid:
            return {"valid": False, "reason": self.reason}
        return {"valid": True, "name_id": self.name_id, "issuer": self.issuer,
                "attributes": self.attributes, "session_index": self.session_index,
                "in_response_to": self.in_response_to, "relay_state": self.relay_state}


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if "AudienceRestrictions" in text:
        return "wrong_audience"
    if isinstance(exc, VerificationError) and "Condition not OK" in text:
        return "expired"  # outside NotBefore..NotOnOrAfter (pysaml2 says no more)
    return next((r for cls, r in _REASONS if isinstance(exc, cls)), "invalid")


class WrappedAssertion(Exception):
    """The document's structure is what signature wrapping attacks produce."""


def check_structure(xml: bytes) -> tuple[str, str]:
    """(InResponseTo, assertion ID) of a Response that has one assertion, signed (or inside
    a signed Response) by a signature referencing it; WrappedAssertion otherwise."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as exc:
        raise WrappedAssertion(f"not XML: {exc}") from None
    if root.tag != f"{{{_NS['samlp']}}}Response":
        raise WrappedAssertion("not a samlp:Response")
    assertions = root.findall(".//saml:Assertion", _NS)
    if len(assertions) != 1:
        raise WrappedAssertion(f"{len(assertions)} assertions (exactly one expected)")
    assertion = assertions[0]
    if assertion not in list(root):
        raise WrappedAssertion("the assertion is not a direct child of the Response")
    signed_ids = set()
    for element in (root, assertion):
        for signature in element.findall("ds:Signature", _NS):
            for ref in signature.findall("ds:SignedInfo/ds:Reference", _NS):
                signed_ids.add((element, ref.get("URI", "")))
    ids = {(root, f"#{root.get('ID', '')}"), (assertion, f"#{assertion.get('ID', '')}")}
    if not signed_ids & ids or any(pair not in ids for pair in signed_ids):
        raise WrappedAssertion("no signature references the Response or its assertion")
    return root.get("InResponseTo", ""), assertion.get("ID", "")


class SamlServiceProvider:
    def __init__(self, settings: SamlSettings, store: Store, stats: IdentityStats | None = None,
                 audit: Auditor | None = None, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.store = store
        self.stats = stats or IdentityStats()
        self.audit = audit
        self.clock = clock
        missing = [name for name in ("entity_id", "acs_url", "idp_metadata_file")
                   if not getattr(settings, name)]
        if missing:
            raise ValueError(f"security.saml: set {', '.join(missing)}")
        self.config = self._config()
        self.client = Saml2Client(config=self.config)

    def _config(self) -> SPConfig:
        s = self.settings
        conf: dict[str, Any] = {
            "entityid": s.entity_id,
            "xmlsec_binary": s.xmlsec_binary,
            "metadata": {"local": [s.idp_metadata_file]},
            "accepted_time_diff": int(s.accepted_time_diff),
            "service": {"sp": {
                "endpoints": {"assertion_consumer_service": [(s.acs_url, BINDING_HTTP_POST)]},
                "want_assertions_signed": s.want_assertions_signed,
                "want_response_signed": s.want_response_signed,
                "allow_unsolicited": s.allow_unsolicited,
                "authn_requests_signed": bool(s.sp_key_file),
            }},
        }
        if s.sp_key_file:
            conf["key_file"] = s.sp_key_file
            conf["cert_file"] = s.sp_cert_file
        config = SPConfig()
        config.load(conf)
        return config

    def metadata(self) -> str:
        """The SP's metadata XML, for the IdP."""
        text = create_metadata_string(None, config=self.config, valid=365 * 24)
        return text.decode("utf-8") if isinstance(text, bytes) else str(text)

    def idp(self) -> str:
        """The IdP's entity id (the only one in its metadata)."""
        idps = list(self.config.metadata.identity_providers())
        if len(idps) != 1:
            raise ValueError(f"idp_metadata_file must describe one IdP, found {len(idps)}")
        return str(idps[0])

    async def authn_request(self, relay_state: str = "", *, actor: str = "api"
                            ) -> dict[str, str]:
        """A new AuthnRequest: its id (awaited for request_lifetime) and the redirect URL."""
        request_id, info = await asyncio.to_thread(
            self.client.prepare_for_authenticate, entityid=self.idp(),
            relay_state=relay_state, binding=BINDING_HTTP_REDIRECT)
        url = dict(info["headers"])["Location"]
        now = self.clock()
        await self.store.put_record(Record(REQUEST_KIND, request_id, {"created": now},
                                           now + self.settings.request_lifetime))
        return {"request_id": request_id, "url": url, "binding": "HTTP-Redirect"}

    async def acs(self, saml_response: str, relay_state: str = "") -> SamlResult:
        """Validates a base64 Response posted to the ACS URL; counted and audited."""
        result = await self._acs(saml_response)
        result.relay_state = relay_state if result.valid else ""
        self.stats.verified("saml", result.valid, "" if result.valid else result.reason)
        audit_verification(self.audit, "saml", result.valid,
                           result.name_id if result.valid else "unknown",
                           {"issuer": result.issuer} if result.valid else
                           {"reason": result.reason})
        return result

    async def _acs(self, saml_response: str) -> SamlResult:
        if len(saml_response) > MAX_RESPONSE_BYTES:
            return SamlResult(False, "malformed")
        try:
            xml = base64.b64decode(saml_response, validate=True)
        except (binascii.Error, ValueError):
            return SamlResult(False, "malformed")
        try:
            in_response_to, assertion_id = check_structure(xml)
        except WrappedAssertion as exc:
            log.info("SAML response refused: %s", exc)
            return SamlResult(False, "wrapped_or_unsigned")
        except ValueError as exc:  # defusedxml: entity declarations, external references
            log.info("SAML response refused: %s", type(exc).__name__)
            return SamlResult(False, "malformed")
        now = self.clock()
        outstanding = {}
        if in_response_to:
            if await self.store.get_record(REQUEST_KIND, in_response_to, now) is None:
                seen = await self.store.get_record(ASSERTION_KIND, assertion_id, now)
                return SamlResult(False, "replayed" if seen else "unknown_request")
            outstanding[in_response_to] = self.settings.acs_url
        try:
            response = await asyncio.to_thread(self.client.parse_authn_request_response,
                                               saml_response, BINDING_HTTP_POST, outstanding)
        except Exception as exc:  # pysaml2 raises many unrelated types; map the known ones
            reason = _reason(exc)
            log.info("SAML response refused (%s): %s: %s", reason, type(exc).__name__, exc)
            return SamlResult(False, reason)
        # pysaml2 drops (without raising) a Response whose Destination is not our ACS URL
        assertion = response.assertion if response is not None else None
        if assertion is None:
            return SamlResult(False, "wrong_recipient")
        if assertion.id != assertion_id:
            return SamlResult(False, "wrapped_or_unsigned")
        # what pysaml2 checks only when present (an audience) or when given a conv_info it
        # cannot be given here (the recipient): the Web Browser SSO profile requires both
        if not self._for_our_acs(assertion):
            return SamlResult(False, "wrong_recipient")
        if not self._restricted_to_us(assertion):
            return SamlResult(False, "wrong_audience")
        expires = self._not_on_or_after(assertion) or now + self.settings.request_lifetime
        if not await self.store.add_record(
                Record(ASSERTION_KIND, assertion.id, {"at": now},
                       expires + self.settings.accepted_time_diff), now):
            return SamlResult(False, "replayed")
        if in_response_to:
            await self.store.delete_record(REQUEST_KIND, in_response_to)
        info = response.session_info()
        name_id = info.get("name_id")
        return SamlResult(
            True, "ok", name_id=getattr(name_id, "text", "") or "",
            issuer=str(info.get("issuer", "")),
            attributes={k: [str(v) for v in vs] for k, vs in (info.get("ava") or {}).items()},
            session_index=str(info.get("session_index") or ""),
            in_response_to=in_response_to)

    def _for_our_acs(self, assertion: Any) -> bool:
        """A bearer SubjectConfirmation whose Recipient is our ACS URL."""
        subject = getattr(assertion, "subject", None)
        for confirmation in getattr(subject, "subject_confirmation", None) or []:
            data = confirmation.subject_confirmation_data
            if (confirmation.method == SCM_BEARER and data is not None
                    and data.recipient == self.settings.acs_url):
                return True
        return False

    def _restricted_to_us(self, assertion: Any) -> bool:
        """An AudienceRestriction naming our entity id (pysaml2 refuses one that does not)."""
        conditions = getattr(assertion, "conditions", None)
        for restriction in getattr(conditions, "audience_restriction", None) or []:
            if any(a.text == self.settings.entity_id for a in restriction.audience or []):
                return True
        return False

    @staticmethod
    def _not_on_or_after(assertion: Any) -> float | None:
        from saml2.time_util import str_to_time

        times = []
        conditions = getattr(assertion, "conditions", None)
        if conditions is not None and conditions.not_on_or_after:
            times.append(conditions.not_on_or_after)
        subject = getattr(assertion, "subject", None)
        for confirmation in getattr(subject, "subject_confirmation", None) or []:
            data = confirmation.subject_confirmation_data
            if data is not None and data.not_on_or_after:
                times.append(data.not_on_or_after)
        if not times:
            return None
        import calendar

        return max(float(calendar.timegm(str_to_time(t))) for t in times)
