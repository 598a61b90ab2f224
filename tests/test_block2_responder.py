"""The one Block2 responder (otacoap.core.block2_responder) and the option codec under it.

Properties: every answer names exactly the bytes the request asks for (RFC 7959 §2.2,
§2.3, §2.4), following the answers block by block rebuilds the body exactly, and the
options it encodes are the bytes aiocoap writes for the same response (the fast path
sends ours, the resource sends aiocoap's: they must be one wire format).
"""

from __future__ import annotations

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import ACK
from hypothesis import given
from hypothesis import strategies as st

from otacoap.core import blockwise, coap_numbers, coap_options
from otacoap.core.block2_responder import Block2Answer, answer
from otacoap.core.blockwise import BlockError

ETAG = bytes.fromhex("0102030405060708")
CF = coap_numbers.CF_OCTET_STREAM

sizes = st.integers(0, 70_000)
szxs = st.integers(0, 6)
asks = st.none() | st.tuples(st.integers(0, 5000), st.integers(0, 7))


def _answer(size: int, asked: tuple[int, int] | None, max_szx: int) -> Block2Answer:
    return answer(size, asked, max_szx, content_format=CF, etag=ETAG)


@given(size=sizes, asked=asks, max_szx=szxs)
def test_an_answer_names_exactly_the_asked_bytes_or_refuses(
    size: int, asked: tuple[int, int] | None, max_szx: int
) -> None:
    try:
        got = _answer(size, asked, max_szx)
    except BlockError as exc:
        assert exc.coap_code == coap_numbers.BAD_REQUEST
        assert asked is not None  # no Block2 never fails
        num, szx = asked
        assert szx == 7 or num * (16 << szx) >= max(size, 1)
        return
    assert got.code == coap_numbers.CONTENT
    assert (got.content_format, got.etag) == (CF, ETAG)
    assert got.offset >= 0 and got.offset + got.length <= size
    if got.block2 is None:
        # §2.4: without Block2, a body that fits one block goes whole, without Size2.
        assert asked is None and size <= 16 << max_szx
        assert (got.offset, got.length, got.size2) == (0, size, None)
        return
    num_used, more, szx_used = got.block2
    asked_num, asked_szx = asked if asked is not None else (0, max_szx)
    assert szx_used == min(asked_szx, max_szx)  # §2.3: only ever lowered
    assert got.offset == asked_num << (4 + asked_szx) == num_used << (4 + szx_used)
    assert got.length == min(16 << szx_used, size - got.offset)
    assert more == (got.offset + got.length < size)
    assert got.size2 == size  # §4


@given(size=st.integers(1, 20_000), szx=szxs, max_szx=szxs)
def test_following_the_answers_rebuilds_the_body(size: int, szx: int, max_szx: int) -> None:
    body = bytes(i % 251 for i in range(size))
    out = bytearray()
    first = _answer(size, None, max_szx)
    out += body[first.offset : first.offset + first.length]
    more = first.block2 is not None and first.block2[1]
    while more:
        # The client continues at the size it prefers (§2.4); the server may lower it.
        asked_szx = szx
        size_asked = 16 << asked_szx
        if len(out) % size_asked:
            asked_szx = blockwise.szx_of(16 << first.block2[2])  # type: ignore[index]
            size_asked = 16 << asked_szx
        got = _answer(size, (len(out) // size_asked, asked_szx), max_szx)
        assert got.offset == len(out)
        out += body[got.offset : got.offset + got.length]
        assert got.block2 is not None
        more = got.block2[1]
    assert bytes(out) == body


def _aiocoap_bytes(got: Block2Answer, payload: bytes) -> bytes:
    """What aiocoap encodes for the same response, without header and token."""
    msg = aiocoap.Message(
        code=Code(got.code), payload=payload, content_format=got.content_format, etag=got.etag
    )
    if got.block2 is not None:
        msg.opt.block2 = got.block2
        msg.opt.size2 = got.size2
    msg.mtype, msg.mid, msg.token = ACK, 0, b""
    return bytes(msg.encode())[4:]


@given(size=sizes, asked=asks, max_szx=szxs, etag=st.binary(min_size=1, max_size=8))
def test_encoded_options_are_what_aiocoap_writes(
    size: int, asked: tuple[int, int] | None, max_szx: int, etag: bytes
) -> None:
    try:
        got = answer(size, asked, max_szx, content_format=CF, etag=etag)
    except BlockError:
        return
    payload = b"\xa5" * got.length
    assert got.encoded_options() + payload == _aiocoap_bytes(got, payload)


@pytest.mark.parametrize("cf", [0, 42, 60, 255, 256, 65535])
def test_content_formats_of_every_width_encode_like_aiocoap(cf: int) -> None:
    got = answer(3000, (1, 6), 6, content_format=cf, etag=ETAG)
    payload = b"x" * got.length
    assert got.encoded_options() + payload == _aiocoap_bytes(got, payload)


def test_an_empty_body_has_no_payload_marker() -> None:
    got = _answer(0, None, 6)
    assert got.length == 0 and not got.encoded_options().endswith(b"\xff")
    assert got.encoded_options() == _aiocoap_bytes(got, b"")


# -- the option codec (RFC 7252 §3.1, §3.2) ---------------------------------------------


@given(delta=st.integers(0, 65535 + 269), length=st.integers(0, 65535 + 269))
def test_an_option_header_decodes_to_what_was_encoded(delta: int, length: int) -> None:
    head = coap_options.header(delta, length)
    data = head + b"\x00" * 3
    got_delta, i = coap_options.field(data[0] >> 4, data, 1)
    got_length, i = coap_options.field(data[0] & 0x0F, data, i)
    assert (got_delta, got_length, i) == (delta, length, len(head))


@given(st.integers(0, 1 << 64))
def test_uint_is_minimal_big_endian(value: int) -> None:
    raw = coap_options.uint(value)
    assert int.from_bytes(raw, "big") == value
    assert raw[:1] != b"\x00"  # zero is the empty string, nothing has a leading zero


def test_reserved_or_cut_short_fields_are_refused() -> None:
    assert coap_options.field(15, b"", 0) == (-1, 0)  # 15 is reserved
    assert coap_options.field(13, b"", 0) == (-1, 0)
    assert coap_options.field(14, b"\x01", 0) == (-1, 0)


def test_options_must_come_in_number_order() -> None:
    assert coap_options.options([(4, b"e"), (12, b"")]) == b"\x41e\x80"
    with pytest.raises(ValueError):
        coap_options.options([(12, b""), (4, b"e")])


@given(num=st.integers(0, blockwise.MAX_NUM), more=st.booleans(), szx=st.integers(0, 7))
def test_block_values_round_trip(num: int, more: bool, szx: int) -> None:
    value = blockwise.block_value(num, more, szx)
    assert blockwise.parse_block_value(value) == (num, more, szx)
    option = aiocoap.optiontypes.BlockOption(coap_numbers.OPT_BLOCK2, value=(num, more, szx))
    assert option.encode() == coap_options.uint(value)  # the bytes aiocoap would send
