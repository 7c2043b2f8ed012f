"""Alert labels and annotations expanded as Prometheus expands them.

Prometheus runs every label value and annotation of a firing rule through Go's
text/template with `$labels` (the result series' labels), `$value` (its value) and
`$externalLabels`. The generated rules use `{{ $labels.NAME }}`, `{{ $value }}` and
`{{ $value | printf "%.1f" }}`; this module expands that language, with the
functions operators reach for in their own annotations (printf, humanize,
humanizePercentage, humanizeDuration, toUpper, toLower, title), and prints numbers
as Go does (`{{ $value }}` of 1000000 is `1e+06`, as in Prometheus). Anything else
(range, if, define, other functions) expands to `<error expanding template: ...>`,
as a template that fails in Prometheus does.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|`[^`]*`|\||[$.][A-Za-z_.$][\w.]*|\$|'
                    r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|[A-Za-z_]\w*)")
_VERB = re.compile(r"%([-+# 0]*)(\d+)?(?:\.(\d+))?([a-zA-Z%])")


class TemplateError(ValueError):
    pass


def syntax_problem(text: str) -> str | None:
    """What Go's template parser would refuse in text before any expansion: an action
    opened and never closed (Prometheus then refuses the whole rule file)."""
    return "an unclosed {{ action" if "{{" in _ACTION.sub("", text) else None


def expand(text: str, labels: Mapping[str, str], value: float,
           external_labels: Mapping[str, str] | None = None) -> str:
    """The text with every {{ ... }} action expanded; an error gives Prometheus's error text."""
    if "{{" not in text:
        return text
    scope = {"labels": labels, "value": value, "externalLabels": external_labels or {},
             "externalURL": ""}
    out: list[str] = []
    pos, trim_next = 0, False
    try:
        for match in _ACTION.finditer(text):
            literal = text[pos:match.start()]
            if trim_next:
                literal = literal.lstrip()
            if match.group(1):
                literal = literal.rstrip()
            out.append(literal)
            out.append(_pipeline(match.group(2), scope))
            pos, trim_next = match.end(), bool(match.group(3))
        rest = text[pos:]
        out.append(rest.lstrip() if trim_next else rest)
    except TemplateError as exc:
        return f"<error expanding template: {exc}>"
    return "".join(out)


def _tokens(text: str) -> list[str]:
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            if text[pos:].strip():
                raise TemplateError(f"unexpected {text[pos:].strip()!r} in {{{{ {text} }}}}")
            break
        tokens.append(match.group(1))
        pos = match.end()
    return tokens


def _pipeline(text: str, scope: dict[str, Any]) -> str:
    commands: list[list[str]] = [[]]
    for word in _tokens(text):
        if word == "|":  # the pipe between commands
            commands.append([])
        else:
            commands[-1].append(word)
    if not all(commands):
        raise TemplateError(f"empty command in {{{{ {text} }}}}")
    result: Any = None
    for index, command in enumerate(commands):
        head, *args = command
        piped = [result] if index else []
        if head in FUNCTIONS:
            result = FUNCTIONS[head](*[_operand(a, scope) for a in args], *piped)
        elif index == 0 and not args:
            result = _operand(head, scope)
        else:
            raise TemplateError(f"function {head!r} not defined")
    return go_print(result)


def _operand(token: str, scope: dict[str, Any]) -> Any:
    if token.startswith('"'):
        return json.loads(token)
    if token[0] == "`":  # a raw string
        return token[1:-1]
    if token[0].isdigit() or token[0] == "-":
        return float(token) if any(c in token for c in ".eE") else int(token)
    if token.startswith("$") or token.startswith("."):
        path = [p for p in token.lstrip("$.").split(".") if p]
        if token.startswith("."):  # .Labels.x, .Value, as the template data's fields
            field = {"Labels": "labels", "Value": "value", "ExternalLabels": "externalLabels",
                     "ExternalURL": "externalURL"}
            if not path or path[0] not in field:
                raise TemplateError(f"can't evaluate field {token}")
            path[0] = field[path[0]]
        if not path or path[0] not in scope:
            raise TemplateError(f"undefined variable {token}")
        value = scope[path[0]]
        for key in path[1:]:
            if not isinstance(value, Mapping):
                raise TemplateError(f"can't evaluate {token}")
            value = value.get(key, "")  # Prometheus: missingkey=zero
        return value
    raise TemplateError(f"function {token!r} not defined")


# --------------------------------------------------------------------------- printing


def go_float(value: float, verb: str = "g", precision: int | None = None) -> str:
    """A float64 as Go's fmt prints it (%v / %g shortest; %e, %f, %g with a precision)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if verb in "fF":
        return f"{value:.{6 if precision is None else precision}f}"
    if verb in "eE":
        text = f"{value:.{6 if precision is None else precision}e}"
        return text.upper() if verb == "E" else text
    if precision is not None:  # %.Ng: Python's %g follows the same rule
        text = f"{value:.{max(precision, 1)}g}"
        return text.upper() if verb == "G" else text
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    if value == 0:
        return sign + "0"
    digits_tuple = Decimal(repr(abs(value))).normalize().as_tuple()
    digits = "".join(str(d) for d in digits_tuple.digits)
    assert isinstance(digits_tuple.exponent, int)
    point = len(digits) + digits_tuple.exponent  # digits before the decimal point
    exponent = point - 1
    if exponent < -4 or exponent >= 6:  # Go: shortest %g switches to %e at 1e+06
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        text = f"{mantissa}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"
        return sign + (text.upper() if verb == "G" else text)
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return sign + digits + "0" * (point - len(digits))
    return f"{sign}{digits[:point]}.{digits[point:]}"


def go_print(value: Any) -> str:
    """What {{ value }} writes (fmt.Print)."""
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return go_float(value)
    if isinstance(value, Mapping):
        return "map[" + " ".join(f"{k}:{v}" for k, v in sorted(value.items())) + "]"
    return str(value)


def printf(fmt: Any, *args: Any) -> str:
    if not isinstance(fmt, str):
        raise TemplateError("printf: the format must be a string")
    remaining = list(args)

    def one(match: re.Match[str]) -> str:
        flags, width, precision, verb = match.groups()
        if verb == "%":
            return "%"
        if not remaining:
            return f"%!{verb}(MISSING)"
        arg = remaining.pop(0)
        prec = int(precision) if precision is not None else None
        if isinstance(arg, float | int) and not isinstance(arg, bool) and verb in "eEfFgGv":
            if verb == "v" and isinstance(arg, int):
                text = str(arg)
            else:
                text = go_float(float(arg), "g" if verb == "v" else verb, prec)
            if "+" in flags and not text.startswith(("-", "+")):
                text = "+" + text
        elif verb == "d" and isinstance(arg, int) and not isinstance(arg, bool):
            text = str(arg)
        elif verb in "sv":
            text = go_print(arg)
            if prec is not None:
                text = text[:prec]
        elif verb == "q":
            text = json.dumps(go_print(arg))
        else:
            kind = "float64" if isinstance(arg, float) else type(arg).__name__
            return f"%!{verb}({kind}={go_print(arg)})"
        if width:
            fill = "0" if "0" in flags and "-" not in flags and verb not in "sq" else " "
            text = text.ljust(int(width)) if "-" in flags else text.rjust(int(width), fill)
        return text

    text = _VERB.sub(one, fmt)
    if remaining:
        text += "%!(EXTRA " + ", ".join(go_print(a) for a in remaining) + ")"
    return text


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise TemplateError("expected a number")
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        raise TemplateError(f"can't convert {value!r} to a number") from None


def humanize(value: Any) -> str:
    """Prometheus's humanize: SI prefixes, 4 significant digits."""
    v = _number(value)
    if v == 0 or math.isnan(v) or math.isinf(v):
        return go_float(v, "g", 4)
    prefix = ""
    if abs(v) >= 1:
        for p in ("k", "M", "G", "T", "P", "E", "Z", "Y"):
            if abs(v) < 1000:
                break
            prefix, v = p, v / 1000
    else:
        for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
            if abs(v) >= 1:
                break
            prefix, v = p, v * 1000
    return go_float(v, "g", 4) + prefix


def humanize_percentage(value: Any) -> str:
    return go_float(_number(value) * 100, "g", 4) + "%"


def humanize_duration(value: Any) -> str:
    """Prometheus's humanizeDuration: 1d 2h 3m 4s, or 4 significant digits of seconds."""
    v = _number(value)
    if math.isnan(v) or math.isinf(v):
        return go_float(v, "g", 4)
    if v == 0:
        return go_float(v, "g", 4) + "s"
    if abs(v) >= 1:
        sign = "-" if v < 0 else ""
        v = abs(v)
        whole = int(v)
        seconds, minutes = whole % 60, (whole // 60) % 60
        hours, days = (whole // 3600) % 24, whole // 86400
        if days:
            return f"{sign}{days}d {hours}h {minutes}m {seconds}s"
        if hours:
            return f"{sign}{hours}h {minutes}m {seconds}s"
        if minutes:
            return f"{sign}{minutes}m {seconds}s"
        return f"{sign}{go_float(v, 'g', 4)}s"
    prefix = ""
    for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if abs(v) >= 1:
            break
        prefix, v = p, v * 1000
    return go_float(v, "g", 4) + prefix + "s"


FUNCTIONS: dict[str, Callable[..., str]] = {
    "printf": printf,
    "humanize": humanize,
    "humanizePercentage": humanize_percentage,
    "humanizeDuration": humanize_duration,
    "toUpper": lambda s: go_print(s).upper(),
    "toLower": lambda s: go_print(s).lower(),
    "title": lambda s: re.sub(r"\b\w", lambda m: m.group(0).upper(), go_print(s)),
}
