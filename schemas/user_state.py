"""The published user state: a versioned, language-neutral binary layout.

docs/state-format.md specifies it byte by byte for Java and Go readers; this module is the
reference codec. One object serves every place a state lives: the worker's RocksDB store
(float64, so sums do not drift over millions of events), the `user-states` topic (float32,
what rankers read) and the scorer.

In memory a state is dense: ``log_count[g, c, r]`` (``-inf`` where a (group, code, rate) cell
has seen no event) and ``mean[g, c, r, :]``. On the wire only the non-empty cells travel, so
a new user costs a few hundred bytes and no user costs more than G*K*R cells.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

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


def encode_user_state(state: UserState, dtype: np.dtype | type = np.float32) -> bytes:
    """Serialise ``state`` with its non-empty cells in ``dtype`` (float32 or float64)."""
    dtype = np.dtype(dtype).newbyteorder("<")
    if dtype not in _DTYPE_CODES:
        raise ValueError(f"states are stored as float32 or float64, not {dtype}")
    groups, codes, rates, dim = state.shape
    if groups * codes * rates > MAX_CELLS:
        raise ValueError(f"{groups * codes * rates} cells exceed the layout's {MAX_CELLS}")
    version = state.model_version.encode("ascii")
    if len(version) != MODEL_VERSION_BYTES:
        raise ValueError(f"model version must be {MODEL_VERSION_BYTES} ASCII characters")
    user = state.user_id.encode("utf-8")
    flat_log = state.log_count.reshape(-1)
    cells = np.flatnonzero(np.isfinite(flat_log)).astype("<u2")
    header = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        _DTYPE_CODES[dtype],
        0,
        version,
        groups,
        codes,
        rates,
        dim,
        state.landmark_t0,
        state.last_event_time,
        state.event_count,
        state.applied_offset,
        cells.size,
        len(user),
    )
    log_count = flat_log[cells].astype(dtype)
    mean = state.mean.reshape(-1, dim)[cells].astype(dtype)
    return b"".join((header, user, cells.tobytes(), log_count.tobytes(), mean.tobytes()))


def decode_user_state(data: bytes | memoryview) -> UserState:
    """Parse a state written by :func:`encode_user_state` (any supported precision).

    The arrays come back as float64 regardless of the wire precision, so that callers do the
    same arithmetic whichever copy of a state they hold.
    """
    view = memoryview(data)
    if len(view) < HEADER_BYTES:
        raise StateFormatError(f"{len(view)} bytes is shorter than a state header")
    (
        magic,
        format_version,
        dtype_code,
        _flags,
        version,
        groups,
        codes,
        rates,
        dim,
        landmark_t0,
        last_event_time,
        event_count,
        applied_offset,
        n_cells,
        user_len,
    ) = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise StateFormatError(f"not a VQL user state (magic {magic!r})")
    if format_version != FORMAT_VERSION:
        raise StateFormatError(f"state format version {format_version} is not supported")
    if dtype_code not in _CODE_DTYPES:
        raise StateFormatError(f"unknown value type code {dtype_code}")
    dtype = _CODE_DTYPES[dtype_code]
    total_cells = groups * codes * rates
    expected = HEADER_BYTES + user_len + n_cells * (2 + dtype.itemsize * (1 + dim))
    if n_cells > total_cells or len(view) != expected:
        raise StateFormatError(
            f"state body is {len(view)} bytes, expected {expected} for {n_cells} cells"
        )
    offset = HEADER_BYTES
    try:
        user_id = bytes(view[offset : offset + user_len]).decode("utf-8")
        model_version = version.decode("ascii")
    except UnicodeDecodeError as exc:
        raise StateFormatError(f"user id or model version is not text: {exc}") from exc
    offset += user_len
    cells = np.frombuffer(view, dtype="<u2", count=n_cells, offset=offset)
    offset += 2 * n_cells
    log_values = np.frombuffer(view, dtype=dtype, count=n_cells, offset=offset)
    offset += dtype.itemsize * n_cells
    mean_values = np.frombuffer(view, dtype=dtype, count=n_cells * dim, offset=offset)
    if n_cells and int(cells.max()) >= total_cells:
        raise StateFormatError("a cell index lies outside the state's shape")
    log_count = np.full(total_cells, -np.inf)
    log_count[cells] = log_values
    mean = np.zeros((total_cells, dim))
    mean[cells] = mean_values.reshape(n_cells, dim)
    return UserState(
        user_id=user_id,
        model_version=model_version,
        landmark_t0=landmark_t0,
        last_event_time=last_event_time,
        event_count=event_count,
        applied_offset=applied_offset,
        log_count=log_count.reshape(groups, codes, rates),
        mean=mean.reshape(groups, codes, rates, dim),
    )
