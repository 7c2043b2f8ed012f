"""WebAuthn through MfaManager with the software authenticator of tests/: registration
(attestation none and packed, self and x5c), assertions, wrong origin, wrong challenge,
replayed assertions and a cloned authenticator."""

from __future__ import annotations

import dataclasses
import json

import pytest

from security.mfa.manager import MfaError, MfaManager
from security.mfa.sealing import Sealer
from security.mfa.settings import MfaSettings, WebAuthnSettings
from security.store.memory import MemoryStore
from tests.unit.test_mfa_totp import KEY, Clock
from tests.webauthn_authenticator import AttestationCA, SoftAuthenticator, b64url

ORIGIN = "https://mail.example.test"
RP = WebAuthnSettings(rp_id="mail.example.test", rp_name="Example Mail", origins=(ORIGIN,))


@pytest.fixture
def manager() -> MfaManager:
    return MfaManager(MfaSettings(webauthn=RP), MemoryStore(), Sealer(KEY), clock=Clock())


async def register(manager: MfaManager, authenticator: SoftAuthenticator,
                   user: str = "alice", **create) -> dict:
    options = await manager.webauthn_register_options(user, "Alice")
    return await manager.webauthn_register(user, authenticator.create(options, ORIGIN, **create),
                                           name="key 1")


async def login(manager: MfaManager, authenticator: SoftAuthenticator, user: str = "alice",
                **get):
    options = await manager.webauthn_authenticate_options(user)
    return await manager.webauthn_authenticate(user, authenticator.get(options, ORIGIN, **get))


async def test_registration_options_are_real_webauthn_options(manager):
    options = await manager.webauthn_register_options("alice", "Alice A.")
    assert options["rp"] == {"name": "Example Mail", "id": "mail.example.test"}
    assert options["user"]["name"] == "alice" and options["user"]["displayName"] == "Alice A."
    assert options["user"]["id"] != b64url(b"alice")  # a random handle, not the name
    assert {"type": "public-key", "alg": -7} in options["pubKeyCredParams"]
    assert len(options["challenge"]) >= 43  # 32+ random bytes
    again = await manager.webauthn_register_options("alice")
    assert again["user"]["id"] == options["user"]["id"]  # stable per user
    assert again["challenge"] != options["challenge"]


@pytest.mark.parametrize("attestation", ["none", "packed"])
async def test_register_and_authenticate(manager, attestation):
    key = SoftAuthenticator(attestation)
    registered = await register(manager, key)
    assert registered["credential_id"] == key.id and registered["fmt"] == attestation
    assert registered["sign_count"] == 0
    assert (await manager.status("alice"))["methods"] == ["webauthn"]
    for expected in (1, 2):
        result = await login(manager, key)
        assert result.valid and result.details["sign_count"] == expected
    listed = await manager.webauthn_credentials("alice")
    assert [c["credential_id"] for c in listed] == [key.id] and listed[0]["sign_count"] == 2
    assert listed[0]["last_used"] is not None


async def test_packed_x5c_chain_must_reach_a_configured_root():
    ca, stranger = AttestationCA(), AttestationCA("Unknown Root")
    rp = dataclasses.replace(RP, attestation_roots=(ca.root_pem,))
    manager = MfaManager(MfaSettings(webauthn=rp), MemoryStore(), Sealer(KEY), clock=Clock())
    assert (await register(manager, SoftAuthenticator("packed", ca)))["fmt"] == "packed"
    with pytest.raises(MfaError) as refused:
        await register(manager, SoftAuthenticator("packed", stranger), user="bob")
    assert refused.value.reason == "invalid"


async def test_formats_outside_the_allowlist_are_refused():
    rp = dataclasses.replace(RP, formats=("packed",))
    manager = MfaManager(MfaSettings(webauthn=rp), MemoryStore(), Sealer(KEY), clock=Clock())
    with pytest.raises(MfaError) as refused:
        await register(manager, SoftAuthenticator("none"))
    assert refused.value.reason == "format_not_allowed"


async def test_wrong_origin_wrong_challenge_and_wrong_rp_are_refused(manager):
    key = SoftAuthenticator()
    options = await manager.webauthn_register_options("alice")
    with pytest.raises(MfaError, match="origin"):
        await manager.webauthn_register("alice", key.create(options, "https://evil.example"))
    # the challenge was used up by the failed try: start again
    options = await manager.webauthn_register_options("alice")
    with pytest.raises(MfaError, match="challenge"):
        await manager.webauthn_register("alice", key.create(options, ORIGIN,
                                                            challenge=b64url(b"x" * 32)))
    options = await manager.webauthn_register_options("alice")
    with pytest.raises(MfaError, match="RP ID"):
        await manager.webauthn_register("alice", key.create(options, ORIGIN,
                                                            rp_id="evil.example"))
    with pytest.raises(MfaError) as none_pending:
        await manager.webauthn_register("alice", key.create(options, ORIGIN))
    assert none_pending.value.reason == "no_challenge"
    await register(manager, key)
    options = await manager.webauthn_authenticate_options("alice")
    bad_origin = await manager.webauthn_authenticate("alice", key.get(options, "https://evil.example"))
    assert not bad_origin.valid and bad_origin.reason == "invalid"
    options = await manager.webauthn_authenticate_options("alice")
    forged = key.get(options, ORIGIN, challenge=b64url(b"y" * 32))
    assert (await manager.webauthn_authenticate("alice", forged)).reason == "invalid"
    # no pending challenge at all: an old assertion cannot be replayed
    assert (await manager.webauthn_authenticate("alice", forged)).reason == "no_challenge"
    assert (await login(manager, key)).valid  # the genuine key still works


async def test_a_replayed_assertion_is_refused(manager):
    key = SoftAuthenticator()
    await register(manager, key)
    options = await manager.webauthn_authenticate_options("alice")
    assertion = key.get(options, ORIGIN)
    assert (await manager.webauthn_authenticate("alice", assertion)).valid
    assert (await manager.webauthn_authenticate("alice", assertion)).reason == "no_challenge"
    await manager.webauthn_authenticate_options("alice")  # a new challenge, the old answer
    assert (await manager.webauthn_authenticate("alice", assertion)).reason == "invalid"


async def test_a_cloned_authenticator_is_detected_and_the_credential_disabled(manager):
    original = SoftAuthenticator()
    await register(manager, original)
    assert (await login(manager, original)).valid  # counter 1
    clone = original.clone()  # copied at counter 1
    assert (await login(manager, original)).valid  # counter 2
    detected = await login(manager, clone)  # the clone says 2 again: not greater than 2
    assert not detected.valid and detected.reason == "cloned"
    assert detected.details["credential_id"] == original.id
    creds = await manager.webauthn_credentials("alice")
    assert creds[0]["cloned"] is not None
    # the credential is disabled for everyone, the original included
    with pytest.raises(MfaError) as disabled:
        await manager.webauthn_authenticate_options("alice")
    assert disabled.value.reason == "not_enrolled"
    assert manager.stats.verifications[("webauthn", "cloned")] == 1
    # a clone is no way out of MFA: with no other factor the user is still asked (and can
    # answer only after registering again), where before the login was allowed
    fields = await manager.store.mfa_fields("alice")
    assert manager.second_factor_reason("alice", "203.0.113.50", "never-seen", fields,
                                        0) == "factor_disabled"
    await register(manager, SoftAuthenticator())  # registered again: asked as before
    fields = await manager.store.mfa_fields("alice")
    assert manager.second_factor_reason("alice", "203.0.113.50", "never-seen", fields,
                                        0) == "new_device"


async def test_a_bad_signature_with_an_old_counter_is_invalid_not_a_clone(manager):
    key = SoftAuthenticator()
    await register(manager, key)
    assert (await login(manager, key)).valid
    options = await manager.webauthn_authenticate_options("alice")
    key.sign_count = 0  # the counter regressed, but the signature is forged
    assertion = key.get(options, ORIGIN)
    assertion["response"]["signature"] = b64url(b"\x30\x06\x02\x01\x01\x02\x01\x01")
    result = await manager.webauthn_authenticate("alice", assertion)
    assert result.reason == "invalid"
    assert (await manager.webauthn_credentials("alice"))[0]["cloned"] is None


@pytest.mark.parametrize("credential", [
    {}, {"id": "x"}, {"id": "AAAA", "rawId": "AAAA", "type": "public-key", "response": {}},
    {"id": "AAAA", "rawId": "AAAA", "type": "public-key",
     "response": {"clientDataJSON": "!!", "authenticatorData": "AA", "signature": "AA"}},
])
async def test_malformed_assertions_are_invalid(manager, credential):
    await register(manager, SoftAuthenticator())
    await manager.webauthn_authenticate_options("alice")
    result = await manager.webauthn_authenticate("alice", credential)
    assert not result.valid and result.reason == "invalid"


async def test_malformed_registration_is_refused(manager):
    await manager.webauthn_register_options("alice")
    with pytest.raises(MfaError) as refused:
        await manager.webauthn_register("alice", {"id": "AAAA", "rawId": "AAAA",
                                                  "type": "public-key", "response": {
                                                      "clientDataJSON": "e30",
                                                      "attestationObject": "oA"}})
    assert refused.value.reason == "invalid"


async def test_credentials_are_stored_without_secrets_and_can_be_removed(manager):
    key = SoftAuthenticator()
    await register(manager, key)
    fields = await manager.store.mfa_fields("alice")
    record = json.loads(fields[f"wa:{key.id}"])
    assert set(record) >= {"pk", "fmt", "aaguid", "created"}
    assert await manager.webauthn_remove("alice", key.id) is True
    assert await manager.webauthn_remove("alice", key.id) is False
    assert await manager.webauthn_credentials("alice") == []
