"""Frozen records for the modules on the quick commands' path, without `dataclasses`.

Importing dataclasses imports inspect, and with it ast, dis and tokenize: ~15 ms, most of
what `ps` or a small `pull` costs beyond the interpreter's own start. The records those
commands build (an image's layers, a reference, a detached VM's state) need only fields,
defaults, equality, a repr and `replace`, which this base gives from one declaration::

    class Platform(Record):
        __slots__ = ("os", "architecture", "variant")  # the fields, in order
        DEFAULTS = {"variant": ""}

Modules off that path (the runtime, the agent protocol, the service) use dataclasses.
"""

from __future__ import annotations


class Record:
    """Fields are ``__slots__``, given by position or keyword. Immutable (``FROZEN``), equal
    to a record of the same class with the same compared fields, hashable when those are."""

    __slots__ = ()
    #: field -> default (an immutable value)
    DEFAULTS: dict[str, object] = {}
    #: field -> a callable making the default, for a mutable one (a fresh one per record)
    FACTORIES: dict[str, object] = {}
    #: fields left out of equality and hashing (where a record is, not what it is)
    UNCOMPARED: tuple[str, ...] = ()
    #: False for a record whose fields change in place (progress counters)
    FROZEN = True

    def __init__(self, *args: object, **kwargs: object) -> None:
        names = self.__slots__
        cls = type(self).__name__
        if len(args) > len(names):
            raise TypeError(f"{cls} takes {len(names)} fields, got {len(args)}")
        values = dict(zip(names, args, strict=False))
        for name, value in kwargs.items():
            if name not in names:
                raise TypeError(f"{cls} has no field {name!r}")
            if name in values:
                raise TypeError(f"{cls} got the field {name!r} twice")
            values[name] = value
        for name in names:
            if name in values:
                value = values[name]
            elif name in self.DEFAULTS:
                value = self.DEFAULTS[name]
            elif name in self.FACTORIES:
                value = self.FACTORIES[name]()  # type: ignore[operator]
            else:
                raise TypeError(f"{cls} needs the field {name!r}")
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        if self.FROZEN:
            raise AttributeError(f"{type(self).__name__} is immutable: use replace(), "
                                 f"not .{name} = ...")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} fields cannot be deleted")

    def as_dict(self) -> dict[str, object]:
        """The fields by name, in order (values as they are: not copied, not recursed)."""
        return {name: getattr(self, name) for name in self.__slots__}

    def replace(self, **changes: object) -> Record:
        """A copy with ``changes``."""
        return type(self)(**{**self.as_dict(), **changes})

    def _compared(self) -> tuple[object, ...]:
        return tuple(getattr(self, n) for n in self.__slots__ if n not in self.UNCOMPARED)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._compared() == other._compared()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        if not self.FROZEN:
            raise TypeError(f"a mutable {type(self).__name__} is not hashable")
        return hash(self._compared())

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"
