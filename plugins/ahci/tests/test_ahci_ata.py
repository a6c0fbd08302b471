"""ATA disks behind the AHCI HBA: IDENTIFY, DMA, PIO and NCQ transfers into the image file,
FLUSH, TRIM, SET FEATURES and the error answers (ABRT, IDNF) a driver sees."""
import os
import random
import struct
import threading

import pytest

from hvframe_ahci import ata, regs
from hvframe_ahci.hba import AhciHba
from hvframe_ahci.testdriver import AhciDriver, build_machine, h2d

SLOT = 4
BUF = 0x1000000
SECTORS = 2048


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(SECTORS * 512))
    return path


def open_port(conf, *, ie=0):
    m = build_machine(f"{SLOT},{conf}")
    drv = AhciDriver(m, SLOT)
    p = drv.port(0)
    p.start(ie=ie)
    return m, drv, p


@pytest.fixture
def port(disk):
    m, drv, p = open_port(f"ahci-hd,{disk},ser=SER123,model=Test Disk Model")
    yield m, p
    m.close()


def identify(m, p) -> list[int]:
    is_ = p.run(0, h2d(ata.IDENTIFY_DEVICE), [(BUF, 512)])
    assert not is_ & regs.IS_FATAL
    return list(struct.unpack("<256H", m.memory.read(BUF, 512)))


def ata_text(words, first, n):
    return b"".join(struct.pack(">H", w) for w in words[first:first + n]).decode().rstrip()


def device(m, index=0):
    return next(d for d in m.devices if isinstance(d, AhciHba)).ports[index].device


# -- IDENTIFY ----------------------------------------------------------------------------------
def test_identify_device(port):
    m, p = port
    w = identify(m, p)
    assert ata_text(w, 10, 10) == "SER123"
    assert ata_text(w, 27, 20) == "Test Disk Model"
    assert w[60] | w[61] << 16 == SECTORS
    assert sum(w[100 + i] << (16 * i) for i in range(4)) == SECTORS
    assert w[83] & (1 << 10) and w[86] & (1 << 10)          # LBA48 supported and enabled
    assert w[76] & (1 << 8) and w[75] == 31                  # NCQ, depth 32
    assert w[169] & 1 and w[69] & (1 << 14)                  # TRIM, deterministic
    assert w[106] == 0x4000                                  # 512/512
    raw = m.memory.read(BUF, 512)
    assert raw[510] == 0xA5 and sum(raw) & 0xFF == 0         # integrity word
    # a PIO data-in command: PIO Setup FIS with the final status, as SeaBIOS and Linux read
    ps = p.psfis()
    assert ps[0] == 0x5F and ps[1] & 0x20 and ps[2] & regs.ST_DRDY and ps[15] == 0x50
    assert p.read("is") & regs.IS_PSS and p.prdbc(0) == 512


@pytest.mark.parametrize("conf, logical, phys_exp", [("sectorsize=512/4096", 512, 3),
                                                     ("sectorsize=4096", 4096, 0)])
def test_identify_sector_sizes(tmp_path, conf, logical, phys_exp):
    path = tmp_path / "d.img"
    path.write_bytes(bytes(64 << 10))
    m, drv, p = open_port(f"ahci-hd,{path},{conf}")
    w = identify(m, p)
    assert w[106] & 0xF == phys_exp and bool(w[106] & 0x2000) == bool(phys_exp)
    if logical > 512:
        assert w[106] & 0x1000 and (w[117] | w[118] << 16) * 2 == logical
    assert w[60] == (64 << 10) // logical
    m.close()


def test_identify_without_trim_when_nodelete_or_readonly(disk):
    for opt in ("nodelete", "ro"):
        m, drv, p = open_port(f"ahci-hd,{disk},{opt}")
        w = identify(m, p)
        assert not w[169] & 1 and w[105] == 0
        m.close()


def test_seabios_probe_sequence(port):
    """SeaBIOS asks IDENTIFY PACKET DEVICE first: a disk aborts it, SeaBIOS recovers the port
    and asks IDENTIFY DEVICE."""
    m, p = port
    is_ = p.run(0, h2d(ata.IDENTIFY_PACKET_DEVICE), [(BUF, 512)])
    assert is_ & regs.IS_DHRS and is_ & regs.IS_TFES
    assert p.rfis()[2] & regs.ST_ERR and p.rfis()[3] == regs.ERR_ABRT
    p.recover()
    assert not p.read("tfd") & (regs.ST_BSY | regs.ST_DRQ)
    w = identify(m, p)
    assert w[0] == 0x0040


# -- DMA and PIO transfers ----------------------------------------------------------------------------
def test_read_dma_28_and_48_bit(port, disk):
    m, p = port
    data = disk.read_bytes()
    p.run(0, h2d(ata.READ_DMA, lba=5 | 0x0 << 24, count=2, device=0x40), [(BUF, 1024)])
    assert m.memory.read(BUF, 1024) == data[5 * 512:7 * 512]
    p.run(1, h2d(ata.READ_DMA_EXT, lba=SECTORS - 1, count=1), [(BUF, 512)])
    assert m.memory.read(BUF, 512) == data[-512:]
    assert p.read("ci") == 0 and p.tfd() == (0x50, 0)


def test_write_dma_lands_in_the_image(port, disk):
    m, p = port
    payload = os.urandom(8192)
    m.memory.write(BUF, payload)
    is_ = p.run(0, h2d(ata.WRITE_DMA_EXT, lba=17, count=16), [(BUF, 8192)], write=True)
    assert is_ & regs.IS_DHRS and not is_ & regs.IS_TFES
    assert disk.read_bytes()[17 * 512:17 * 512 + 8192] == payload
    m.memory.write(BUF, b"\x5A" * 512)
    p.run(1, h2d(ata.WRITE_DMA, lba=0, count=1), [(BUF, 512)], write=True)
    assert disk.read_bytes()[:512] == b"\x5A" * 512


def test_pio_read_and_write_sectors(port, disk):
    m, p = port
    is_ = p.run(0, h2d(ata.READ_SECTORS, lba=9, count=1), [(BUF, 512)])
    assert is_ & regs.IS_PSS and m.memory.read(BUF, 512) == disk.read_bytes()[9 * 512:10 * 512]
    m.memory.write(BUF, b"\x11" * 1024)
    p.run(1, h2d(ata.WRITE_SECTORS_EXT, lba=30, count=2), [(BUF, 1024)], write=True)
    assert disk.read_bytes()[30 * 512:32 * 512] == b"\x11" * 1024


def test_read_past_the_end_is_idnf(port):
    m, p = port
    is_ = p.run(0, h2d(ata.READ_DMA_EXT, lba=SECTORS - 1, count=2), [(BUF, 1024)])
    assert is_ & regs.IS_TFES and p.tfd() == (0x51, regs.ERR_IDNF)


def test_write_to_a_readonly_disk_is_aborted(disk):
    before = disk.read_bytes()
    m, drv, p = open_port(f"ahci-hd,{disk},ro")
    m.memory.write(BUF, b"\xFF" * 512)
    is_ = p.run(0, h2d(ata.WRITE_DMA_EXT, lba=0, count=1), [(BUF, 512)], write=True)
    assert is_ & regs.IS_TFES and p.tfd()[1] == regs.ERR_ABRT
    assert disk.read_bytes() == before
    m.close()


def test_write_completes_only_after_the_backend_has_it(port, disk):
    m, p = port
    dev = device(m)
    entered, release = threading.Event(), threading.Event()
    real = dev.backend.write

    def slow_write(offset, bufs, fua=False):
        entered.set()
        release.wait(5)
        return real(offset, bufs, fua=fua)
    dev.backend.write = slow_write
    m.memory.write(BUF, b"\x77" * 512)
    p.issue(0, h2d(ata.WRITE_DMA_EXT, lba=3, count=1), [(BUF, 512)], write=True)
    assert entered.wait(5)
    assert p.read("ci") == 1 and not p.read("is") & regs.IS_DHRS
    release.set()
    p.wait(1)
    assert p.read("is") & regs.IS_DHRS
    assert disk.read_bytes()[3 * 512:4 * 512] == b"\x77" * 512


# -- NCQ ------------------------------------------------------------------------------------------------
def test_ncq_32_slots_random_reads_and_writes(disk):
    m, drv, p = open_port(f"ahci-hd,{disk}", ie=regs.IS_SDBS)
    drv.write("ghc", regs.GHC_AE | regs.GHC_IE)
    rng = random.Random(7)
    image = bytearray(disk.read_bytes())
    lbas = rng.sample(range(0, SECTORS - 8, 8), 32)
    writes = {}
    for slot, lba in enumerate(lbas):
        buf = BUF + slot * 0x10000
        if slot % 3 == 0:
            payload = os.urandom(4096)
            m.memory.write(buf, payload)
            writes[lba] = payload
            fis = h2d(ata.WRITE_FPDMA_QUEUED, lba=lba, count=slot << 3, features=8)
        else:
            fis = h2d(ata.READ_FPDMA_QUEUED, lba=lba, count=slot << 3, features=8)
        p.prepare(slot, fis, [(buf, 4096)], write=slot % 3 == 0)
    p.write("sact", 0xFFFFFFFF)
    p.write("ci", 0xFFFFFFFF)
    is_ = p.wait()
    assert is_ & regs.IS_SDBS and not is_ & regs.IS_FATAL
    assert p.read("sact") == 0 and p.read("ci") == 0
    sdb = p.sdbfis()
    assert sdb[0] == 0xA1 and sdb[1] & 0x40
    for lba, payload in writes.items():
        image[lba * 512:lba * 512 + 4096] = payload
    for slot, lba in enumerate(lbas):
        if slot % 3:
            assert m.memory.read(BUF + slot * 0x10000, 4096) == bytes(image[lba * 512:lba * 512 + 4096])
    assert disk.read_bytes() == bytes(image)
    assert drv.read("is") == 1
    m.close()


def test_ncq_error_halts_with_sactive_kept(port):
    m, p = port
    p.prepare(4, h2d(ata.READ_FPDMA_QUEUED, lba=SECTORS, count=4 << 3, features=1),
              [(BUF, 512)])
    p.write("sact", 1 << 4)
    p.write("ci", 1 << 4)
    is_ = p.wait(1 << 4)
    assert is_ & regs.IS_TFES and is_ & regs.IS_SDBS
    assert p.read("sact") == 1 << 4 and p.read("ci") == 0          # accepted, then failed
    assert p.tfd() == (0x51, regs.ERR_IDNF)
    p.recover()
    assert p.read("sact") == 0


def test_ncq_without_sactive_or_with_a_wrong_tag_is_aborted(port):
    m, p = port
    is_ = p.run(2, h2d(ata.READ_FPDMA_QUEUED, lba=0, count=2 << 3, features=1), [(BUF, 512)])
    assert is_ & regs.IS_TFES and p.tfd()[1] == regs.ERR_ABRT
    p.recover()
    is_ = p.run(2, h2d(ata.READ_FPDMA_QUEUED, lba=0, count=5 << 3, features=1), [(BUF, 512)],
                ncq=True)
    assert is_ & regs.IS_TFES
    p.recover()
    is_ = p.run(2, h2d(ata.READ_FPDMA_QUEUED, lba=0, count=2 << 3, features=1), [(BUF, 512)],
                ncq=True)
    assert not is_ & regs.IS_FATAL and p.read("sact") == 0


# -- other commands ------------------------------------------------------------------------------------
def test_flush_and_verify_and_power_mode(port):
    m, p = port
    assert not p.run(0, h2d(ata.FLUSH_CACHE_EXT)) & regs.IS_TFES
    assert not p.run(0, h2d(ata.FLUSH_CACHE)) & regs.IS_TFES
    assert not p.run(0, h2d(ata.READ_VERIFY_EXT, lba=0, count=SECTORS)) & regs.IS_TFES
    assert p.run(0, h2d(ata.READ_VERIFY_EXT, lba=1, count=SECTORS)) & regs.IS_TFES
    assert p.tfd()[1] == regs.ERR_IDNF
    p.recover()
    m.memory.write(p.fb + 0x40, bytes(20))
    p.run(0, h2d(ata.CHECK_POWER_MODE))
    assert p.rfis()[12] == 0xFF


def test_trim_zeroes_the_ranges(port, disk):
    m, p = port
    ranges = struct.pack("<QQ", 10 | 4 << 48, 100 | 1 << 48) + bytes(512 - 16)
    m.memory.write(BUF, ranges)
    is_ = p.run(0, h2d(ata.DATA_SET_MANAGEMENT, count=1, features=1), [(BUF, 512)], write=True)
    assert not is_ & regs.IS_TFES
    data = disk.read_bytes()
    assert data[10 * 512:14 * 512] == bytes(2048) and data[100 * 512:101 * 512] == bytes(512)
    assert data[14 * 512:15 * 512] != bytes(512)
    # a range past the end, no TRIM bit, a zero block count
    m.memory.write(BUF, struct.pack("<Q", (SECTORS - 1) | 2 << 48) + bytes(504))
    assert p.run(0, h2d(ata.DATA_SET_MANAGEMENT, count=1, features=1), [(BUF, 512)]) & \
        regs.IS_TFES
    p.recover()
    assert p.run(0, h2d(ata.DATA_SET_MANAGEMENT, count=1, features=0), [(BUF, 512)]) & \
        regs.IS_TFES
    p.recover()
    assert p.run(0, h2d(ata.DATA_SET_MANAGEMENT, count=0, features=1), [(BUF, 512)]) & \
        regs.IS_TFES


def test_set_features_write_cache(port, disk):
    m, p = port
    dev = device(m)
    assert identify(m, p)[85] & 0x20
    flushed = []
    real = dev.backend.flush
    dev.backend.flush = lambda: (flushed.append(1), real())[1]
    assert not p.run(0, h2d(ata.SET_FEATURES, features=ata.SF_DISABLE_WRITE_CACHE)) & \
        regs.IS_TFES
    assert not identify(m, p)[85] & 0x20
    m.memory.write(BUF, bytes(512))
    p.run(0, h2d(ata.WRITE_DMA_EXT, lba=0, count=1), [(BUF, 512)], write=True)
    assert flushed                                    # write-through while the cache is off
    assert not p.run(0, h2d(ata.SET_FEATURES, features=0x03, count=0x40 | 2)) & regs.IS_TFES
    assert identify(m, p)[88] >> 8 == 1 << 2          # UDMA 2 selected
    assert p.run(0, h2d(ata.SET_FEATURES, features=0x5D)) & regs.IS_TFES


def test_unknown_and_packet_commands_are_aborted_on_a_disk(port):
    m, p = port
    for op in (0x00, 0xA0, 0xB0, 0x2F):
        assert p.run(0, h2d(op), [(BUF, 512)]) & regs.IS_TFES
        assert p.tfd() == (0x51, regs.ERR_ABRT)
        p.recover()
