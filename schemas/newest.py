"""Of several states of one user, the newest: the one with the larger applied offset.

A state records the highest input offset applied to it, and within a partition that offset
only grows: every later state of a user was folded on top of the earlier ones. So a reader
of the states topic (a restore, a standby copy, the serving view) keeps, per user, the state
with the larger applied offset rather than the last one it read. A publication that arrives
late (a worker that lost its partition and did not know it yet) then cannot replace a newer
state; transactions fence such a worker too (streams/fencing.py), this holds even without.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

Change = tuple[bytes, bytes | None, int | None]  # key, state or None (a tombstone), its applied offset


def newest(changes: Iterable[Change], stored: Callable[[Sequence[bytes]], Sequence[int | None]],
           replace_equal: bool = True) -> dict[bytes, bytes | None]:
    """What to write per key for ``changes`` of one partition, in offset order: the state with
    the largest applied offset among them (the later among equals), unless ``stored`` (the
    applied offsets already held for keys, None where none) holds a larger one (or an equal
    one, without ``replace_equal``), in which case the key is left out; None for a key whose
    last change is a tombstone (delete it), and a state after a tombstone wins over what was
    stored."""
    chosen: dict[bytes, tuple[bytes | None, int]] = {}
    deleted: set[bytes] = set()
    for key, value, applied in changes:
        if value is None:
            chosen[key] = (None, -1)
            deleted.add(key)
        elif key not in chosen or chosen[key][0] is None or applied >= chosen[key][1]:
            chosen[key] = (value, applied)
    compare = [key for key, (value, _a) in chosen.items() if value is not None and key not in deleted]
    held = dict(zip(compare, stored(compare))) if compare else {}
    return {key: value for key, (value, applied) in chosen.items()
            if value is None or key in deleted or held.get(key) is None or applied > held[key]
            or (replace_equal and applied == held[key])}
