"""MFA secrets at rest: AES-256-GCM sealing, and keyed hashes for codes.

The key material (a secret of at least 32 characters from `security.mfa.encryption_key_file`
or `_env`) is stretched with HKDF-SHA256 into two independent keys:

- the sealing key encrypts TOTP secrets with AES-GCM, a fresh 96-bit nonce per seal and
  the context (purpose and user) as associated data, so a sealed value copied to another
  user or field does not open;
- the digest key makes HMAC-SHA256 digests of recovery and one-time codes: a copy of the
  store gives nothing to brute-force offline without the key.

A sealed value reads `v1.<kid>.<base64url(nonce | ciphertext | tag)>`; `kid` (8 hex digits
of the sealing key's SHA-256) tells "sealed under another key" apart from "tampered".

HKDF is RFC 5869 on the standard library's HMAC (tests check it against the RFC's vectors
and cryptography's HKDF), and `cryptography`'s AES-GCM is loaded by the first seal or open:
it is about 6.6 MB resident that an exporter nobody enrolls in TOTP never needs.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MIN_KEY_CHARS = 32
_NONCE = 12


class SealError(Exception):
    """A sealed value that does not open: another key, tampered, or not a sealed value."""


def hkdf_sha256(material: bytes, info: bytes, length: int = 32, salt: bytes = b"") -> bytes:
    """RFC 5869 HKDF with SHA-256 (an empty salt is HashLen zero bytes, as the RFC says)."""
    if not 0 < length <= 255 * 32:
        raise ValueError(f"HKDF-SHA256 makes 1 to {255 * 32} bytes, not {length}")
    prk = hmac.new(salt or bytes(32), material, hashlib.sha256).digest()
    okm, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes((counter,)), hashlib.sha256).digest()
        okm += block
    return okm[:length]


@functools.cache
def _aes_gcm() -> tuple[type[AESGCM], type[Exception]]:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM, InvalidTag


class Sealer:
    def __init__(self, material: str | bytes):
        raw = material.encode("utf-8") if isinstance(material, str) else material
        if len(raw) < MIN_KEY_CHARS:
            raise ValueError(f"the MFA encryption key needs at least {MIN_KEY_CHARS} "
                             f"characters, got {len(raw)}")
        seal_key = hkdf_sha256(raw, b"a3mailer-exporter mfa seal v1")
        self._seal_key = seal_key
        self._aead_cipher: AESGCM | None = None
        self._digest_key = hkdf_sha256(raw, b"a3mailer-exporter mfa digest v1")
        self.kid = hashlib.sha256(seal_key).hexdigest()[:8]

    @property
    def _aead(self) -> AESGCM:
        if self._aead_cipher is None:
            self._aead_cipher = _aes_gcm()[0](self._seal_key)
        return self._aead_cipher

    def seal(self, plaintext: bytes, context: str) -> str:
        nonce = os.urandom(_NONCE)
        box = nonce + self._aead.encrypt(nonce, plaintext, context.encode("utf-8"))
        return f"v1.{self.kid}.{base64.urlsafe_b64encode(box).decode('ascii')}"

    def open(self, sealed: str, context: str) -> bytes:
        version, _, rest = sealed.partition(".")
        kid, _, body = rest.partition(".")
        if version != "v1" or not body:
            raise SealError("not a sealed value")
        if kid != self.kid:
            raise SealError(f"sealed under another key (kid {kid}, this key is {self.kid})")
        aead, invalid_tag = self._aead, _aes_gcm()[1]
        try:
            box = base64.urlsafe_b64decode(body)
            return aead.decrypt(box[:_NONCE], box[_NONCE:], context.encode("utf-8"))
        except (binascii.Error, ValueError, invalid_tag):
            raise SealError("sealed value does not verify (tampered or another context)"
                            ) from None

    def digest(self, value: str, context: str) -> str:
        """A keyed hash of a code (hex), bound to its context."""
        message = f"{context}\0{value}".encode()
        return hmac.new(self._digest_key, message, hashlib.sha256).hexdigest()


def load_or_create_key(path: Path) -> str:
    """The key material in path; a new random key (mode 0600) when the file is missing."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(secrets.token_urlsafe(48) + "\n")
    return path.read_text(encoding="utf-8").strip()
