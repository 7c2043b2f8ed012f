"""A software WebAuthn authenticator for tests: ES256 keys, real CBOR/COSE encoding.

It answers registration and authentication options the way a browser plus a security key
would (navigator.credentials.create/get, serialized with toJSON()), with attestation
`none`, `packed` self attestation, or `packed` with an x5c chain from a CA made here.
`clone()` copies the key and the counter, as a cloned authenticator would hold them.
"""

from __future__ import annotations

import base64
import copy
import datetime
import hashlib
import json
import os
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

UP, UV, AT = 0x01, 0x04, 0x40


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class AttestationCA:
    """A root CA and a packed attestation certificate it issued (FIDO's required fields)."""

    def __init__(self, name: str = "Test Attestation Root") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))
        self.leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf_subject = x509.Name([
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Vendor"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Authenticator Attestation"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Test Key")])
        self.leaf = (x509.CertificateBuilder().subject_name(leaf_subject).issuer_name(subject)
                     .public_key(self.leaf_key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))

    @property
    def root_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


class SoftAuthenticator:
    def __init__(self, attestation: str = "none", ca: AttestationCA | None = None,
                 aaguid: bytes = bytes(range(16))) -> None:
        self.attestation = attestation  # none | packed
        self.ca = ca  # with packed: an x5c chain instead of self attestation
        self.aaguid = aaguid
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.credential_id = os.urandom(32)
        self.sign_count = 0

    @property
    def id(self) -> str:
        return b64url(self.credential_id)

    def clone(self) -> SoftAuthenticator:
        twin = copy.copy(self)  # the same key object, id and counter value
        return twin

    def cose_key(self) -> bytes:
        numbers = self.key.public_key().public_numbers()
        return cbor2.dumps({1: 2, 3: -7, -1: 1, -2: numbers.x.to_bytes(32, "big"),
                            -3: numbers.y.to_bytes(32, "big")})

    def _auth_data(self, rp_id: str, flags: int, attested: bool) -> bytes:
        data = hashlib.sha256(rp_id.encode()).digest() + bytes([flags])
        data += self.sign_count.to_bytes(4, "big")
        if attested:
            data += self.aaguid + len(self.credential_id).to_bytes(2, "big")
            data += self.credential_id + self.cose_key()
        return data

    @staticmethod
    def _client_data(kind: str, challenge: str, origin: str) -> bytes:
        return json.dumps({"type": kind, "challenge": challenge, "origin": origin,
                           "crossOrigin": False}).encode()

    def create(self, options: dict[str, Any], origin: str, *, challenge: str | None = None,
               rp_id: str | None = None, flags: int = UP | UV | AT) -> dict[str, Any]:
        """navigator.credentials.create() answered; challenge/rp_id override for forgeries."""
        client_data = self._client_data("webauthn.create", challenge or options["challenge"],
                                        origin)
        auth_data = self._auth_data(rp_id or options["rp"]["id"], flags, attested=True)
        signed = auth_data + hashlib.sha256(client_data).digest()
        statement: dict[str, Any] = {}
        if self.attestation == "packed" and self.ca is None:
            statement = {"alg": -7, "sig": self.key.sign(signed, ec.ECDSA(hashes.SHA256()))}
        elif self.attestation == "packed":
            assert self.ca is not None
            statement = {"alg": -7, "sig": self.ca.leaf_key.sign(signed, ec.ECDSA(hashes.SHA256())),
                         "x5c": [self.ca.leaf.public_bytes(serialization.Encoding.DER)]}
        attestation = cbor2.dumps({"fmt": self.attestation, "attStmt": statement,
                                   "authData": auth_data})
        return {"id": self.id, "rawId": self.id, "type": "public-key",
                "response": {"clientDataJSON": b64url(client_data),
                             "attestationObject": b64url(attestation), "transports": ["usb"]},
                "clientExtensionResults": {}, "authenticatorAttachment": "cross-platform"}

    def get(self, options: dict[str, Any], origin: str, *, challenge: str | None = None,
            rp_id: str | None = None, flags: int = UP | UV) -> dict[str, Any]:
        """navigator.credentials.get() answered: the counter goes up by one."""
        self.sign_count += 1
        client_data = self._client_data("webauthn.get", challenge or options["challenge"],
                                        origin)
        auth_data = self._auth_data(rp_id or options["rpId"], flags, attested=False)
        signature = self.key.sign(auth_data + hashlib.sha256(client_data).digest(),
                                  ec.ECDSA(hashes.SHA256()))
        return {"id": self.id, "rawId": self.id, "type": "public-key",
                "response": {"clientDataJSON": b64url(client_data),
                             "authenticatorData": b64url(auth_data),
                             "signature": b64url(signature)},
                "clientExtensionResults": {}}
