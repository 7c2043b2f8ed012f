"""Password policy after NIST SP 800-63B, and Argon2id for every password the engine keeps.

A password is accepted when it is long enough (and not absurdly long), is not on the
blocklist of common and breached passwords (the 30,000 most common of the Xato leak
corpus that zxcvbn ships, plus an operator's file), does not contain the user's name,
domain or a configured context word, reaches a zxcvbn strength score, and is not one
of the user's last `history_size` passwords. Composition rules (upper, lower, digit,
special) are off by default, as NIST advises, and can be switched on. Passwords are
NFKC-normalised first and their length counted in characters.

History entries are Argon2id hashes (argon2-cffi); checking them is deliberately slow,
so it runs on a worker thread.
"""

from __future__ import annotations

import asyncio
import functools
import re
import unicodedata
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

from security.engine import Auditor, record_audit
from security.identity import IdentityStats
from security.store import Record, Store

HISTORY_KIND = "pwhistory"
HASH_WORKERS = 2  # password checks and hashes at once (each Argon2id takes 64 MiB)
# Argon2id and zxcvbn run on threads of their own, HASH_WORKERS for the process (a reload's
# new policy shares them): on the loop's default executor a burst of checks held every
# thread, and the health checks queued behind them (/readyz 503 after 40 s)
_WORKERS = ThreadPoolExecutor(HASH_WORKERS, thread_name_prefix="passwords")
T = TypeVar("T")
ESTIMATE_CHARS = 72
"""zxcvbn looks at this many characters at most: its cost grows fast with length."""
MIN_CONTEXT_WORD = 3
MESSAGES = {
    "too_short": "shorter than {min_length} characters",
    "too_long": "longer than {max_length} characters",
    "blocklisted": "a commonly used or breached password",
    "context": "contains the user name, the domain or another word tied to this service",
    "too_weak": "too easy to guess (strength {score} of 4, at least {min_score} needed)",
    "reused": "one of the last {history_size} passwords of this user",
    "missing_uppercase": "needs an upper-case letter",
    "missing_lowercase": "needs a lower-case letter",
    "missing_digit": "needs a digit",
    "missing_special": "needs a character that is not a letter or digit",
}


@dataclass(frozen=True)
class PasswordSettings:
    min_length: int = 8
    max_length: int = 128
    require_uppercase: bool = False
    require_lowercase: bool = False
    require_digit: bool = False
    require_special: bool = False
    min_score: int = 2
    builtin_blocklist: bool = True
    blocklist_file: str = ""
    context_words: tuple[str, ...] = ()
    history_size: int = 5
    argon2_time_cost: int = 3
    argon2_memory_cost_kib: int = 65536
    argon2_parallelism: int = 4


@dataclass
class PasswordCheck:
    accepted: bool
    reasons: list[str]
    messages: list[str]
    score: int
    guesses_log10: float
    suggestions: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "reasons": self.reasons, "messages": self.messages,
                "score": self.score, "guesses_log10": round(self.guesses_log10, 2),
                "suggestions": self.suggestions}


@functools.cache
def _builtin_blocklist() -> frozenset[str]:
    from zxcvbn.frequency_lists import FREQUENCY_LISTS

    return frozenset(FREQUENCY_LISTS["passwords"])


def load_blocklist(path: str | Path) -> frozenset[str]:
    """One password per line (case-insensitive); blank lines and `#` comments skipped."""
    words = set()
    with Path(path).open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            word = line.rstrip("\r\n")
            if word and not word.startswith("#"):
                words.add(unicodedata.normalize("NFKC", word).casefold())
    return frozenset(words)


def context_words(user: str | None, extra: Iterable[str] = ()) -> list[str]:
    """The user name, its local part and domain labels, and the extra words, lower-cased."""
    words = [w.casefold() for w in extra]
    if user:
        user = user.casefold()
        local, _, domain = user.partition("@")
        words += [user, *re.split(r"[._+-]", local), local]
        if domain:
            labels = domain.split(".")
            words += [domain, *labels[:-1]]  # the TLD alone says nothing
    return sorted({w for w in words if len(w) >= MIN_CONTEXT_WORD})


class PasswordPolicy:
    def __init__(self, settings: PasswordSettings | None = None, store: Store | None = None,
                 audit: Auditor | None = None, stats: IdentityStats | None = None):
        self.settings = settings or PasswordSettings()
        self.store = store
        self.audit = audit
        self.stats = stats or IdentityStats()
        s = self.settings
        # the operator's file is read now (a bad one fails the config load); zxcvbn and
        # its lists (about 12 MB resident) only when the first password is checked
        self._file_blocklist = (load_blocklist(s.blocklist_file) if s.blocklist_file
                                else frozenset())
        self.hasher = PasswordHasher(time_cost=s.argon2_time_cost,
                                     memory_cost=s.argon2_memory_cost_kib,
                                     parallelism=s.argon2_parallelism, type=Type.ID)

    async def _work(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(_WORKERS, fn)

    @functools.cached_property
    def blocklist(self) -> frozenset[str]:
        builtin = _builtin_blocklist() if self.settings.builtin_blocklist else frozenset()
        return builtin | self._file_blocklist

    # --- Argon2id

    def hash(self, password: str) -> str:
        return self.hasher.hash(unicodedata.normalize("NFKC", password))

    def verify(self, hashed: str, password: str) -> bool:
        try:
            return self.hasher.verify(hashed, unicodedata.normalize("NFKC", password))
        except (VerificationError, InvalidHashError):
            return False

    # --- the policy

    def evaluate(self, password: str, user: str | None = None,
                 context: Iterable[str] = ()) -> PasswordCheck:
        """Every rule but the history (which needs the store)."""
        s = self.settings
        pw = unicodedata.normalize("NFKC", password)
        folded = pw.casefold()
        reasons = []
        if len(pw) < s.min_length:
            reasons.append("too_short")
        if len(pw) > s.max_length:
            reasons.append("too_long")
        if folded in self.blocklist:
            reasons.append("blocklisted")
        words = context_words(user, [*s.context_words, *context])
        if any(word in folded for word in words):
            reasons.append("context")
        for flag, reason, test in (
                (s.require_uppercase, "missing_uppercase", str.isupper),
                (s.require_lowercase, "missing_lowercase", str.islower),
                (s.require_digit, "missing_digit", str.isdigit),
                (s.require_special, "missing_special", lambda c: not c.isalnum())):
            if flag and not any(test(c) for c in pw):
                reasons.append(reason)
        # zxcvbn fails on the empty string (an IndexError): nothing to estimate, score 0
        nothing: dict[str, Any] = {"score": 0, "guesses_log10": 0.0, "feedback": {}}
        from zxcvbn import zxcvbn

        estimate = zxcvbn(pw[:ESTIMATE_CHARS], user_inputs=words) if pw else nothing
        score = int(estimate["score"])
        if score < s.min_score:
            reasons.append("too_weak")
        feedback = estimate.get("feedback") or {}
        suggestions = [x for x in [feedback.get("warning"), *feedback.get("suggestions", [])]
                       if x]
        return PasswordCheck(not reasons, reasons, [], score,
                             float(estimate["guesses_log10"]), suggestions)

    async def check(self, password: str, user: str | None = None,
                    context: Iterable[str] = (), *, actor: str = "api") -> PasswordCheck:
        """The whole policy, history included; counted and audited (never the password)."""
        context = list(context)
        result = await self._work(lambda: self.evaluate(password, user, context))
        if user and await self._reused(user, password):
            result.reasons.append("reused")
            result.accepted = False
        params = {**self.settings.__dict__, "score": result.score}
        result.messages = [MESSAGES[r].format(**params) for r in result.reasons]
        for reason in result.reasons:
            self.stats.password_rejections[reason] = (
                self.stats.password_rejections.get(reason, 0.0) + 1)
        record_audit(self.audit, "password.accepted" if result.accepted else
                     "password.rejected", actor, user or "",
                     {"reasons": result.reasons, "score": result.score})
        return result

    async def _reused(self, user: str, password: str) -> bool:
        if self.store is None or self.settings.history_size <= 0:
            return False
        record = await self.store.get_record(HISTORY_KIND, user, 0.0)
        hashes = record.data["hashes"] if record is not None else []
        recent = hashes[-self.settings.history_size:]
        return await self._work(lambda: any(self.verify(h, password) for h in recent))

    async def remember(self, user: str, password: str, *, actor: str = "api") -> int:
        """Adds a password the user now has to the history (as Argon2id); returns its length."""
        if self.store is None:
            raise RuntimeError("password history needs a store")
        hashed = await self._work(lambda: self.hash(password))
        record = await self.store.get_record(HISTORY_KIND, user, 0.0)
        hashes = [*(record.data["hashes"] if record is not None else []), hashed]
        hashes = hashes[-max(1, self.settings.history_size):]
        await self.store.put_record(Record(HISTORY_KIND, user, {"hashes": hashes}))
        record_audit(self.audit, "password.history", actor, user, {"length": len(hashes)})
        return len(hashes)

    async def forget(self, user: str, *, actor: str = "api") -> bool:
        """Drops a user's password history (the account is gone)."""
        if self.store is None:
            return False
        removed = await self.store.delete_record(HISTORY_KIND, user) is not None
        if removed:
            record_audit(self.audit, "password.history", actor, user, {"length": 0})
        return removed
