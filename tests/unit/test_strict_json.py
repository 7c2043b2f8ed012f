"""strict_json: the JSON json.loads accepts but the stores, the audit log and the answers
cannot hold, refused as ValueError by every front end that parses network JSON."""

from __future__ import annotations

import re

import pytest

from security import strict_json
from security.protocols import dovecot, stalwart

DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize("text, message", [
    ('{"login": "a\\ud800b"}', "lone surrogate ('\\ud800')"),
    ('{"login": "\\udfff"}', "lone surrogate ('\\udfff')"),
    ('{"a\\udc00": 1}', "lone surrogate ('\\udc00')"),  # a key too
    ('[["x", {"y": ["\\ud83d"]}]]', "lone surrogate ('\\ud83d')"),  # a pair's first half
    (DEEP, "nested too deeply"),
    ('{"duration_seconds": NaN}', "NaN is not a JSON number"),
    ('[-Infinity]', "-Infinity is not a JSON number"),
    ('{"x": 1e400}', "1e400 is out of range for a JSON number"),
])
def test_what_json_loads_lets_through_is_refused(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        strict_json.loads(text)


def test_real_text_passes_as_json_loads_gives_it():
    text = '{"login": "caf\\u00e9 \\ud83d\\ude00 \u00fc", "n": [1, 2.5, -1e-300, null, true]}'
    assert strict_json.loads(text) == {"login": "café 😀 ü",
                                       "n": [1, 2.5, -1e-300, None, True]}


@pytest.mark.parametrize("body", [b'{"login": "a\\ud800", "remote": "192.0.2.1"}',
                                  b'{"login": "a", "remote": "192.0.2.1", "x": "\\udc00"}',
                                  b'{"login": "a", "remote": "192.0.2.1", "x": NaN}',
                                  ('{"login": ' + DEEP + "}").encode()])
def test_the_dovecot_parser_refuses_them_on_its_fast_path_too(body):
    with pytest.raises(dovecot.PolicyRequestError, match="body is not JSON"):
        dovecot.parse_request("allow", body)


def test_the_stalwart_webhook_refuses_them():
    with pytest.raises(stalwart.WebhookError, match="lone surrogate"):
        stalwart.parse_batch(b'{"events": [{"id": "1", "type": "auth.failed", '
                             b'"data": {"login": "a\\ud800"}}]}')


@pytest.mark.parametrize("text, key", [
    ('{"user": "a", "user": "b"}', "user"),
    ('[{"x": {"k": 1, "k": 1}}]', "k"),  # nested, and the same value twice
    ('{"caf\\u00e9": 1, "café": 2}', "caf\\xe9"),  # one key, spelled two ways
])
def test_a_duplicate_key_is_refused_and_named(text, key):
    """json.loads keeps the last of two values: {"user": "a", "user": "b"} was user "b" here
    and could be user "a" to a proxy or a log reader that keeps the first."""
    with pytest.raises(ValueError, match=re.escape(f"duplicate key '{key}'")):
        strict_json.loads(text)


def test_the_same_key_in_two_objects_is_no_duplicate():
    assert strict_json.loads('[{"a": 1}, {"a": 2}]') == [{"a": 1}, {"a": 2}]


def test_the_front_ends_refuse_duplicate_keys():
    with pytest.raises(dovecot.PolicyRequestError, match="duplicate key 'login'"):
        dovecot.parse_request("allow", b'{"login": "a", "remote": "192.0.2.1", "login": "b"}')
    with pytest.raises(stalwart.WebhookError, match="duplicate key 'type'"):
        stalwart.parse_batch(b'{"events": [{"id": "1", "type": "auth.failed", '
                             b'"type": "auth.success", "data": {}}]}')
