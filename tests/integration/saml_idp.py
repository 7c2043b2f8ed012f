"""A test SAML identity provider: pysaml2's IdP side with a key and certificate made here,
signing real Responses with Debian's xmlsec1, for the SP under test.

`SamlPair.make(dir)` writes the IdP key/cert, the SP metadata and the IdP metadata and
returns the pair: `pair.sp_settings()` configures the SP under test, `pair.respond(...)`
issues a signed Response (base64, as the browser would post it).
"""

from __future__ import annotations

import base64
import datetime
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from saml2 import BINDING_HTTP_POST, BINDING_HTTP_REDIRECT
from saml2.config import IdPConfig, SPConfig
from saml2.metadata import create_metadata_string
from saml2.saml import NAMEID_FORMAT_UNSPECIFIED, NameID
from saml2.server import Server

from security.federation.saml import SamlSettings

XMLSEC = "/usr/bin/xmlsec1"
SP_ENTITY = "https://mail.example.org/saml/sp"
ACS_URL = "https://mail.example.org/saml/acs"
IDP_ENTITY = "https://idp.example.org/saml/idp"
SSO_URL = "https://idp.example.org/saml/sso"
NAME_FORM_URI = "urn:oasis:names:tc:SAML:2.0:attrname-format:uri"


def key_and_cert(directory: Path, name: str) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@dataclass
class SamlPair:
    directory: Path
    idp_key: Path
    idp_cert: Path
    sp_metadata: Path
    idp_metadata: Path

    @classmethod
    def make(cls, directory: Path) -> SamlPair:
        directory.mkdir(parents=True, exist_ok=True)
        idp_key, idp_cert = key_and_cert(directory, "idp")
        sp_conf = SPConfig()
        sp_conf.load({"entityid": SP_ENTITY, "xmlsec_binary": XMLSEC, "service": {"sp": {
            "endpoints": {"assertion_consumer_service": [(ACS_URL, BINDING_HTTP_POST)]},
            "want_assertions_signed": True}}})
        sp_metadata = directory / "sp.xml"
        sp_metadata.write_bytes(_bytes(create_metadata_string(None, config=sp_conf)))
        pair = cls(directory, idp_key, idp_cert, sp_metadata, directory / "idp.xml")
        pair.idp_metadata.write_bytes(_bytes(create_metadata_string(
            None, config=pair._idp_config(15))))
        return pair

    def _idp_config(self, lifetime_minutes: int) -> IdPConfig:
        conf = IdPConfig()
        conf.load({
            "entityid": IDP_ENTITY, "xmlsec_binary": XMLSEC,
            "key_file": str(self.idp_key), "cert_file": str(self.idp_cert),
            "metadata": {"local": [str(self.sp_metadata)]},
            "service": {"idp": {
                "endpoints": {"single_sign_on_service": [(SSO_URL, BINDING_HTTP_REDIRECT)]},
                "policy": {"default": {"lifetime": {"minutes": lifetime_minutes},
                                       "attribute_restrictions": None,
                                       "name_form": NAME_FORM_URI}},
            }},
        })
        return conf

    def sp_settings(self, **extra: Any) -> SamlSettings:
        return SamlSettings(**{"entity_id": SP_ENTITY, "acs_url": ACS_URL,
                               "idp_metadata_file": str(self.idp_metadata),
                               "xmlsec_binary": XMLSEC, **extra})

    def respond_xml(self, in_response_to: str | None, user: str = "alice@example.org", *,
                    lifetime_minutes: int = 15, destination: str = ACS_URL,
                    audience: str = SP_ENTITY, sign_response: bool = False,
                    sign_assertion: bool = True, recipient: str | None = None) -> str:
        """`recipient`: the assertion's SubjectConfirmationData Recipient, when it is not
        to be `destination` (what an IdP answering another SP would write)."""
        server = Server(config=self._idp_config(lifetime_minutes))
        extra: dict[str, Any] = {}
        if recipient is not None:
            extra["farg"] = {"assertion": {"subject": {"subject_confirmation": {
                "method": "urn:oasis:names:tc:SAML:2.0:cm:bearer",
                "subject_confirmation_data": {"in_response_to": in_response_to,
                                              "recipient": recipient}}}}}
        xml = server.create_authn_response(
            identity={"mail": [user], "givenName": ["Alice"]}, in_response_to=in_response_to,
            destination=destination, sp_entity_id=audience,
            name_id=NameID(format=NAMEID_FORMAT_UNSPECIFIED, text=user),
            authn={"class_ref": "urn:oasis:names:tc:SAML:2.0:ac:classes:Password",
                   "authn_auth": IDP_ENTITY},
            sign_response=sign_response, sign_assertion=sign_assertion,
            sign_alg="http://www.w3.org/2001/04/xmldsig-more#rsa-sha256",
            digest_alg="http://www.w3.org/2001/04/xmlenc#sha256", **extra)
        return str(xml)

    def resign_assertion(self, xml: str) -> str:
        """The assertion signed again with the IdP's key after the caller edited it (what
        a compromised or careless IdP could send: the signature is genuine)."""
        server = Server(config=self._idp_config(15))
        found = re.search(r'<(?:\w+:)?Assertion [^>]*ID="([^"]+)"', xml)
        assert found, "no assertion"
        return str(server.sec.sign_statement(
            xml, "urn:oasis:names:tc:SAML:2.0:assertion:Assertion",
            key_file=str(self.idp_key), node_id=found[1]))

    def respond(self, in_response_to: str | None, **kwargs: Any) -> str:
        return base64.b64encode(self.respond_xml(in_response_to, **kwargs).encode()).decode()


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
