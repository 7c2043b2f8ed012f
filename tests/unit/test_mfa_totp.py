"""TOTP, recovery codes, sealing and the verification guard of MfaManager (memory and SQLite
stores, a fake clock), checked against pyotp and the RFC 6238 test vectors."""

from __future__ import annotations

import base64
import dataclasses
import hmac
import json
import stat
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest

from security.audit import AuditLog, AuditPolicy
from security.keyed_hmac import KeyedHmac
from security.mfa import recovery, totp
from security.mfa.manager import LoginContext, MfaError, MfaManager, Verification
from security.mfa.sealing import Sealer, SealError, load_or_create_key
from security.mfa.settings import MfaSettings
from security.mfa.totp import TotpParams
from security.ratelimit import Limit
from security.store import open_store

KEY = "k" * 40
T0 = 4_000_000_020.0  # a step boundary plus 20 s (period 30), far ahead as in the store suite


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def audit(tmp_path: Path):
    log = AuditLog(tmp_path / "audit", AuditPolicy())
    yield log
    log.close()


@pytest.fixture(params=["memory", "sqlite"])
async def make_manager(request, tmp_path: Path, clock: Clock, audit):
    opened = []

    async def make(settings: MfaSettings | None = None, key: str = KEY) -> MfaManager:
        store = open_store(request.param, path=str(tmp_path / "security.db"), flush_interval=0.05)
        await store.open()
        opened.append(store)
        return MfaManager(settings or MfaSettings(), store, Sealer(key), audit, clock=clock)

    yield make
    for store in opened:
        await store.close()


def code_for(secret: str, at: float) -> str:
    return pyotp.TOTP(secret).at(at)


def audit_lines(audit: AuditLog) -> list[dict]:
    audit.sync()
    return [json.loads(line) for line in audit.path.read_text().splitlines()]


# --- the building blocks


def test_code_at_matches_pyotp_and_the_rfc_6238_vectors():
    # RFC 6238 appendix B: the SHA1 seed "12345678901234567890", 8 digits
    seed = b"12345678901234567890"
    params = TotpParams(digits=8, period=30, algorithm="SHA1")
    vectors = {59: "94287082", 1111111109: "07081804", 1111111111: "14050471",
               1234567890: "89005924", 2000000000: "69279037", 20000000000: "65353130"}
    for t, expected in vectors.items():
        assert totp.code_at(seed, totp.step(t, params), params) == expected
    key = totp.new_secret()
    for t in (0, 59, T0, T0 + 12345):
        assert totp.code_at(key, totp.step(t, TotpParams()), TotpParams()) == pyotp.TOTP(
            totp.base32(key)).at(t)


def test_keyed_secrets_give_the_rfc_6238_codes_for_every_algorithm():
    """match() on a secret keyed once (the manager's cache) finds the RFC 6238 appendix B
    codes for SHA1, SHA256 and SHA512, exactly where the one-shot code_at() puts them."""
    seeds = {"SHA1": b"12345678901234567890", "SHA256": b"12345678901234567890123456789012",
             "SHA512": b"1234567890" * 6 + b"1234"}
    vectors = {"SHA1": {59: "94287082", 1111111109: "07081804", 2000000000: "69279037"},
               "SHA256": {59: "46119246", 1111111109: "68084774", 2000000000: "90698825"},
               "SHA512": {59: "90693936", 1111111109: "25091201", 2000000000: "38618901"}}
    for algorithm, seed in seeds.items():
        params = TotpParams(digits=8, period=30, algorithm=algorithm)
        mac = totp.keyed(seed, params)
        for t, expected in vectors[algorithm].items():
            counter = totp.step(t, params)
            assert totp.code_at(seed, counter, params) == expected
            assert totp.match(mac, expected, counter, params, 0) == 0
            assert totp.match(mac, expected, counter + 1, params, 1) == -1
        with pytest.raises(ValueError):  # keyed for one algorithm, asked for another
            totp.match(mac, "12345678", 1, TotpParams(digits=8, algorithm="SHA1" if (
                algorithm != "SHA1") else "SHA256"), 1)


@pytest.mark.parametrize("name", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize("length", [0, 16, 20, 63, 64, 65, 128, 129, 300])
def test_keyed_hmac_is_hmac_for_keys_of_any_length(name, length):
    key = bytes((i * 7 + length) % 256 for i in range(length))
    mac = KeyedHmac(key, name)
    for message in (b"", b"x", bytes(range(256)) * 3):
        assert mac.digest(message) == hmac.new(key, message, name).digest()
        assert mac.hexdigest(message) == hmac.new(key, message, name).hexdigest()


def test_secrets_are_at_least_160_bits_and_the_uri_is_otpauth():
    with pytest.raises(ValueError):
        totp.new_secret(19)
    key = totp.new_secret()
    assert len(key) == 20 and len(totp.base32(key)) == 32
    uri = totp.provisioning_uri(key, "alice@example.org", "A3 Mailer", TotpParams())
    parts = urlsplit(uri)
    assert (parts.scheme, parts.netloc) == ("otpauth", "totp")
    query = parse_qs(parts.query)
    assert query["secret"] == [totp.base32(key)] and query["issuer"] == ["A3 Mailer"]
    assert pyotp.parse_uri(uri).secret == totp.base32(key)
    svg = totp.qr_svg(uri)
    assert svg.startswith("<svg") and "http://www.w3.org/2000/svg" in svg


def test_match_stays_within_the_skew_and_tries_the_drift_first():
    key, params = totp.new_secret(), TotpParams()
    counter = 1000
    for offset in (-1, 0, 1):
        assert totp.match(key, totp.code_at(key, counter + offset, params), counter, params,
                          1) == offset
    assert totp.match(key, totp.code_at(key, counter + 2, params), counter, params, 1) is None
    assert totp.match(key, totp.code_at(key, counter + 1, params), counter, params, 0) is None
    assert totp._search_order(1, -1) == (-1, 0, 1)
    assert totp._search_order(1, 1)[0] == 1


def test_sealing_roundtrip_context_key_and_tamper(tmp_path: Path):
    sealer = Sealer(KEY)
    sealed = sealer.seal(b"secret", "totp|alice")
    assert b"secret" not in sealed.encode() and sealed.startswith(f"v1.{sealer.kid}.")
    assert sealer.open(sealed, "totp|alice") == b"secret"
    assert sealer.seal(b"secret", "totp|alice") != sealed  # a fresh nonce each time
    with pytest.raises(SealError, match="context"):
        sealer.open(sealed, "totp|bob")
    with pytest.raises(SealError, match="another key"):
        Sealer("x" * 40).open(sealed, "totp|alice")
    body = bytearray(base64.urlsafe_b64decode(sealed.split(".")[2]))
    body[-1] ^= 1
    with pytest.raises(SealError, match="tampered"):
        sealer.open(f"v1.{sealer.kid}.{base64.urlsafe_b64encode(bytes(body)).decode()}",
                    "totp|alice")
    with pytest.raises(SealError):
        sealer.open("garbage", "totp|alice")
    with pytest.raises(ValueError, match="32"):
        Sealer("short")
    path = tmp_path / "state" / "mfa.key"
    first = load_or_create_key(path)
    assert len(first) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == first


def test_recovery_codes_are_80_bits_and_forgiving_to_type():
    codes = recovery.new_codes(10)
    assert len(set(codes)) == 10
    code = codes[0]
    assert len(code) == 19 and code.count("-") == 3
    assert recovery.normalize(code.upper().replace("-", " ")) == code.replace("-", "")
    assert recovery.normalize("0000-1111-0000-1111") == recovery.normalize("oooo-iiii-OOOO-llll")
    assert recovery.normalize("too-short") is None and recovery.normalize("u" * 16) is None


# --- MfaManager: TOTP


async def test_enroll_then_verify_confirms_and_never_accepts_a_code_twice(make_manager, clock,
                                                                          audit):
    manager = await make_manager()
    enrolled = await manager.enroll_totp("Alice@Example.org")
    assert enrolled["user"] == "alice@example.org" and not enrolled["confirmed"]
    assert enrolled["provisioning_uri"].startswith("otpauth://totp/")
    assert len(enrolled["recovery_codes"]) == 10
    secret = enrolled["secret"]
    assert (await manager.status("alice@example.org"))["methods"] == []  # not confirmed yet
    code = code_for(secret, clock.now)
    first = await manager.verify_totp("alice@example.org", code)
    assert first.valid and first.reason == "ok" and first.details["confirmed"]
    again = await manager.verify_totp("ALICE@example.org", code)
    assert not again.valid and again.reason == "replayed"
    assert (await manager.status("alice@example.org"))["methods"] == ["totp", "recovery"]
    # a code of an earlier step, still inside the skew, is refused after a later one was used
    clock.now += 30
    assert (await manager.verify_totp("alice@example.org", code_for(secret, clock.now))).valid
    earlier = await manager.verify_totp("alice@example.org", code_for(secret, clock.now - 30))
    assert earlier.reason == "replayed"
    types = [r["type"] for r in audit_lines(audit)]
    assert types.count("mfa.verify.success") == 2 and types.count("mfa.verify.failure") == 2
    assert "mfa.totp.enroll" in types and "mfa.totp.confirm" in types
    text = audit.path.read_text()
    assert code not in text and secret not in text  # codes and secrets never reach the log
    assert manager.stats.verifications == {("totp", "success"): 2, ("totp", "replayed"): 2}


async def test_one_step_of_skew_and_drift_is_tracked(make_manager, clock):
    manager = await make_manager()
    secret = (await manager.enroll_totp("bob"))["secret"]
    ahead = await manager.verify_totp("bob", code_for(secret, clock.now + 30))
    assert ahead.valid and ahead.details["drift_steps"] == 1
    assert (await manager.status("bob"))["totp"]["drift_steps"] == 1
    clock.now += 90
    behind = await manager.verify_totp("bob", code_for(secret, clock.now - 30))
    assert behind.valid and behind.details["drift_steps"] == -1
    assert (await manager.status("bob"))["totp"]["drift_steps"] == -1
    clock.now += 90
    for far in (clock.now - 60, clock.now + 60):
        assert (await manager.verify_totp("bob", code_for(secret, far))).reason == "invalid"


async def test_a_reload_with_another_algorithm_keys_the_cached_secret_again(make_manager,
                                                                             clock):
    manager = await make_manager()
    secret = (await manager.enroll_totp("carol"))["secret"]
    assert (await manager.verify_totp("carol", code_for(secret, clock.now))).valid  # cached
    sha256 = TotpParams(algorithm="SHA256")
    manager.configure(MfaSettings(totp=sha256), {})
    clock.now += 30
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    sha1_code = totp.code_at(key, totp.step(clock.now, TotpParams()), TotpParams())
    sha256_code = totp.code_at(key, totp.step(clock.now, sha256), sha256)
    assert sha1_code != sha256_code
    assert (await manager.verify_totp("carol", sha1_code)).reason == "invalid"
    assert (await manager.verify_totp("carol", sha256_code)).valid


async def test_malformed_codes_and_unknown_users(make_manager, clock):
    manager = await make_manager(MfaSettings(verify_limit=Limit(100, 60.0, 100)))
    assert (await manager.verify_totp("nobody", "123456")).reason == "not_enrolled"
    await manager.enroll_totp("carol")
    for bad in ("", "12345", "1234567", "12a456", "１２３４５６", "123456" * 100):
        result = await manager.verify_totp("carol", bad)
        assert not result.valid and result.reason == "invalid", bad


async def test_the_secret_is_sealed_in_the_store(make_manager):
    manager = await make_manager()
    secret = (await manager.enroll_totp("dave"))["secret"]
    fields = await manager.store.mfa_fields("dave")
    blob = json.dumps(fields)
    assert secret not in blob and base64.b32decode(secret).hex() not in blob
    assert json.loads(fields["totp"])["s"].startswith("v1.")
    other = MfaManager(MfaSettings(), manager.store, Sealer("z" * 40), clock=manager.clock)
    with pytest.raises(MfaError, match="decrypted"):
        await other.verify_totp("dave", "123456")


async def test_replay_state_survives_a_restart(tmp_path: Path, clock):
    path = str(tmp_path / "restart.db")
    store = open_store("sqlite", path=path)
    await store.open()
    manager = MfaManager(MfaSettings(), store, Sealer(KEY), clock=clock)
    secret = (await manager.enroll_totp("erin"))["secret"]
    code = code_for(secret, clock.now)
    assert (await manager.verify_totp("erin", code)).valid
    await store.close()
    store = open_store("sqlite", path=path)
    await store.open()
    try:
        manager = MfaManager(MfaSettings(), store, Sealer(KEY), clock=clock)
        assert (await manager.verify_totp("erin", code)).reason == "replayed"
        clock.now += 30
        assert (await manager.verify_totp("erin", code_for(secret, clock.now))).valid
    finally:
        await store.close()


async def test_attempts_are_rate_limited_then_locked(make_manager, clock):
    settings = MfaSettings(verify_limit=Limit(5, 60.0, 2), max_failures=4)
    manager = await make_manager(settings)
    secret = (await manager.enroll_totp("frank"))["secret"]
    results = [await manager.verify_totp("frank", f"{n:06d}") for n in range(4)]
    assert [r.reason for r in results] == ["invalid", "invalid", "invalid", "rate_limited"]
    assert results[-1].retry_after > 0
    clock.now += 60  # the bucket refills; one more wrong code reaches max_failures
    assert (await manager.verify_totp("frank", "000009")).reason == "invalid"
    clock.now += 60
    locked = await manager.verify_totp("frank", code_for(secret, clock.now))
    assert locked.reason == "locked" and not locked.valid  # even the right code
    clock.now += settings.failure_window + 1
    assert (await manager.verify_totp("frank", code_for(secret, clock.now))).valid


async def test_the_same_wrong_codes_at_later_steps_still_reach_the_lock(make_manager, clock):
    """Failures count distinct within a time step (retyping one code is one failure), but
    a few fixed guesses repeated at every step used to never lock."""
    settings = MfaSettings(verify_limit=Limit(100, 1.0, 100), max_failures=4)
    manager = await make_manager(settings)
    secret = (await manager.enroll_totp("fay"))["secret"]
    wrong = [c for c in ("000000", "111111", "222222") if c != code_for(secret, clock.now)
             and c != code_for(secret, clock.now + 30)][:2]
    reasons = []
    for _ in range(3):
        for code in wrong:
            for _ in range(2):  # the same code twice in one step counts once
                reasons.append((await manager.verify_totp("fay", code)).reason)
        clock.now += 30
    # the 4th distinct failure is the 7th try (2 steps x 2 codes, duplicates free)
    assert reasons[:7] == ["invalid"] * 7 and set(reasons[7:]) == {"locked"}


async def test_reenrolling_a_confirmed_user_keeps_the_old_factor_until_the_new_one_works(
        make_manager, clock):
    """An enrolment begun and not finished must not turn MFA off: the confirmed secret and
    its recovery codes stay in force until the new secret's first code."""
    manager = await make_manager()
    old = await manager.enroll_totp("hal")
    assert (await manager.verify_totp("hal", code_for(old["secret"], clock.now))).valid
    new = await manager.enroll_totp("hal")
    status = await manager.status("hal")
    assert status["methods"] == ["totp", "recovery"] and status["totp"]["confirmed"]
    assert status["totp"]["replacement_pending"]
    clock.now += 30
    assert (await manager.verify_totp("hal", code_for(old["secret"], clock.now))).valid
    assert (await manager.verify_recovery("hal", old["recovery_codes"][0])).valid
    assert (await manager.verify_recovery("hal", new["recovery_codes"][0])).reason == "invalid"
    clock.now += 30
    assert (await manager.verify_totp("hal", code_for(new["secret"], clock.now))).valid
    status = await manager.status("hal")
    assert status["totp"]["confirmed"] and not status["totp"]["replacement_pending"]
    clock.now += 30
    assert (await manager.verify_totp("hal", code_for(old["secret"], clock.now))).reason == (
        "invalid")
    assert (await manager.verify_recovery("hal", old["recovery_codes"][1])).reason == "invalid"
    assert (await manager.verify_recovery("hal", new["recovery_codes"][1])).valid
    assert status["recovery_codes_left"] == len(new["recovery_codes"])


async def test_reenrolling_replaces_the_secret_and_recovery_codes(make_manager, clock):
    manager = await make_manager()
    old = await manager.enroll_totp("gina")
    new = await manager.enroll_totp("gina")
    assert new["secret"] != old["secret"]
    assert (await manager.verify_totp("gina", code_for(old["secret"], clock.now))).reason in (
        "invalid", "replayed")
    assert (await manager.verify_recovery("gina", old["recovery_codes"][0])).reason == "invalid"
    assert (await manager.verify_recovery("gina", new["recovery_codes"][0])).valid


# --- recovery codes


async def test_recovery_codes_are_hashed_and_single_use(make_manager):
    manager = await make_manager()
    codes = (await manager.enroll_totp("hank"))["recovery_codes"]
    blob = json.dumps(await manager.store.mfa_fields("hank"))
    assert not any(c in blob or c.replace("-", "") in blob for c in codes)
    used = await manager.verify_recovery("hank", codes[3].upper())
    assert used.valid and used.details["remaining"] == 9
    assert (await manager.verify_recovery("hank", codes[3])).reason == "invalid"
    assert (await manager.verify_recovery("hank", "not a code")).reason == "invalid"
    fresh = await manager.new_recovery_codes("hank")
    assert (await manager.verify_recovery("hank", codes[0])).reason == "invalid"
    assert (await manager.verify_recovery("hank", fresh[0])).valid
    with pytest.raises(MfaError):
        await manager.new_recovery_codes("nobody")


async def test_remove_and_reset(make_manager, clock):
    manager = await make_manager()
    secret = (await manager.enroll_totp("ivy"))["secret"]
    assert (await manager.verify_totp("ivy", code_for(secret, clock.now),
                                      LoginContext("198.51.100.7", "dev-1"))).valid
    status = await manager.status("ivy")
    assert status["remembered_devices"] == 1
    assert status["remembered_networks"] == ["198.51.100.7/32"]
    assert await manager.remove_totp("ivy") is True
    assert (await manager.status("ivy"))["methods"] == []
    assert await manager.reset("ivy") > 0
    assert await manager.store.mfa_fields("ivy") == {}
    assert await manager.users() == []


def test_a_verification_is_a_frozen_dataclass_with_its_own_details():
    """Its __init__ is written by hand (one dict update, not a frozen __setattr__ per
    field): it must still build what the generated one built."""
    a, b = Verification(False, "totp", "invalid"), Verification(False, "totp", "invalid")
    assert a == b and a.details == {} and a.details is not b.details and a.retry_after == 0.0
    assert dataclasses.asdict(Verification(True, "totp", "ok", {"drift_steps": 1}, 2.5)) == {
        "valid": True, "method": "totp", "reason": "ok", "details": {"drift_steps": 1},
        "retry_after": 2.5}
    assert dataclasses.replace(a, reason="replayed").reason == "replayed"
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.valid = True  # type: ignore[misc]
