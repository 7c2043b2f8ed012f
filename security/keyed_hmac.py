"""HMAC with the key set up once per key: RFC 2104's precomputed pads.

`hmac.new()` and `hmac.digest()` set the key up again on every call, which with OpenSSL 3
costs more than hashing a short message. RFC 2104 section 4 notes that the hash states
after the inner and the outer padded key can be computed once per key; a KeyedHmac keeps
them and copies them for each message. The result is HMAC exactly (tests compare it with
hmac.new on keys of every length); CSRF tokens and TOTP codes are computed with it.
"""

from __future__ import annotations

import hashlib
from typing import Any

_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))


class KeyedHmac:
    __slots__ = ("name", "_inner", "_outer")

    def __init__(self, key: bytes, name: str = "sha256") -> None:
        inner: Any = hashlib.new(name)
        block = inner.block_size
        if len(key) > block:  # a long key is hashed first (RFC 2104 section 2)
            key = hashlib.new(name, key).digest()
        key = key.ljust(block, b"\0")
        inner.update(key.translate(_IPAD))
        self.name = name
        self._inner = inner
        self._outer: Any = hashlib.new(name, key.translate(_OPAD))

    def digest(self, message: bytes) -> bytes:
        return bytes(self._outer_of(message).digest())

    def hexdigest(self, message: bytes) -> str:
        return str(self._outer_of(message).hexdigest())

    def _outer_of(self, message: bytes) -> Any:
        """The outer hash of HMAC(key, message), ready for its digest."""
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer
