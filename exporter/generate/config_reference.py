"""Writes the embedded defaults.yaml and docs/configuration.md from config.schema.json.

The schema is the one source of every key, description and default; these two
files are views of it, so a default is never written twice by hand.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import yaml

from exporter.config import load_schema

HEADER = (
    "# Embedded default configuration of a3mailer-exporter.\n"
    "# GENERATED from exporter/config/config.schema.json by `a3mailer-exporter generate`:\n"
    "# do not edit. A file given with --config is merged over these values."
)


def _resolve(prop: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """The property with its $ref target's keywords filled in (the property's own win)."""
    ref = prop.get("$ref")
    if not ref:
        return prop
    target = schema
    for part in ref.lstrip("#/").split("/"):
        target = target[part]
    return {**target, **{k: v for k, v in prop.items() if k != "$ref"}}


def _walk(
    node: dict[str, Any], schema: dict[str, Any], path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    for key, raw in node.get("properties", {}).items():
        prop = _resolve(raw, schema)
        yield (*path, key), prop
        if prop.get("type") == "object" and "properties" in prop:
            yield from _walk(prop, schema, (*path, key))


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def defaults_yaml() -> str:
    schema = load_schema()
    return "\n".join([HEADER, *commented_yaml(schema, schema)]) + "\n"


def commented_yaml(node: dict[str, Any], schema: dict[str, Any],
                   prefix: tuple[str, ...] = ()) -> list[str]:
    """YAML lines of a schema node's defaults, each key under its description, nested
    below `prefix` (the Helm chart's values.yaml puts the config under `config:`)."""
    lines = []
    for path, prop in _walk(node, schema, prefix):
        indent = "  " * (len(path) - 1)
        if len(path) == len(prefix) + 1:
            lines.append("")
        for text in _wrap(prop.get("description", ""), 88 - len(indent)):
            lines.append(f"{indent}# {text}")
        if prop.get("type") == "object" and "properties" in prop:
            lines.append(f"{indent}{path[-1]}:")
        else:
            lines.append(f"{indent}{path[-1]}: {_scalar(prop['default'])}")
    return lines


def _wrap(text: str, width: int) -> list[str]:
    words, out, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        out.append(line)
    return out


def _type_of(prop: dict[str, Any]) -> str:
    kind = prop.get("type", "")
    if "pattern" in prop and "duration" in prop.get("description", "").lower():
        return "duration"
    if kind == "array" and "items" in prop:
        return f"list of {prop['items'].get('type', 'object')}"
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    return str(kind)


def _default(prop: dict[str, Any]) -> str:
    return f"`{json.dumps(prop['default'])}`" if "default" in prop else "required"


def configuration_md() -> str:
    schema = load_schema()
    out = [
        "# Configuration reference",
        "",
        "<!-- GENERATED from exporter/config/config.schema.json by "
        "`a3mailer-exporter generate`: do not edit. -->",
        "",
        schema["description"],
        "",
        "Durations are written as a number and a unit: `ms`, `s`, `m`, `h`, `d`, `w` "
        "(`30s`, `5m`, `24h`, `1h30m`). Secrets are never inline: each `*_file` key names "
        "a file holding the secret and each `*_env` key an environment variable.",
        "",
        "Errors are reported all at once as `FILE:LINE: key.path: message` and "
        "`check-config` exits 2.",
        "",
    ]
    for key, raw in schema["properties"].items():
        section = _resolve(raw, schema)
        out += [f"## `{key}`", "", section.get("description", ""), "",
                "| key | type | default | description |", "| --- | --- | --- | --- |"]
        for path, prop in _walk(section, schema, (key,)):
            if prop.get("type") == "object" and "properties" in prop:
                default = ""
            else:
                default = _default(prop)
            desc = prop.get("description", "").replace("|", "\\|")
            out.append(f"| `{'.'.join(path)}` | {_type_of(prop)} | {default} | {desc} |")
        out.append("")
    custom = _resolve(schema["properties"]["monitoring"], schema)["properties"]["custom_metrics"]
    out += ["### `monitoring.custom_metrics[]` items", "",
            "| key | type | default | description |", "| --- | --- | --- | --- |"]
    for path, prop in _walk(custom["items"], schema):
        desc = prop.get("description", "")
        out.append(f"| `{path[-1]}` | {_type_of(prop)} | {_default(prop)} | {desc} |")
    out.append("")
    return "\n".join(out)
