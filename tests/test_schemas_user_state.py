"""Round-trip and refusal tests of the published user-state layout (schemas/user_state.py).

The same bytes are read by Java and Go rankers from docs/state-format.md alone, so the layout
is pinned by a golden-bytes test that also checks the doc's worked example, and the decoder
must refuse (StateFormatError) anything it does not fully understand rather than guess.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vql.model.config import ModelConfig
from vql.model.state import NO_OFFSET, empty_state
from vql.schemas.user_state import (
    FORMAT_VERSION,
    HEADER_BYTES,
    StateBatch,
    StateFormatError,
    UserState,
    decode_states,
    decode_user_state,
    encode_states,
    encode_user_state,
)

MODEL_VERSION = "0123456789abcdef"
DOC = Path(__file__).resolve().parents[1] / "docs" / "state-format.md"

# Byte offsets of header fields that the refusal tests patch (docs/state-format.md).
FORMAT_VERSION_AT = 4
DTYPE_AT = 6
N_CELLS_AT = 64


def make_state(
    shape: tuple[int, int, int, int],
    cells: dict[int, tuple[float, list[float]]],
    user_id: str = "user-1",
) -> UserState:
    """A state with the given flat cells occupied by (log_count, mean) and header values."""
    state = empty_state(user_id, MODEL_VERSION, shape)
    state.landmark_t0 = 1_700_000_000.0
    state.last_event_time = 1_700_000_100.0
    state.event_count = 12
    state.applied_offset = 99
    for index, (log_count, mean) in cells.items():
        state.log_count.reshape(-1)[index] = log_count
        state.mean.reshape(-1, shape[3])[index] = mean
    return state


def full_state(shape: tuple[int, int, int, int], seed: int = 0) -> UserState:
    rng = np.random.default_rng(seed)
    state = make_state(shape, {})
    state.log_count = rng.normal(size=shape[:3]) * 5
    state.mean = rng.normal(size=shape)
    return state


def expected_size(user_id: str, n_cells: int, itemsize: int, dim: int) -> int:
    return HEADER_BYTES + len(user_id.encode("utf-8")) + n_cells * (2 + itemsize * (1 + dim))


def assert_header_equal(decoded: UserState, state: UserState) -> None:
    assert decoded.user_id == state.user_id
    assert decoded.model_version == state.model_version
    assert decoded.shape == state.shape
    # struct 'd' keeps every bit of a float64 header field, -0.0 included.
    assert struct.pack("<dd", decoded.landmark_t0, decoded.last_event_time) == struct.pack(
        "<dd", state.landmark_t0, state.last_event_time
    )
    assert decoded.event_count == state.event_count
    assert decoded.applied_offset == state.applied_offset


def assert_bits_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    """Bit-exact float64 comparison (so -0.0 vs 0.0 and -inf placement count too)."""
    assert actual.dtype == np.float64 and actual.shape == expected.shape
    assert actual.tobytes() == np.ascontiguousarray(expected, dtype=np.float64).tobytes()


def through_float32(state: UserState) -> tuple[np.ndarray, np.ndarray]:
    """What a float32 round trip must give: every stored number rounded once to float32."""
    return (
        state.log_count.astype(np.float32).astype(np.float64),
        state.mean.astype(np.float32).astype(np.float64),
    )


# ---------------------------------------------------------------------------- golden


# G=1, K=2, R=1, D=2; one occupied cell (g=0, c=1, r=0) -> flat index 1; float32 body.
GOLDEN_HEX = "".join(
    [
        "56514c53",  # 0   magic "VQLS"
        "0100",  # 4   format version 1
        "01",  # 6   dtype code 1 = float32
        "00",  # 7   flags
        "30313233343536373839616263646566",  # 8   model version "0123456789abcdef"
        "0100",  # 24  G = 1
        "0200",  # 26  K = 2
        "0100",  # 28  R = 1
        "0200",  # 30  D = 2
        "00000040fc54d941",  # 32  landmark_t0 = 1700000000.0
        "00000059fc54d941",  # 40  last_event_time = 1700000100.0
        "0300000000000000",  # 48  event_count = 3
        "2900000000000000",  # 56  applied_offset = 41
        "01000000",  # 64  n_cells = 1
        "0200",  # 68  user id length = 2
        "7531",  # 70  user id "u1"
        "0100",  # 72  cell index 1
        "0000003f",  # 74  log_count 0.5
        "0000803f000000c0",  # 78  mean (1.0, -2.0)
    ]
)


def golden_state() -> UserState:
    state = empty_state("u1", MODEL_VERSION, (1, 2, 1, 2))
    state.landmark_t0 = 1_700_000_000.0
    state.last_event_time = 1_700_000_100.0
    state.event_count = 3
    state.applied_offset = 41
    state.log_count[0, 1, 0] = 0.5
    state.mean[0, 1, 0] = [1.0, -2.0]
    return state


def test_golden_float32_bytes_pin_the_layout() -> None:
    assert encode_user_state(golden_state(), np.float32).hex() == GOLDEN_HEX


def test_golden_bytes_decode_to_the_golden_state() -> None:
    decoded = decode_user_state(bytes.fromhex(GOLDEN_HEX))

    assert_header_equal(decoded, golden_state())
    assert_bits_equal(decoded.log_count, golden_state().log_count)
    assert_bits_equal(decoded.mean, golden_state().mean)


def test_doc_carries_the_golden_bytes_as_its_worked_example() -> None:
    """Java and Go readers implement from the doc: its example must be what we write."""
    assert GOLDEN_HEX in DOC.read_text(encoding="utf-8")


def test_header_is_70_bytes() -> None:
    assert HEADER_BYTES == 70


# ---------------------------------------------------------------------- round trips

SHAPE = (2, 3, 2, 4)  # 12 cells


@pytest.mark.parametrize(
    "state",
    [
        pytest.param(make_state(SHAPE, {}), id="empty"),
        pytest.param(make_state(SHAPE, {0: (0.0, [1, 2, 3, 4]), 7: (-3.25, [-1, 0, 0.5, 9])}), id="partial"),
        pytest.param(full_state(SHAPE), id="full"),
    ],
)
def test_float64_round_trip_is_exact(state: UserState) -> None:
    data = encode_user_state(state, np.float64)
    decoded = decode_user_state(data)

    assert len(data) == expected_size(state.user_id, state.occupied_cells, 8, SHAPE[3])
    assert_header_equal(decoded, state)
    assert_bits_equal(decoded.log_count, state.log_count)
    assert_bits_equal(decoded.mean, state.mean)


@pytest.mark.parametrize(
    "state",
    [
        pytest.param(make_state(SHAPE, {}), id="empty"),
        pytest.param(make_state(SHAPE, {3: (0.1, [0.1, 0.2, 0.3, 1e-3])}), id="partial"),
        pytest.param(full_state(SHAPE), id="full"),
    ],
)
def test_float32_round_trip_rounds_each_number_once(state: UserState) -> None:
    data = encode_user_state(state, np.float32)
    decoded = decode_user_state(data)
    log_count, mean = through_float32(state)

    assert len(data) == expected_size(state.user_id, state.occupied_cells, 4, SHAPE[3])
    assert_header_equal(decoded, state)  # the header is float64 whatever the body's dtype
    assert_bits_equal(decoded.log_count, log_count)
    assert_bits_equal(decoded.mean, mean)


def test_empty_state_is_header_and_user_id_only() -> None:
    state = empty_state("用户-😀", MODEL_VERSION, (2, 32, 3, 16))

    data = encode_user_state(state, np.float32)

    assert len(data) == HEADER_BYTES + len("用户-😀".encode())
    decoded = decode_user_state(data)
    assert decoded.applied_offset == NO_OFFSET == -1
    assert np.isneginf(decoded.log_count).all() and not decoded.mean.any()


def test_full_state_at_default_config_has_the_documented_size() -> None:
    """docs/state-format.md: 70 + len(user id) + 192 * (2 + 4 * 17) bytes, under 16 KiB."""
    cfg = ModelConfig()
    shape = (cfg.groups, cfg.codes, cfg.rates, cfg.group_dim)
    longest_id = "😀" * 128  # the longest user id an event may carry, 512 bytes

    state = full_state(shape)
    state.user_id = longest_id

    data = encode_user_state(state, np.float32)

    assert shape == (2, 32, 3, 16)
    assert len(data) == 70 + 512 + 192 * (2 + 4 * 17) == 14_022
    assert len(data) < 16 * 1024


# -------------------------------------------------------------------- property test


@st.composite
def user_states(draw: st.DrawFn) -> UserState:
    """Random shape, random occupied cells and values, header fields over their whole range."""
    groups, codes, rates, dim = (draw(st.integers(1, n)) for n in (3, 6, 3, 5))
    total = groups * codes * rates
    occupied = sorted(draw(st.sets(st.integers(0, total - 1))))
    # Finite and inside float32's range, so that the float32 copy rounds but never overflows.
    values = st.floats(min_value=-1e38, max_value=1e38, allow_nan=False, allow_subnormal=True)
    log_count = np.full(total, -np.inf)
    log_count[occupied] = draw(hnp.arrays(np.float64, len(occupied), elements=values))
    mean = np.zeros((total, dim))
    mean[occupied] = draw(hnp.arrays(np.float64, (len(occupied), dim), elements=values))
    return UserState(
        user_id=draw(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=128)),
        model_version=draw(st.text(st.characters(max_codepoint=127), min_size=16, max_size=16)),
        landmark_t0=draw(st.floats(allow_nan=False)),
        last_event_time=draw(st.floats(allow_nan=False)),
        event_count=draw(st.integers(0, 2**64 - 1)),
        applied_offset=draw(st.just(NO_OFFSET) | st.integers(-1, 2**63 - 1)),
        log_count=log_count.reshape(groups, codes, rates),
        mean=mean.reshape(groups, codes, rates, dim),
    )


def cell_block(data: bytes, state: UserState) -> np.ndarray:
    start = HEADER_BYTES + len(state.user_id.encode("utf-8"))
    return np.frombuffer(data, "<u2", count=state.occupied_cells, offset=start)


@settings(max_examples=200, deadline=None)
@given(state=user_states())
def test_float64_round_trip_is_exact_for_any_state(state: UserState) -> None:
    data = encode_user_state(state, np.float64)
    decoded = decode_user_state(data)

    assert len(data) == expected_size(state.user_id, state.occupied_cells, 8, state.shape[3])
    assert_header_equal(decoded, state)
    assert_bits_equal(decoded.log_count, state.log_count)
    assert_bits_equal(decoded.mean, state.mean)


@settings(max_examples=200, deadline=None)
@given(state=user_states())
def test_float32_round_trip_rounds_once_for_any_state(state: UserState) -> None:
    data = encode_user_state(state, np.float32)
    decoded = decode_user_state(data)
    log_count, mean = through_float32(state)

    assert len(data) == expected_size(state.user_id, state.occupied_cells, 4, state.shape[3])
    assert_header_equal(decoded, state)
    assert_bits_equal(decoded.log_count, log_count)
    assert_bits_equal(decoded.mean, mean)


@settings(max_examples=100, deadline=None)
@given(state=user_states())
def test_cell_indices_are_written_strictly_ascending(state: UserState) -> None:
    """The doc promises readers sorted, unique indices (a merge-join with a codebook works)."""
    cells = cell_block(encode_user_state(state, np.float32), state)

    assert (np.diff(cells.astype(np.int64)) > 0).all()
    assert cells.tolist() == np.flatnonzero(np.isfinite(state.log_count.reshape(-1))).tolist()


# ---------------------------------------------------------------------------- batches


@st.composite
def state_lists(draw: st.DrawFn) -> list[UserState]:
    """1-8 random states of one model and shape (a store's or a topic's states)."""
    first = draw(user_states())
    more = draw(st.lists(user_states(), max_size=7))
    shaped = [s for s in more if s.shape == first.shape]
    for state in shaped:
        state.model_version = first.model_version
    return [first, *shaped]


@settings(max_examples=100, deadline=None)
@given(states=state_lists(), dtype=st.sampled_from([np.float32, np.float64]))
def test_a_batch_encodes_to_the_bytes_of_its_states_one_by_one(states: list[UserState], dtype) -> None:
    """The worker encodes whole batches; each state's bytes must be what the one-state
    codec (pinned by the golden bytes) writes."""
    singles = [encode_user_state(s, dtype) for s in states]
    assert encode_states(StateBatch.of(states), dtype) == singles
    decoded = decode_states(singles)
    for row, state in enumerate(states):
        assert_header_equal(decoded.state(row), decode_user_state(singles[row]))
        assert_bits_equal(decoded.log_count[row], decode_user_state(singles[row]).log_count)
        assert_bits_equal(decoded.mean[row], decode_user_state(singles[row]).mean)


def test_an_empty_batch_encodes_to_no_states() -> None:
    """A micro-batch whose events were all redeliveries changes no state: nothing to publish."""
    empty = StateBatch.empty([], MODEL_VERSION, (2, 4, 3, 5))
    assert encode_states(empty, np.float32) == [] and encode_states(empty, np.float64) == []


def test_decoding_into_rows_overwrites_them_whole() -> None:
    shape = (1, 2, 2, 2)
    old = make_state(shape, {0: (1.0, [1.0, 1.0]), 3: (2.0, [2.0, 2.0])}, user_id="old")
    new = make_state(shape, {1: (0.5, [1.0, 2.0])}, user_id="new")
    batch = StateBatch.of([old, old, old])
    decode_states([encode_user_state(new, np.float64)], into=batch, rows=np.array([1]))
    assert batch.user_ids == ["old", "new", "old"]
    assert_bits_equal(batch.log_count[1], new.log_count)
    assert_bits_equal(batch.mean[1], new.mean)
    assert_bits_equal(batch.log_count[2], old.log_count)


def test_a_batch_of_mixed_models_or_shapes_is_refused() -> None:
    one = encode_user_state(make_state((1, 2, 2, 2), {}), np.float32)
    other_shape = encode_user_state(make_state((1, 2, 1, 2), {}), np.float32)
    other_precision = encode_user_state(make_state((1, 2, 2, 2), {}), np.float64)
    for pair in ([one, other_shape], [one, other_precision]):
        with pytest.raises(StateFormatError, match="share"):
            decode_states(pair)
    with pytest.raises(StateFormatError, match="cannot join"):
        decode_states([other_shape], into=StateBatch.of([make_state((1, 2, 2, 2), {})]), rows=np.array([0]))


# ------------------------------------------------------------------------- refusals


def sample_bytes() -> bytes:
    """A small float32 state with two cells (G=1, K=2, R=2, D=2: 4 cells in all)."""
    state = make_state((1, 2, 2, 2), {1: (0.5, [1.0, 2.0]), 2: (-1.0, [3.0, 4.0])}, user_id="u1")
    return encode_user_state(state, np.float32)


def patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def test_sample_bytes_are_valid_before_patching() -> None:
    """The refusals below must come from the patch, not from a broken sample."""
    assert decode_user_state(sample_bytes()).occupied_cells == 2


@pytest.mark.parametrize("magic", [b"VQLX", b"\x00\x00\x00\x00", b"SLQV"])
def test_refuses_bad_magic(magic: bytes) -> None:
    with pytest.raises(StateFormatError, match="magic"):
        decode_user_state(patched(sample_bytes(), 0, magic))


@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1, 0xFFFF])
def test_refuses_unsupported_format_version(version: int) -> None:
    with pytest.raises(StateFormatError, match="version"):
        decode_user_state(patched(sample_bytes(), FORMAT_VERSION_AT, struct.pack("<H", version)))


@pytest.mark.parametrize("code", [0, 3, 255])
def test_refuses_unknown_dtype_code(code: int) -> None:
    with pytest.raises(StateFormatError, match="type code"):
        decode_user_state(patched(sample_bytes(), DTYPE_AT, bytes([code])))


def test_refuses_every_truncation() -> None:
    data = sample_bytes()
    for length in range(len(data)):
        with pytest.raises(StateFormatError):
            decode_user_state(data[:length])


@pytest.mark.parametrize("extra", [b"\x00", b"\x00" * 4, b"VQLS"])
def test_refuses_trailing_bytes(extra: bytes) -> None:
    with pytest.raises(StateFormatError):
        decode_user_state(sample_bytes() + extra)


def test_refuses_cell_index_out_of_range() -> None:
    data = sample_bytes()
    cells_at = HEADER_BYTES + len(b"u1")

    with pytest.raises(StateFormatError, match="cell index"):
        decode_user_state(patched(data, cells_at + 2, struct.pack("<H", 4)))  # 4 cells: 0..3


def test_refuses_more_cells_than_the_shape_holds() -> None:
    """n_cells = 5 > G*K*R = 4, with a body sized to match: the length alone would pass."""
    data = sample_bytes()
    user_end = HEADER_BYTES + 2
    n_cells = 5
    body = struct.pack(f"<{n_cells}H", 0, 1, 2, 3, 0) + bytes(n_cells * 4 * (1 + 2))
    forged = patched(data[:user_end], N_CELLS_AT, struct.pack("<I", n_cells)) + body

    with pytest.raises(StateFormatError):
        decode_user_state(forged)


# A caller catching StateFormatError (streams/state_store.py) must not see UnicodeDecodeError.
def test_refuses_user_id_that_is_not_utf8() -> None:
    data = sample_bytes()

    with pytest.raises(StateFormatError):
        decode_user_state(patched(data, HEADER_BYTES, b"\xff\xfe"))


def test_refuses_model_version_that_is_not_ascii() -> None:
    with pytest.raises(StateFormatError):
        decode_user_state(patched(sample_bytes(), 8, b"\xff"))
