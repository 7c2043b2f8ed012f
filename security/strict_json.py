"""JSON from the network, parsed so that what json.loads lets through cannot break what
later stores, hashes or answers with the values.

json.loads accepts a lone surrogate escape ("\\ud800"): the string it gives holds a code
point no UTF-8 encoder takes, so SQLite's flush, the audit log's query answer or a JSON
answer would each fail on it later, long after the request was answered. It accepts NaN
and Infinity, which no JSON answer or audit record may hold (and a NaN duration compares
false with everything). And a deeply nested document raises RecursionError, which is not
a ValueError. And it keeps the last of two values for one key, where a proxy, a WAF or a
log reader may keep the first: {"user": "a", "user": "b"} meant two users at once. All are
refused here as ValueError, the error every caller already turns into its protocol's "bad
request".
"""

from __future__ import annotations

import json
import math
from typing import Any


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: Infinity by another name
        raise ValueError(f"{text} is out of range for a JSON number")
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):  # the usual object pays one length comparison
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key[:64]!a}")
            seen.add(key)
    return value


# json.loads's own decoder but for the constants, overflowing numbers and repeated keys; its
# scan_once serves a caller's fast path (the C scanner calls the hooks too)
DECODER = json.JSONDecoder(parse_constant=_constant, parse_float=_number,
                           object_pairs_hook=_object)


def loads(text: str) -> Any:
    """json.loads(text), refusing lone surrogates, NaN and Infinity, a key twice in one
    object, and nesting too deep to parse."""
    try:
        value = DECODER.decode(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if "\\u" in text:
        check_text(value)
    return value


def check_text(value: Any) -> None:
    """Raises ValueError when a string in value (a key too) is not Unicode text: only a
    \\u escape can put a lone surrogate there, so callers ask only when the text has one."""
    try:
        # ensure_ascii=False leaves each string as it is, so encoding the whole document
        # checks every string at once, in C
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"a string holds a lone surrogate ({exc.object[exc.start:exc.end]!a}"
                         "), which is not Unicode text") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
