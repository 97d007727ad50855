"""The published user state: a versioned, language-neutral binary layout.

docs/state-format.md specifies it byte by byte for Java and Go readers; this module is the
reference codec. One object serves every place a state lives: the worker's RocksDB store
(float64, so sums do not drift over millions of events), the `user-states` topic (float32,
what rankers read) and the scorer.

In memory a state is dense: ``log_count[g, c, r]`` (``-inf`` where a (group, code, rate) cell
has seen no event) and ``mean[g, c, r, :]``. On the wire only the non-empty cells travel, so
a new user costs a few hundred bytes and no user costs more than G*K*R cells.

The worker handles states a micro-batch at a time, so the codec is columnar: a
:class:`StateBatch` holds many users' states as arrays, and :func:`encode_states` /
:func:`decode_states` convert a whole batch with a few array calls and one short Python step
per state (its header). The one-state functions are the same codec on a batch of one.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

MAGIC = b"VQLS"
FORMAT_VERSION = 1
MODEL_VERSION_BYTES = 16
MAX_CELLS = 2**16  # cell indices travel as uint16

_HEADER = struct.Struct("<4sHBB16sHHHHddQqIH")
HEADER_BYTES = _HEADER.size  # 70, followed by the user id

_DTYPE_CODES = {np.dtype("<f4"): 1, np.dtype("<f8"): 2}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


class StateFormatError(ValueError):
    """Raised when bytes are not a user state this reader understands."""


@dataclass(eq=False)
class UserState:
    """Everything a ranker needs to score candidates against one user's whole history.

    Times are epoch seconds. ``log_count`` is the log of the forward-decayed count relative to
    ``landmark_t0`` (design/vql.md section 6): read at time t as
    ``log_count - rate * (t - landmark_t0)``.
    """

    user_id: str
    model_version: str
    landmark_t0: float
    last_event_time: float
    event_count: int
    applied_offset: int
    log_count: np.ndarray  # (G, K, R)
    mean: np.ndarray  # (G, K, R, D)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(groups, codes, rates, value dim per group)."""
        return self.mean.shape  # type: ignore[return-value]

    @property
    def occupied_cells(self) -> int:
        return int(np.isfinite(self.log_count).sum())


def full_state_bytes(groups: int, codes: int, rates: int, dim: int, user_id_bytes: int,
                     dtype: np.dtype | type = np.float32) -> int:
    """Encoded size of a state with every (group, code, rate) cell occupied: the most a user
    can cost, whatever the length of the history."""
    itemsize = np.dtype(dtype).itemsize
    return HEADER_BYTES + user_id_bytes + groups * codes * rates * (2 + itemsize * (1 + dim))


@dataclass(eq=False)
class StateBatch:
    """Many users' states of one model as columns: row i is user ``user_ids[i]``.

    What the worker loads, folds (model/state.py), stores and publishes per micro-batch, so
    that none of those steps loops over users in Python. ``log_count`` is (N, G, K, R) and
    ``mean`` (N, G, K, R, D), both float64 and C-contiguous.
    """

    user_ids: list[str]
    model_version: str
    landmark_t0: np.ndarray  # (N,) float64
    last_event_time: np.ndarray  # (N,) float64
    event_count: np.ndarray  # (N,) uint64, as in the header
    applied_offset: np.ndarray  # (N,) int64
    log_count: np.ndarray  # (N, G, K, R)
    mean: np.ndarray  # (N, G, K, R, D)

    def __post_init__(self) -> None:
        # Folding and decoding write through reshaped views: the arrays must be contiguous.
        self.log_count = np.ascontiguousarray(self.log_count, dtype=np.float64)
        self.mean = np.ascontiguousarray(self.mean, dtype=np.float64)

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(groups, codes, rates, value dim per group) of every state."""
        return self.mean.shape[1:]  # type: ignore[return-value]

    @classmethod
    def empty(cls, user_ids: Sequence[str], model_version: str, shape: tuple[int, int, int, int],
              no_offset: int = -1) -> "StateBatch":
        """States of users with no history: every cell empty (log-count -inf)."""
        n = len(user_ids)
        return cls(list(user_ids), model_version, np.zeros(n), np.zeros(n), np.zeros(n, np.uint64),
                   np.full(n, no_offset, np.int64), np.full((n, *shape[:3]), -np.inf), np.zeros((n, *shape)))

    @classmethod
    def of(cls, states: Sequence[UserState]) -> "StateBatch":
        """The states (of one model and shape) as a batch; the arrays are copies."""
        if not states:
            raise ValueError("a StateBatch needs at least one state (use StateBatch.empty)")
        return cls(
            [s.user_id for s in states], states[0].model_version,
            np.fromiter((s.landmark_t0 for s in states), np.float64, len(states)),
            np.fromiter((s.last_event_time for s in states), np.float64, len(states)),
            np.fromiter((s.event_count for s in states), np.uint64, len(states)),
            np.fromiter((s.applied_offset for s in states), np.int64, len(states)),
            np.stack([s.log_count for s in states]),
            np.stack([s.mean for s in states]),
        )

    def state(self, row: int) -> UserState:
        """Row ``row`` as a UserState whose arrays are views of this batch."""
        return UserState(self.user_ids[row], self.model_version, float(self.landmark_t0[row]),
                         float(self.last_event_time[row]), int(self.event_count[row]),
                         int(self.applied_offset[row]), self.log_count[row], self.mean[row])

    def states(self) -> list[UserState]:
        return [self.state(row) for row in range(len(self))]

    def take(self, rows: np.ndarray) -> "StateBatch":
        """A new batch of these rows (copies)."""
        return StateBatch([self.user_ids[i] for i in rows], self.model_version, self.landmark_t0[rows],
                          self.last_event_time[rows], self.event_count[rows], self.applied_offset[rows],
                          self.log_count[rows], self.mean[rows])

    def put(self, rows: np.ndarray, states: "StateBatch") -> None:
        """Overwrite ``rows`` with ``states``, row ``rows[i]`` with state i (copies)."""
        for row, user_id in zip(rows.tolist(), states.user_ids):
            self.user_ids[row] = user_id
        for column in _COLUMNS:
            getattr(self, column)[rows] = getattr(states, column)

    def clear(self, rows: np.ndarray, no_offset: int = -1) -> None:
        """Make ``rows`` empty states (their user ids stay)."""
        self.landmark_t0[rows] = self.last_event_time[rows] = 0.0
        self.event_count[rows] = 0
        self.applied_offset[rows] = no_offset
        self.log_count[rows] = -np.inf
        self.mean[rows] = 0.0

    def grown(self, size: int) -> "StateBatch":
        """A copy with ``size`` >= len(self) rows: these first, then empty states with no user id."""
        grown = StateBatch.empty(self.user_ids + [""] * (size - len(self)), self.model_version, self.shape)
        for column in _COLUMNS:
            getattr(grown, column)[:len(self)] = getattr(self, column)
        return grown


_COLUMNS = ("landmark_t0", "last_event_time", "event_count", "applied_offset", "log_count", "mean")


def encode_states(batch: StateBatch, dtype: np.dtype | type = np.float32) -> list[bytes]:
    """Serialise every state of ``batch``, each with its non-empty cells in ``dtype`` (float32
    or float64): the cells of all states are gathered and cast in one go, then cut per state."""
    dtype = np.dtype(dtype).newbyteorder("<")
    if dtype not in _DTYPE_CODES:
        raise ValueError(f"states are stored as float32 or float64, not {dtype}")
    groups, codes, rates, dim = batch.shape
    if groups * codes * rates > MAX_CELLS:
        raise ValueError(f"{groups * codes * rates} cells exceed the layout's {MAX_CELLS}")
    version = batch.model_version.encode("ascii")
    if len(version) != MODEL_VERSION_BYTES:
        raise ValueError(f"model version must be {MODEL_VERSION_BYTES} ASCII characters")
    n, total_cells = len(batch), groups * codes * rates
    flat_log = batch.log_count.reshape(n * total_cells)  # explicit sizes: a batch may be empty
    occupied = np.isfinite(flat_log)
    flat = np.flatnonzero(occupied)  # row-major: each state's cells together, ascending
    ends = np.cumsum(occupied.reshape(n, total_cells).sum(axis=1)).tolist()
    # Byte views of the gathered cells, so that each state's join is the only copy.
    cell_bytes = _bytes_view((flat % total_cells).astype("<u2"))
    log_bytes = _bytes_view(flat_log[flat].astype(dtype, copy=False))
    mean_bytes = _bytes_view(np.take(batch.mean.reshape(n * total_cells, dim), flat, axis=0).astype(dtype, copy=False))
    item, code = dtype.itemsize, _DTYPE_CODES[dtype]
    encoded, start = [], 0
    for user_id, landmark, last, count, applied, end in zip(
        batch.user_ids, batch.landmark_t0.tolist(), batch.last_event_time.tolist(), batch.event_count.tolist(),
        batch.applied_offset.tolist(), ends,
    ):
        user = user_id.encode("utf-8")
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, code, 0, version, groups, codes, rates, dim,
                              landmark, last, count, applied, end - start, len(user))
        encoded.append(b"".join((header, user, cell_bytes[2 * start:2 * end], log_bytes[item * start:item * end],
                                 mean_bytes[item * dim * start:item * dim * end])))
        start = end
    return encoded


def _bytes_view(array: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B")


class StateHeader(NamedTuple):
    """What a state's fixed header and user id say: enough to index or count states
    without decoding their cells."""

    layout: tuple  # (model version, groups, codes, rates, dim, value dtype): one per batch
    user_id: str
    landmark_t0: float
    last_event_time: float
    event_count: int
    applied_offset: int
    cells: int
    body: int  # where the user id ends and the cells begin


def read_state_header(view: memoryview) -> StateHeader:
    """Parse and check one encoded state's header (raises StateFormatError)."""
    if len(view) < HEADER_BYTES:
        raise StateFormatError(f"{len(view)} bytes is shorter than a state header")
    (magic, format_version, dtype_code, _flags, version, groups, codes, rates, dim, landmark_t0,
     last_event_time, event_count, applied_offset, n_cells, user_len) = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise StateFormatError(f"not a VQL user state (magic {magic!r})")
    if format_version != FORMAT_VERSION:
        raise StateFormatError(f"state format version {format_version} is not supported")
    if dtype_code not in _CODE_DTYPES:
        raise StateFormatError(f"unknown value type code {dtype_code}")
    dtype = _CODE_DTYPES[dtype_code]
    expected = HEADER_BYTES + user_len + n_cells * (2 + dtype.itemsize * (1 + dim))
    if n_cells > groups * codes * rates or len(view) != expected:
        raise StateFormatError(f"state body is {len(view)} bytes, expected {expected} for {n_cells} cells")
    try:
        user_id = bytes(view[HEADER_BYTES:HEADER_BYTES + user_len]).decode("utf-8")
        model_version = version.decode("ascii")
    except UnicodeDecodeError as exc:
        raise StateFormatError(f"user id or model version is not text: {exc}") from exc
    return StateHeader((model_version, groups, codes, rates, dim, dtype), user_id, landmark_t0, last_event_time,
                   event_count, applied_offset, n_cells, HEADER_BYTES + user_len)


def decode_states(blobs: Sequence[bytes | memoryview], into: StateBatch | None = None,
                  rows: np.ndarray | None = None, rows_empty: bool = False) -> StateBatch:
    """Parse states written by :func:`encode_states` (float64 whatever the wire precision).

    They must share model version, shape and precision, as the states of one store or topic
    do; anything else is a StateFormatError. With ``into``, state i overwrites row
    ``rows[i]`` of that batch (which must have their model version and shape) and ``into``
    is returned; otherwise they form a new batch. ``rows_empty`` says those rows hold empty
    states already (as :meth:`StateBatch.empty` makes them), which spares clearing them.
    """
    if not blobs:
        raise ValueError("decode_states needs at least one state")
    views = [memoryview(blob) for blob in blobs]
    headers = [read_state_header(view) for view in views]
    layout = headers[0].layout
    if any(h.layout != layout for h in headers):
        raise StateFormatError("states of one batch must share model version, shape and precision")
    model_version, groups, codes, rates, dim, dtype = layout
    if into is None:
        into, rows = StateBatch.empty([""] * len(headers), model_version, (groups, codes, rates, dim)), None
        rows_empty = True
    elif (into.model_version, *into.shape) != layout[:5]:
        raise StateFormatError(f"states of model {model_version} and shape {layout[1:5]} cannot join a batch of "
                               f"model {into.model_version} and shape {into.shape}")
    rows = np.arange(len(headers)) if rows is None else np.asarray(rows)
    item = dtype.itemsize
    cell_parts, log_parts, mean_parts = [], [], []
    for row, view, h in zip(rows.tolist(), views, headers):
        into.user_ids[row] = h.user_id
        logs = h.body + 2 * h.cells
        means = logs + item * h.cells
        cell_parts.append(view[h.body:logs])
        log_parts.append(view[logs:means])
        mean_parts.append(view[means:])
    cells = np.frombuffer(b"".join(cell_parts), "<u2").astype(np.int64)
    total_cells = groups * codes * rates
    if cells.size and int(cells.max()) >= total_cells:
        raise StateFormatError("a cell index lies outside the state's shape")
    into.landmark_t0[rows] = [h.landmark_t0 for h in headers]
    into.last_event_time[rows] = [h.last_event_time for h in headers]
    into.event_count[rows] = [h.event_count for h in headers]
    into.applied_offset[rows] = [h.applied_offset for h in headers]
    flat_log = into.log_count.reshape(len(into), -1)
    flat_mean = into.mean.reshape(len(into), -1, dim)
    if not rows_empty:
        flat_log[rows] = -np.inf  # a state overwrites the row whole: cells it lacks are empty
        flat_mean[rows] = 0.0
    # One flat index per cell: numpy scatters along one axis several times faster than by
    # (row, cell) pairs.
    flat = np.repeat(rows * total_cells, np.fromiter((h.cells for h in headers), np.int64, len(headers))) + cells
    flat_log.reshape(-1)[flat] = np.frombuffer(b"".join(log_parts), dtype)
    flat_mean.reshape(-1, dim)[flat] = np.frombuffer(b"".join(mean_parts), dtype).reshape(-1, dim)
    return into


def encode_user_state(state: UserState, dtype: np.dtype | type = np.float32) -> bytes:
    """Serialise one state (:func:`encode_states` on a batch of one)."""
    return encode_states(StateBatch.of([state]), dtype)[0]


def decode_user_state(data: bytes | memoryview) -> UserState:
    """Parse one state written by :func:`encode_user_state` (any supported precision); the
    arrays come back as float64 regardless of the wire precision, so that callers do the
    same arithmetic whichever copy of a state they hold."""
    return decode_states([data]).state(0)
