"""record.Record: the frozen records of the quick commands' path (images, detached state)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supermachine.record import Record


class Point(Record):
    __slots__ = ("x", "y", "tags", "where")
    DEFAULTS = {"y": 0}
    FACTORIES = {"tags": list}
    UNCOMPARED = ("where",)

    x: int
    y: int
    tags: list[str]
    where: str


class Other(Record):
    __slots__ = ("x",)


class Counter(Record):
    __slots__ = ("n",)
    FROZEN = False


def test_fields_by_position_or_keyword_with_defaults_and_fresh_factories():
    a = Point(1, where="here")
    assert (a.x, a.y, a.tags, a.where) == (1, 0, [], "here")
    b = Point(x=1, y=2, where="there")
    assert a.tags is not b.tags  # a fresh default per record
    assert a.as_dict() == {"x": 1, "y": 0, "tags": [], "where": "here"}


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    ((), {"where": "w"}, "needs the field 'x'"),
    ((1, 2, [], "w", 5), {}, "takes 4 fields, got 5"),
    ((1,), {"x": 2, "where": "w"}, "field 'x' twice"),
    ((1,), {"where": "w", "z": 3}, "no field 'z'"),
])
def test_wrong_fields_are_a_type_error(args, kwargs, message):
    with pytest.raises(TypeError, match=message):
        Point(*args, **kwargs)


def test_frozen_records_refuse_changes_and_replace_makes_a_copy():
    a = Point(1, where="w")
    with pytest.raises(AttributeError, match="immutable"):
        a.x = 2
    with pytest.raises(AttributeError):
        del a.x
    b = a.replace(y=5)
    assert (a.y, b.y, b.x, type(b)) == (0, 5, 1, Point)
    c = Counter(1)
    c.n += 1
    assert c.n == 2
    with pytest.raises(TypeError, match="not hashable"):
        hash(c)


def test_equality_is_by_class_and_compared_fields():
    assert Point(1, where="a") == Point(1, where="b")  # where is not compared
    assert hash(Other(1)) == hash(Other(1))
    assert Point(1, where="a") != Point(2, where="a")
    assert Other(1) != Point(1, where="a") and Other(1) != (1,)
    assert repr(Point(1, where="a")) == "Point(x=1, y=0, tags=[], where='a')"


@given(st.integers(), st.integers(), st.lists(st.text(max_size=5), max_size=3), st.text())
def test_as_dict_round_trips(x, y, tags, where):
    p = Point(x, y, tags, where)
    assert Point(**p.as_dict()) == p and Point(**p.as_dict()).as_dict() == p.as_dict()
