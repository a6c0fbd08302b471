"""ATAPI CD-ROMs behind the AHCI HBA: the PACKET command with the MMC commands hosts use,
and CHECK CONDITION with the sense data a driver reads back."""
import os
import struct

import pytest

from hvframe.errors import ConfigError
from hvframe_ahci import atapi, regs
from hvframe_ahci.testdriver import AhciDriver, build_machine, h2d

SLOT = 5
BUF = 0x1000000
ISO_SECTORS = 300


@pytest.fixture
def iso(tmp_path):
    path = tmp_path / "cd.iso"
    path.write_bytes(os.urandom(ISO_SECTORS * 2048))
    return path


@pytest.fixture
def cd(iso):
    m = build_machine(f"{SLOT},ahci-cd,{iso}")
    drv = AhciDriver(m, SLOT)
    p = drv.port(0)
    p.start()
    yield m, p
    m.close()


def cdb(*b):
    return bytes(b).ljust(12, b"\0")


def packet(p, acmd, length=0, *, dma=True, slot=0):
    """Run a PACKET command; returns (PxIS, status, error)."""
    prds = [(BUF, length)] if length else []
    is_ = p.run(slot, h2d(atapi.ATA_PACKET, features=1 if dma else 0), prds, atapi=True,
                acmd=acmd)
    st, err = p.tfd()
    if is_ & regs.IS_TFES:
        p.recover()
    return is_, st, err


def sense(m, p):
    is_, st, _ = packet(p, cdb(atapi.REQUEST_SENSE, 0, 0, 0, 18), 18)
    assert not st & regs.ST_ERR
    s = m.memory.read(BUF, 18)
    return s[2] & 0xF, s[12], s[13]


def test_signature_and_identify(cd):
    m, p = cd
    assert p.read("sig") == regs.SIG_ATAPI
    assert not p.read("tfd") & (regs.ST_BSY | regs.ST_DRQ)
    is_ = p.run(0, h2d(atapi.ATA_IDENTIFY_PACKET), [(BUF, 512)])
    assert is_ & regs.IS_PSS and not is_ & regs.IS_TFES
    w = struct.unpack("<256H", m.memory.read(BUF, 512))
    assert w[0] == 0x85C0                                   # ATAPI CD-ROM, removable
    assert b"".join(struct.pack(">H", x) for x in w[27:47]).rstrip() == b"HVFRAME DVD-ROM"
    # IDENTIFY DEVICE is aborted with the packet signature in the registers
    is_ = p.run(1, h2d(atapi.ATA_IDENTIFY), [(BUF, 512)])
    fis = p.rfis()
    assert is_ & regs.IS_TFES and fis[3] == regs.ERR_ABRT
    assert (fis[5], fis[6]) == (0x14, 0xEB)


def test_inquiry_capacity_and_test_unit_ready(cd):
    m, p = cd
    _, st, _ = packet(p, cdb(atapi.TEST_UNIT_READY))
    assert st == 0x50
    packet(p, cdb(atapi.INQUIRY, 0, 0, 0, 36), 36)
    inq = m.memory.read(BUF, 36)
    assert inq[0] == 5 and inq[1] & 0x80 and inq[8:16] == b"HVFRAME "
    packet(p, cdb(atapi.INQUIRY, 1, 0x80, 0, 64), 24)
    assert m.memory.read(BUF, 4)[1] == 0x80
    packet(p, cdb(atapi.READ_CAPACITY), 8)
    assert struct.unpack(">II", m.memory.read(BUF, 8)) == (ISO_SECTORS - 1, 2048)


@pytest.mark.parametrize("dma", [True, False])
def test_read_10_and_12(cd, iso, dma):
    m, p = cd
    data = iso.read_bytes()
    is_, st, _ = packet(p, cdb(atapi.READ_10, 0, 0, 0, 0, 7, 0, 0, 3), 3 * 2048, dma=dma)
    assert st == 0x50 and m.memory.read(BUF, 6144) == data[7 * 2048:10 * 2048]
    assert bool(is_ & regs.IS_PSS) == (not dma)
    assert p.prdbc(0) == 6144
    packet(p, cdb(atapi.READ_12, 0, 0, 0, 1, 0x20, 0, 0, 0, 1), 2048, dma=dma)
    assert m.memory.read(BUF, 2048) == data[0x120 * 2048:0x121 * 2048]


def test_read_past_the_end_reports_lba_out_of_range(cd):
    m, p = cd
    is_, st, err = packet(p, cdb(atapi.READ_10, 0, 0, 0, 1, 0x2B, 0, 0, 2), 4096)
    assert is_ & regs.IS_TFES and st & regs.ST_ERR and err >> 4 == atapi.ILLEGAL_REQUEST
    assert sense(m, p) == (atapi.ILLEGAL_REQUEST, 0x21, 0x00)
    assert sense(m, p) == (0, 0, 0)                           # REQUEST SENSE cleared it


def test_unknown_scsi_command_is_invalid_opcode(cd):
    m, p = cd
    is_, st, err = packet(p, cdb(0xF3))
    assert st & regs.ST_ERR and err == atapi.ILLEGAL_REQUEST << 4 | regs.ERR_ABRT
    assert sense(m, p) == (atapi.ILLEGAL_REQUEST, 0x20, 0x00)


def test_read_toc_formats(cd):
    m, p = cd
    packet(p, cdb(atapi.READ_TOC, 0, 0, 0, 0, 0, 0, 0, 100), 100)
    toc = m.memory.read(BUF, 20)
    assert struct.unpack(">H", toc[:2])[0] == 18 and toc[2:4] == b"\x01\x01"
    assert toc[6] == 1 and struct.unpack(">I", toc[8:12])[0] == 0          # track 1 at 0
    assert toc[14] == 0xAA and struct.unpack(">I", toc[16:20])[0] == ISO_SECTORS
    packet(p, cdb(atapi.READ_TOC, 2, 0, 0, 0, 0, 0, 0, 100), 100)           # MSF
    toc = m.memory.read(BUF, 20)
    assert toc[8:12] == bytes((0, 0, 2, 0)) and toc[16:20] == atapi.msf(ISO_SECTORS)
    packet(p, cdb(atapi.READ_TOC, 0, 1, 0, 0, 0, 0, 0, 12), 12)             # sessions
    assert m.memory.read(BUF, 4) == b"\x00\x0a\x01\x01"
    packet(p, cdb(atapi.READ_TOC, 0, 2, 0, 0, 0, 0, 0, 100), 48)            # raw
    assert m.memory.read(BUF, 2)[1] == 46
    _, st, _ = packet(p, cdb(atapi.READ_TOC, 0, 5, 0, 0, 0, 0, 0, 100), 100)
    assert st & regs.ST_ERR and sense(m, p) == (atapi.ILLEGAL_REQUEST, 0x24, 0)


def test_mode_sense_capabilities_page(cd):
    m, p = cd
    packet(p, cdb(atapi.MODE_SENSE_10, 0, 0x2A, 0, 0, 0, 0, 0, 64), 30)
    d = m.memory.read(BUF, 30)
    assert struct.unpack(">H", d[:2])[0] == 28 and d[8] == 0x2A and d[9] == 20
    assert d[8 + 6] & 0x08                                      # eject supported
    _, st, _ = packet(p, cdb(atapi.MODE_SENSE_10, 0, 0x05, 0, 0, 0, 0, 0, 64), 64)
    assert st & regs.ST_ERR and sense(m, p) == (atapi.ILLEGAL_REQUEST, 0x24, 0)
    packet(p, cdb(atapi.MODE_SENSE_10, 0, 0x3F, 0, 0, 0, 0, 0, 64), 38)
    assert m.memory.read(BUF, 10)[8] == 0x01                    # all pages, page 1 first


def test_get_configuration_profiles(cd, tmp_path):
    m, p = cd
    packet(p, cdb(atapi.GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 0, 64), 64)
    d = m.memory.read(BUF, 64)
    assert struct.unpack(">H", d[6:8])[0] == atapi.PROFILE_CD_ROM
    assert d[8:10] == b"\x00\x00"                               # profile list first
    packet(p, cdb(atapi.GET_CONFIGURATION, 2, 0, 0x1E, 0, 0, 0, 0, 64), 64)  # only CD Read
    d = m.memory.read(BUF, 16)
    assert struct.unpack(">I", d[:4])[0] == 4 + 8 and d[8:10] == b"\x00\x1e"
    big = tmp_path / "dvd.iso"
    with open(big, "wb") as f:
        f.truncate((atapi.CD_MAX_SECTORS + 1) * 2048)
    m2 = build_machine(f"{SLOT},ahci-cd,{big}")
    p2 = AhciDriver(m2, SLOT).port(0)
    p2.start()
    packet(p2, cdb(atapi.GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 0, 8), 8)
    assert struct.unpack(">H", m2.memory.read(BUF + 6, 2))[0] == atapi.PROFILE_DVD_ROM
    m2.close()


def test_eject_prevent_and_media_events(cd):
    m, p = cd
    gesn = cdb(atapi.GET_EVENT_STATUS, 1, 0, 0, 0x10, 0, 0, 0, 8)
    packet(p, gesn, 8)
    assert m.memory.read(BUF, 8) == b"\x00\x06\x04\x10\x00\x02\x00\x00"   # present, no event
    packet(p, cdb(atapi.PREVENT_ALLOW, 0, 0, 0, 1))
    _, st, _ = packet(p, cdb(atapi.START_STOP_UNIT, 0, 0, 0, 0x02))       # eject: refused
    assert st & regs.ST_ERR and sense(m, p) == (atapi.ILLEGAL_REQUEST, 0x53, 0x02)
    packet(p, cdb(atapi.PREVENT_ALLOW, 0, 0, 0, 0))
    _, st, _ = packet(p, cdb(atapi.START_STOP_UNIT, 0, 0, 0, 0x02))
    assert not st & regs.ST_ERR
    packet(p, gesn, 8)
    assert m.memory.read(BUF, 8)[4:6] == b"\x03\x01"              # removal, tray open
    _, st, err = packet(p, cdb(atapi.TEST_UNIT_READY))
    assert err >> 4 == atapi.NOT_READY and sense(m, p) == (atapi.NOT_READY, 0x3A, 0x02)
    _, st, _ = packet(p, cdb(atapi.READ_10, 0, 0, 0, 0, 0, 0, 0, 1), 2048)
    assert st & regs.ST_ERR
    packet(p, cdb(atapi.START_STOP_UNIT, 0, 0, 0, 0x03))               # load
    _, st, err = packet(p, cdb(atapi.TEST_UNIT_READY))
    assert err >> 4 == atapi.UNIT_ATTENTION                             # medium may have changed
    _, st, _ = packet(p, cdb(atapi.TEST_UNIT_READY))
    assert st == 0x50
    packet(p, gesn, 8)
    assert m.memory.read(BUF, 8)[4:6] == b"\x02\x02"              # new media, present
    _, st, _ = packet(p, cdb(atapi.GET_EVENT_STATUS, 0, 0, 0, 0x10, 0, 0, 0, 8), 8)
    assert st & regs.ST_ERR                                         # only polled mode


def test_cd_image_must_be_whole_2048_byte_sectors(tmp_path):
    bad = tmp_path / "odd.iso"
    bad.write_bytes(bytes(2048 * 3 + 512))
    with pytest.raises(ConfigError, match="2048"):
        build_machine(f"{SLOT},ahci-cd,{bad}")
