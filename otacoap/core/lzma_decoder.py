"""An LZMA1 decoder with a small, fixed memory footprint, in the shape of an embedded one.

Why not CPython's `lzma`: its liblzma decoder reserves about 33 KiB of state besides the
dictionary (tracemalloc sees it, since _lzma allocates through PyMem_RawMalloc), which
is what a desktop library needs, not a device; and `lzma.py` imports io, which the
sans-I/O core may not. This is the reference decoder of the LZMA specification (Igor
Pavlov, lzma-specification.txt / LzmaSpec.cpp, public domain), written for a delta
patch's stream: its state is the dictionary (a ring buffer of `dict_size` bytes, which
the device bounds) plus 1846 + 0x300 << (lc + lp) 16-bit probabilities (5,228 bytes for
lc = lp = 0), like LzmaDec's.

Push-style without coroutines: LzmaDec's rule that one symbol never needs more than
`REQUIRED_INPUT_MAX` input bytes means a symbol is decoded only when that many are
buffered, or when the caller says the input is complete (`finish_input`). Output comes
out in whole symbols (a match is at most 273 bytes), bounded by the caller's `max_length`.

Format: the 13-byte "alone" header (properties byte, dictionary size, uncompressed size
or all ones for "unknown, end marker follows"), then the range-coded stream.
"""

from __future__ import annotations

from array import array

from .errors import OtaError

REQUIRED_INPUT_MAX = 20  # LzmaDec.h LZMA_REQUIRED_INPUT_MAX
HEADER_SIZE = 13
_TOP = 1 << 24
_BIT_MODEL_TOTAL = 1 << 11
_MOVE_BITS = 5
_PROB_INIT = _BIT_MODEL_TOTAL // 2
_MATCH_MIN_LEN = 2
_END_POS_MODEL_INDEX = 14
_NUM_FULL_DISTANCES = 1 << (_END_POS_MODEL_INDEX >> 1)
_NUM_ALIGN_BITS = 4
_NUM_LEN_TO_POS_STATES = 4
_NUM_STATES = 12
_POS_BITS_MAX = 4
_UNKNOWN_SIZE = (1 << 64) - 1


class LzmaError(OtaError):
    """The stream is not valid LZMA, or asks for more than the caller allows."""


class LzmaTruncated(LzmaError):
    """The input ended before the stream did."""


class LzmaTooLarge(LzmaError):
    """The stream's dictionary is larger than the caller allows."""


def probability_bytes(lc: int, lp: int) -> int:
    """The decoder's probability tables in bytes (16-bit each), as LzmaDec sizes them."""
    return (1846 + (0x300 << (lc + lp))) * 2


class LzmaDecoder:
    """Decode one LZMA "alone" stream incrementally (see the module docstring).

    `feed(data)` buffers input; `decompress(max_length)` returns up to about
    `max_length` bytes (whole symbols); `eof` once the end marker (or the stated size)
    is reached. Refuses a dictionary larger than `max_dict`.
    """

    def __init__(self, max_dict: int) -> None:
        self._max_dict = max_dict
        self._in = bytearray()
        self._pos = 0  # next unread byte of self._in
        self._input_done = False
        self._header_done = False
        self.eof = False
        self.dict_size = 0
        self.lc = self.lp = self.pb = 0
        self._unpack_size = _UNKNOWN_SIZE
        self._total = 0  # bytes decoded so far
        self._range = 0xFFFFFFFF
        self._code = 0
        self._state = 0
        self._reps = [0, 0, 0, 0]
        self._dict = bytearray()
        self._dpos = 0
        self._full = False

    # -- input -----------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray) -> None:
        if self._pos:
            del self._in[: self._pos]
            self._pos = 0
        self._in += data

    def finish_input(self) -> None:
        """No more input will come: decode what is left, then it must be the end."""
        self._input_done = True

    @property
    def buffered(self) -> int:
        return len(self._in) - self._pos

    @property
    def unused_data(self) -> bytes:
        return bytes(self._in[self._pos :]) if self.eof else b""

    def _byte(self) -> int:
        if self._pos >= len(self._in):
            raise LzmaTruncated("lzma stream is truncated")
        b = self._in[self._pos]
        self._pos += 1
        return b

    # -- the header and the tables ----------------------------------------------------------

    def _start(self) -> bool:
        if self.buffered < HEADER_SIZE + 5:
            if self._input_done:
                raise LzmaTruncated("lzma stream is truncated")
            return False
        d = self._byte()
        if d >= 9 * 5 * 5:
            raise LzmaError("bad lzma properties")
        self.lc, d = d % 9, d // 9
        self.lp, self.pb = d % 5, d // 5
        self.dict_size = int.from_bytes(bytes(self._byte() for _ in range(4)), "little")
        self._unpack_size = int.from_bytes(bytes(self._byte() for _ in range(8)), "little")
        if self.dict_size > self._max_dict:
            raise LzmaTooLarge(f"lzma dictionary of {self.dict_size} bytes is too large")
        self.dict_size = max(self.dict_size, 4096)  # the format's minimum (LZMA_DIC_MIN)
        self._dict = bytearray(self.dict_size)
        n = 0x300 << (self.lc + self.lp)
        self._lit = array("H", [_PROB_INIT]) * n
        self._probs = array("H", [_PROB_INIT]) * 1846
        if self._byte() != 0:
            raise LzmaError("bad lzma range coder start")
        self._code = int.from_bytes(bytes(self._byte() for _ in range(4)), "big")
        if self._code == self._range:
            raise LzmaError("bad lzma range coder start")
        self._header_done = True
        if self._unpack_size == 0:
            self.eof = True
        return True

    # -- decoding ----------------------------------------------------------------------------

    def decompress(self, max_length: int) -> bytes:
        """Up to about `max_length` decoded bytes from the input buffered so far."""
        out = bytearray()
        if self.eof:
            return b""
        if not self._header_done and not self._start():
            return b""
        while len(out) < max_length and not self.eof:
            if self.buffered < REQUIRED_INPUT_MAX and not self._input_done:
                break
            self._symbol(out)
            if self._unpack_size != _UNKNOWN_SIZE and self._total >= self._unpack_size:
                if self._total > self._unpack_size:
                    raise LzmaError("lzma stream is longer than its stated size")
                self.eof = True
        return bytes(out)

    def _bit(self, probs: array[int], i: int) -> int:
        p = probs[i]
        bound = (self._range >> 11) * p
        if self._code < bound:
            self._range = bound
            probs[i] = p + ((_BIT_MODEL_TOTAL - p) >> _MOVE_BITS)
            bit = 0
        else:
            self._range -= bound
            self._code -= bound
            probs[i] = p - (p >> _MOVE_BITS)
            bit = 1
        if self._range < _TOP:
            self._range = (self._range << 8) & 0xFFFFFFFF
            self._code = ((self._code << 8) | self._byte()) & 0xFFFFFFFF
        return bit

    def _tree(self, base: int, bits: int) -> int:
        m = 1
        for _ in range(bits):
            m = (m << 1) + self._bit(self._probs, base + m)
        return m - (1 << bits)

    def _reverse(self, base: int, bits: int) -> int:
        m, symbol = 1, 0
        for i in range(bits):
            bit = self._bit(self._probs, base + m)
            m = (m << 1) + bit
            symbol |= bit << i
        return symbol

    def _direct(self, bits: int) -> int:
        res = 0
        for _ in range(bits):
            self._range >>= 1
            if self._code >= self._range:
                self._code -= self._range
                res = (res << 1) | 1
            else:
                res <<= 1
            if self._range < _TOP:
                self._range = (self._range << 8) & 0xFFFFFFFF
                self._code = ((self._code << 8) | self._byte()) & 0xFFFFFFFF
        return res

    def _length(self, base: int, pos_state: int) -> int:
        # choice, choice2, low[16][8], mid[16][8], high[256]
        if self._bit(self._probs, base) == 0:
            return self._tree(base + 2 + (pos_state << 3) - 1, 3)
        if self._bit(self._probs, base + 1) == 0:
            return 8 + self._tree(base + 2 + 128 + (pos_state << 3) - 1, 3)
        return 16 + self._tree(base + 2 + 256 - 1, 8)

    def _put(self, out: bytearray, b: int) -> None:
        d = self._dict
        d[self._dpos] = b
        self._dpos += 1
        if self._dpos == len(d):
            self._dpos = 0
            self._full = True
        self._total += 1
        out.append(b)

    def _back(self, dist: int) -> int:
        """The byte `dist` + 1 positions back in the dictionary."""
        i = self._dpos - dist - 1
        return self._dict[i + len(self._dict) if i < 0 else i]

    def _symbol(self, out: bytearray) -> None:
        pb_mask = (1 << self.pb) - 1
        pos_state = self._total & pb_mask
        state = self._state
        probs = self._probs
        if self._bit(probs, _IS_MATCH + (state << _POS_BITS_MAX) + pos_state) == 0:
            self._literal(out, state)
            self._state = 0 if state < 4 else (state - 3 if state < 10 else state - 6)
            return
        reps = self._reps
        if self._bit(probs, _IS_REP + state):
            if self._total == 0:
                raise LzmaError("lzma match before any data")
            if self._bit(probs, _IS_REP_G0 + state) == 0:
                if self._bit(probs, _IS_REP0_LONG + (state << _POS_BITS_MAX) + pos_state) == 0:
                    self._state = 9 if state < 7 else 11
                    self._put(out, self._back(reps[0]))
                    return
            else:
                if self._bit(probs, _IS_REP_G1 + state) == 0:
                    dist = reps[1]
                else:
                    if self._bit(probs, _IS_REP_G2 + state) == 0:
                        dist = reps[2]
                    else:
                        dist = reps[3]
                        reps[3] = reps[2]
                    reps[2] = reps[1]
                reps[1] = reps[0]
                reps[0] = dist
            length = self._length(_REP_LEN, pos_state)
            self._state = 8 if state < 7 else 11
        else:
            reps[3], reps[2], reps[1] = reps[2], reps[1], reps[0]
            length = self._length(_LEN, pos_state)
            self._state = 7 if state < 7 else 10
            reps[0] = self._distance(length)
            if reps[0] == 0xFFFFFFFF:
                if self._code != 0:
                    raise LzmaError("bad lzma end marker")
                if self._unpack_size not in (_UNKNOWN_SIZE, self._total):
                    raise LzmaError("lzma end marker before the stated size")
                self.eof = True
                return
            seen = len(self._dict) if self._full else self._dpos
            if reps[0] >= self.dict_size or reps[0] >= seen:
                raise LzmaError("lzma match reaches before the data")
        length += _MATCH_MIN_LEN
        if self._unpack_size != _UNKNOWN_SIZE:
            length = min(length, self._unpack_size - self._total)
        dist = reps[0]
        for _ in range(length):
            self._put(out, self._back(dist))

    def _literal(self, out: bytearray, state: int) -> None:
        prev = self._back(0) if self._total else 0
        lit_state = ((self._total & ((1 << self.lp) - 1)) << self.lc) + (prev >> (8 - self.lc))
        base = 0x300 * lit_state
        lit = self._lit
        symbol = 1
        if state >= 7:
            match_byte = self._back(self._reps[0])
            while symbol < 0x100:
                match_bit = (match_byte >> 7) & 1
                match_byte <<= 1
                bit = self._bit(lit, base + ((1 + match_bit) << 8) + symbol)
                symbol = (symbol << 1) | bit
                if match_bit != bit:
                    break
        while symbol < 0x100:
            symbol = (symbol << 1) | self._bit(lit, base + symbol)
        self._put(out, symbol - 0x100)

    def _distance(self, length: int) -> int:
        len_state = min(length, _NUM_LEN_TO_POS_STATES - 1)
        slot = self._tree(_POS_SLOT + (len_state << 6) - 1, 6)
        if slot < 4:
            return slot
        direct = (slot >> 1) - 1
        dist = (2 | (slot & 1)) << direct
        if slot < _END_POS_MODEL_INDEX:
            return dist + self._reverse(_POS_DECODERS + dist - slot - 1, direct)
        dist += self._direct(direct - _NUM_ALIGN_BITS) << _NUM_ALIGN_BITS
        return dist + self._reverse(_ALIGN - 1, _NUM_ALIGN_BITS)


# Offsets of each model in the 1846 probabilities (LzmaDec.c's layout, any order works).
_IS_MATCH = 0  # 12 << 4
_IS_REP = _IS_MATCH + (_NUM_STATES << _POS_BITS_MAX)  # 12
_IS_REP_G0 = _IS_REP + _NUM_STATES
_IS_REP_G1 = _IS_REP_G0 + _NUM_STATES
_IS_REP_G2 = _IS_REP_G1 + _NUM_STATES
_IS_REP0_LONG = _IS_REP_G2 + _NUM_STATES  # 12 << 4
_POS_SLOT = _IS_REP0_LONG + (_NUM_STATES << _POS_BITS_MAX)  # 4 << 6
_POS_DECODERS = _POS_SLOT + (_NUM_LEN_TO_POS_STATES << 6)  # 128 - 14
_ALIGN = _POS_DECODERS + _NUM_FULL_DISTANCES - _END_POS_MODEL_INDEX  # 16
_LEN = _ALIGN + (1 << _NUM_ALIGN_BITS)  # 2 + 16 * 8 * 2 + 256 = 514
_REP_LEN = _LEN + 514
assert _REP_LEN + 514 == 1846
