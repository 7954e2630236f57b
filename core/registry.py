"""A small name -> object registry that refuses duplicates and says what it holds.

Towers, heads, data sources and evaluators each live in one `Registry`. Registering is done
with a decorator next to the definition, so adding a component is one file; tests are
parametrized over `registry.names()`, so every registered component is tested for free.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar

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
        def add(obj: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is already registered by {self._entries[name]!r}")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(
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
