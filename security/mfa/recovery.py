"""Recovery codes: 80 random bits each, shown once, stored only as keyed hashes.

Written as four groups of four characters from Crockford's base32 alphabet (no I, L, O,
U), e.g. `7k2q-mz4x-0c9d-hh3w`; typing is forgiving (case, dashes, spaces, and I/L/O read
as 1/1/0). Each is good for one login: the store removes its hash atomically on use.
"""

from __future__ import annotations

import secrets

ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_CHARS = 16  # 16 x 5 bits = 80 bits
_READ_AS = str.maketrans({"i": "1", "l": "1", "o": "0"})


def new_codes(count: int) -> list[str]:
    codes = []
    for _ in range(count):
        raw = "".join(secrets.choice(ALPHABET) for _ in range(_CHARS))
        codes.append("-".join(raw[i:i + 4] for i in range(0, _CHARS, 4)))
    return codes


def normalize(code: str) -> str | None:
    """The code's canonical form, or None when it cannot be a recovery code."""
    text = code.strip().lower().replace("-", "").replace(" ", "").translate(_READ_AS)
    if len(text) != _CHARS or any(c not in ALPHABET for c in text):
        return None
    return text
