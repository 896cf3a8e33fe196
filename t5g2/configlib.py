"""Config plumbing shared by every config section: mapping -> frozen dataclass, clear errors.

Configs are ml_collections data; each section (model, train, mesh...) is validated once, at
start, into a frozen dataclass. Errors name the field, the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def positive(value: Any, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{field}={value!r} must be a positive integer")


def to_dict(cd: Any) -> dict[str, Any]:
    if hasattr(cd, "to_dict"):
        return dict(cd.to_dict())
    if isinstance(cd, Mapping):
        return dict(cd)
    raise ConfigError(f"expected a ConfigDict or mapping, got {type(cd).__name__}")


def build(cls: type, values: dict[str, Any], prefix: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown field(s) {', '.join(f'{prefix}.{u}' for u in unknown)}; "
            f"valid: {', '.join(sorted(fields))}"
        )
    missing = sorted(
        n for n, f in fields.items()
        if n not in values and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ConfigError(f"missing field(s) {', '.join(f'{prefix}.{m}' for m in missing)}")
    return cls(**values)
