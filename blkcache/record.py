"""Frozen dataclasses for results, without the start-up cost of generating them.

``@dataclass(frozen=True)`` compiles an ``__init__``, ``__repr__``,
``__eq__``, ``__hash__``, ``__setattr__`` and ``__delattr__`` from source
text at import time, for every class: about 1 ms for a class of 17 fields,
paid by every ``blkcache drop``.  A record is still a frozen dataclass
(``dataclasses.fields``, ``asdict``, ``replace`` and ``is_dataclass`` work,
``__dataclass_params__.frozen`` is true, assigning or deleting a field
raises FrozenInstanceError), but its ``__init__`` is written out in the
class (compiled once, into the .pyc) and the other methods come from the
Record base class, the same for all.
"""

from dataclasses import FrozenInstanceError, dataclass


class Record:
    """``__repr__``, ``__eq__`` and ``__hash__`` of a frozen dataclass, over its fields."""

    __slots__ = ()

    def _values(self):
        values = self.__dict__
        return tuple(values[name] for name in self.__dataclass_fields__)

    def __repr__(self):
        values = self.__dict__
        inner = ", ".join(f"{name}={values[name]!r}" for name in self.__dataclass_fields__)
        return f"{type(self).__qualname__}({inner})"

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self):
        return hash(self._values())

    def __setattr__(self, name, value):
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name):
        raise FrozenInstanceError(f"cannot delete field {name!r}")


class MutableRecord(Record):
    """A Record whose fields may be assigned (an unhashable dataclass, as
    ``@dataclass`` without ``frozen`` makes it)."""

    __slots__ = ()
    __setattr__ = object.__setattr__
    __delattr__ = object.__delattr__
    __hash__ = None


def record(cls):
    """Make cls (a Record subclass with its own ``__init__``, which sets its
    fields through ``self.__dict__``) a dataclass, frozen unless it is a
    MutableRecord."""
    cls = dataclass(init=False, repr=False, eq=False)(cls)
    # Frozen in fact (Record's __setattr__/__delattr__): say so, as
    # dataclass(frozen=True) would, without its generated methods.
    cls.__dataclass_params__.frozen = not issubclass(cls, MutableRecord)
    return cls
