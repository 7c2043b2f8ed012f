"""WebAuthn relying party on the `webauthn` package: options, attestation and assertions.

Pure functions; the manager stores challenges and credentials. Attestation formats are
limited to `security.mfa.webauthn.formats` (none and packed by default). A packed
statement with an x5c chain is checked against `attestation_roots` when any are
configured; without roots it proves only that the authenticator holds the key.

Sign counters: an assertion whose counter did not grow past the stored one, but whose
signature is genuine, is a cloned authenticator (W3C WebAuthn section 6.1.1): the caller
disables the credential. A bad signature is just an invalid assertion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import (
    base64url_to_bytes,
    bytes_to_base64url,
    parse_authentication_credential_json,
    parse_authenticator_data,
)
from webauthn.helpers.cose import COSEAlgorithmIdentifier
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AttestationFormat,
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialDescriptor,
    UserVerificationRequirement,
)

from security.mfa.settings import WebAuthnSettings

ALGORITHMS = [COSEAlgorithmIdentifier.ECDSA_SHA_256, COSEAlgorithmIdentifier.EDDSA,
              COSEAlgorithmIdentifier.RSASSA_PKCS1_v1_5_SHA_256]
# what a malformed credential makes the library (or base64/CBOR decoding) raise
_BAD_INPUT = (WebAuthnException, ValueError, KeyError, TypeError, IndexError)


class WebAuthnError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason  # invalid | format_not_allowed


@dataclass(frozen=True)
class NewCredential:
    id: str  # base64url, as browsers send it
    public_key: bytes  # COSE
    sign_count: int
    fmt: str
    aaguid: str
    user_verified: bool
    backed_up: bool


def registration_options(settings: WebAuthnSettings, user: str, user_handle: bytes,
                         display_name: str, exclude: list[str]) -> tuple[dict[str, Any], bytes]:
    """PublicKeyCredentialCreationOptions as JSON (for navigator.credentials.create) and
    the challenge to keep."""
    options = generate_registration_options(
        rp_id=settings.rp_id, rp_name=settings.rp_name, user_name=user, user_id=user_handle,
        user_display_name=display_name or user, timeout=int(settings.challenge_timeout * 1000),
        attestation=AttestationConveyancePreference(settings.attestation),
        authenticator_selection=AuthenticatorSelectionCriteria(
            user_verification=UserVerificationRequirement(settings.user_verification)),
        exclude_credentials=[PublicKeyCredentialDescriptor(id=base64url_to_bytes(c))
                             for c in exclude],
        supported_pub_key_algs=ALGORITHMS)
    return json.loads(options_to_json(options)), options.challenge


def verify_registration(settings: WebAuthnSettings, credential: dict[str, Any],
                        challenge: bytes) -> NewCredential:
    roots = ({AttestationFormat.PACKED: list(settings.attestation_roots)}
             if settings.attestation_roots else None)
    try:
        verified = verify_registration_response(
            credential=credential, expected_challenge=challenge,
            expected_rp_id=settings.rp_id, expected_origin=list(settings.origins),
            require_user_verification=settings.user_verification == "required",
            supported_pub_key_algs=ALGORITHMS, pem_root_certs_bytes_by_fmt=roots)
    except _BAD_INPUT as exc:
        raise WebAuthnError("invalid", f"registration not verified: {exc}") from None
    fmt = str(getattr(verified.fmt, "value", verified.fmt))
    if fmt not in settings.formats:
        raise WebAuthnError("format_not_allowed",
                            f"attestation format {fmt!r} is not in security.mfa.webauthn.formats")
    return NewCredential(bytes_to_base64url(verified.credential_id),
                         verified.credential_public_key, verified.sign_count, fmt,
                         verified.aaguid, verified.user_verified, verified.credential_backed_up)


def authentication_options(settings: WebAuthnSettings,
                           allow: list[str]) -> tuple[dict[str, Any], bytes]:
    """PublicKeyCredentialRequestOptions as JSON (navigator.credentials.get) and the
    challenge to keep."""
    options = generate_authentication_options(
        rp_id=settings.rp_id, timeout=int(settings.challenge_timeout * 1000),
        allow_credentials=[PublicKeyCredentialDescriptor(id=base64url_to_bytes(c))
                           for c in allow],
        user_verification=UserVerificationRequirement(settings.user_verification))
    return json.loads(options_to_json(options)), options.challenge


def assertion_credential_id(credential: dict[str, Any]) -> str:
    try:
        return parse_authentication_credential_json(credential).id
    except _BAD_INPUT as exc:
        raise WebAuthnError("invalid", f"assertion malformed: {exc}") from None


def verify_assertion(settings: WebAuthnSettings, credential: dict[str, Any], challenge: bytes,
                     public_key: bytes, stored_count: int) -> tuple[int, bool]:
    """(the authenticator's new sign count, whether it regressed); raises WebAuthnError
    when the assertion does not verify."""
    try:
        parsed = parse_authentication_credential_json(credential)
        new_count = parse_authenticator_data(parsed.response.authenticator_data).sign_count
        regressed = (new_count > 0 or stored_count > 0) and new_count <= stored_count
        # a regressed counter is judged after the signature: only a genuine one means a clone
        verified = verify_authentication_response(
            credential=parsed, expected_challenge=challenge, expected_rp_id=settings.rp_id,
            expected_origin=list(settings.origins), credential_public_key=public_key,
            credential_current_sign_count=0 if regressed else stored_count,
            require_user_verification=settings.user_verification == "required")
    except _BAD_INPUT as exc:
        raise WebAuthnError("invalid", f"assertion not verified: {exc}") from None
    return verified.new_sign_count, regressed
