"""Loads YAML config files and reports every problem as FILE:LINE: key.path: message.

The embedded defaults (defaults.yaml) are loaded first; a user file is validated
on its own (so line numbers point into it) and then merged over them.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import errno
import functools
import ipaddress
import json
import math
import os
import re
import ssl
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CONFIG_DIR = Path(__file__).resolve().parent
SCHEMA_PATH = CONFIG_DIR / "config.schema.json"
DEFAULTS_PATH = CONFIG_DIR / "defaults.yaml"

# Health components the exporter itself registers (a probe may not take their names).
RESERVED_COMPONENTS = ("state_dir", "config", "system", "security_store")

_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One config error, located in its file."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path or '(top level)'}: {self.message}"


class ConfigError(Exception):
    """All the problems found in one config file, reported together."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass
class Config:
    """The merged, validated configuration: plain nested dicts, keyed as in the schema."""

    data: dict[str, Any]
    source: str = "(embedded defaults)"
    path: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def seconds(self, *keys: str) -> float:
        """A duration value, in seconds."""
        value: Any = self.data
        for key in keys:
            value = value[key]
        return parse_duration(value)


def parse_duration(text: str) -> float:
    """'30s' -> 30.0, '1h30m' -> 5400.0. The schema's pattern has already checked the form."""
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"bad duration {text!r}")
    return total


def read_secret(section: Mapping[str, Any], name: str) -> str | None:
    """A secret from `<name>_file`, else from the variable `<name>_env` names; None if unset.

    Secrets never live inline in the config, so they stay out of ConfigMaps and logs.
    """
    path = section.get(f"{name}_file") or ""
    if path:
        raw = Path(path).read_bytes()
        try:
            return raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:  # one failure for every caller: the secret cannot be read
            raise OSError(errno.EINVAL, "the file is not UTF-8 text", path) from None
    env = section.get(f"{name}_env") or ""
    return os.environ.get(env) or None if env else None


_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
# Header names that carry credentials: refused inline in tracing.otlp_headers.
SECRET_HEADER = re.compile(r"authorization|token|secret|password|api[-_]?key|cookie|credential",
                           re.IGNORECASE)


# what an HTTP header value may hold here: visible ASCII, spaces and tabs (a line break
# would end the header; http.client refuses it at every export, long after the load)
_HEADER_VALUE = re.compile(r"^[\t\x20-\x7e]*$")
# headers of the export request that the exporter sets itself
RESERVED_HEADERS = frozenset({"content-type", "content-length", "host", "transfer-encoding",
                              "connection"})
# gRPC metadata: names of digits, letters, - _ . (sent in lower case); "grpc-" names are
# the transport's own and "-bin" names carry binary values, which a text config cannot
_GRPC_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
GRPC_RESERVED_HEADERS = RESERVED_HEADERS | {"te", "user-agent"}


def header_problem(name: str, value: str, grpc: bool = False) -> str | None:
    """What is wrong with one export header (gRPC metadata when `grpc`), said without
    its value (it may be secret)."""
    if not _HEADER_NAME.match(name):
        return "the name must be an HTTP token"
    if name.lower() in (GRPC_RESERVED_HEADERS if grpc else RESERVED_HEADERS):
        return "the exporter sets this header itself"
    if grpc and (not _GRPC_NAME.match(name) or name.lower().startswith("grpc-")
                 or name.lower().endswith("-bin")):
        return ("a gRPC metadata name holds only letters, digits, - _ and ., and neither "
                "starts with grpc- nor ends with -bin")
    if not _HEADER_VALUE.match(value):
        return "the value may hold only visible ASCII, spaces and tabs (no line breaks)"
    return None


def parse_headers(text: str, grpc: bool = False) -> dict[str, str]:
    """'name=value' pairs separated by commas or newlines, values percent-encoded (the
    OTEL_EXPORTER_OTLP_HEADERS format); lines starting with # are comments. ValueError
    names the bad pair by position, never its value, which may be a secret. `grpc`: the
    names must also be gRPC metadata names."""
    headers: dict[str, str] = {}
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    pairs = [pair.strip() for line in lines for pair in line.split(",")]
    for number, pair in enumerate((p for p in pairs if p), start=1):
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not _HEADER_NAME.match(name):
            raise ValueError(f"header {number}: expected name=value with a token name")
        value = urllib.parse.unquote(value.strip())
        problem = header_problem(name, value, grpc)
        if problem is not None:
            raise ValueError(f"header {number}: {problem}")
        headers[name] = value
    return headers


def merge_headers(*sources: Mapping[str, str]) -> dict[str, str]:
    """The headers of every source, a later one's overriding an earlier one's of the same
    name in any case (HTTP names are case-insensitive: x-scope-orgid replaces
    X-Scope-OrgID rather than going out beside it)."""
    merged: dict[str, tuple[str, str]] = {}
    for source in sources:
        for name, value in source.items():
            merged[name.lower()] = (name, value)
    return dict(merged.values())


# URLs whose credentials have keys of their own (secret files, kept out of ConfigMaps, logs
# and /health): a password in the URL is refused, with where it belongs.
URLS_WITHOUT_CREDENTIALS: dict[tuple[str, ...], str] = {
    ("tracing", "otlp_endpoint"): "tracing.otlp_headers_file or tracing.otlp_headers_env",
    ("monitoring", "stalwart", "url"): "monitoring.stalwart.token_file, or username and "
                                       "password_file",
    ("security", "mfa", "sms", "url"): "security.mfa.sms.auth_header and auth_value_file",
    ("security", "store", "redis_url"): "security.store.redis_password_file or "
                                        "redis_password_env",
}

# Secrets the exporter itself keys with, or that guard its admin routes: shorter ones are
# refused at load (and so on a reload, before anything is applied), not at first use.
SECRET_MIN_LENGTH: dict[tuple[str, ...], int] = {
    ("security", "admin_token"): 16,
    ("security", "csrf_key"): 16,  # security/csrf.py's HMAC key
    ("security", "mfa", "encryption_key"): 32,  # security/mfa/sealing.py's MIN_KEY_CHARS
}


@functools.cache
def secret_paths() -> tuple[tuple[tuple[str, ...], str], ...]:
    """(section path, name) of every secret: each `<name>_file` key the schema types as a
    secret_file, so a secret added to the schema is checked at load (and gets its place in
    the chart's Secret) without a second list to keep."""
    found: list[tuple[tuple[str, ...], str]] = []

    def walk(node: dict[str, Any], path: tuple[str, ...]) -> None:
        for key, prop in node.get("properties", {}).items():
            if prop.get("$ref") == "#/definitions/secret_file" and key.endswith("_file"):
                found.append((path, key.removesuffix("_file")))
            elif prop.get("type") == "object":
                walk(prop, (*path, key))

    walk(load_schema(), ())
    return tuple(found)


@functools.cache
def load_schema() -> dict[str, Any]:
    with SCHEMA_PATH.open(encoding="utf-8") as fh:
        schema: dict[str, Any] = json.load(fh)
    return schema


@functools.cache
def _validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(
        load_schema(), format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
    )


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> Config:
    """Defaults, then the user file, then command-line overrides ({"server": {...}})."""
    data = copy.deepcopy(_defaults())
    source = "(embedded defaults)"
    positions: dict[Path_, tuple[int, int]] = {}
    if path is not None:
        source = str(path)
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError([Problem(source, 0, "", f"cannot read: {exc.strerror}")]) from exc
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            raise ConfigError([Problem(source, line, "", f"not UTF-8: byte 0x{raw[exc.start]:02x}"
                                       " cannot be decoded")]) from exc
        user, positions = _load_text(text, source)
        data = merge(data, user)
    if overrides:
        data = merge(data, dict(overrides))
    problems = _semantic_problems(data, source, positions)
    if problems:
        raise ConfigError(problems)
    return Config(
        data=data,
        source=source,
        path=Path(path) if path is not None else None,
        overrides=dict(overrides or {}),
    )


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else (lists included) replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@functools.cache
def _defaults() -> dict[str, Any]:
    data, _ = _load_text(DEFAULTS_PATH.read_text(encoding="utf-8"), str(DEFAULTS_PATH))
    return data


def _load_text(text: str, name: str) -> tuple[dict[str, Any], dict[Path_, tuple[int, int]]]:
    """Parses and schema-checks one file; returns its data and the line of every key."""
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:  # a control character: YAML refuses the file
        line = text.count("\n", 0, max(exc.position, 0)) + 1
        raise ConfigError([Problem(name, line, "", f"invalid YAML: character "
                                   f"#x{exc.character:04x} is not allowed")]) from exc
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            raise ConfigError([_yaml_problem(name, exc)]) from exc
        except yaml.YAMLError as exc:
            raise ConfigError([Problem(name, 0, "", f"invalid YAML: {exc}")]) from exc
        except RecursionError:  # PyYAML composes nested collections recursively
            raise ConfigError([Problem(name, 0, "", "invalid YAML: lists or mappings nested "
                                       "too deep to read")]) from None
        if node is None:
            return {}, {}
        alias_problem = _alias_problem(node, name)
        if alias_problem is not None:
            raise ConfigError([alias_problem])
        positions: dict[Path_, tuple[int, int]] = {}
        problems = _index_node(node, (), positions, name, set())
        try:
            data = loader.construct_document(node)
        except yaml.MarkedYAMLError as exc:  # a tag SafeLoader refuses (!!python/object)
            raise ConfigError([_yaml_problem(name, exc)]) from exc
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError([Problem(name, node.start_mark.line + 1, "", "must be a mapping")])
    problems += _schema_problems(data, positions, name)
    problems += _non_finite_problems(data, (), positions, name)
    if problems:
        problems.sort(key=lambda p: (p.line, p.path))
        raise ConfigError(problems)
    return data, positions


def _yaml_problem(name: str, exc: yaml.MarkedYAMLError) -> Problem:
    """YAML's error at the line it names, with where the construct it was reading began
    (an unclosed quote is found at the end of the file, but opened on its own line)."""
    mark = exc.problem_mark or exc.context_mark
    message = f"invalid YAML: {exc.problem}"
    if exc.context and exc.context_mark is not None and exc.context_mark is not mark:
        message += f" ({exc.context} started on line {exc.context_mark.line + 1})"
    return Problem(name, mark.line + 1 if mark else 0, "", message)


# the most values a config may hold with its aliases expanded (each reference counted):
# a real one holds a few thousand; ten references a level, eight levels deep, would be
# 10^8 and took the loader minutes and gigabytes
MAX_VALUES = 100_000


def _alias_problem(node: yaml.Node, name: str) -> Problem | None:
    """A recursive alias, or aliases that expand the file beyond MAX_VALUES values:
    what the data built from it would then be is refused before it is built."""
    sizes: dict[int, int] = {}  # a node's values, expanded, by id: each node counted once
    open_nodes: set[int] = set()

    def size(item: yaml.Node) -> int:
        key = id(item)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise RecursionError
        open_nodes.add(key)
        if isinstance(item, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in item.value)
        elif isinstance(item, yaml.SequenceNode):
            total = 1 + sum(size(v) for v in item.value)
        else:
            total = 1
        open_nodes.discard(key)
        sizes[key] = min(total, MAX_VALUES + 1)
        return sizes[key]

    try:
        total = size(node)
    except RecursionError:  # an alias inside what it names, or nesting beyond the stack
        return Problem(name, 0, "", "an alias refers to a node that contains it (or the "
                       "nesting is too deep): such a value has no end")
    if total > MAX_VALUES:
        return Problem(name, 0, "", f"with its aliases expanded the file holds more than "
                       f"{MAX_VALUES:,} values")
    return None


def _index_node(
    node: yaml.Node, path: Path_, positions: dict[Path_, tuple[int, int]], name: str,
    indexed: set[int],
) -> list[Problem]:
    """Records (value line, key line) for every path; finds duplicate keys and keys that
    are not plain strings. A node an alias names again is indexed once: what lies under
    the alias has the alias's line."""
    problems: list[Problem] = []
    if id(node) in indexed:
        return problems
    indexed.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append(Problem(name, key_node.start_mark.line + 1, _dotted(path),
                                        "a key must be a plain string, not a list or mapping"))
                continue
            key = key_node.value
            child = (*path, key)
            if key in seen:
                problems.append(
                    Problem(name, key_node.start_mark.line + 1, _dotted(child), "duplicate key")
                )
            seen.add(key)
            positions[child] = (value_node.start_mark.line + 1, key_node.start_mark.line + 1)
            problems += _index_node(value_node, child, positions, name, indexed)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, index)
            positions[child] = (item.start_mark.line + 1, item.start_mark.line + 1)
            problems += _index_node(item, child, positions, name, indexed)
    return problems


def _at(data: Mapping[str, Any], path: Path_) -> Any:
    """The value at a key path of the (merged) config."""
    value: Any = data
    for key in path:
        value = value[key]
    return value


def _dotted(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _schema_problems(
    data: dict[str, Any], positions: dict[Path_, tuple[int, int]], name: str
) -> list[Problem]:
    problems = []
    for error in _validator().iter_errors(data):
        for path, message, on_key in _explain(error):
            line = _line_for(path, positions, on_key)
            problems.append(Problem(name, line, _dotted(path), message))
    return problems


def _non_finite_problems(node: Any, path: Path_, positions: dict[Path_, tuple[int, int]],
                         name: str) -> list[Problem]:
    """.nan and .inf, which YAML reads as floats and the schema's bounds let through (a
    threshold of nan never fires): no key takes them."""
    if isinstance(node, float) and not math.isfinite(node):
        return [Problem(name, _line_for(path, positions, False), _dotted(path),
                        f"must be a finite number, got {node!r}")]
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(
        node, list) else ()
    return [problem for key, value in items
            for problem in _non_finite_problems(value, (*path, key), positions, name)]


def _line_for(path: Path_, positions: dict[Path_, tuple[int, int]], on_key: bool) -> int:
    while path:
        if path in positions:
            value_line, key_line = positions[path]
            return key_line if on_key else value_line
        path = path[:-1]
    return 1


def _explain(error: jsonschema.ValidationError) -> list[tuple[Path_, str, bool]]:
    """Turns a jsonschema error into (path, message, points-at-key) in the user's words."""
    path: Path_ = tuple(error.absolute_path)
    value = error.instance
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties" and isinstance(value, dict):
        known = list(schema.get("properties", {}))
        out = []
        for key in sorted(set(value) - set(known), key=str):
            hint = difflib.get_close_matches(str(key), known, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            out.append(((*path, key), f"unknown key{suggestion}", True))
        if out:
            return out
    if error.validator == "type":
        expected = error.validator_value
        return [(path, f"wrong type: expected {expected}, got {_describe(value)}", False)]
    durations = _duration_patterns()
    if error.validator == "pattern" and schema.get("pattern") in durations:
        zero = "0 (0s, 0m, ...) or " if schema["pattern"] != durations[0] else ""
        return [
            (path, f"bad duration {value!r}: expected {zero}a positive number followed by "
             "ms, s, m, h, d or w (e.g. 30s, 5m, 24h)", False)
        ]
    if error.validator == "not" and "propertyNames" in error.schema_path and value in (
            "severity", "alertname"):
        advice = (" (an alert's severity has a key of its own: alerting.alerts.NAME.severity)"
                  if value == "severity" else "")
        return [((*path, str(value)), f"the name {value!r} is every rule's own{advice}", True)]
    if error.validator == "pattern" and "propertyNames" in error.schema_path:
        # a key, not a value: said, since the line alone does not tell which of a mapping's
        rule = _pattern_rules().get(str(error.validator_value))
        said = f"must be {rule}" if rule else f"must match {error.validator_value!r}"
        return [((*path, str(value)), f"the name {value!r} {said}", True)]
    # a string's rules are said without the string: it may be a secret in the wrong place
    # (a plain password where a bcrypt hash belongs), and the line is named anyway
    if error.validator == "pattern":
        rule = _pattern_rules().get(str(error.validator_value))
        if rule is not None:
            return [(path, f"must be {rule}", False)]
        return [(path, f"does not match the pattern {error.validator_value!r}", False)]
    if error.validator in ("minLength", "maxLength", "format"):
        rule = {"minLength": "at least {} characters", "maxLength": "at most {} characters",
                "format": "a valid {}"}[str(error.validator)].format(error.validator_value)
        return [(path, f"must be {rule}", False)]
    if error.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        bound = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">",
                 "exclusiveMaximum": "<"}[str(error.validator)]
        return [(path, f"out of range: {value!r} must be {bound} {error.validator_value}", False)]
    if error.validator == "enum":
        choices = ", ".join(repr(v) for v in error.schema["enum"])  # type: ignore[index]
        return [(path, f"must be one of {choices}, got {value!r}", False)]
    return [(path, error.message, False)]


def _describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "mapping", type(None): "null"}.get(type(value), type(value).__name__)
    return f"{kind} {value!r}" if not isinstance(value, (dict, list)) else kind


def _duration_patterns() -> tuple[str, str]:
    """The patterns of a duration and of a duration-or-zero, in that order."""
    definitions = load_schema()["definitions"]
    return definitions["duration"]["pattern"], definitions["duration_or_zero"]["pattern"]


@functools.cache
def _pattern_rules() -> dict[str, str]:
    """The schema's patterns that have a rule in words (others are quoted as they are)."""
    selector = load_schema()["properties"]["alerting"]["properties"]["selector"]["pattern"]
    return {
        "^[a-zA-Z_][a-zA-Z0-9_]*$": "a Prometheus label name (letters, digits and _, not "
                                    "starting with a digit)",
        "^(https?://[^@/]+(/.*)?)?$": "an http:// or https:// URL without user:password@ "
                                      "(credentials have keys of their own)",
        # what a probe writes into its request line as it is: no space, CR or LF
        "^/[!-~]*$": "a path starting with /, in visible ASCII (percent-encode the rest)",
        r"^([A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[!-Z^-~]{1,250}\])$":
            "a host name or an address literal such as [192.0.2.1]",
        selector: 'PromQL label matchers: name, =, !=, =~ or !~, a double-quoted value, '
                  'separated by commas (job="a3mailer-exporter", env="prod")',
        _listen_pattern(): LISTEN_RULE,
    }


def _semantic_problems(
    data: dict[str, Any], source: str, positions: dict[Path_, tuple[int, int]]
) -> list[Problem]:
    """Checks a schema cannot express, on the merged result."""
    problems = []

    def problem(path: Path_, message: str) -> None:
        problems.append(Problem(source, _line_for(path, positions, True), _dotted(path), message))

    mon = data["monitoring"]
    if parse_duration(mon["health_check_timeout"]) > parse_duration(mon["health_check_interval"]):
        problem(("monitoring", "health_check_timeout"),
                "must not exceed monitoring.health_check_interval")
    seen: dict[str, str] = {}  # the name each is exposed as (a counter's with _total)
    for index, metric in enumerate(mon["custom_metrics"]):
        exposed = metric["name"] + ("_total" if metric["type"] == "counter" else "")
        if metric["name"] in seen.values():
            problem(("monitoring", "custom_metrics", index, "name"),
                    f"metric {metric['name']!r} declared twice")
        elif exposed in seen:  # two families of one name: Prometheus drops the whole scrape
            problem(("monitoring", "custom_metrics", index, "name"),
                    f"exposed as a3mailer_custom_{exposed}, as {seen[exposed]!r} is already")
        seen[exposed] = metric["name"]
    _mail_problems(mon, problem)
    _bundle_problems(data, problem)
    _network_problems(data["security"], problem)
    _port_problems(data, problem)
    _health_path_problems(mon, problem)
    _interval_problems(data, problem)
    security = data["security"]
    if parse_duration(security["lockout"]["max_duration"]) < parse_duration(
            security["lockout_duration"]):  # every lock would be cut to the cap
        problem(("security", "lockout", "max_duration"),
                "must not be below security.lockout_duration")
    cookies = security["session_config"]
    if cookies["cookie_same_site"] == "None" and not cookies["secure_cookies"]:
        problem(("security", "session_config", "cookie_same_site"),
                "None needs secure_cookies: true (browsers drop a SameSite=None cookie "
                "without Secure)")
    policy = security["postfix_policy"]
    if policy["enabled"] and _same_socket(data["server"]["listen_address"], policy["listen"]):
        problem(("security", "postfix_policy", "listen"), "the port of server.listen_address: "
                "each listener needs its own")
    for path, ca_file in _ca_files(data):
        if (wrong := ca_problem(ca_file)) is not None:
            problem(path, wrong)
    for section, name in secret_paths():
        values = _at(data, section)
        try:
            secret = read_secret(values, name)
        except OSError as exc:
            problem((*section, f"{name}_file"), f"cannot read secret: {exc.strerror}")
            continue
        if secret is None and (wrong := _unset_variable(section, name, values)) is not None:
            problem((*section, f"{name}_env"), wrong)
        shortest = SECRET_MIN_LENGTH.get((*section, name), 0)
        if secret is not None and len(secret) < shortest:
            # said without the value; the file, or the variable it came from
            key = f"{name}_file" if values.get(f"{name}_file") else f"{name}_env"
            origin = "" if key.endswith("_file") else f" (${values[key]})"
            problem((*section, key), f"the secret{origin} has {len(secret)} characters; "
                    f"at least {shortest} are needed")
    for path, where in URLS_WITHOUT_CREDENTIALS.items():
        netloc = urllib.parse.urlsplit(_at(data, path)).netloc
        userinfo = netloc.rpartition("@")[0]
        # Redis's ACL user may stand in its URL (redis://user@host), the password may not
        if userinfo and (path[-1] != "redis_url" or ":" in userinfo):
            # said without the value: it holds a password
            problem(path, f"no user:password@ in the URL: put credentials in {where}")
    tracing = data["tracing"]
    grpc = tracing["otlp_protocol"] == "grpc"
    if grpc and urllib.parse.urlsplit(tracing["otlp_endpoint"]).path not in ("", "/"):
        problem(("tracing", "otlp_endpoint"), "with otlp_protocol grpc the endpoint is a "
                "scheme, host and port only (http://collector:4317): gRPC has no path")
    for name, value in tracing["otlp_headers"].items():
        if SECRET_HEADER.search(name):
            problem(("tracing", "otlp_headers", name), "looks like a secret: put it in "
                    "tracing.otlp_headers_file or tracing.otlp_headers_env")
        elif (wrong := header_problem(name, value, grpc)) is not None:
            problem(("tracing", "otlp_headers", name), wrong)
    with contextlib.suppress(OSError):  # an unreadable file is reported with every secret
        try:
            parse_headers(read_secret(tracing, "otlp_headers") or "", grpc)
        except ValueError as exc:
            where = "otlp_headers_file" if tracing["otlp_headers_file"] else "otlp_headers_env"
            problem(("tracing", where), str(exc))
    tls = data["server"]["tls"]
    if bool(tls["cert_file"]) != bool(tls["key_file"]):
        problem(("server", "tls"), "cert_file and key_file go together")
    elif tls["cert_file"] and (wrong := _tls_pair_problem(tls["cert_file"],
                                                          tls["key_file"])) is not None:
        problem(("server", "tls", "cert_file"), wrong)
    roots = security["mfa"]["webauthn"]["attestation_roots_file"]
    if roots and (wrong := ca_problem(roots)) is not None:
        problem(("security", "mfa", "webauthn", "attestation_roots_file"), wrong)
    _alert_engine_problems(data["alerting"]["engine"]["alertmanager"], problem)
    return problems


# the lists of networks the security engine matches addresses against
NETWORK_LISTS: tuple[Path_, ...] = (("trusted_networks",), ("allowlist",),
                                    ("mfa", "policy", "risky_networks"))
# lists where a /0 switches the engine off for every client (risky_networks: MFA for
# everyone, a choice)
_EVERYONE: dict[Path_, str] = {
    ("trusted_networks",): "trusted, no client would ever be delayed, locked or banned",
    ("allowlist",): "allowlisted, no client would ever be banned"}


def _unset_variable(section: Path_, name: str, values: Mapping[str, Any]) -> str | None:
    """A `<name>_env` the operator set (not its default) to a variable that is unset or
    empty: said, since the feature the secret guards would quietly be off (the listener
    open, with server.auth's bearer_token_env). A default name unset is the feature off,
    as documented."""
    env = values.get(f"{name}_env") or ""
    if not env or env == _at(_defaults(), section).get(f"{name}_env"):
        return None
    return f"${env} is not set or is empty"


def _network_problems(security: dict[str, Any], problem: Any) -> None:
    """Each entry an address or a CIDR that the engine's lists take (host bits allowed, a
    mapped prefix from /96): one they refuse stopped the engine at start and half-applied a
    reload. A trusted or allowlisted /0 (0.0.0.0/0, ::/0) would exempt every client."""
    from security.blocklist import parse_network

    for path in NETWORK_LISTS:
        for index, value in enumerate(_at(security, path)):
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                problem(("security", *path, index), f"not an IP address or CIDR: {value!r}")
                continue
            try:
                network = parse_network(value)
            except ValueError as exc:  # a mapped prefix below /96, a scoped address
                problem(("security", *path, index), str(exc))
                continue
            if network.prefixlen == 0 and path in _EVERYONE:
                problem(("security", *path, index), f"{value!r} is every IPv"
                        f"{network.version} address: {_EVERYONE[path]}")


_ANY_HOST = frozenset({"0.0.0.0", "::", "*"})


def _same_socket(first: str, second: str) -> bool:
    """Whether two HOST:PORT listeners would take the same port (a wildcard host takes it
    on every address); split as the listeners split them."""
    from exporter.cli import split_listen

    if listen_problem(first) or listen_problem(second):  # reported as such
        return False
    (host1, port1), (host2, port2) = split_listen(first), split_listen(second)
    return port1 == port2 and (host1 == host2 or host1 in _ANY_HOST or host2 in _ANY_HOST)


# the listeners' HOST:PORT keys, and the other HOST:PORT key (whose form is looser)
LISTEN_KEYS: tuple[Path_, ...] = (("server", "listen_address"),
                                  ("security", "postfix_policy", "listen"))
HOST_PORT_KEYS: tuple[Path_, ...] = (("alerting", "alertmanager", "smarthost"),)
LISTEN_RULE = "HOST:PORT (127.0.0.1:10587, [::1]:10587, or :10587 for every address)"


def _listen_pattern() -> str:
    return str(load_schema()["properties"]["server"]["properties"]["listen_address"]["pattern"])


def listen_problem(address: str) -> str | None:
    """What is wrong with a listen address, None if nothing: its form (run --listen is
    checked here, not by the schema) and its port, 1 to 65535 (the socket layer bound
    99999 as 99999 - 65536 = 34463)."""
    if not re.fullmatch(_listen_pattern(), address):
        return f"must be {LISTEN_RULE}"
    return port_problem(address)


def port_problem(address: str) -> str | None:
    """What is wrong with the port of a HOST:PORT whose form the schema checked."""
    port = address.rpartition(":")[2]
    if port.isdigit() and 1 <= int(port) <= 65535:
        return None
    return f"port {port} is out of range: must be 1 to 65535"


def _port_problems(data: dict[str, Any], problem: Any) -> None:
    for path in LISTEN_KEYS + HOST_PORT_KEYS:
        check = listen_problem if path in LISTEN_KEYS else port_problem
        if (wrong := check(_at(data, path))) is not None:
            problem(path, wrong)


# How often a job runs that reaches a server or reads the whole process: "1ms", a slip
# for "1m", would run it a thousand times a second (poll intervals may be shorter).
MIN_INTERVAL = 1.0
JOB_INTERVALS: tuple[Path_, ...] = (
    ("monitoring", "collection_interval"), ("monitoring", "health_check_interval"),
    ("monitoring", "delivery", "interval"), ("monitoring", "dns", "interval"),
    ("monitoring", "dnsbl", "interval"), ("monitoring", "stalwart", "interval"),
    ("monitoring", "queues", "postfix", "interval"),
    ("monitoring", "queues", "stalwart", "interval"))


def _interval_problems(data: dict[str, Any], problem: Any) -> None:
    probes = [("monitoring", "probes", index, "interval")
              for index, item in enumerate(data["monitoring"]["probes"]) if "interval" in item]
    for path in (*JOB_INTERVALS, *probes, ("alerting", "engine", "evaluation_interval")):
        value = _at(data, path)
        if parse_duration(value) < MIN_INTERVAL:
            problem(path, f"{value} is below the 1s floor of a job's interval (a slip for "
                          "1m?)")


# the app's own routes (exporter/http/): the health document's path may not take one
BUILT_IN_PATHS = ("/metrics", "/livez", "/readyz", "/openapi.json")
BUILT_IN_PREFIXES = ("/api", "/dovecot", "/-")  # and everything under them


def _health_path_problems(mon: dict[str, Any], problem: Any) -> None:
    """A health path equal to a built-in route shadowed it or was shadowed by it (the
    first in the route table wins), and under /api/ or /-/ it took their auth and limits."""
    path = mon["health_endpoint_path"].rstrip("/") or "/"
    if path in BUILT_IN_PATHS or any(path == prefix or path.startswith(prefix + "/")
                                     for prefix in BUILT_IN_PREFIXES):
        taken = ", ".join([*BUILT_IN_PATHS, *(f"{prefix}/..." for prefix in BUILT_IN_PREFIXES)])
        problem(("monitoring", "health_endpoint_path"),
                f"{mon['health_endpoint_path']} is a built-in route: the health document "
                f"needs a path of its own (not {taken})")


def _ca_files(node: Any, path: Path_ = ()) -> Iterator[tuple[Path_, str]]:
    """Every CA bundle the config names (keys ending in ca_file: a probe's, the alert
    push's, the listener's client_ca_file, ...), with where."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(
        node, list) else ()
    for key, value in items:
        if isinstance(key, str) and key.endswith("ca_file") and isinstance(value, str):
            if value:
                yield (*path, key), value
        else:
            yield from _ca_files(value, (*path, key))


def ca_problem(path: str) -> str | None:
    """Why a CA bundle cannot serve, now rather than at the first connection (an alert
    push weeks later said only 'unreachable: FileNotFoundError')."""
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError:  # an OSError too: first
        return "no PEM certificates in the file"
    except OSError as exc:
        return f"cannot read CA certificates: {exc.strerror or exc}"
    return None


def _tls_pair_problem(cert_file: str, key_file: str) -> str | None:
    """Why the listener's certificate and key cannot serve: found by check-config, not
    by `run` after it has said it started."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            cert_file, key_file, password=lambda: b"")  # an encrypted key cannot be used
    except ssl.SSLError:
        return ("the certificate and key_file are not a PEM certificate and its "
                "unencrypted private key")
    except OSError as exc:
        return f"cannot read the certificate or key: {exc.strerror or exc}"
    return None


def _alert_engine_problems(push: dict[str, Any], problem: Any) -> None:
    """The engine's Alertmanager credentials: Basic (user and password) or a bearer token."""
    where = ("alerting", "engine", "alertmanager")
    password = bool(push["password_file"] or push["password_env"])
    bearer = bool(push["bearer_token_file"] or push["bearer_token_env"])
    if password != bool(push["username"]):
        problem((*where, "username"), "username and password_file/password_env go together")
    if bearer and (password or push["username"]):
        token = "bearer_token_file" if push["bearer_token_file"] else "bearer_token_env"
        problem((*where, token), "Basic auth or a bearer token, not both")


def _bundle_problems(data: dict[str, Any], problem: Any) -> None:
    """Alert and dashboard names in alerting.alerts and dashboards.uids must exist; the
    templates of alert labels and annotations must parse, as Prometheus parses them."""
    import difflib

    from exporter.alert_templates import syntax_problem
    from exporter.generate.alerts import ALERT_NAMES
    from exporter.generate.dashboards import KEYS

    alerting = data["alerting"]
    templated: list[tuple[Path_, Any]] = [(("alerting", key), alerting[key])
                                          for key in ("runbook_url", "dashboard_url")]
    templated += [(("alerting", "labels", k), v) for k, v in alerting["labels"].items()]
    for name, override in alerting["alerts"].items():
        for kind in ("labels", "annotations"):
            templated += [(("alerting", "alerts", name, kind, k), v)
                          for k, v in override.get(kind, {}).items()]
    for path, text in templated:
        if (wrong := syntax_problem(str(text))) is not None:
            problem(path, f"{wrong} (Prometheus would refuse every rule)")

    for section, names, what in ((("alerting", "alerts"), ALERT_NAMES, "alert"),
                                 (("dashboards", "uids"), KEYS, "dashboard")):
        for name in data[section[0]][section[1]]:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problem((*section, name), f"unknown {what}{hint}")


def _credentials_problems(section: dict[str, Any], path: Path_, keys: tuple[str, ...],
                          read: Any, problem: Any) -> None:
    """A credentials file that cannot be read, or holds no `user:password` line, is an
    error now (as an unreadable secret is), not at the probe's first run."""
    for key in keys:
        if section.get(key):
            try:
                read(section[key])
            except ValueError as exc:
                problem((*path, key), str(exc).removeprefix(f"{key} "))


def _mail_problems(mon: dict[str, Any], problem: Any) -> None:
    """Probe targets and the round trip, checked by the same code that builds them."""
    from exporter.mail import COMPONENTS
    from exporter.probes import DeliverySettings, Target
    from exporter.probes.delivery import required_problems
    from exporter.probes.target import read_credentials

    names: set[str] = set()
    for index, item in enumerate(mon["probes"]):
        path = ("monitoring", "probes", index)
        try:
            target = Target.from_config(item)
        except ValueError as exc:
            problem(path, str(exc))
            names.add(str(item.get("name", "")))  # a later copy of its name is still one
            continue
        _credentials_problems(item, path, ("credentials_file",), read_credentials, problem)
        if target.name in names:
            problem((*path, "name"), f"probe name {target.name!r} used twice")
        elif target.name in COMPONENTS or target.name in RESERVED_COMPONENTS:
            problem((*path, "name"), f"{target.name!r} is the name of a built-in health "
                                     "component; choose another")
        names.add(target.name)
    if mon["delivery"]["enabled"] and (missing := required_problems(mon["delivery"])):
        for key, wrong in missing:  # every one, each on its key
            problem(("monitoring", "delivery", key), wrong)
    elif mon["delivery"]["enabled"]:
        try:
            DeliverySettings.from_config(mon["delivery"])
        except ValueError as exc:
            problem(("monitoring", "delivery"), str(exc).removeprefix("monitoring.delivery."))
        else:
            _credentials_problems(mon["delivery"], ("monitoring", "delivery"),
                                  ("credentials_file", "imap_credentials_file"),
                                  read_credentials, problem)
    seen: set[str] = set()
    for index, item in enumerate(mon["logs"]["files"]):
        if item["name"] in seen:
            problem(("monitoring", "logs", "files", index, "name"),
                    f"log file name {item['name']!r} used twice")
        seen.add(item["name"])
