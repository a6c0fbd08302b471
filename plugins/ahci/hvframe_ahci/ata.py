"""An ATA disk behind an AHCI port (ACS-3 command set, the subset hosts use).

DMA and NCQ transfers go to the shared block layer (hvframe.block) on worker threads and
complete from there; everything else answers at once. Sector numbers are logical sectors of
the backend (512 or 4096 bytes, sectorsize=). Errors: a range past the end is IDNF, a
command the disk does not have (or a parameter it does not accept) is ABRT, a failed host
read is UNC.
"""
from __future__ import annotations

import errno
import struct

from hvframe.block.backend import BlockBackend, BlockError, BlockQueue
from hvframe.errors import ConfigError
from hvframe.packed import declared_later
from hvframe.snapshot.state import DeviceState

from .hba import Command, Result, ata_error
from .regs import (  # noqa: F401  (the NCQ numbers are ATA's, declared with the layouts)
    ERR_ABRT, ERR_IDNF, ERR_UNC, FUA_BIT, READ_FPDMA_QUEUED, SIG_ATA, ST_OK, WRITE_FPDMA_QUEUED)

# Opcodes (ACS-3 section 7)
NOP = 0x00
DATA_SET_MANAGEMENT = 0x06
READ_SECTORS, READ_SECTORS_EXT = 0x20, 0x24
READ_DMA_EXT, READ_DMA = 0x25, 0xC8
WRITE_SECTORS, WRITE_SECTORS_EXT = 0x30, 0x34
WRITE_DMA_EXT, WRITE_DMA, WRITE_DMA_FUA_EXT = 0x35, 0xCA, 0x3D
READ_VERIFY, READ_VERIFY_EXT = 0x40, 0x42
RECALIBRATE, SEEK = 0x10, 0x70
INITIALIZE_DEVICE_PARAMETERS = 0x91
IDENTIFY_PACKET_DEVICE = 0xA1
CHECK_POWER_MODE = 0xE5
STANDBY_IMMEDIATE, IDLE_IMMEDIATE, STANDBY, IDLE = 0xE0, 0xE1, 0xE2, 0xE3
FLUSH_CACHE, FLUSH_CACHE_EXT = 0xE7, 0xEA
IDENTIFY_DEVICE = 0xEC
SET_FEATURES = 0xEF

# SET FEATURES subcommands
SF_ENABLE_WRITE_CACHE, SF_DISABLE_WRITE_CACHE = 0x02, 0x82
SF_SET_TRANSFER_MODE = 0x03
SF_LOOKAHEAD = (0x55, 0xAA)
SF_REVERTING = (0x66, 0xCC)

DSM_TRIM = 0x01
DSM_BLOCK = 512                  # DATA SET MANAGEMENT payload blocks are always 512 bytes
DSM_MAX_BLOCKS = 8               # advertised in IDENTIFY word 105
NCQ_DEPTH = 32
CACHED_READ_MAX = 256 << 10      # reads tried from the page cache in the exit (hba.lock held)
LBA28_LIMIT = 1 << 28

DEFAULT_MODEL = "HVFRAME HARDDISK"
FIRMWARE = "HV 0.1"


def ata_string(text: str, nbytes: int) -> bytes:
    """ATA strings hold two characters per word, first in the high byte; space padded."""
    raw = text.encode("ascii", "replace")[:nbytes].ljust(nbytes, b" ")
    out = bytearray(nbytes)
    out[0::2], out[1::2] = raw[1::2], raw[0::2]
    return bytes(out)


def identify_block(words: list[int], strings: dict[int, tuple[str, int]]) -> bytes:
    """256 words plus strings at word offsets, with the integrity word (255) filled in."""
    buf = bytearray(struct.pack("<256H", *words))
    for word, (text, nbytes) in strings.items():
        buf[2 * word:2 * word + nbytes] = ata_string(text, nbytes)
    buf[510] = 0xA5
    buf[511] = -sum(buf[:511]) & 0xFF
    return bytes(buf)


class AtaDisk(DeviceState):
    signature = SIG_ATA
    reset_status = ST_OK
    atapi = False
    state_version = 1

    @declared_later
    def state_layout():
        """The disk's checkpoint record (inside its AHCI port's record)."""
        from construct import Flag, Int8ul, Struct
        return Struct(
            "write_cache" / Flag,             # SET FEATURES' choice
            "udma_mode" / Int8ul,
            "writeback_failed" / Flag,        # a lost write-back: every FLUSH fails until COMRESET
        )

    def __init__(self, backend: BlockBackend, *, model: str | None = None,
                 serial: str | None = None, nmrr: int = 0, workers: int = 4,
                 name: str = "ahci-hd"):
        self.backend = backend
        self.workers = workers
        self.queue = BlockQueue(backend, workers=workers, depth=4 * NCQ_DEPTH, name=name)
        self.model = model or DEFAULT_MODEL
        self.serial = serial or backend.serial
        self.nmrr = nmrr
        self.sector = backend.logical_sector
        self.write_cache = True        # SET FEATURES can turn it off: then writes are FUA
        # Small reads the page cache holds complete during the PxCI write (both paths);
        # False sends every read to the workers (tests that model a slow disk).
        self.cached_reads = True
        self.udma_mode = 5
        self._ops = {
            READ_DMA: self._read_dma, READ_DMA_EXT: self._read_dma,
            READ_SECTORS: self._read_pio, READ_SECTORS_EXT: self._read_pio,
            WRITE_DMA: self._write_dma, WRITE_DMA_EXT: self._write_dma,
            WRITE_DMA_FUA_EXT: self._write_dma,
            WRITE_SECTORS: self._write_pio, WRITE_SECTORS_EXT: self._write_pio,
            READ_FPDMA_QUEUED: self._read_fpdma, WRITE_FPDMA_QUEUED: self._write_fpdma,
            READ_VERIFY: self._verify, READ_VERIFY_EXT: self._verify,
            FLUSH_CACHE: self._flush, FLUSH_CACHE_EXT: self._flush,
            DATA_SET_MANAGEMENT: self._dsm,
            IDENTIFY_DEVICE: self._identify,
            SET_FEATURES: self._set_features,
            CHECK_POWER_MODE: lambda c: Result(regs={"count": 0xFF}),   # active or idle
            **{op: lambda c: Result() for op in (STANDBY_IMMEDIATE, IDLE_IMMEDIATE, STANDBY,
                                                 IDLE, RECALIBRATE, SEEK,
                                                 INITIALIZE_DEVICE_PARAMETERS)},
        }

    @property
    def sectors(self) -> int:
        return self.backend.sectors

    @property
    def supports_trim(self) -> bool:
        return not self.backend.readonly and not self.backend.nodelete

    def native_setup(self, nat) -> bool:
        """Fill a ``struct ahci_port`` (the native module's) with this disk's side for the native NCQ path;
        False if it cannot serve (closed, O_DIRECT, whose alignment bounces are Python's, or
        after a failed write-back, which only the Python path keeps reporting)."""
        be = self.backend
        fd = be.fd
        if fd < 0 or be.direct or be.failed:
            return False
        nat.fd = fd
        nat.sectors = self.sectors
        nat.sector_size = self.sector
        nat.readonly = be.readonly
        nat.write_through = (not self.write_cache) or be.write_through
        return True

    def is_queued(self, command: int) -> bool:
        return command in (READ_FPDMA_QUEUED, WRITE_FPDMA_QUEUED)

    def execute(self, cmd: Command) -> Result | None:
        op = self._ops.get(cmd.command)
        return ata_error(ERR_ABRT) if op is None else op(cmd)

    # -- checkpoint (the HBA quiesces its ports first: no command is with the device) ----
    def quiesce(self) -> None:
        """Acknowledged writes on stable storage before the state is taken."""
        self.backend.settle()

    def save_state(self) -> dict:
        return dict(write_cache=self.write_cache, udma_mode=self.udma_mode,
                    writeback_failed=self.backend.failed)

    def load_state(self, s) -> None:
        if s.udma_mode > 7:
            raise ConfigError(f"snapshot: ahci disk: UDMA mode {s.udma_mode} (0-7)")
        self.write_cache, self.udma_mode = bool(s.write_cache), s.udma_mode
        if s.writeback_failed:
            self.backend.writeback_failed(errno.EIO)

    def close(self) -> None:
        self.queue.close()
        self.backend.close()

    # -- addressing -----------------------------------------------------------------------
    @staticmethod
    def _is_ext(command: int) -> bool:
        return command in (READ_DMA_EXT, WRITE_DMA_EXT, WRITE_DMA_FUA_EXT, READ_SECTORS_EXT,
                           WRITE_SECTORS_EXT, READ_VERIFY_EXT)

    def _range(self, cmd: Command) -> tuple[int, int]:
        if self._is_ext(cmd.command):
            return cmd.lba48, cmd.count or 0x10000
        return cmd.lba28, (cmd.count & 0xFF) or 0x100

    def _in_range(self, lba: int, n: int) -> bool:
        return lba + n <= self.sectors

    # -- transfers ------------------------------------------------------------------------
    def _submit_read(self, cmd: Command, lba: int, n: int, pio: str | None) -> Result | None:
        if not self._in_range(lba, n):
            return ata_error(ERR_IDNF)
        length = n * self.sector
        bufs = cmd.buffers(length)
        # A small non-queued read the page cache has completes in the exit itself: a
        # firmware polling PxCI for it (SeaBIOS) finds it done at its first look, and no
        # worker wakes. (Queued ones stay in flight together, as the guest issued them.)
        if not cmd.ncq and self.cached_reads and length <= CACHED_READ_MAX \
                and self.backend.read_cached(lba * self.sector, bufs):
            return Result(transferred=length, pio=pio)
        cmd.submit(self.backend.read, lba * self.sector, bufs,
                          callback=lambda r: cmd.complete(self._done(r, length, pio, ERR_UNC)))
        return None

    def _submit_write(self, cmd: Command, lba: int, n: int, pio: str | None,
                      fua: bool) -> Result | None:
        if self.backend.readonly:
            return ata_error(ERR_ABRT)
        if not self._in_range(lba, n):
            return ata_error(ERR_IDNF)
        length = n * self.sector
        bufs = cmd.buffers(length)
        cmd.submit(self._write, lba * self.sector, bufs, fua or not self.write_cache,
                          callback=lambda r: cmd.complete(self._done(r, length, pio, ERR_ABRT)))
        return None

    def _write(self, offset: int, bufs, fua: bool) -> int:
        return self.backend.write(offset, bufs, fua=fua)

    @staticmethod
    def _done(r, length: int, pio: str | None, io_error: int) -> Result:
        if isinstance(r, BlockError):
            return ata_error(ERR_IDNF if r.kind == BlockError.RANGE else
                             io_error if r.kind == BlockError.IO else ERR_ABRT)
        return Result(transferred=length, pio=pio)

    def _read_dma(self, cmd: Command):
        return self._submit_read(cmd, *self._range(cmd), None)

    def _read_pio(self, cmd: Command):
        return self._submit_read(cmd, *self._range(cmd), "in")

    def _write_dma(self, cmd: Command):
        return self._submit_write(cmd, *self._range(cmd), None,
                                  cmd.command == WRITE_DMA_FUA_EXT)

    def _write_pio(self, cmd: Command):
        return self._submit_write(cmd, *self._range(cmd), "out", False)

    def _read_fpdma(self, cmd: Command):
        return self._submit_read(cmd, cmd.lba48, cmd.features or 0x10000, None)

    def _write_fpdma(self, cmd: Command):
        return self._submit_write(cmd, cmd.lba48, cmd.features or 0x10000, None,
                                  bool(cmd.device & FUA_BIT))

    def _verify(self, cmd: Command):
        lba, n = self._range(cmd)
        return Result() if self._in_range(lba, n) else ata_error(ERR_IDNF)

    def _flush(self, cmd: Command):
        cmd.submit(self.backend.flush,
                          callback=lambda r: cmd.complete(self._done(r, 0, None, ERR_ABRT)))
        return None

    def _dsm(self, cmd: Command):
        """DATA SET MANAGEMENT with TRIM: 8-byte range entries (48-bit LBA, 16-bit count)."""
        blocks = cmd.count
        if not cmd.features & DSM_TRIM or not self.supports_trim or \
                not 1 <= blocks <= DSM_MAX_BLOCKS:
            return ata_error(ERR_ABRT)
        ranges = []
        for (entry,) in struct.iter_unpack("<Q", cmd.gather(blocks * DSM_BLOCK)):
            lba, n = entry & 0xFFFFFFFFFFFF, entry >> 48
            if n:
                if not self._in_range(lba, n):
                    return ata_error(ERR_IDNF)
                ranges.append((lba * self.sector, n * self.sector))
        cmd.submit(self._trim, ranges,
                          callback=lambda r: cmd.complete(self._done(r, 0, None, ERR_ABRT)))
        return None

    def _trim(self, ranges) -> None:
        # write_zeroes(unmap) punches holes where it can and writes zeros where it cannot,
        # so the "reads return zeros after TRIM" IDENTIFY promises holds on every host.
        for offset, length in ranges:
            self.backend.write_zeroes(offset, length, unmap=True)

    # -- identification and features ------------------------------------------------------
    def _set_features(self, cmd: Command):
        sub = cmd.features & 0xFF
        if sub == SF_ENABLE_WRITE_CACHE:
            self.write_cache = True
        elif sub == SF_DISABLE_WRITE_CACHE:
            self.write_cache = False
        elif sub == SF_SET_TRANSFER_MODE:
            mode = cmd.count & 0xFF
            if mode >> 3 == 8 and mode & 7 <= 6:       # UDMA 0-6
                self.udma_mode = mode & 7
            elif mode >> 3 not in (0, 1, 4):          # PIO default / PIO n / MWDMA n
                return ata_error(ERR_ABRT)
        elif sub not in SF_LOOKAHEAD + SF_REVERTING:
            return ata_error(ERR_ABRT)
        return Result()

    def identify(self) -> bytes:
        n = self.sectors
        w = [0] * 256
        heads, spt = 16, 63
        cyls = min(n // (heads * spt), 16383)
        w[0] = 0x0040                                   # fixed ATA device
        w[1], w[3], w[6] = cyls, heads, spt
        w[47] = 0x8000                                  # no READ/WRITE MULTIPLE
        w[49] = 0x0B00                                  # IORDY, LBA, DMA
        w[50] = 0x4000
        w[53] = 0x0006                                  # words 64-70 and 88 valid
        w[54], w[55], w[56] = cyls, heads, spt
        chs = cyls * heads * spt
        w[57], w[58] = chs & 0xFFFF, chs >> 16
        lba28 = min(n, LBA28_LIMIT - 1)
        w[60], w[61] = lba28 & 0xFFFF, lba28 >> 16
        w[63] = 0x0007                                  # MWDMA 0-2
        w[64] = 0x0003                                  # PIO 3-4
        w[65] = w[66] = w[67] = w[68] = 120
        w[75] = NCQ_DEPTH - 1
        w[76] = 0x0100 | 0x000E                         # NCQ; SATA 1.5/3/6 Gb/s
        w[80] = 0x07F0                                  # ATA/ATAPI-4 .. ACS-3
        w[82] = 0x0060                                  # write cache, look-ahead
        w[83] = 0x4000 | 0x2000 | 0x1000 | 0x0400       # FLUSH CACHE (EXT), 48-bit
        w[84] = 0x4000
        w[85] = 0x0040 | (0x0020 if self.write_cache else 0)
        w[86] = 0x2000 | 0x1000 | 0x0400
        w[87] = 0x4000
        w[88] = 0x007F | (1 << (8 + self.udma_mode))    # UDMA 0-6, the selected mode
        for i in range(4):
            w[100 + i] = (n >> (16 * i)) & 0xFFFF
        phys = self.backend.physical_sector // self.sector
        w[106] = 0x4000 | (0x2000 | (phys.bit_length() - 1) if phys > 1 else 0)
        if self.sector > 512:
            w[106] |= 0x1000                            # words 117-118: logical sector size
            w[117], w[118] = (self.sector // 2) & 0xFFFF, (self.sector // 2) >> 16
        w[209] = 0x4000                                 # logical sector 0 is aligned
        if self.supports_trim:
            w[69] = 0x4000 | 0x0020                     # deterministic, zeros after TRIM
            w[105] = DSM_MAX_BLOCKS
            w[169] = 0x0001
        w[217] = self.nmrr
        return identify_block(w, {10: (self.serial, 20), 23: (FIRMWARE, 8),
                                  27: (self.model, 40)})

    def _identify(self, cmd: Command):
        data = self.identify()
        return Result(transferred=cmd.scatter(data), pio="in")


__all__ = ["AtaDisk", "ata_string", "identify_block"]


def __getattr__(name: str):
    # ATA_DISK_STATE, the record's module-level name before it was declared late (tools reading
    # checkpoints import it); asking for it imports construct.
    if name == "ATA_DISK_STATE":
        return AtaDisk.state_layout
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
