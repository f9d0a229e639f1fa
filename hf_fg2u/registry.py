"""One way to register a pluggable thing: hypergradient methods, outer modules, inner optimizers and recipes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


def check_choice(name: str, value, choices) -> None:
    """A ValueError naming the option and its choices when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not known; use one of {list(choices)}.")


class Registry(Mapping[str, T], Generic[T]):
    """Name -> entry for one kind of thing. ``register`` adds one (also as a decorator); ``get`` names the known
    ones when a name is not among them; reading is a plain read-only mapping."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None):
        """Add ``entry`` under ``name`` (a second entry under a taken name is an error); without ``entry``, a
        decorator that registers what it decorates."""
        if entry is None:
            return lambda decorated: self.register(name, decorated)
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} {name!r} is already registered.")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:  # type: ignore[override]
        """The entry of ``name``, or a ValueError naming the option and the known names."""
        check_choice(self.kind, name, sorted(self._entries))
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
