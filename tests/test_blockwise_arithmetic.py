"""Block2 arithmetic (RFC 7959) shared by the server and the device: otacoap.core.blockwise.

The server answers each block from storage with `server_slice`; the device checks each
answer with `check_response` against the size the *signed manifest* states (ATTACKS.md
#11, #12). These tests pin the RFC 7959 §2.2/§2.3 rules and the exact-coverage property.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacoap.core import blockwise
from otacoap.core.blockwise import BlockError, Slice, check_response, server_slice
from otacoap.core.errors import TransferError

# -- SZX <-> size ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("szx", "size"), [(0, 16), (1, 32), (2, 64), (3, 128), (4, 256), (5, 512), (6, 1024)]
)
def test_szx_maps_to_block_size_and_back(szx: int, size: int) -> None:
    assert blockwise.size_of(szx) == size
    assert blockwise.szx_of(size) == szx


@pytest.mark.parametrize("szx", [7, -1, 8])
def test_reserved_or_invalid_szx_is_refused(szx: int) -> None:
    # RFC 7959 §2.2: SZX 7 is reserved
    with pytest.raises(BlockError):
        blockwise.size_of(szx)


@pytest.mark.parametrize("size", [0, 8, 15, 100, 2048, 1000])
def test_block_size_that_is_not_a_power_of_two_in_range_has_no_szx(size: int) -> None:
    with pytest.raises(ValueError):
        blockwise.szx_of(size)


def test_block_error_is_a_transfer_error() -> None:
    assert issubclass(BlockError, TransferError)


@pytest.mark.parametrize(
    ("total", "szx", "count"),
    [(0, 6, 1), (1, 6, 1), (1024, 6, 1), (1025, 6, 2), (3000, 6, 3), (3000, 0, 188)],
)
def test_block_count_rounds_up_and_is_at_least_one(total: int, szx: int, count: int) -> None:
    assert blockwise.block_count(total, szx) == count


# -- server_slice ------------------------------------------------------------------------


def test_first_block_is_full_and_has_more() -> None:
    assert server_slice(3000, 0, 6) == (6, Slice(0, 1024, True))


def test_middle_block_starts_at_its_offset() -> None:
    assert server_slice(3000, 1, 6) == (6, Slice(1024, 1024, True))


def test_last_block_is_short_and_final() -> None:
    assert server_slice(3000, 2, 6) == (6, Slice(2048, 952, False))


def test_last_block_of_an_exact_multiple_is_full_and_final() -> None:
    assert server_slice(2048, 1, 6) == (6, Slice(1024, 1024, False))


@pytest.mark.parametrize(("total", "num"), [(3000, 3), (2048, 2), (1, 1), (0, 1), (100, 1000)])
def test_block_starting_past_the_end_is_refused(total: int, num: int) -> None:
    with pytest.raises(BlockError, match="past the end"):
        server_slice(total, num, 6)


def test_empty_body_answers_block_zero_empty_and_final() -> None:
    assert server_slice(0, 0, 6) == (6, Slice(0, 0, False))


def test_largest_twenty_bit_num_is_served() -> None:
    num = (1 << 20) - 1
    total = (num + 1) * 16
    assert server_slice(total, num, 0) == (0, Slice(num * 16, 16, False))


@pytest.mark.parametrize("num", [1 << 20, (1 << 20) + 5, -1])
def test_num_outside_twenty_bits_is_refused(num: int) -> None:
    with pytest.raises(BlockError, match="out of range"):
        server_slice(1 << 40, num, 0)


def test_server_slice_refuses_reserved_szx() -> None:
    with pytest.raises(BlockError):
        server_slice(3000, 0, 7)


def test_server_may_lower_szx_and_keeps_the_requested_offset() -> None:
    # RFC 7959 §2.3: the server may answer with a smaller block; the NUM it sends is
    # recomputed so that it still names the offset asked for.
    szx_used, piece = server_slice(3000, 1, 6, max_szx=4)
    assert szx_used == 4
    assert piece == Slice(1024, 256, True)
    answered_num = piece.offset // blockwise.size_of(szx_used)
    assert answered_num == 4
    assert answered_num * blockwise.size_of(szx_used) == 1 * blockwise.size_of(6)


def test_server_never_raises_szx_above_the_request() -> None:
    szx_used, piece = server_slice(3000, 1, 2, max_szx=6)
    assert szx_used == 2
    assert piece == Slice(64, 64, True)


def test_lowering_szx_refuses_when_the_recomputed_num_needs_more_than_twenty_bits() -> None:
    num = (1 << 20) - 1
    total = (num + 1) * 1024
    # Answering at 16-byte blocks would need NUM = num * 64 > 2**20 - 1: unencodable.
    with pytest.raises(BlockError):
        server_slice(total, num, 6, max_szx=0)


# -- check_response ----------------------------------------------------------------------


def _ok(**overrides: Any) -> dict[str, Any]:
    """A valid middle-block answer for a 3000-byte image at SZX 6."""
    args: dict[str, Any] = {
        "asked_num": 1,
        "asked_szx": 6,
        "num": 1,
        "szx": 6,
        "more": True,
        "payload_len": 1024,
        "offset": 1024,
        "total": 3000,
    }
    args.update(overrides)
    return args


def test_check_response_accepts_a_correct_middle_block() -> None:
    check_response(**_ok())


def test_check_response_accepts_a_correct_final_block() -> None:
    check_response(**_ok(asked_num=2, num=2, more=False, payload_len=952, offset=2048))


def test_check_response_accepts_a_lowered_szx_with_recomputed_num() -> None:
    check_response(**_ok(num=4, szx=4, payload_len=256))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num": 2}, "not the block asked for"),
        ({"num": 0}, "not the block asked for"),
        ({"num": 5, "szx": 4, "payload_len": 256}, "not the block asked for"),
        ({"szx": 7}, "reserved"),
        ({"asked_szx": 4, "asked_num": 4, "szx": 6, "num": 1}, "raised the block size"),
        ({"payload_len": 1000}, "shorter than the block size"),
        ({"payload_len": 1025}, "past the image size|larger than the block size"),
        (
            {"asked_num": 2, "num": 2, "offset": 2048, "more": False, "payload_len": 1024},
            "past the image size",
        ),
        ({"more": False}, "ended before"),
        (
            {"asked_num": 2, "num": 2, "offset": 2048, "payload_len": 952, "more": True},
            "shorter|past the image",
        ),
        ({"total": 2048, "more": True}, "more blocks past the image size"),
    ],
    ids=[
        "num-mismatch-ahead",
        "num-mismatch-behind",
        "num-mismatch-after-lowered-szx",
        "szx-7",
        "raised-size",
        "non-final-short-block",
        "oversized-payload",
        "bytes-past-total",
        "early-end",
        "final-block-claims-more",
        "more-at-exact-end",
    ],
)
def test_check_response_refuses_broken_answers(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(BlockError, match=message):
        check_response(**_ok(**overrides))


def test_check_response_refuses_an_empty_body_claiming_more() -> None:
    with pytest.raises(BlockError):
        check_response(
            asked_num=0, asked_szx=6, num=0, szx=6, more=True, payload_len=0, offset=0, total=0
        )


# -- the coverage property ---------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    total=st.integers(min_value=0, max_value=100_000),
    szx=st.integers(min_value=0, max_value=6),
    max_szx=st.integers(min_value=0, max_value=6),
)
def test_server_slices_cover_exactly_the_whole_body(total: int, szx: int, max_szx: int) -> None:
    """Walking the body the way the device does covers [0, total) once, in order."""
    covered = 0
    requests = 0
    asked_num, asked_szx = 0, szx
    while True:
        szx_used, piece = server_slice(total, asked_num, asked_szx, max_szx)
        assert szx_used == min(asked_szx, max_szx)
        size = blockwise.size_of(szx_used)
        assert piece.offset == covered
        assert piece.offset % size == 0
        assert 0 <= piece.length <= size
        check_response(
            asked_num=asked_num,
            asked_szx=asked_szx,
            num=piece.offset // size,
            szx=szx_used,
            more=piece.more,
            payload_len=piece.length,
            offset=piece.offset,
            total=total,
        )
        covered += piece.length
        requests += 1
        if not piece.more:
            break
        assert piece.length == size
        # The device continues at the size the server chose (RFC 7959 §2.4).
        asked_szx = szx_used
        asked_num = covered // size
    assert covered == total
    assert requests == blockwise.block_count(total, min(szx, max_szx))
    if total:
        with pytest.raises(BlockError):
            server_slice(total, requests, min(szx, max_szx))
