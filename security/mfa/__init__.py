"""Second factors: TOTP with recovery codes, e-mail and SMS one-time codes, WebAuthn.

`manager.MfaManager` is the one entry; `SecurityManager` asks it whether a login needs a
second factor (Decision action `mfa_required`).
"""
