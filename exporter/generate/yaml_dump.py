"""The one YAML style of the generated files: stable, readable, diff-friendly."""

from __future__ import annotations

import yaml


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, no folded lines, no anchors or aliases."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(data: object) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=1_000_000, allow_unicode=True)
