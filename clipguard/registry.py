"""``Registry``: the one name table behind every choice a user types (attacks, methods, objectives, sources...).

A registry maps names to entries and owns the one "unknown name" message, with close matches::

    ATTACKS = Registry("--attack")

    @ATTACKS.register("pgd")
    def _pgd(model, cfg): ...

    ATTACKS.get("pgdd")  # ClipguardError: --attack 'pgdd' is unknown (did you mean pgd?): choose from fgsm, pgd

Adding an attack, objective, method, source or surrogate is one function and one ``register`` line.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

from clipguard.errors import ClipguardError

T = TypeVar("T")


def suggest(name: str, choices: list[str], n: int = 5) -> str:
    """A ", "-joined list of the close matches of ``name`` among ``choices`` (may be empty); a choice that differs
    only in case comes first (``vit-b-32`` -> ``ViT-B-32``)."""
    same = [c for c in choices if c.lower() == str(name).lower()]
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    return ", ".join(dict.fromkeys([*same, *close][:n]))


def unknown_choice(option: str, value: str, choices: list[str], *, what: str = "is unknown") -> ClipguardError:
    """The one-line error for a value outside ``choices``: names the option, the value and close matches."""
    close = suggest(str(value), list(choices))
    hint = f" (did you mean {close}?)" if close else ""
    return ClipguardError(f"{option} {value!r} {what}{hint}: choose from {', '.join(choices)}")


class Registry(Generic[T]):
    """Names -> entries for one option (``option`` is how the CLI spells it, e.g. ``--attack``)."""

    def __init__(self, option: str):
        self.option = option
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None):
        """``reg.register("pgd", fn)``, or ``@reg.register("pgd")`` as a decorator; returns the entry."""
        def add(e: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.option}: {name!r} is registered twice")
            self._entries[name] = e
            return e
        return add(entry) if entry is not None else add

    def get(self, name: str, option: str | None = None) -> T:
        """The entry for ``name``; an unknown name is a one-line ClipguardError with the close matches."""
        if name not in self._entries:
            raise unknown_choice(option or self.option, name, self.names())
        return self._entries[name]

    def check(self, name: str, option: str | None = None) -> str:
        """``name`` itself when it is registered (else the same error as :meth:`get`)."""
        self.get(name, option)
        return name

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

