"""Turning fuzzer bytes into values, and values back into bytes (for seed corpora).

``Provider`` is a small, deterministic stand-in for ``atheris.FuzzedDataProvider`` with the
same method names for what the targets use. It reads front to back, little-endian, and reads
zeros once the input is used up, so any byte string is a valid input and a saved crash
replays the same way with or without atheris. ``Encoder`` writes exactly what ``Provider``
reads, which is how ``fuzz/make_corpus.py`` builds meaningful seeds (valid rings, valid
command tables) instead of random bytes.
"""
from __future__ import annotations


def _nbytes(span: int) -> int:
    return max(1, (span.bit_length() + 7) // 8)


class Provider:
    def __init__(self, data: bytes):
        self.data = bytes(data)
        self.pos = 0

    def remaining_bytes(self) -> int:
        return max(0, len(self.data) - self.pos)

    def done(self) -> bool:
        return self.pos >= len(self.data)

    def ConsumeBytes(self, n: int) -> bytes:
        n = max(0, n)
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def ConsumeUInt(self, nbytes: int) -> int:
        return int.from_bytes(self.ConsumeBytes(nbytes).ljust(nbytes, b"\0"), "little")

    def ConsumeIntInRange(self, lo: int, hi: int) -> int:
        if hi <= lo:
            return lo
        span = hi - lo
        return lo + self.ConsumeUInt(_nbytes(span)) % (span + 1)

    def ConsumeBool(self) -> bool:
        return bool(self.ConsumeUInt(1) & 1)

    def PickValueInList(self, values):
        return values[self.ConsumeIntInRange(0, len(values) - 1)]

    # short names used by the targets
    def u8(self) -> int:
        return self.ConsumeUInt(1)

    def u16(self) -> int:
        return self.ConsumeUInt(2)

    def u32(self) -> int:
        return self.ConsumeUInt(4)

    def u64(self) -> int:
        return self.ConsumeUInt(8)


def operations(p: Provider, max_ops: int, n_ops: int):
    """The operations an input asks for, as (step, operation number): one byte each, read
    just before the operation decodes its own, until max_ops or the input is used up."""
    for step in range(max_ops):
        if p.done():
            return
        yield step, p.u8() % n_ops


class Encoder:
    """The inverse of Provider: each call appends the bytes the matching Provider call reads."""

    def __init__(self):
        self.out = bytearray()

    def bytes(self, data: bytes, n: int | None = None) -> "Encoder":
        data = bytes(data)
        if n is not None:
            data = data[:n].ljust(n, b"\0")
        self.out += data
        return self

    def uint(self, value: int, nbytes: int) -> "Encoder":
        self.out += (value & ((1 << (8 * nbytes)) - 1)).to_bytes(nbytes, "little")
        return self

    def u8(self, v: int) -> "Encoder":
        return self.uint(v, 1)

    def u16(self, v: int) -> "Encoder":
        return self.uint(v, 2)

    def u32(self, v: int) -> "Encoder":
        return self.uint(v, 4)

    def u64(self, v: int) -> "Encoder":
        return self.uint(v, 8)

    def int_in_range(self, v: int, lo: int, hi: int) -> "Encoder":
        if hi <= lo:
            return self
        if not lo <= v <= hi:
            raise ValueError(f"{v} not in [{lo}, {hi}]")
        return self.uint(v - lo, _nbytes(hi - lo))

    def bool(self, v: bool) -> "Encoder":
        return self.u8(1 if v else 0)

    def pick(self, values, value) -> "Encoder":
        return self.int_in_range(list(values).index(value), 0, len(values) - 1)

    def getvalue(self) -> bytes:
        return bytes(self.out)
