"""Of several states of a user, readers keep the one with the larger applied offset."""

from __future__ import annotations

from vql.schemas.newest import newest


def held(offsets: dict[bytes, int]):
    return lambda keys: [offsets.get(key) for key in keys]


def test_the_larger_applied_offset_wins_over_the_later_read():
    changes = [(b"u", b"new", 200), (b"u", b"old", 100), (b"v", b"v1", 5)]
    assert newest(changes, held({})) == {b"u": b"new", b"v": b"v1"}


def test_equal_offsets_keep_the_later_state():
    assert newest([(b"u", b"first", 7), (b"u", b"second", 7)], held({})) == {b"u": b"second"}


def test_what_is_stored_wins_unless_the_change_is_newer():
    changes = [(b"u", b"older", 100), (b"v", b"newer", 300), (b"w", b"same", 50)]
    stored = held({b"u": 200, b"v": 200, b"w": 50})
    assert newest(changes, stored) == {b"v": b"newer", b"w": b"same"}
    assert newest(changes, stored, replace_equal=False) == {b"v": b"newer"}


def test_a_tombstone_deletes_and_a_state_after_it_starts_afresh():
    assert newest([(b"u", b"s", 100), (b"u", None, None)], held({b"u": 50})) == {b"u": None}
    assert newest([(b"u", None, None), (b"u", b"again", 3)], held({b"u": 500})) == {b"u": b"again"}
