"""Dovecot 2.3 auth policy: the JSON Dovecot POSTs and the answers it understands.

Dovecot calls `?command=allow` before checking the password (and again after a
success) and `?command=report` afterwards. With the default
auth_policy_request_attributes every value is a string except `tls`, `success`
and `policy_reject`, which are JSON booleans. `pwhash` is a truncated, salted
hash of the password tried: enough to tell distinct passwords apart, useless to
recover one. The answer is `{"status": S, "msg": M}`: S = -1 rejects (the
client sees M), 0 allows, N > 0 delays the answer by N seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from security import strict_json
from security.attempts import Attempt, Decision, parse_address

COMMANDS = ("allow", "report")


class PolicyRequestError(ValueError):
    """A request Dovecot could not have meant: answered with HTTP 400."""


def parse_request(command: str | None, body: bytes) -> tuple[str, Attempt, dict[str, Any]]:
    """(command, attempt, raw fields); raises PolicyRequestError with a clear reason."""
    if command not in COMMANDS:
        raise PolicyRequestError(f"command must be one of {', '.join(COMMANDS)}")
    try:
        fields = _json_object(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PolicyRequestError("body is not UTF-8") from exc
    except ValueError as exc:
        raise PolicyRequestError(f"body is not JSON: {exc}") from exc
    if not isinstance(fields, dict):
        raise PolicyRequestError("body must be a JSON object")
    login = _text(fields, "login", required=True)
    remote = _text(fields, "remote", required=True)
    try:
        address = parse_address(remote)
    except ValueError as exc:
        raise PolicyRequestError(f"remote: not an IP address: {remote!r}") from exc
    if command == "report" and not isinstance(fields.get("success"), bool):
        raise PolicyRequestError("success: a boolean is required with command=report")
    tls = fields.get("tls", False)
    # the address parsed above seeds the cached property: the engine does not parse again
    attempt = Attempt.known(address, login=login, remote_ip=remote,
                            protocol=_text(fields, "protocol") or "unknown",
                            tls=tls is True or tls in ("1", "yes", "true"),
                            session_id=_text(fields, "session_id"),
                            pwhash=_text(fields, "pwhash"))
    return command, attempt, fields


_scan: Callable[[str, int], tuple[Any, int]] = strict_json.DECODER.scan_once  # type: ignore[attr-defined]


def _json_object(text: str) -> Any:
    """strict_json.loads(text), the same value and the same errors; the usual body (an
    object with nothing around it) skips json.loads's layers and its two whitespace
    matches."""
    if text[:1] == "{" and text[-1:] == "}":
        try:
            value, end = _scan(text, 0)
        except (StopIteration, ValueError, RecursionError):
            pass  # strict_json.loads raises the error, with its message
        else:
            if end == len(text):
                if "\\u" in text:
                    strict_json.check_text(value)
                return value
    return strict_json.loads(text)


def _text(fields: dict[str, Any], name: str, required: bool = False) -> str:
    value = fields.get(name)
    if value.__class__ is str and 0 < len(value) <= 1024:  # the usual case, checked first
        return value
    if value is None or value == "":
        if required:
            raise PolicyRequestError(f"{name}: required")
        return ""
    if not isinstance(value, str):
        raise PolicyRequestError(f"{name}: expected a string, got {type(value).__name__}")
    if len(value) > 1024:
        raise PolicyRequestError(f"{name}: longer than 1024 characters")
    return value


def answer(decision: Decision, mfa_reject: bool = False) -> dict[str, Any]:
    """Dovecot's answer for a decision.

    Dovecot cannot ask for a second factor, so `mfa_required` becomes a plain allow (with
    the tarpit's delay, if any) or, with mfa_reject (security.mfa.policy.dovecot_action:
    reject), a reject carrying the decision's message.
    """
    if decision.action == "reject" or (decision.action == "mfa_required" and mfa_reject):
        return {"status": -1, "msg": decision.message or "Access denied"}
    if decision.action in ("delay", "mfa_required") and decision.delay > 0:
        return {"status": max(1, math.ceil(decision.delay)), "msg": ""}
    return {"status": 0, "msg": ""}


OK = {"status": 0, "msg": ""}


def encode(answer: dict[str, Any]) -> bytes:
    """The answer as the JSON body sent (compact, UTF-8, like Starlette's JSONResponse)."""
    return json.dumps(answer, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode("utf-8")


OK_BODY = encode(OK)
# status N: the bodies of allow and the usual tarpit delays, encoded once
_BODIES = {status: encode({"status": status, "msg": ""}) for status in range(0, 61)}


def answer_body(decision: Decision, mfa_reject: bool = False) -> bytes:
    """encode(answer(decision, mfa_reject)), without encoding the common answers again."""
    if decision.action == "mfa_required":  # rare: a user with a second factor, a new device
        return encode(answer(decision, mfa_reject))
    if decision.action == "allow":
        return OK_BODY
    if decision.action == "delay":
        body = _BODIES.get(max(1, math.ceil(decision.delay)))
        if body is not None:
            return body
    elif decision.action == "reject":  # a flood from a banned network: all the same answer
        message = decision.message or "Access denied"
        body = _REJECTS.get(message)
        if body is None:
            if len(_REJECTS) >= 64:
                _REJECTS.clear()
            body = _REJECTS[message] = encode({"status": -1, "msg": message})
        return body
    return encode(answer(decision))


_REJECTS: dict[str, bytes] = {}  # message -> body; the messages come from the settings
