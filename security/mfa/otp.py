"""One-time codes sent by e-mail or SMS: issued, expiring, attempt-limited, single use.

Per user and channel the store holds one code, as a keyed hash with its expiry, and an
attempt counter. A new code replaces the old one and resets the counter. A check after
`max_attempts` wrong tries, or after expiry, removes the code; a right code is removed as
it is accepted (atomically, so two concurrent checks cannot both accept it).
"""

from __future__ import annotations

import hmac
import json
import secrets
from dataclasses import dataclass

from security.mfa.sealing import Sealer
from security.store import Store


@dataclass(frozen=True)
class CodeCheck:
    result: str  # ok | invalid | expired | no_code | too_many_attempts | replayed
    attempts_left: int
    issue: str = ""  # which issued code was checked (a prefix of its hash), "" for none


class OneTimeCodes:
    def __init__(self, store: Store, sealer: Sealer, digits: int, lifetime: float,
                 max_attempts: int):
        self.store, self.sealer = store, sealer
        self.digits, self.lifetime, self.max_attempts = digits, lifetime, max_attempts

    def _digest(self, user: str, channel: str, code: str) -> str:
        return self.sealer.digest(code, f"otp|{channel}|{user}")

    async def issue(self, user: str, channel: str, now: float) -> str:
        code = str(secrets.randbelow(10 ** self.digits)).zfill(self.digits)
        await self.store.mfa_pop(user, f"otp_tries:{channel}")
        await self.store.mfa_put(user, f"otp:{channel}", json.dumps(
            {"h": self._digest(user, channel, code), "exp": now + self.lifetime}))
        return code

    async def held(self, user: str, channel: str) -> tuple[str | None, str | None]:
        """The code in force and its attempt count, as stored, for `restore`."""
        return (await self.store.mfa_get(user, f"otp:{channel}"),
                await self.store.mfa_get(user, f"otp_tries:{channel}"))

    async def restore(self, user: str, channel: str, held: tuple[str | None, str | None]
                      ) -> None:
        """Puts back what `held` returned: a new code's delivery failed, and the one the
        user already has stays good, with the attempts it had used."""
        for field, value in zip((f"otp:{channel}", f"otp_tries:{channel}"), held,
                                strict=True):
            if value is None:
                await self.store.mfa_pop(user, field)
            else:
                await self.store.mfa_put(user, field, value)

    async def check(self, user: str, channel: str, code: str, now: float) -> CodeCheck:
        field = f"otp:{channel}"
        raw = await self.store.mfa_get(user, field)
        if raw is None:
            return CodeCheck("no_code", 0)
        record = json.loads(raw)
        issue = record["h"][:16]
        if now >= record["exp"]:
            await self.store.mfa_pop(user, field)
            return CodeCheck("expired", 0, issue)
        tries = await self.store.mfa_incr(user, f"otp_tries:{channel}")
        if tries > self.max_attempts:
            await self.store.mfa_pop(user, field)
            return CodeCheck("too_many_attempts", 0, issue)
        left = self.max_attempts - tries
        if not hmac.compare_digest(self._digest(user, channel, code), record["h"]):
            if left == 0:
                await self.store.mfa_pop(user, field)
            return CodeCheck("invalid", left, issue)
        if await self.store.mfa_pop(user, field) != raw:  # a concurrent check took it first
            return CodeCheck("replayed", 0, issue)
        await self.store.mfa_pop(user, f"otp_tries:{channel}")
        return CodeCheck("ok", left, issue)
