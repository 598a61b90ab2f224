"""The device's own LZMA decoder (otacoap.core.lzma_decoder): the same bytes as CPython's
liblzma for every property set and any way the input is split, a bounded dictionary,
and only LzmaError (never a crash, never a hang) for truncated or corrupted streams."""

from __future__ import annotations

import lzma
import random

import pytest

from otacoap.core.lzma_decoder import (
    LzmaDecoder,
    LzmaError,
    LzmaTooLarge,
    LzmaTruncated,
    probability_bytes,
)


def pack(data: bytes, dict_size: int = 8192, **props: int) -> bytes:
    filt = {"id": lzma.FILTER_LZMA1, "dict_size": dict_size, **props}
    return lzma.compress(data, format=lzma.FORMAT_ALONE, filters=[filt])


def unpack(stream: bytes, block: int = 1024, max_dict: int = 1 << 20) -> bytes:
    dec = LzmaDecoder(max_dict)
    out = bytearray()
    for pos in range(0, len(stream), block):
        dec.feed(stream[pos : pos + block])
        while piece := dec.decompress(512):
            assert len(piece) <= 512 + 273  # whole symbols: one match at most over
            out += piece
    dec.finish_input()
    for _ in range(len(stream) * 8 + 1000):  # bounded: every symbol costs input bits
        if dec.eof:
            break
        out += dec.decompress(512)
    assert dec.eof and not dec.buffered
    return bytes(out)


SAMPLES = {
    "empty": b"",
    "one": b"x",
    "text": b"the quick brown fox jumps over the lazy dog " * 300,
    "random": random.Random(7).randbytes(6000),
    "zeros-and-code": bytes(3000) + bytes(range(256)) * 20 + bytes(5000),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize(
    "props", [{"lc": 3, "lp": 0, "pb": 2}, {"lc": 0, "lp": 0, "pb": 0}, {"lc": 1, "lp": 2, "pb": 2}]
)
def test_same_bytes_as_liblzma(name: str, props: dict[str, int]) -> None:
    data = SAMPLES[name]
    stream = pack(data, **props)
    assert unpack(stream) == data == lzma.decompress(stream, format=lzma.FORMAT_ALONE)


def test_any_split_of_the_input_gives_the_same_bytes() -> None:
    data = SAMPLES["zeros-and-code"] + SAMPLES["text"]
    stream = pack(data, lc=0, lp=0, pb=0)
    for block in (1, 3, 19, 20, 21, 4096):
        assert unpack(stream, block) == data


def test_a_dictionary_above_the_limit_is_refused_before_any_output() -> None:
    stream = pack(SAMPLES["text"], dict_size=1 << 20)
    dec = LzmaDecoder(max_dict=32 * 1024)
    dec.feed(stream)
    with pytest.raises(LzmaTooLarge):
        dec.decompress(100)


def test_state_is_the_dictionary_and_the_probabilities() -> None:
    assert probability_bytes(0, 0) == 5228  # (1846 + 768) * 2, as LzmaDec
    assert probability_bytes(3, 0) == (1846 + 0x300 * 8) * 2


def test_a_truncated_stream_is_refused() -> None:
    stream = pack(SAMPLES["random"])
    for cut in (5, 13, 18, len(stream) // 2, len(stream) - 1):
        with pytest.raises(LzmaTruncated):
            unpack(stream[:cut])


def test_corrupted_streams_raise_lzma_error_or_decode_to_something_else() -> None:
    """Hostile input: a bit flipped anywhere gives LzmaError or other bytes, nothing else."""
    data = SAMPLES["zeros-and-code"]
    stream = pack(data, lc=0, lp=0, pb=0)
    rng = random.Random(3)
    refused = 0
    for _ in range(300):
        bad = bytearray(stream)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(bad))
            bad[i] ^= 1 << rng.randrange(8)
        try:
            out = unpack(bytes(bad), max_dict=64 * 1024)
        except LzmaError:
            refused += 1
            continue
        assert len(out) < 10 * len(data) + 10_000  # no runaway output
    assert refused > 100
