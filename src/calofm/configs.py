"""``from_dict`` for the config dataclasses, refusing keys the dataclass does not have."""

from __future__ import annotations

from dataclasses import fields
from typing import ClassVar, TypeVar

from calofm.errors import CalofmError

T = TypeVar("T", bound="FromDict")


class FromDict:
    """Mixin for a config dataclass read back from JSON (a manifest, a run directory).

    An unknown key is refused with one line rather than a TypeError, naming the config it is for:
    a misspelt or newer key must not be dropped silently.
    """

    config_name: ClassVar[str]

    @classmethod
    def from_dict(cls: type[T], d: dict) -> T:
        unknown = set(d) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise CalofmError(f"{cls.config_name}: unknown config keys {sorted(unknown)}")
        return cls(**d)
