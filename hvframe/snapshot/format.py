"""The checkpoint format, the same in a file and on a migration socket.

    header     HEADER: magic "HVFSNAP\\0", format version, length of the metadata
    metadata   JSON: format, hvframe version, VM name, time, RAM size, vCPUs, the machine's
               configuration (the command line as its configuration tree), the devices
               (id, type, record version) and the sections that follow (name, length)
    sections   in the order listed, each exactly its length: "ram0" (and "ram1" above
               4 GiB) guest RAM as it is; "machine" (the VMM's own bits); "kvm-vm" (PICs,
               IOAPIC, PIT, clock); "vcpuN" per vCPU; "dev:ID" per device (a version and a
               record declared with construct by the device: hvframe.snapshot.state)
    trailer    TRAILER: magic "HVFSEND\\0" and the CRC-32 of each section, in order

Everything is little-endian. A reader refuses, with one line, a stream that is cut short
(anywhere), of another format version, whose metadata does not parse, or whose CRCs do
not match. A file's size is checked against its metadata before anything else is done.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import BinaryIO

from construct import Const, ConstructError, Int32ul, PrefixedArray, Struct

from ..errors import ConfigError

MAGIC = b"HVFSNAP\0"
END_MAGIC = b"HVFSEND\0"
FORMAT_VERSION = 1
HEADER = Struct("magic" / Const(MAGIC), "version" / Int32ul, "meta_len" / Int32ul)
HEADER_SIZE = HEADER.sizeof()
TRAILER = Struct("magic" / Const(END_MAGIC), "crcs" / PrefixedArray(Int32ul, Int32ul))
MAX_META = 16 << 20         # metadata is a few KiB; anything near this is not ours
CHUNK = 1 << 20


class SnapshotError(ConfigError):
    """A checkpoint that cannot be used: one line for the user, exit status 4."""


def trailer_size(sections: int) -> int:
    return len(END_MAGIC) + 4 + 4 * sections


class Writer:
    """Writes one checkpoint to a binary stream: write_header(meta) with every section's
    name and length, then each section's bytes in that order, then finish()."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self._crcs: list[int] = []
        self._sections: list[tuple[str, int]] = []
        self._crc = 0
        self._left = 0

    def write_header(self, meta: dict, sections: list[tuple[str, int]]) -> None:
        meta = dict(meta, format=FORMAT_VERSION,
                    sections=[{"name": n, "length": n_} for n, n_ in sections])
        raw = json.dumps(meta, sort_keys=True).encode()
        self.out.write(HEADER.build(dict(version=FORMAT_VERSION, meta_len=len(raw))))
        self.out.write(raw)
        self._sections = list(sections)

    def section(self, name: str, data) -> None:
        """One whole section (bytes or a buffer), or its next piece (see begin/end)."""
        self.begin(name)
        self.piece(data)
        self.end()

    def begin(self, name: str) -> None:
        expected, length = self._sections[len(self._crcs)]
        if expected != name:
            raise ValueError(f"section {name} written where {expected} belongs")
        self._crc, self._left = 0, length

    def piece(self, data) -> None:
        view = memoryview(data).cast("B")
        if len(view) > self._left:
            raise ValueError("section longer than declared")
        for i in range(0, len(view), CHUNK):
            chunk = view[i:i + CHUNK]
            self._crc = zlib.crc32(chunk, self._crc)
            self.out.write(chunk)
        self._left -= len(view)

    def end(self) -> None:
        if self._left:
            raise ValueError("section shorter than declared")
        self._crcs.append(self._crc)

    def finish(self) -> None:
        self.out.write(TRAILER.build(dict(crcs=self._crcs)))
        self.out.flush()


class Reader:
    """Reads one checkpoint from a binary stream. read_header() -> metadata; then
    sections() yields (name, length) and the caller reads each with read()/readinto()
    (whatever it leaves is skipped); verify() checks the trailer."""

    def __init__(self, inp: BinaryIO, what: str):
        self.inp = inp
        self.what = what
        self.meta: dict = {}
        self._crcs: list[int] = []
        self._crc = 0
        self._left = 0

    def _exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.inp.read(min(n - len(data), CHUNK))
            if not chunk:
                raise SnapshotError(f"{self.what}: truncated (the snapshot ends early)")
            data += chunk
        return bytes(data)

    def read_header(self) -> dict:
        raw = self._exact(HEADER_SIZE)
        if raw[:len(MAGIC)] != MAGIC:
            raise SnapshotError(f"{self.what}: not an hvframe snapshot")
        h = HEADER.parse(raw)
        if h.version != FORMAT_VERSION:
            raise SnapshotError(f"{self.what}: snapshot format version {h.version}; this "
                                f"hvframe reads version {FORMAT_VERSION}")
        if h.meta_len > MAX_META:
            raise SnapshotError(f"{self.what}: corrupt snapshot (metadata of {h.meta_len} bytes)")
        try:
            meta = json.loads(self._exact(h.meta_len))
            sections = [(str(s["name"]), int(s["length"])) for s in meta["sections"]]
        except (ValueError, KeyError, TypeError):
            raise SnapshotError(f"{self.what}: corrupt snapshot (metadata does not parse)") from None
        if any(n < 0 for _, n in sections) or not isinstance(meta, dict):
            raise SnapshotError(f"{self.what}: corrupt snapshot (bad section lengths)")
        self.meta = meta
        self.meta_len = h.meta_len
        self.section_list = sections
        return meta

    def expected_size(self) -> int:
        return (HEADER_SIZE + self.meta_len +
                sum(n for _, n in self.section_list) + trailer_size(len(self.section_list)))

    def sections(self):
        for name, length in self.section_list:
            self._crc, self._left = 0, length
            yield name, length
            while self._left:
                self.read(min(self._left, CHUNK))
            self._crcs.append(self._crc)

    def read(self, n: int | None = None) -> bytes:
        n = self._left if n is None else min(n, self._left)
        data = self._exact(n)
        self._crc = zlib.crc32(data, self._crc)
        self._left -= n
        return data

    def readinto(self, view: memoryview) -> None:
        """Fill view (a section's next len(view) bytes) in place."""
        view = view.cast("B")
        if len(view) > self._left:
            raise SnapshotError(f"{self.what}: corrupt snapshot (section too short)")
        done = 0
        while done < len(view):
            chunk = view[done:done + CHUNK]
            got = self.inp.readinto(chunk)
            if not got:
                raise SnapshotError(f"{self.what}: truncated (the snapshot ends early)")
            self._crc = zlib.crc32(chunk[:got], self._crc)
            done += got
        self._left -= len(view)

    def verify(self) -> None:
        raw = self._exact(trailer_size(len(self.section_list)))
        try:
            t = TRAILER.parse(raw)
        except ConstructError:
            raise SnapshotError(f"{self.what}: corrupt snapshot (no end marker)") from None
        if list(t.crcs) != self._crcs:
            bad = [n for (n, _), a, b in zip(self.section_list, t.crcs, self._crcs) if a != b]
            raise SnapshotError(f"{self.what}: corrupt snapshot (checksum mismatch in "
                                f"{', '.join(bad) or 'the trailer'})")


def open_snapshot(path: str) -> tuple[BinaryIO, Reader]:
    """Open a checkpoint file and check its header and size (one line if unusable)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise SnapshotError(f"{path}: {e.strerror}") from None
    try:
        r = Reader(f, path)
        r.read_header()
        size = os.fstat(f.fileno()).st_size
        want = r.expected_size()
        if size < want:
            raise SnapshotError(f"{path}: truncated ({size} bytes of {want})")
        if size > want:
            raise SnapshotError(f"{path}: corrupt snapshot ({size - want} bytes past its end)")
    except BaseException:
        f.close()
        raise
    return f, r
