"""Named implementations of one kind (divergences, losses, engines), each registered once by a decorator: a new
one is one decorated function, and the choices a config may name and the error that lists them follow from here."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, Mapping, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """name -> implementation, read-only but for `register` and `unregister`; a lookup of an unknown name raises
    `error` in one line that lists the registered names."""

    def __init__(self, what: str, error: type[Exception] = ValueError):
        self.what = what  # how errors name a key: "divergence kind", "rollout.engine", ...
        self.error = error
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under `name`, once."""
        def register(item: T) -> T:
            if name in self._items:
                raise ValueError(f"a {self.what} named {name!r} is already registered")
            self._items[name] = item
            return item
        return register

    def unregister(self, name: str) -> None:
        """Remove a registered name (a test's own, once it is done)."""
        self[name]
        del self._items[name]

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._items)

    def __getitem__(self, name: str) -> T:
        if name not in self._items:
            raise self.error(f"unknown {self.what} {name!r}; valid ones are {', '.join(self._items)}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:  # Mapping's would call __getitem__, whose error is no KeyError
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
