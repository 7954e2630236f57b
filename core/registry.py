"""A small name -> object registry that refuses duplicates and says what it holds.

Towers, heads, data sources, exporters and evaluators each live in one `Registry`, set up one
way: the registry sits in the package's `base.py` beside the base class; the package's
`__init__.py` ends with `discover(__name__)`, which imports every module of the folder so their
decorators run; a component whose config has `type: Literal["name"]` registers with
`@REGISTRY.register_by_type`, so its name is written once. Adding a component is one file, and
tests parametrized over `registry.names()` test every registered component for free.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import typing
from typing import Any, Callable, Generic, Iterator, TypeVar

from vlp.core.errors import UnknownName

T = TypeVar("T")


def nearest(name: str, choices: list[str]) -> str:
    """' Did you mean "x"?' for the closest of `choices`, or '' when nothing is close."""
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f' Did you mean "{match[0]}"?' if match else ""


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register under `name` (kinds whose config has no `type` field: heads are
        keyed by their config section, sources are functions, exporters instances). A class
        whose config does declare `type` must carry this same name there."""

        def add(obj: T) -> T:
            declared = config_type(obj.config_class) if hasattr(obj, "config_class") else None
            if declared is not None and declared != name:
                raise TypeError(f"{self.kind} {obj!r} is registered as {name!r} but its config says type {declared!r}")
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is already registered by {self._entries[name]!r}")
            self._entries[name] = obj
            return obj

        return add

    def register_by_type(self, cls: T) -> T:
        """Decorator: register `cls` under the one value of its `config_class`'s
        `type: Literal["name"]` field, so the name is written once."""
        name = config_type(getattr(cls, "config_class", None))
        if name is None:
            raise TypeError(f"{self.kind} {cls!r}: its config_class needs `type: Literal[\"name\"]`")
        return self.register(name)(cls)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:  # a name the user wrote (config, command line): an input error, exit 2
            raise UnknownName(
                f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}.{nearest(name, self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._entries.items()))

    def __contains__(self, name: Any) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self.names())})"


def config_type(config_class: Any) -> str | None:
    """The one value of a pydantic config class's `type: Literal["name"]` field, else None."""
    field = getattr(config_class, "model_fields", {}).get("type")
    if field is None or typing.get_origin(field.annotation) is not typing.Literal:
        return None
    values = typing.get_args(field.annotation)
    return values[0] if len(values) == 1 and isinstance(values[0], str) else None


def discover(package: str) -> None:
    """Import every module of `package` (a package's `__name__`; names starting with "_" are
    skipped), so the components they define register themselves. Called as the last line of
    each registry package's `__init__.py`; modules import their registry from `base.py`."""
    for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package}.{module.name}")
