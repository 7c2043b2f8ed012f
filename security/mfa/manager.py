"""MfaManager: enrolment and verification of second factors, and when one is required.

Factors: TOTP (with recovery codes), one-time codes by e-mail or SMS, and WebAuthn.
Everything lives in the engine's store (fields per user, see Store.mfa_*), so it
survives restarts and several replicas share it through Redis; TOTP secrets are sealed
with AES-GCM and codes are kept only as keyed hashes (sealing.py).

Every verification passes the same guard first: a GCRA rate limit per user
(`verify_rate`/`verify_window`/`verify_burst`, in this process) and a failure count per
user in the store (`max_failures` distinct wrong codes within `failure_window` refuse
further tries until the window passes, on every replica). Every success, failure and
change is audited (never a code or a secret) and counted by method and result.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from security.attempts import parse_ip
from security.blocklist import CidrSet, Entry, prefix_of
from security.engine import Auditor, record_audit
from security.keyed_hmac import KeyedHmac
from security.mfa import recovery, totp
from security.mfa.delivery import DeliveryError, Sender
from security.mfa.otp import OneTimeCodes
from security.mfa.sealing import Sealer, SealError
from security.mfa.settings import MfaSettings
from security.ratelimit import RateLimiter
from security.store import Store

log = logging.getLogger(__name__)

METHODS = ("totp", "recovery", "email", "sms", "webauthn")
PENDING_RECOVERY = "rcp:"  # recovery codes of a TOTP secret not yet confirmed
# A verification's details that go into its audit record (no codes, no secrets).
_AUDITED_DETAILS = frozenset({"drift_steps", "confirmed", "remaining", "credential_id",
                              "sign_count"})
UNSEALED_CACHE = 10_000  # TOTP records kept parsed and unsealed (oldest dropped first)


class MfaError(Exception):
    """A request that cannot be carried out; `reason` says why (the API maps it)."""

    def __init__(self, reason: str, message: str, retry_after: float = 0.0):
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True)
class LoginContext:
    """Where a verification comes from; on success the device and network are remembered,
    so later logins from them need no second factor (see `second_factor_reason`)."""

    remote_ip: str = ""
    device_id: str = ""
    actor: str = "api"  # who asks, as the audit log names it (apikey:<id>, admin)


@dataclass(frozen=True)
class Verification:
    valid: bool
    method: str
    reason: str  # ok | invalid | replayed | expired | no_code | too_many_attempts |
    #              rate_limited | locked | not_enrolled | no_challenge | cloned
    details: dict[str, Any] = field(default_factory=dict)
    retry_after: float = 0.0

    def __init__(self, valid: bool, method: str, reason: str,
                 details: dict[str, Any] | None = None, retry_after: float = 0.0) -> None:
        """The fields in one dict update: the generated __init__ of a frozen dataclass
        sets each through object.__setattr__, most of what building one costs (one per
        verification). The instance stays frozen."""
        vars(self).update(valid=valid, method=method, reason=reason,
                          details={} if details is None else details, retry_after=retry_after)

    def as_dict(self) -> dict[str, Any]:
        out = {"valid": self.valid, "method": self.method, "reason": self.reason,
               **self.details}
        if self.retry_after:
            out["retry_after"] = round(self.retry_after, 3)
        return out


class MfaStats:
    """Plain counters the exporter turns into metrics (methods and results only)."""

    def __init__(self) -> None:
        self.verifications: dict[tuple[str, str], float] = {}  # (method, result)
        self.enrollments: dict[tuple[str, str], float] = {}  # (method, action)
        self.deliveries: dict[tuple[str, str], float] = {}  # (channel, result)

    @staticmethod
    def count(table: dict[tuple[str, str], float], key: tuple[str, str]) -> None:
        table[key] = table.get(key, 0.0) + 1


def normalize_user(user: str) -> str:
    """The account as the engine tracks it (attempts.tracking_keys): trimmed, lower case."""
    return user.strip().lower()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class MfaManager:
    def __init__(self, settings: MfaSettings, store: Store, sealer: Sealer,
                 audit: Auditor | None = None, senders: dict[str, Sender] | None = None,
                 clock: Callable[[], float] = time.time, ipv6_prefix_length: int = 64):
        self.store = store
        self.sealer = sealer
        self.audit = audit
        self.clock = clock
        self.stats = MfaStats()
        self.limiter = RateLimiter()
        self.ipv6_prefix_length = ipv6_prefix_length
        self._unsealed: dict[str, tuple[dict[str, Any], KeyedHmac]] = {}
        self.configure(settings, senders or {})

    def configure(self, settings: MfaSettings, senders: dict[str, Sender]) -> None:
        """Applies new settings and senders (also on reload)."""
        self.settings = settings
        self.senders = senders
        self.codes = OneTimeCodes(self.store, self.sealer, settings.code_digits,
                                  settings.code_lifetime, settings.code_max_attempts)
        now = self.clock()
        self._risky = CidrSet([Entry(n, "risky network", "config", now)
                               for n in settings.policy.risky_networks])

    # --- the guard and the bookkeeping every verification shares

    async def _guard(self, user: str, method: str, now: float) -> tuple[Verification | None,
                                                                        int]:
        """A refusal when the user may not try now, else None and the failures so far."""
        limit = self.limiter.hit("mfa", user, self.settings.verify_limit, now)
        if not limit.allowed:
            return Verification(False, method, "rate_limited",
                                retry_after=limit.retry_after), 0
        failures = await self.store.failure_count(f"m:{user}", now,
                                                  self.settings.failure_window)
        if failures >= self.settings.max_failures:
            return Verification(False, method, "locked",
                                retry_after=self.settings.failure_window), failures
        return None, failures

    async def _failed(self, user: str, method: str, reason: str, attempt: str, now: float,
                      details: dict[str, Any] | None = None,
                      context: LoginContext | None = None) -> Verification:
        """Counts a wrong code (attempt: its keyed hash, so a retyped one counts once)."""
        await self.store.record_failure(f"m:{user}", attempt, now, self.settings.failure_window)
        return self._finish(Verification(False, method, reason, details or {}), user, context)

    async def _succeeded(self, user: str, method: str, failures: int, now: float,
                         context: LoginContext | None,
                         details: dict[str, Any] | None = None) -> Verification:
        if failures:
            await self.store.clear_failures(f"m:{user}")
        if context is not None and (context.remote_ip or context.device_id):
            await self._remember(user, context, now)
        return self._finish(Verification(True, method, "ok", details or {}), user, context)

    def _finish(self, result: Verification, user: str,
                context: LoginContext | None = None) -> Verification:
        self.stats.count(self.stats.verifications,
                         (result.method, "success" if result.valid else result.reason))
        if self.audit is not None:
            details = {"method": result.method, "reason": result.reason}
            for key, value in result.details.items():  # a loop: a comprehension is a call
                if key in _AUDITED_DETAILS:
                    details[key] = value
            if context is not None and context.remote_ip:
                details["remote_ip"] = context.remote_ip
            self._audit("mfa.verify.success" if result.valid else "mfa.verify.failure",
                        context.actor if context is not None else "api", user, details)
        return result

    def _audit(self, type_: str, actor: str, subject: str, details: dict[str, Any]) -> None:
        record_audit(self.audit, type_, actor, subject, details)

    # --- TOTP

    async def enroll_totp(self, user: str, actor: str = "admin") -> dict[str, Any]:
        """A new secret, its otpauth:// URI and QR code, and new recovery codes. The secret
        counts as confirmed after its first good code. A user with a confirmed secret
        keeps it, and its recovery codes, until the new one is confirmed: an enrolment
        begun and never finished (or begun by whoever holds a session) must not leave the
        account without its second factor."""
        user = normalize_user(user)
        now = self.clock()
        s = self.settings
        key = totp.new_secret(s.secret_bytes)
        current = await self.store.mfa_get(user, "totp")
        replaced = current is not None
        record = {"s": self.sealer.seal(key, f"totp|{user}"), "c": False, "d": 0, "t": now}
        if current is not None and json.loads(current)["c"]:
            await self.store.mfa_put(user, "totp_pending", json.dumps(record))
            codes = await self._replace_recovery_codes(user, PENDING_RECOVERY)
        else:
            await self.store.mfa_put(user, "totp", json.dumps(record))
            await self.store.mfa_pop(user, "totp_pending")
            await self.store.mfa_pop(user, "totp_step")  # a new secret has no used steps
            codes = await self._replace_recovery_codes(user)
        uri = totp.provisioning_uri(key, user, s.issuer, s.totp)
        self.stats.count(self.stats.enrollments, ("totp", "enroll"))
        self._audit("mfa.totp.enroll", actor, user, {"replaced": replaced,
                                                     "recovery_codes": len(codes)})
        return {"user": user, "secret": totp.base32(key), "provisioning_uri": uri,
                "qr_svg": totp.qr_svg(uri), "recovery_codes": codes, "confirmed": False,
                "digits": s.totp.digits, "period": s.totp.period,
                "algorithm": s.totp.algorithm}

    async def verify_totp(self, user: str, code: str,
                          context: LoginContext | None = None) -> Verification:
        """Checks a code within skew_steps of now, never accepting a time step twice (the
        last accepted step is kept in the store, atomically advanced)."""
        user = normalize_user(user)
        now = self.clock()
        refused, failures = await self._guard(user, "totp", now)
        if refused is not None:
            return self._finish(refused, user, context)
        raw = await self.store.mfa_get(user, "totp")
        if raw is None:
            return self._finish(Verification(False, "totp", "not_enrolled"), user, context)
        params = self.settings.totp
        code = totp.normalize(code)
        counter = totp.step(now, params)
        attempt = self._attempt(user, code, counter)
        if not totp.well_formed(code, params.digits):
            return await self._failed(user, "totp", "invalid", attempt, now, context=context)
        record, key = self._totp_record(user, raw, params)
        offset = totp.match(key, code, counter, params, self.settings.skew_steps, record["d"])
        pending = None
        if offset is None:  # a new secret waiting for its first code, if any
            pending = await self.store.mfa_get(user, "totp_pending")
            if pending is not None:
                record, key = self._totp_record(user, pending, params)
                offset = totp.match(key, code, counter, params, self.settings.skew_steps, 0)
        if offset is None:
            return await self._failed(user, "totp", "invalid", attempt, now, context=context)
        if not await self.store.mfa_advance(user, "totp_step", counter + offset):
            return await self._failed(user, "totp", "replayed", attempt, now, context=context)
        confirmed_now = not record["c"]
        if confirmed_now or record["d"] != offset:
            record = {**record, "c": True, "d": offset}
            await self.store.mfa_put(user, "totp", json.dumps(record))
            if pending is not None:  # the new secret replaces the old, with its codes
                await self.store.mfa_pop(user, "totp_pending")
                await self._promote_recovery_codes(user)
            if confirmed_now:
                self.stats.count(self.stats.enrollments, ("totp", "confirm"))
                self._audit("mfa.totp.confirm", context.actor if context is not None else "api",
                            user, {"replaced": pending is not None})
        return await self._succeeded(user, "totp", failures, now, context,
                                     {"drift_steps": offset, "confirmed": True})

    def _attempt(self, user: str, code: str, counter: int) -> str:
        """A wrong code as the failure counter keeps it: a keyed hash, never the code. The
        failures are counted distinct (a user retyping one code is one failure), but the
        same code at another time step is a new guess against a new code: the step is in
        the hash, or repeating a few codes would never reach max_failures."""
        return self.sealer.digest(f"{counter}|{code[:64]}", f"totp|{user}")

    def _totp_record(self, user: str, raw: str, params: totp.TotpParams
                     ) -> tuple[Mapping[str, Any], KeyedHmac]:
        """The stored record, parsed, and its secret, unsealed and keyed for HMAC. Both are
        cached by the sealed text (a process holding the key can unseal anyway), so a
        verification costs no JSON parse, AES-GCM decryption or HMAC key setup; a changed
        record has a new text, a changed algorithm (a reload) keys the secret again. The
        record is the cached one: a change goes into a copy."""
        cached = self._unsealed.get(raw)
        if cached is not None and cached[1].name != totp.keyed_name(params):
            cached = None
        if cached is None:
            record = json.loads(raw)
            try:
                key = self.sealer.open(record["s"], f"totp|{user}")
            except SealError as exc:
                log.error("TOTP secret does not open; re-enrol the user or restore the key",
                          extra={"problem": str(exc)})
                raise MfaError("sealed_secret", "the stored TOTP secret cannot be decrypted "
                                                "with the configured key") from None
            cached = self._unsealed[raw] = (record, totp.keyed(key, params))
            if len(self._unsealed) > UNSEALED_CACHE:
                del self._unsealed[next(iter(self._unsealed))]
        return cached[0], cached[1]

    async def remove_totp(self, user: str, actor: str = "admin") -> bool:
        user = normalize_user(user)
        removed = await self.store.mfa_pop(user, "totp") is not None
        await self.store.mfa_pop(user, "totp_pending")
        await self.store.mfa_pop(user, "totp_step")
        await self.store.mfa_delete(user, "rc:")
        await self.store.mfa_delete(user, PENDING_RECOVERY)
        if removed:
            self.stats.count(self.stats.enrollments, ("totp", "remove"))
            self._audit("mfa.totp.remove", actor, user, {})
        return removed

    # --- recovery codes

    async def _replace_recovery_codes(self, user: str, prefix: str = "rc:") -> list[str]:
        """New recovery codes under `prefix`: rc: in force, PENDING_RECOVERY waiting for a
        new TOTP secret's first code."""
        await self.store.mfa_delete(user, prefix)
        codes = recovery.new_codes(self.settings.recovery_codes)
        for code in codes:
            digest = self.sealer.digest(recovery.normalize(code) or "", f"recovery|{user}")
            await self.store.mfa_put(user, f"{prefix}{digest}", str(int(self.clock())))
        return codes

    async def _promote_recovery_codes(self, user: str) -> None:
        """The pending recovery codes replace those in force (a new secret is confirmed)."""
        fields = await self.store.mfa_fields(user)
        await self.store.mfa_delete(user, "rc:")
        for name, value in fields.items():
            if name.startswith(PENDING_RECOVERY):
                await self.store.mfa_put(user, "rc:" + name[len(PENDING_RECOVERY):], value)
        await self.store.mfa_delete(user, PENDING_RECOVERY)

    async def new_recovery_codes(self, user: str, actor: str = "admin") -> list[str]:
        """Replaces the user's recovery codes (the old ones stop working)."""
        user = normalize_user(user)
        if await self.store.mfa_get(user, "totp") is None:
            raise MfaError("not_enrolled", "recovery codes come with TOTP: enrol it first")
        codes = await self._replace_recovery_codes(user)
        self._audit("mfa.recovery.generate", actor, user, {"count": len(codes)})
        return codes

    async def verify_recovery(self, user: str, code: str,
                              context: LoginContext | None = None) -> Verification:
        user = normalize_user(user)
        now = self.clock()
        refused, failures = await self._guard(user, "recovery", now)
        if refused is not None:
            return self._finish(refused, user, context)
        canonical = recovery.normalize(code)
        digest = self.sealer.digest(canonical or code[:64], f"recovery|{user}")
        if canonical is None or await self.store.mfa_pop(user, f"rc:{digest}") is None:
            return await self._failed(user, "recovery", "invalid", digest, now, context=context)
        left = len([f for f in await self.store.mfa_fields(user) if f.startswith("rc:")])
        return await self._succeeded(user, "recovery", failures, now, context,
                                     {"remaining": left})

    # --- one-time codes by e-mail and SMS

    async def send_code(self, user: str, channel: str, destination: str,
                        actor: str = "api") -> dict[str, Any]:
        """Sends a new code to destination (an e-mail address, an E.164 number)."""
        sender = self.senders.get(channel)
        if sender is None:
            raise MfaError("channel_disabled", f"{channel} codes are not configured "
                                               f"(security.mfa.{channel}.enabled)")
        user = normalize_user(user)
        now = self.clock()
        try:  # before the rate limit and the new code: a bad request costs the user nothing
            sender.check(destination)
        except DeliveryError as exc:
            self._send_failed(channel, exc, actor, user)
            raise
        limit = self.limiter.hit(f"send:{channel}", user, self.settings.send_limit, now)
        if not limit.allowed:
            self.stats.count(self.stats.deliveries, (channel, "rate_limited"))
            raise MfaError("rate_limited", "a code was sent moments ago; wait before asking "
                                           "for another", limit.retry_after)
        limit = self.limiter.hit(f"send-destination:{channel}",
                                 self._destination_key(channel, destination),
                                 self.settings.destination_limit, now)
        if not limit.allowed:  # one number for many user names: SMS pumping
            self.stats.count(self.stats.deliveries, (channel, "destination_limited"))
            raise MfaError("rate_limited", "this destination got its codes for now; wait "
                                           "before asking for another", limit.retry_after)
        held = await self.codes.held(user, channel)
        code = await self.codes.issue(user, channel, now)
        try:
            await sender.send(destination, code, self.settings.code_lifetime)
        except DeliveryError as exc:
            await self.codes.restore(user, channel, held)  # the code delivered before stays
            self._send_failed(channel, exc, actor, user)
            raise
        self.stats.count(self.stats.deliveries, (channel, "sent"))
        self._audit("mfa.code.send", actor, user, {"channel": channel, "outcome": "sent",
                                                   "destination": destination})
        return {"sent": True, "channel": channel,
                "expires_in": self.settings.code_lifetime,
                "max_attempts": self.settings.code_max_attempts}

    def _destination_key(self, channel: str, destination: str) -> str:
        """A keyed hash of the destination: the limiter's state never holds the number or
        address itself (e-mail addresses compared in lower case)."""
        return self.sealer.digest(destination.lower(), f"send-destination:{channel}")

    def _send_failed(self, channel: str, exc: DeliveryError, actor: str, user: str) -> None:
        self.stats.count(self.stats.deliveries, (channel, exc.reason))
        self._audit("mfa.code.send", actor, user, {"channel": channel, "outcome": exc.reason,
                                                   "problem": str(exc)})

    async def verify_code(self, user: str, channel: str, code: str,
                          context: LoginContext | None = None) -> Verification:
        user = normalize_user(user)
        now = self.clock()
        refused, failures = await self._guard(user, channel, now)
        if refused is not None:
            return self._finish(refused, user, context)
        code = totp.normalize(code)
        check = await self.codes.check(user, channel, code, now)
        # distinct per issued code: one wrong code tried against each new code is a new
        # guess each time (the lock would never come otherwise)
        attempt = self.sealer.digest(f"{check.issue}|{code}", f"otp|{channel}|{user}")
        if check.result != "ok":
            return await self._failed(user, channel, check.result, attempt, now,
                                      {"attempts_left": check.attempts_left}, context=context)
        return await self._succeeded(user, channel, failures, now, context)

    # --- WebAuthn

    async def _credentials(self, user: str) -> dict[str, dict[str, Any]]:
        fields = await self.store.mfa_fields(user)
        out = {}
        for name, raw in fields.items():
            if name.startswith("wa:"):
                cred = json.loads(raw)
                cred["sign_count"] = int(fields.get(f"wacount:{name[3:]}", "0"))
                out[name[3:]] = cred
        return out

    async def _challenge(self, user: str, purpose: str, challenge: bytes, now: float) -> None:
        await self.store.mfa_put(user, f"wa_challenge:{purpose}", json.dumps(
            {"c": _b64(challenge), "exp": now + self.settings.webauthn.challenge_timeout}))

    async def _take_challenge(self, user: str, purpose: str, now: float) -> bytes | None:
        """The pending challenge, removed: each can be answered once."""
        raw = await self.store.mfa_pop(user, f"wa_challenge:{purpose}")
        if raw is None:
            return None
        record = json.loads(raw)
        return None if now >= record["exp"] else _unb64(record["c"])

    async def webauthn_register_options(self, user: str,
                                        display_name: str = "") -> dict[str, Any]:
        from security.mfa import webauthn as wa  # py_webauthn: ~12 MB, on first use

        user = normalize_user(user)
        now = self.clock()
        handle_text = await self.store.mfa_get(user, "wa_handle")
        if handle_text is None:  # a random user handle: the user name never reaches it
            handle_text = _b64(secrets.token_bytes(32))
            await self.store.mfa_put(user, "wa_handle", handle_text)
        options, challenge = wa.registration_options(
            self.settings.webauthn, user, _unb64(handle_text), display_name,
            list(await self._credentials(user)))
        await self._challenge(user, "register", challenge, now)
        return options

    async def webauthn_register(self, user: str, credential: dict[str, Any], name: str = "",
                                actor: str = "api") -> dict[str, Any]:
        from security.mfa import webauthn as wa  # py_webauthn: ~12 MB, on first use

        user = normalize_user(user)
        now = self.clock()
        challenge = await self._take_challenge(user, "register", now)
        if challenge is None:
            raise MfaError("no_challenge", "no registration pending (or it expired): ask "
                                           "for registration options first")
        try:
            new = wa.verify_registration(self.settings.webauthn, credential, challenge)
        except wa.WebAuthnError as exc:
            self._audit("mfa.webauthn.register", actor, user, {"outcome": exc.reason,
                                                               "problem": str(exc)})
            raise MfaError(exc.reason, str(exc)) from None
        if await self.store.mfa_get(user, f"wa:{new.id}") is not None:
            raise MfaError("already_registered", "this credential is already registered")
        record = {"pk": _b64(new.public_key), "fmt": new.fmt, "aaguid": new.aaguid,
                  "name": name, "created": now, "user_verified": new.user_verified,
                  "backed_up": new.backed_up, "last_used": None, "cloned": None}
        await self.store.mfa_put(user, f"wa:{new.id}", json.dumps(record))
        await self.store.mfa_put(user, f"wacount:{new.id}", str(new.sign_count))
        self.stats.count(self.stats.enrollments, ("webauthn", "enroll"))
        self._audit("mfa.webauthn.register", actor, user, {
            "outcome": "registered", "credential_id": new.id, "fmt": new.fmt,
            "aaguid": new.aaguid})
        return _credential_view(new.id, {**record, "sign_count": new.sign_count})

    async def webauthn_authenticate_options(self, user: str) -> dict[str, Any]:
        from security.mfa import webauthn as wa  # py_webauthn: ~12 MB, on first use

        user = normalize_user(user)
        usable = [cid for cid, cred in (await self._credentials(user)).items()
                  if not cred["cloned"]]
        if not usable:
            raise MfaError("not_enrolled", "no usable WebAuthn credential registered")
        options, challenge = wa.authentication_options(self.settings.webauthn, usable)
        await self._challenge(user, "authenticate", challenge, self.clock())
        return options

    async def webauthn_authenticate(self, user: str, credential: dict[str, Any],
                                    context: LoginContext | None = None) -> Verification:
        from security.mfa import webauthn as wa  # py_webauthn: ~12 MB, on first use

        user = normalize_user(user)
        now = self.clock()
        refused, failures = await self._guard(user, "webauthn", now)
        if refused is not None:
            return self._finish(refused, user, context)
        challenge = await self._take_challenge(user, "authenticate", now)
        try:
            cid = wa.assertion_credential_id(credential)
        except wa.WebAuthnError:
            return await self._failed(user, "webauthn", "invalid", "malformed", now,
                                      context=context)
        if challenge is None:
            return await self._failed(user, "webauthn", "no_challenge", cid, now, context=context)
        raw = await self.store.mfa_get(user, f"wa:{cid}")
        if raw is None:
            return await self._failed(user, "webauthn", "invalid", cid, now, context=context)
        record = json.loads(raw)
        if record["cloned"]:
            return await self._failed(user, "webauthn", "cloned", cid, now,
                                      {"credential_id": cid}, context=context)
        stored = int(await self.store.mfa_get(user, f"wacount:{cid}") or "0")
        try:
            new_count, regressed = wa.verify_assertion(self.settings.webauthn, credential,
                                                       challenge, _unb64(record["pk"]), stored)
        except wa.WebAuthnError:
            return await self._failed(user, "webauthn", "invalid", cid, now, context=context)
        advanced = new_count == 0 or await self.store.mfa_advance(
            user, f"wacount:{cid}", new_count)
        if regressed or not advanced:
            record["cloned"] = now
            await self.store.mfa_put(user, f"wa:{cid}", json.dumps(record))
            self._audit("mfa.webauthn.clone", "engine", user, {
                "credential_id": cid, "stored_sign_count": stored, "sign_count": new_count})
            return await self._failed(user, "webauthn", "cloned", cid, now,
                                      {"credential_id": cid, "sign_count": new_count},
                                      context=context)
        record["last_used"] = now
        await self.store.mfa_put(user, f"wa:{cid}", json.dumps(record))
        return await self._succeeded(user, "webauthn", failures, now, context,
                                     {"credential_id": cid, "sign_count": new_count})

    async def webauthn_credentials(self, user: str) -> list[dict[str, Any]]:
        creds = await self._credentials(normalize_user(user))
        return [_credential_view(cid, cred) for cid, cred in sorted(
            creds.items(), key=lambda item: item[1]["created"])]

    async def webauthn_remove(self, user: str, credential_id: str,
                              actor: str = "admin") -> bool:
        user = normalize_user(user)
        removed = await self.store.mfa_pop(user, f"wa:{credential_id}") is not None
        await self.store.mfa_pop(user, f"wacount:{credential_id}")
        if removed:
            self.stats.count(self.stats.enrollments, ("webauthn", "remove"))
            self._audit("mfa.webauthn.remove", actor, user, {"credential_id": credential_id})
        return removed

    # --- overview and administration

    async def status(self, user: str) -> dict[str, Any]:
        user = normalize_user(user)
        fields = await self.store.mfa_fields(user)
        now = self.clock()
        record = json.loads(fields["totp"]) if "totp" in fields else None
        creds = await self.webauthn_credentials(user)
        return {
            "user": user,
            "methods": _methods(fields),
            "totp": {"enrolled": record is not None,
                     "confirmed": bool(record and record["c"]),
                     "drift_steps": record["d"] if record else 0,
                     # a new secret enrolled, in force once its first code is checked
                     "replacement_pending": "totp_pending" in fields},
            "recovery_codes_left": sum(1 for f in fields if f.startswith("rc:")),
            "webauthn": creds,
            "remembered_devices": sum(1 for f, v in fields.items()
                                      if f.startswith("dev:") and float(v) > now),
            "remembered_networks": sorted(f[4:] for f, v in fields.items()
                                          if f.startswith("src:") and float(v) > now),
        }

    async def users(self) -> list[dict[str, Any]]:
        out = []
        for user in await self.store.mfa_users():
            methods = _methods(await self.store.mfa_fields(user))
            if methods:
                out.append({"user": user, "methods": methods})
        return out

    async def reset(self, user: str, actor: str = "admin") -> int:
        """Removes every factor, code and remembered device of the user."""
        user = normalize_user(user)
        removed = await self.store.mfa_delete(user)
        await self.store.clear_failures(f"m:{user}")
        if removed:
            self._audit("mfa.reset", actor, user, {"fields": removed})
        return removed

    # --- when a login needs a second factor

    def _network(self, ip: str) -> str:
        return prefix_of(parse_ip(ip), self.ipv6_prefix_length)

    async def _remember(self, user: str, context: LoginContext, now: float) -> None:
        """Remembers the context's device and network (a context with either)."""
        until = str(now + self.settings.policy.remember_for)
        if context.device_id:
            await self.store.mfa_put(user, "dev:" + self.sealer.digest(
                context.device_id, f"device|{user}"), until)
        if context.remote_ip:
            await self.store.mfa_put(user, "src:" + self._network(context.remote_ip), until)
        fields = await self.store.mfa_fields(user)
        for prefix in ("dev:", "src:"):
            remembered = sorted((float(v), f) for f, v in fields.items() if f.startswith(prefix))
            expired = [f for v, f in remembered if v <= now]
            oldest = [f for v, f in remembered if v > now][:-self.settings.policy.max_remembered]
            for name in expired + oldest:
                await self.store.mfa_pop(user, name)

    def second_factor_reason(self, login: str, remote_ip: str, device_id: str,
                             fields: dict[str, str], source_failures: int) -> str | None:
        """Why this login needs a second factor, or None, from the user's MFA fields and
        the source's distinct wrong passwords lately (the engine reads both from the store
        in its one call per check). Only users with a confirmed factor are asked:
        risky_network (security.mfa.policy.risky_networks), risky_source (that many
        distinct wrong passwords from the source), new_device (a device_id not
        remembered), new_source (a network not remembered)."""
        if not _methods(fields):
            # a user whose every factor was disabled as cloned is still asked (and cannot
            # answer until registering again): a clone is a compromise, not a way out of MFA
            return "factor_disabled" if _cloned_only(fields) else None
        user = normalize_user(login)
        policy, now = self.settings.policy, self.clock()
        if self._risky.match(remote_ip, now) is not None:
            return "risky_network"
        if policy.risky_source_failures and source_failures >= policy.risky_source_failures:
            return "risky_source"
        if policy.on_new_device and device_id and not _known(
                fields, "dev:" + self.sealer.digest(device_id, f"device|{user}"), now):
            return "new_device"
        if policy.on_new_source and not _known(fields, "src:" + self._network(remote_ip), now):
            return "new_source"
        return None


def _known(fields: dict[str, str], name: str, now: float) -> bool:
    until = fields.get(name)
    return until is not None and float(until) > now


def _methods(fields: dict[str, str]) -> list[str]:
    """The confirmed factors a user can answer a second-factor request with."""
    methods = []
    if "totp" in fields and json.loads(fields["totp"])["c"]:
        methods.append("totp")
        if any(f.startswith("rc:") for f in fields):
            methods.append("recovery")
    if any(f.startswith("wa:") and not json.loads(v)["cloned"] for f, v in fields.items()):
        methods.append("webauthn")
    return methods


def _cloned_only(fields: dict[str, str]) -> bool:
    """Whether the user has WebAuthn credentials and every one was disabled as cloned."""
    creds = [json.loads(v) for f, v in fields.items() if f.startswith("wa:")]
    return bool(creds) and all(c["cloned"] for c in creds)


def _credential_view(cid: str, cred: dict[str, Any]) -> dict[str, Any]:
    return {"credential_id": cid, "name": cred["name"], "fmt": cred["fmt"],
            "aaguid": cred["aaguid"], "created": cred["created"],
            "last_used": cred["last_used"], "sign_count": cred["sign_count"],
            "user_verified": cred["user_verified"], "backed_up": cred["backed_up"],
            "cloned": cred["cloned"]}
