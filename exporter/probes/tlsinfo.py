"""TLS for the probes: the client contexts and what the peer's certificate says.

How a probe learns both "did the chain verify" and "when does the certificate
expire", whatever the answer to the first: Python's ssl module (3.11) can neither
verify a chain after an unverified handshake nor decode an unverified peer
certificate (`getpeercert()` returns {} then). So a probe first handshakes with a
verifying context (the system CAs, or only `ca_file`). When that fails with a
verification error, it connects a second time with an unverified context, takes
the leaf certificate in DER form (`getpeercert(binary_form=True)`) and decodes
notAfter itself (`cert_not_after`, a few lines of DER walking). A valid
certificate costs one connection, a failing one two; the upgrade itself and its
timing live in session.py.
"""

from __future__ import annotations

import calendar
import ssl


def verifying_context(ca_file: str = "") -> ssl.SSLContext:
    """Verifies chain and host name: against `ca_file` only when set, else the system CAs."""
    return ssl.create_default_context(cafile=ca_file or None)


def unverified_context() -> ssl.SSLContext:
    """Accepts any certificate: used to read a certificate that did not verify."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def verify_message(exc: ssl.SSLCertVerificationError) -> str:
    """OpenSSL's words for the failure ("certificate has expired", "self-signed certificate")."""
    return str(exc.verify_message or exc.reason or exc)


def _item(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER item at `pos`."""
    if pos + 2 > len(der):
        raise ValueError("truncated DER")
    tag, length = der[pos], der[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or pos + count > len(der):
            raise ValueError("bad DER length")
        length = int.from_bytes(der[pos:pos + count], "big")
        pos += count
    if pos + length > len(der):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _children(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        item = _item(der, start)
        out.append(item)
        start = item[2]
    return out


def _asn1_time(tag: int, text: str) -> float:
    """UTCTime (YYMMDDHHMMSSZ, 1950-2049 per RFC 5280) or GeneralizedTime (YYYYMMDDHHMMSSZ)."""
    if not text.endswith("Z"):
        raise ValueError(f"certificate time not in UTC: {text!r}")
    digits = text[:-1]
    if tag == 0x17 and len(digits) == 12 and digits.isdigit():
        year = int(digits[:2])
        year += 1900 if year >= 50 else 2000
        rest = digits[2:]
    elif tag == 0x18 and len(digits) == 14 and digits.isdigit():
        year, rest = int(digits[:4]), digits[4:]
    else:
        raise ValueError(f"bad certificate time {text!r}")
    month, day, hour, minute, second = (int(rest[i:i + 2]) for i in range(0, 10, 2))
    return float(calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)))


def cert_not_after(der: bytes) -> float:
    """notAfter of an X.509 certificate in DER form, as Unix seconds.

    Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    serialNumber, signature, issuer, validity SEQUENCE { notBefore, notAfter } ... } ... }
    """
    tag, start, end = _item(der, 0)
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, start, end = _item(der, start)
    if tag != 0x30:
        raise ValueError("not a certificate")
    parts = _children(der, start, end)
    if parts and parts[0][0] == 0xA0:  # explicit version
        parts = parts[1:]
    if len(parts) < 4 or parts[3][0] != 0x30:
        raise ValueError("certificate has no validity")
    validity = _children(der, parts[3][1], parts[3][2])
    if len(validity) != 2:
        raise ValueError("certificate has no validity")
    tag, start, end = validity[1]
    return _asn1_time(tag, der[start:end].decode("ascii", "replace"))


def describe(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> tuple[str, float | None]:
    """(TLS version, the leaf certificate's notAfter) of an established connection."""
    if ssl_object is None:
        return "", None
    der = ssl_object.getpeercert(binary_form=True)
    not_after = None
    if der:
        try:
            not_after = cert_not_after(der)
        except ValueError:
            not_after = None
    return ssl_object.version() or "", not_after
