"""The README's configuration table, generated from ``Settings.model_fields``.

    python -m service.local.settings_doc        # print the Markdown table (README.md "Configuration")

Each setting is described once, where it is declared: ``Field(description=...,
json_schema_extra={"read_by": roles})`` in ``service.settings``. A field without both fails here
(and so in a test), so a new setting cannot ship undocumented; defaults are read from the class,
never written by hand.
"""

from __future__ import annotations

from pathlib import Path

from pydantic.fields import FieldInfo

from service.settings import ENV_PREFIX, Settings


def read_by(info: FieldInfo) -> str:
    """The roles that read a setting: its ``Field(json_schema_extra={"read_by": ...})``."""
    extra = info.json_schema_extra
    roles = extra.get("read_by") if isinstance(extra, dict) else None
    if not isinstance(roles, str) or not info.description:
        raise ValueError("every setting needs Field(description=..., json_schema_extra={'read_by': ...})")
    return roles


# field -> (roles that read it, meaning), from the fields themselves
MEANINGS: dict[str, tuple[str, str]] = {
    name: (read_by(info), info.description or "") for name, info in Settings.model_fields.items()
}


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def default_text(info: FieldInfo) -> str:
    value = info.default
    if value is None:
        return "unset"
    if isinstance(value, Path):
        value = str(value)
    if value == "":
        return '`""`'
    if isinstance(value, list):
        return "`[]`" if not value else f"`{value}`"
    return f"`{value}`"


def markdown_table() -> str:
    rows = ["| Variable | Default | Read by | Meaning |", "|---|---|---|---|"]
    for name, info in Settings.model_fields.items():
        roles, meaning = MEANINGS[name]
        rows.append(f"| `{env_name(name)}` | {default_text(info)} | {roles} | {meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
