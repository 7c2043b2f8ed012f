"""JSON from the network, parsed so that what json.loads lets through cannot break what
later stores, hashes or answers with the values.

json.loads accepts a lone surrogate escape ("\\ud800"): the string it gives holds a code
point no UTF-8 encoder takes, so SQLite's flush, the audit log's query answer or a JSON
answer would each fail on it later, long after the request was answered. And a deeply
nested document raises RecursionError, which is not a ValueError. Both are refused here
as ValueError, the error every caller already turns into its protocol's "bad request".
"""

from __future__ import annotations

import json
from typing import Any


def loads(text: str) -> Any:
    """json.loads(text), refusing lone surrogates and nesting too deep to parse."""
    try:
        value = json.loads(text)
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
