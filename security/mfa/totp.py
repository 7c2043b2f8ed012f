"""TOTP (RFC 6238): secrets, provisioning URIs, QR codes, and the code check.

pyotp writes the `otpauth://` URI (and checks the secret length); the check itself
computes the few candidate codes with one-shot `hmac.digest` calls, which is the same
RFC 4226 truncation pyotp does (tests compare the two and the RFC test vectors) at a
fraction of the cost.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import io
import secrets
from dataclasses import dataclass

import pyotp
import segno

from security.keyed_hmac import KeyedHmac

MIN_SECRET_BYTES = 20  # 160 bits, RFC 4226's recommendation
_DIGESTS = {"SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}


@dataclass(frozen=True)
class TotpParams:
    digits: int = 6
    period: int = 30
    algorithm: str = "SHA1"  # SHA1 | SHA256 | SHA512 (authenticator apps know SHA1 best)


def new_secret(nbytes: int = MIN_SECRET_BYTES) -> bytes:
    if nbytes < MIN_SECRET_BYTES:
        raise ValueError(f"a TOTP secret needs at least {MIN_SECRET_BYTES} bytes (160 bits)")
    return secrets.token_bytes(nbytes)


def base32(key: bytes) -> str:
    """The secret as authenticator apps take it: base32 without padding."""
    return base64.b32encode(key).decode("ascii").rstrip("=")


def provisioning_uri(key: bytes, user: str, issuer: str, params: TotpParams) -> str:
    otp = pyotp.TOTP(base32(key), digits=params.digits, interval=params.period,
                     digest=getattr(hashlib, _DIGESTS[params.algorithm]))
    return otp.provisioning_uri(name=user, issuer_name=issuer)


def qr_svg(uri: str) -> str:
    """A standalone SVG document of the URI's QR code (to show once, at enrolment)."""
    out = io.BytesIO()
    segno.make(uri, error="m").save(out, kind="svg", scale=4, xmldecl=False)
    return out.getvalue().decode("utf-8")


def step(now: float, params: TotpParams) -> int:
    """The RFC 6238 time step (counter) at Unix time now."""
    return int(now // params.period)


def code_at(key: bytes, counter: int, params: TotpParams) -> str:
    """RFC 4226 HOTP value for counter: dynamic truncation of the HMAC."""
    return _truncated(hmac.digest(key, counter.to_bytes(8, "big"), _DIGESTS[params.algorithm]),
                      params.digits)


def _truncated(mac: bytes, digits: int) -> str:
    offset = mac[-1] & 0x0F
    value = int.from_bytes(mac[offset:offset + 4], "big") & 0x7FFFFFFF
    return str(value % 10 ** digits).zfill(digits)


def keyed(key: bytes, params: TotpParams) -> KeyedHmac:
    """The secret with its HMAC key set up once, for match() to reuse across calls."""
    return KeyedHmac(key, keyed_name(params))


def keyed_name(params: TotpParams) -> str:
    """The hashlib name of the HMAC the codes use (KeyedHmac.name of a keyed secret)."""
    return _DIGESTS[params.algorithm]


def match(key: bytes | KeyedHmac, code: str, counter: int, params: TotpParams, skew: int,
          drift: int = 0) -> int | None:
    """The offset (-skew..skew) from counter at which code is valid, or None.

    The user's last observed drift is tried first (the likely match), then the rest of
    the window; the window itself never widens beyond skew steps. `key` is the secret,
    or keyed(secret, params) made once for it (the same codes, cheaper).
    """
    if isinstance(key, KeyedHmac):
        if key.name != _DIGESTS[params.algorithm]:
            raise ValueError(f"the secret was keyed for {key.name}, not {params.algorithm}")
        mac = key
    else:
        mac = keyed(key, params)
    expected = code.encode("ascii")
    digits = params.digits
    for offset in _search_order(skew, drift):
        at = counter + offset
        if at >= 0 and hmac.compare_digest(
                _truncated(mac.digest(at.to_bytes(8, "big")), digits).encode("ascii"),
                expected):
            return offset
    return None


@functools.cache
def _search_order(skew: int, drift: int) -> tuple[int, ...]:
    return tuple(sorted(range(-skew, skew + 1), key=lambda o: (o != drift, abs(o), o)))


def normalize(code: str) -> str:
    """The code as typed, without spaces or dashes (apps show "123 456")."""
    return code.replace(" ", "").replace("-", "")


def well_formed(code: str, digits: int) -> bool:
    """Exactly `digits` ASCII digits (str.isdigit alone would take other scripts' digits)."""
    return len(code) == digits and code.isascii() and code.isdigit()
