"""The Dovecot policy parser against the plain reading of it: strict_json.loads (json.loads
less what nothing downstream can hold), Attempt(...)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from security import strict_json
from security.attempts import Attempt, parse_address
from security.protocols import dovecot
from security.protocols.dovecot import PolicyRequestError, parse_request


def _reference(command: str | None, body: bytes) -> tuple[str, Attempt, dict[str, Any]]:
    """parse_request as it was written first: strict_json.loads and the dataclass
    constructor."""
    if command not in dovecot.COMMANDS:
        raise PolicyRequestError(f"command must be one of {', '.join(dovecot.COMMANDS)}")
    try:
        fields = strict_json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PolicyRequestError("body is not UTF-8") from exc
    except ValueError as exc:
        raise PolicyRequestError(f"body is not JSON: {exc}") from exc
    if not isinstance(fields, dict):
        raise PolicyRequestError("body must be a JSON object")

    def text(name: str, required: bool = False) -> str:
        value = fields.get(name)
        if value is None or value == "":
            if required:
                raise PolicyRequestError(f"{name}: required")
            return ""
        if not isinstance(value, str):
            raise PolicyRequestError(f"{name}: expected a string, got {type(value).__name__}")
        if len(value) > 1024:
            raise PolicyRequestError(f"{name}: longer than 1024 characters")
        return value

    login = text("login", required=True)
    remote = text("remote", required=True)
    try:
        parse_address(remote)
    except ValueError as exc:
        raise PolicyRequestError(f"remote: not an IP address: {remote!r}") from exc
    if command == "report" and not isinstance(fields.get("success"), bool):
        raise PolicyRequestError("success: a boolean is required with command=report")
    tls = fields.get("tls", False)
    attempt = Attempt(login=login, remote_ip=remote, protocol=text("protocol") or "unknown",
                      tls=tls is True or tls in ("1", "yes", "true"),
                      session_id=text("session_id"), pwhash=text("pwhash"))
    return command, attempt, fields


def _outcome(parse: Any, command: str | None, body: bytes) -> tuple[Any, ...]:
    try:
        got_command, attempt, fields = parse(command, body)
    except PolicyRequestError as exc:
        return ("error", str(exc))
    return ("ok", got_command, attempt, attempt.address, json.dumps(fields, sort_keys=True))


_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.just(""),
    st.text(max_size=8), st.text(min_size=1020, max_size=1030, alphabet="ab"),
    st.sampled_from(["192.0.2.7", "2001:db8::1", "::ffff:192.0.2.7", "010.1.2.3", "1", "yes",
                     "true", "0"]),
    st.lists(st.integers(), max_size=2))
_objects = st.dictionaries(
    st.sampled_from(["login", "remote", "pwhash", "protocol", "session_id", "tls", "success",
                     "policy_reject", "other"]), _values, max_size=9)


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    text = json.dumps(draw(_objects), ensure_ascii=draw(st.booleans()),
                      separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])))
    change = draw(st.sampled_from(["none", "pad", "extra", "cut", "array", "junk", "bytes"]))
    if change == "pad":  # blanks around the object: json.loads accepts them
        text = draw(st.sampled_from([" ", "\n", "\t", ""])) + text + draw(
            st.sampled_from([" ", "\r\n", ""]))
    elif change == "extra":  # data after the object (a second one, a brace)
        text += draw(st.sampled_from(["}", "{}", " 1", ",", "]"]))
    elif change == "cut":
        text = text[:draw(st.integers(min_value=0, max_value=len(text)))]
    elif change == "array":
        text = f"[{text}]"
    elif change == "junk":
        text = draw(st.text(max_size=12))
    body = text.encode("utf-8")
    if change == "bytes":  # not UTF-8
        body = body[:-1] + b"\xff" + body[-1:]
    return body


@settings(max_examples=1500, deadline=None)
@given(command=st.sampled_from(["allow", "report", None, "other"]), body=_bodies())
def test_parse_request_agrees_with_json_loads_and_the_constructor(command, body):
    assert _outcome(parse_request, command, body) == _outcome(_reference, command, body)


@pytest.mark.parametrize("body, message", [
    (b'{"login": "a"} x', "body is not JSON: Extra data: line 1 column 16 (char 15)"),
    (b'{"login": "a"}}', "body is not JSON: Extra data: line 1 column 15 (char 14)"),
    (b'{"login": }', "body is not JSON: Expecting value: line 1 column 11 (char 10)"),
    (b'{"login": "a"', "body is not JSON: Expecting ',' delimiter: line 1 column 14 (char 13)"),
    (b'{"a": NaN, "login": 1}', "body is not JSON: NaN is not a JSON number"),
    (b'{"login": "a\\udc00"}', "body is not JSON: a string holds a lone surrogate ('\\udc00'), "
                             "which is not Unicode text"),
    (b' {"login": "a", "remote": "192.0.2.1"} ', ""),
])
def test_parse_request_errors_are_json_loads_errors(body, message):
    if message:
        with pytest.raises(PolicyRequestError) as caught:
            parse_request("allow", body)
        assert str(caught.value) == message
    else:
        assert parse_request("allow", body)[1].remote_ip == "192.0.2.1"
    # NaN, accepted by json.loads, is refused on the fast path too
    with pytest.raises(PolicyRequestError, match="NaN is not a JSON number"):
        parse_request("allow", b'{"login": "a", "remote": "192.0.2.1", "x": NaN}')


def test_known_makes_the_constructors_attempt_with_its_address_set():
    address = parse_address("2001:db8::7")
    known = Attempt.known(address, login="al", remote_ip="2001:db8::7", protocol="imap",
                          tls=True, session_id="s", pwhash="h")
    built = Attempt(login="al", remote_ip="2001:db8::7", protocol="imap", tls=True,
                    session_id="s", pwhash="h")
    assert known == built and hash(known) == hash(built) and repr(known) == repr(built)
    assert vars(known)["address"] == address == built.address
    assert dataclasses.asdict(known) == dataclasses.asdict(built)
    assert Attempt.known(parse_address("192.0.2.1"), "a", "192.0.2.1").device_id == ""
    with pytest.raises(dataclasses.FrozenInstanceError):
        known.login = "other"  # type: ignore[misc]
