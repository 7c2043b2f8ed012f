"""What the identity parts (API keys, sessions, CSRF, passwords, OIDC, SAML, MFA) share:
their counters, one way to audit a verification, the in-process tables of records, and
what a record that is not the shape its owner writes becomes (absent, logged once).

Counters are plain dicts the exporter turns into metrics at scrape time; their keys
are methods, results and reasons only, never a user name, address or token.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, TypeGuard

from security.engine import Auditor, record_audit

log = logging.getLogger(__name__)


class Tally:
    """One count a hot path adds to (`tally.n += 1`: an attribute, no dict key to hash)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class IdentityStats:
    def __init__(self) -> None:
        self._verifications: dict[tuple[str, str], float] = {}  # (method, success|failure)
        self._successes: dict[str, Tally] = {}  # method -> its successes, counted apart
        self.failures: dict[tuple[str, str], float] = {}  # (method, reason)
        self.csrf_failures: dict[str, float] = {}  # reason
        self.password_rejections: dict[str, float] = {}  # reason

    @property
    def verifications(self) -> dict[tuple[str, str], float]:
        """Verifications by (method, success|failure), the tallied successes included."""
        counts = dict(self._verifications)
        for method, tally in tuple(self._successes.items()):
            if tally.n:
                key = (method, "success")
                counts[key] = counts.get(key, 0.0) + tally.n
        return counts

    def successes(self, method: str) -> Tally:
        """The tally of `method`'s successes, for a hot path to count on."""
        tally = self._successes.get(method)
        if tally is None:
            tally = self._successes[method] = Tally()
        return tally

    def verified(self, method: str, ok: bool, reason: str = "") -> None:
        key = (method, "success" if ok else "failure")
        self._verifications[key] = self._verifications.get(key, 0.0) + 1
        if not ok:
            self.failures[(method, reason)] = self.failures.get((method, reason), 0.0) + 1


def audit_verification(audit: Auditor | None, method: str, ok: bool, subject: str,
                       details: dict[str, Any] | None = None) -> None:
    """One auth.success / auth.failure record (the audit policy's flags decide); like the
    engine's, a failing audit log does not fail the verification (engine.record_audit)."""
    record_audit(audit, "auth.success" if ok else "auth.failure", method, subject,
                 {"method": method, **(details or {})})


class LocalTable:
    """What a check needs of one kind of record, by key, for a store that this process
    alone writes (memory, SQLite): filled from the store once (`loaded`), then changed by
    whoever changes the store, right after the store. Its owner says what the values are."""

    def __init__(self) -> None:
        self.rows: dict[str, Any] = {}
        self.loaded = False


# One table per (store object, kind), shared by every owner on that store; gone with it.
_TABLES: weakref.WeakKeyDictionary[Any, dict[str, LocalTable]] = weakref.WeakKeyDictionary()


def local_table(store: Any, kind: str) -> LocalTable | None:
    """The store's table of `kind`; None for a store other processes write too (Redis:
    `shared`), or one that does not say: then every check must read the store."""
    if getattr(store, "shared", True):
        return None
    tables = _TABLES.get(store)
    if tables is None:
        tables = _TABLES[store] = {}
    table = tables.get(kind)
    if table is None:
        table = tables[kind] = LocalTable()
    return table


_MALFORMED: set[tuple[str, str]] = set()  # (kind, key) of the records logged already


def malformed(kind: str, key: str, problem: str) -> None:
    """Logs once that the stored `kind` record under `key` is not the shape its owner
    writes (a hand edit, another program on the same Redis prefix): the owner treats it as
    absent (a check fails, a listing skips it) rather than answer 500 at every request.
    Names the kind and the problem, never the key (a session's is a hash of its id) or a
    value."""
    if (kind, key) in _MALFORMED or len(_MALFORMED) > 1000:
        return
    _MALFORMED.add((kind, key))
    log.warning("skipping a malformed %s record in the store: %s", kind, problem)


def is_number(value: Any) -> TypeGuard[int | float]:
    """A JSON number (bool is an int to Python, not to JSON)."""
    return isinstance(value, int | float) and not isinstance(value, bool)
