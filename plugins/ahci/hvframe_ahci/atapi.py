"""An ATAPI CD/DVD-ROM behind an AHCI port: the PACKET command carrying SCSI MMC commands,
over a read-only ISO image of 2048-byte sectors.

A failed command reports CHECK CONDITION the ATAPI way: ERR in the status register, the
sense key in bits 7:4 of the error register, and key/ASC/ASCQ kept for REQUEST SENSE. The
tray can be opened (START STOP UNIT with LoEj) unless PREVENT ALLOW MEDIUM REMOVAL holds
it; the image stays attached and comes back, with a UNIT ATTENTION, when it closes.
"""
from __future__ import annotations

import struct

from hvframe.block.backend import BlockBackend, BlockError, BlockQueue
from hvframe.errors import ConfigError
from hvframe.packed import declared_later
from hvframe.snapshot.state import DeviceState

from .ata import FIRMWARE, identify_block
from .hba import Command, Result, ata_error
from .regs import ERR_ABRT, SIG_ATAPI, ST_ERR, ST_OK

CD_SECTOR = 2048
CD_MAX_SECTORS = 80 * 60 * 75            # 80 minutes: bigger images are DVDs
DEFAULT_MODEL = "HVFRAME DVD-ROM"
VENDOR = "HVFRAME"

# ATA opcodes an ATAPI device answers
ATA_NOP, ATA_DEVICE_RESET, ATA_PACKET = 0x00, 0x08, 0xA0
ATA_IDENTIFY_PACKET, ATA_IDENTIFY = 0xA1, 0xEC
ATA_CHECK_POWER_MODE, ATA_SET_FEATURES = 0xE5, 0xEF
ATA_IDLE_STANDBY = (0xE0, 0xE1, 0xE2, 0xE3)
PACKET_DMA = 0x01                        # PACKET features bit 0: data by DMA

# SCSI/MMC opcodes
TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
INQUIRY = 0x12
START_STOP_UNIT = 0x1B
PREVENT_ALLOW = 0x1E
READ_CAPACITY = 0x25
READ_10 = 0x28
READ_TOC = 0x43
GET_CONFIGURATION = 0x46
GET_EVENT_STATUS = 0x4A
MODE_SENSE_10 = 0x5A
READ_12 = 0xA8

# Sense keys and (ASC, ASCQ)
NO_SENSE, NOT_READY, MEDIUM_ERROR, ILLEGAL_REQUEST, UNIT_ATTENTION = 0x0, 0x2, 0x3, 0x5, 0x6
INVALID_OPCODE = (0x20, 0x00)
LBA_OUT_OF_RANGE = (0x21, 0x00)
INVALID_FIELD = (0x24, 0x00)
MEDIUM_CHANGED = (0x28, 0x00)
SAVING_UNSUPPORTED = (0x39, 0x00)
NO_MEDIUM_TRAY_OPEN = (0x3A, 0x02)
UNRECOVERED_READ = (0x11, 0x00)
REMOVAL_PREVENTED = (0x53, 0x02)

# Media event codes (GET EVENT STATUS NOTIFICATION, media class)
EVENT_NONE, EVENT_NEW_MEDIA, EVENT_MEDIA_REMOVAL = 0, 2, 3
PROFILE_CD_ROM, PROFILE_DVD_ROM = 0x0008, 0x0010


def _be16(b: bytes, off: int) -> int:
    return int.from_bytes(b[off:off + 2], "big")


def _be32(b: bytes, off: int) -> int:
    return int.from_bytes(b[off:off + 4], "big")


def msf(lba: int) -> bytes:
    """Minutes, seconds, frames of a logical block (the first block is at 00:02:00)."""
    f = lba + 150
    return bytes((0, f // (75 * 60), (f // 75) % 60, f % 75))


class AtapiCdrom(DeviceState):
    signature = SIG_ATAPI
    reset_status = 0x00            # a packet device is not "ready" until identified
    atapi = True
    state_version = 1

    @declared_later
    def state_layout():
        """The CD-ROM's checkpoint record (inside its AHCI port's record)."""
        from construct import Flag, Int8ul, Struct
        return Struct(
            "sense_key" / Int8ul, "asc" / Int8ul, "ascq" / Int8ul,    # what REQUEST SENSE returns
            "tray_open" / Flag,
            "prevent" / Flag,                 # PREVENT ALLOW MEDIUM REMOVAL
            "unit_attention" / Flag,          # "medium may have changed" not yet reported
            "media_event" / Int8ul,           # for GET EVENT STATUS NOTIFICATION
        )

    def __init__(self, backend: BlockBackend, *, model: str | None = None,
                 serial: str | None = None, workers: int = 2, name: str = "ahci-cd"):
        self.backend = backend
        self.workers = workers
        self.queue = BlockQueue(backend, workers=workers, depth=64, name=name)
        self.model = model or DEFAULT_MODEL
        self.serial = serial or backend.serial
        self.sense = (NO_SENSE, 0, 0)
        self.tray_open = False
        self.prevent = False
        self.unit_attention = False
        self.media_event = EVENT_NONE
        self._scsi = {
            TEST_UNIT_READY: self._test_unit_ready, REQUEST_SENSE: self._request_sense,
            INQUIRY: self._inquiry, START_STOP_UNIT: self._start_stop,
            PREVENT_ALLOW: self._prevent_allow, READ_CAPACITY: self._read_capacity,
            READ_10: self._read, READ_12: self._read, READ_TOC: self._read_toc,
            GET_CONFIGURATION: self._get_configuration,
            GET_EVENT_STATUS: self._get_event_status, MODE_SENSE_10: self._mode_sense,
        }

    @property
    def medium(self) -> bool:
        return not self.tray_open

    @property
    def sectors(self) -> int:
        return self.backend.size // CD_SECTOR

    cached_reads = False              # (AtaDisk's: only the disk's native path reads)

    def native_setup(self, nat) -> bool:
        """The native NCQ path (AtaDisk.native_setup) is for disks: never for a CD-ROM."""
        return False

    def is_queued(self, command: int) -> bool:
        return False

    # -- checkpoint (the HBA quiesces its ports first: no command is with the device) ----
    def save_state(self) -> dict:
        key, asc, ascq = self.sense
        return dict(sense_key=key, asc=asc, ascq=ascq, tray_open=self.tray_open,
                    prevent=self.prevent, unit_attention=self.unit_attention,
                    media_event=self.media_event)

    def load_state(self, s) -> None:
        if s.sense_key > 0xF or s.media_event not in (EVENT_NONE, EVENT_NEW_MEDIA,
                                                      EVENT_MEDIA_REMOVAL):
            raise ConfigError("snapshot: ahci cdrom: malformed sense or media event")
        self.sense = (s.sense_key, s.asc, s.ascq)
        self.tray_open, self.prevent = bool(s.tray_open), bool(s.prevent)
        self.unit_attention, self.media_event = bool(s.unit_attention), s.media_event

    def close(self) -> None:
        self.queue.close()
        self.backend.close()

    # -- ATA level ------------------------------------------------------------------------
    def _signature_regs(self) -> dict:
        s = self.signature
        return {"count": s & 0xFF, "lba0": s >> 8 & 0xFF, "lba1": s >> 16 & 0xFF,
                "lba2": s >> 24 & 0xFF}

    def execute(self, cmd: Command) -> Result | None:
        op = cmd.command
        if op == ATA_PACKET:
            return self._packet(cmd)
        if op == ATA_IDENTIFY_PACKET:
            return Result(transferred=cmd.scatter(self.identify()), pio="in")
        if op == ATA_IDENTIFY:
            # A packet device aborts IDENTIFY DEVICE and shows its signature (ACS-3 7.12).
            return ata_error(ERR_ABRT, regs=self._signature_regs())
        if op == ATA_DEVICE_RESET:
            self.sense = (NO_SENSE, 0, 0)
            return Result(status=self.reset_status, regs=self._signature_regs())
        if op == ATA_CHECK_POWER_MODE:
            return Result(regs={"count": 0xFF})
        if op == ATA_SET_FEATURES or op in ATA_IDLE_STANDBY:
            return Result()
        return ata_error(ERR_ABRT)

    def identify(self) -> bytes:
        w = [0] * 256
        w[0] = 0x8000 | 5 << 8 | 0x80 | 0x40        # ATAPI, CD-ROM, removable, 12-byte CDB
        w[49] = 0x0B00                              # IORDY, LBA, DMA
        w[53] = 0x0006
        w[63] = 0x0007
        w[64] = 0x0003
        w[65] = w[66] = w[67] = w[68] = 120
        w[76] = 0x000E
        w[80] = 0x07F0
        w[82] = 0x0010                              # PACKET feature set
        w[83] = w[84] = w[87] = 0x4000
        w[85] = 0x0010
        w[88] = 0x207F                              # UDMA 0-6, mode 5 selected
        return identify_block(w, {10: (self.serial, 20), 23: (FIRMWARE, 8),
                                  27: (self.model, 40)})

    # -- PACKET ---------------------------------------------------------------------------
    def _packet(self, cmd: Command) -> Result | None:
        cdb = cmd.acmd
        op = cdb[0]
        handler = self._scsi.get(op)
        if handler is None:
            return self._check(ILLEGAL_REQUEST, INVALID_OPCODE)
        if self.unit_attention and op not in (INQUIRY, REQUEST_SENSE, GET_EVENT_STATUS,
                                              GET_CONFIGURATION):
            self.unit_attention = False
            return self._check(UNIT_ATTENTION, MEDIUM_CHANGED)
        pio = None if cmd.features & PACKET_DMA else "in"
        out = handler(cmd, cdb)
        if isinstance(out, (bytes, bytearray)):
            if op != REQUEST_SENSE:
                self.sense = (NO_SENSE, 0, 0)
            return Result(transferred=cmd.scatter(bytes(out)), pio=pio if out else None)
        if out is True:
            self.sense = (NO_SENSE, 0, 0)
            return Result()
        return out                                  # an error Result, or None (async)

    def _check(self, key: int, asc_ascq: tuple[int, int]) -> Result:
        self.sense = (key, *asc_ascq)
        error = key << 4 | (ERR_ABRT if key == ILLEGAL_REQUEST else 0)
        return Result(status=ST_OK | ST_ERR, error=error)

    def _not_ready(self) -> Result | None:
        return self._check(NOT_READY, NO_MEDIUM_TRAY_OPEN) if not self.medium else None

    # -- SCSI commands (each returns data bytes, True for success without data, a Result
    #    for an error, or None when the command completes later) ---------------------------
    def _test_unit_ready(self, cmd, cdb):
        return self._not_ready() or True

    def _request_sense(self, cmd, cdb):
        key, asc, ascq = self.sense
        if key == NO_SENSE and not self.medium:
            key, asc, ascq = NOT_READY, *NO_MEDIUM_TRAY_OPEN
        data = bytearray(18)
        data[0], data[2], data[7], data[12], data[13] = 0x70, key, 10, asc, ascq
        self.sense = (NO_SENSE, 0, 0)
        return bytes(data[:cdb[4]])

    def _inquiry(self, cmd, cdb):
        alloc = _be16(cdb, 3)
        if cdb[1] & 1:                              # vital product data
            page = cdb[2]
            if page == 0x00:
                data = bytes((5, 0, 0, 2, 0x00, 0x80))
            elif page == 0x80:
                serial = self.serial.encode("ascii")
                data = bytes((5, 0x80, 0, len(serial))) + serial
            else:
                return self._check(ILLEGAL_REQUEST, INVALID_FIELD)
            return data[:alloc]
        if cdb[2]:
            return self._check(ILLEGAL_REQUEST, INVALID_FIELD)
        data = (bytes((5, 0x80, 5, 0x32, 31, 0, 0, 0)) + VENDOR.ljust(8).encode()
                + self.model[:16].ljust(16).encode("ascii", "replace")
                + FIRMWARE[:4].ljust(4).encode())
        return data[:alloc]

    def _start_stop(self, cmd, cdb):
        if cdb[4] & 0x02:                           # LoEj: open or close the tray
            if cdb[4] & 0x01:
                if self.tray_open:
                    self.tray_open = False
                    self.media_event = EVENT_NEW_MEDIA
                    self.unit_attention = True      # "medium may have changed"
            else:
                if self.prevent:
                    return self._check(ILLEGAL_REQUEST, REMOVAL_PREVENTED)
                if not self.tray_open:
                    self.tray_open = True
                    self.media_event = EVENT_MEDIA_REMOVAL
        return True

    def _prevent_allow(self, cmd, cdb):
        self.prevent = bool(cdb[4] & 0x01)
        return True

    def _read_capacity(self, cmd, cdb):
        err = self._not_ready()
        if err:
            return err
        return struct.pack(">II", self.sectors - 1, CD_SECTOR)

    def _read(self, cmd: Command, cdb):
        err = self._not_ready()
        if err:
            return err
        lba = _be32(cdb, 2)
        n = _be16(cdb, 7) if cdb[0] == READ_10 else _be32(cdb, 6)
        if lba + n > self.sectors:
            return self._check(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)
        if not n:
            return True
        length = n * CD_SECTOR
        bufs = cmd.buffers(length)
        pio = None if cmd.features & PACKET_DMA else "in"

        def done(r):
            if isinstance(r, BlockError):
                res = self._check(MEDIUM_ERROR, UNRECOVERED_READ)
            else:
                self.sense = (NO_SENSE, 0, 0)
                res = Result(transferred=length, pio=pio)
            cmd.complete(res)
        cmd.submit(self.backend.read, lba * CD_SECTOR, bufs, callback=done)
        return None

    def _read_toc(self, cmd, cdb):
        err = self._not_ready()
        if err:
            return err
        use_msf = bool(cdb[1] & 0x02)
        fmt = cdb[2] & 0x0F or cdb[9] >> 6          # old drives took the format in byte 9
        track = cdb[6]
        alloc = _be16(cdb, 7)

        def addr(lba):
            return msf(lba) if use_msf else struct.pack(">I", lba)
        if fmt == 0:
            if track > 1 and track != 0xAA:
                return self._check(ILLEGAL_REQUEST, INVALID_FIELD)
            body = b""
            if track <= 1:
                body += bytes((0, 0x14, 1, 0)) + addr(0)           # track 1: data
            body += bytes((0, 0x14, 0xAA, 0)) + addr(self.sectors)  # lead-out
            data = struct.pack(">HBB", len(body) + 2, 1, 1) + body
        elif fmt == 1:                                # session information
            body = bytes((0, 0x14, 1, 0)) + addr(0)
            data = struct.pack(">HBB", len(body) + 2, 1, 1) + body
        elif fmt == 2:                                # raw TOC, always in MSF
            def point(p, m, s, f):
                return bytes((1, 0x14, 0, p, 0, 0, 0, 0, m, s, f))
            lead = msf(self.sectors)
            body = (point(0xA0, 1, 0, 0) + point(0xA1, 1, 0, 0)
                    + point(0xA2, lead[1], lead[2], lead[3]) + point(1, 0, 2, 0))
            data = struct.pack(">HBB", len(body) + 2, 1, 1) + body
        else:
            return self._check(ILLEGAL_REQUEST, INVALID_FIELD)
        return data[:alloc]

    def _profile(self) -> int:
        if not self.medium:
            return 0
        return PROFILE_DVD_ROM if self.sectors > CD_MAX_SECTORS else PROFILE_CD_ROM

    def _get_configuration(self, cmd, cdb):
        rt = cdb[1] & 0x03
        start = _be16(cdb, 2)
        alloc = _be16(cdb, 7)
        if rt == 3:
            return self._check(ILLEGAL_REQUEST, INVALID_FIELD)
        current = self._profile()
        cur = 1 if self.medium else 0
        dvd = current == PROFILE_DVD_ROM
        profiles = b"".join(struct.pack(">HBB", p, 1 if p == current else 0, 0)
                            for p in (PROFILE_DVD_ROM, PROFILE_CD_ROM))
        # (feature code, version, persistent, current, body)
        features = [
            (0x0000, 0, 1, 1, profiles),                               # profile list
            (0x0001, 2, 1, 1, struct.pack(">IB3x", 2, 0)),            # core: ATAPI
            (0x0003, 0, 1, 1, bytes((0x29, 0, 0, 0))),                 # removable, tray
            (0x0010, 0, 0, cur, struct.pack(">IHBx", CD_SECTOR, 16 if dvd else 1, 0)),
            (0x001E, 2, 0, cur and not dvd, bytes(4)),                 # CD read
            (0x001F, 0, 0, cur and dvd, bytes(4)),                     # DVD read
        ]
        body = b""
        for code, version, persistent, current_bit, fbody in features:
            if code < start or (rt == 2 and code != start) or (rt == 1 and not current_bit):
                continue
            body += struct.pack(">HBB", code, version << 2 | persistent << 1 | bool(current_bit),
                                len(fbody)) + fbody
        data = struct.pack(">I2xH", len(body) + 4, current) + body
        return data[:alloc]

    def _get_event_status(self, cmd, cdb):
        if not cdb[1] & 0x01:                       # only polled operation is supported
            return self._check(ILLEGAL_REQUEST, INVALID_FIELD)
        alloc = _be16(cdb, 7)
        if cdb[4] & 0x10:                           # media class requested
            event, self.media_event = self.media_event, EVENT_NONE
            status = (0x01 if self.tray_open else 0) | (0x02 if self.medium else 0)
            data = struct.pack(">HBB", 6, 0x04, 0x10) + bytes((event, status, 0, 0))
        else:
            data = struct.pack(">HBB", 2, 0x80, 0x10)     # no event available
        return data[:alloc]

    def _mode_page(self, page: int, changeable: bool) -> bytes:
        if page == 0x01:                            # read error recovery
            body = bytes(6) if changeable else bytes((0, 5, 0, 0, 0, 0))
        elif page == 0x2A:                          # CD/DVD capabilities and mechanical status
            body = bytearray(20)
            if not changeable:
                body[0] = 0x01 | (0x08 if self._profile() == PROFILE_DVD_ROM else 0)
                body[4] = 0x29 | (0x02 if self.prevent else 0)   # lock, eject, tray loader
                struct.pack_into(">H", body, 6, 4224)            # max read speed, kB/s
                struct.pack_into(">H", body, 8, 256)             # volume levels
                struct.pack_into(">H", body, 10, 512)            # buffer size, KiB
                struct.pack_into(">H", body, 12, 4224)           # current read speed
            body = bytes(body)
        else:
            return b""
        return bytes((page, len(body))) + body

    def _mode_sense(self, cmd, cdb):
        page, control = cdb[2] & 0x3F, cdb[2] >> 6
        alloc = _be16(cdb, 7)
        if control == 3:
            return self._check(ILLEGAL_REQUEST, SAVING_UNSUPPORTED)
        pages = (0x01, 0x2A) if page == 0x3F else (page,)
        body = b"".join(self._mode_page(p, control == 1) for p in pages)
        if not body:
            return self._check(ILLEGAL_REQUEST, INVALID_FIELD)
        medium_type = 0x70 if not self.medium else 0x01
        data = struct.pack(">HBB4x", len(body) + 6, medium_type, 0) + body
        return data[:alloc]


__all__ = ["AtapiCdrom", "msf", "CD_SECTOR"]


def __getattr__(name: str):
    # ATAPI_CDROM_STATE, the record's module-level name before it was declared late (tools reading
    # checkpoints import it); asking for it imports construct.
    if name == "ATAPI_CDROM_STATE":
        return AtapiCdrom.state_layout
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
