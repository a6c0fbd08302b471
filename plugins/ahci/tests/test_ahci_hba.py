"""The AHCI HBA through the dispatch core: PCI identity, register reset values, port start/stop,
COMRESET, command lists with fragmented PRDs, interrupts (INTx and MSI) and the error
states a driver's recovery depends on."""
import os
import threading

import time

import pytest
from construct import Container

from hvframe_ahci import regs
from hvframe_ahci.ata import IDENTIFY_DEVICE, READ_DMA_EXT, WRITE_DMA_EXT
from hvframe_ahci.hba import AhciHba
from hvframe_ahci.testdriver import ABAR, AhciDriver, build_machine, h2d

SLOT = 4
BUF = 0x1000000


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 << 20))
    return path


@pytest.fixture
def setup(disk):
    m = build_machine(f"{SLOT},ahci,hd:{disk}")
    drv = AhciDriver(m, SLOT)
    yield m, drv, drv.port(0)
    m.close()


def hba_of(m) -> AhciHba:
    return next(d for d in m.devices if isinstance(d, AhciHba))


# -- declarations ---------------------------------------------------------------------------
def test_struct_fast_paths_agree_with_the_construct_declarations():
    fis = dict(type=0x27, flags=0x80, command=0x25, features=1, lba0=1, lba1=2, lba2=3,
               device=0x40, lba3=4, lba4=5, lba5=6, features_exp=7, count=8, count_exp=9,
               icc=0, control=0)
    built = regs.H2D_FIS.build(Container(**fis))
    assert built == regs.H2D.pack(*fis.values())
    hdr = regs.COMMAND_HEADER.build(Container(flags=0x45, prdtl=3, prdbc=77, ctba=0x1000,
                                              ctbau=1))
    assert regs.CMD_HEADER.unpack(hdr) == (0x45, 3, 77, 0x1000, 1)
    prd = regs.PRD_ENTRY.build(Container(dba=0x2000, dbau=0, dbc=0x800001FF))
    assert regs.PRD.unpack(prd) == (0x2000, 0, 0x800001FF)
    sdb = regs.SDB_FIS.build(Container(type=0xA1, flags=0x40, status=0x50, error=0,
                                       sactive=0x80000001))
    assert regs.SDB.unpack(sdb) == (0xA1, 0x40, 0x50, 0, 0x80000001)
    d2h = regs.D2H_FIS.parse(regs.D2H.pack(0x34, 0x40, 0x51, 4, 1, 2, 3, 0, 4, 5, 6, 1, 0))
    assert (d2h.status, d2h.error, d2h.count) == (0x51, 4, 1)
    assert regs.PORT_OFFSETS["tfd"] == 0x20 and regs.PORT_OFFSETS["devslp"] == 0x44
    assert regs.GHC_OFFSETS["bohc"] == 0x28
    assert regs.RX == {"dsfis": 0, "psfis": 0x20, "rfis": 0x40, "sdbfis": 0x58, "ufis": 0x60}


# -- PCI identity and reset values ------------------------------------------------------------
def test_pci_identity_abar_msi_and_pin(setup):
    m, drv, _ = setup
    assert drv.config_read(0x00) == 0x29228086
    assert drv.config_read(0x08) >> 8 == 0x010601
    assert drv.config_read(0x3D, 1) == 1                      # INTA
    drv.config_write(0x24, 0xFFFFFFFF)
    assert drv.config_read(0x24) == 0xFFFFE000                # 8 KiB, 32-bit memory
    drv.config_write(0x24, ABAR)
    assert drv.config_read(0x10) == 0                         # only BAR5
    cap = drv.config_read(0x34, 1)
    ids = []
    while cap:
        ids.append(drv.config_read(cap, 1))
        cap = drv.config_read(cap + 1, 1)
    assert 0x05 in ids                                        # MSI


def test_reset_values(setup):
    m, drv, p = setup
    cap = drv.read("cap")
    assert cap & regs.CAP_S64A and cap & regs.CAP_SNCQ and cap & regs.CAP_SAM
    assert (cap >> 8) & 0x1F == 31 and cap & 0x1F == 0          # 32 slots, 1 port
    assert drv.read("ghc") == regs.GHC_AE
    assert drv.read("vs") == 0x00010301
    assert drv.read("pi") == 1
    assert drv.read("is") == 0
    assert p.read("cmd") == regs.CMD_SUD | regs.CMD_POD
    assert p.read("ssts") == 0x133
    assert p.read("sig") == regs.SIG_ATA
    assert p.read("tfd") == 0x50
    assert p.read("ci") == p.read("sact") == p.read("ie") == 0
    # registers past the last port, and reserved ones, read 0
    assert drv.read(regs.PORT_BASE + regs.PORT_STRIDE + 0x28) == 0
    assert p.read("fbs") == 0


def test_port_map_with_a_gap_in_the_port_numbers(tmp_path, disk):
    m = build_machine(f"{SLOT},ahci,hd:{disk}")
    m.close()
    from hvframe.config import Config
    from hvframe.pci.bus import add_pci_devices
    from hvframe.plugins import Registry
    from hvframe.runner import add_option, add_slot
    from hvframe.synthetic import SyntheticMachine
    cfg = Config()
    reg = Registry()
    add_slot(cfg, reg, "0,hostbridge")
    add_option(cfg, f"pci.0.{SLOT}.0.device=ahci")
    add_option(cfg, f"pci.0.{SLOT}.0.port.2.type=hd")
    add_option(cfg, f"pci.0.{SLOT}.0.port.2.path={disk}")
    m = SyntheticMachine(64 << 20)
    add_pci_devices(m, reg, cfg.group("pci"), direct_boot=False)
    drv = AhciDriver(m, SLOT)
    assert drv.read("pi") == 0b111 and drv.read("cap") & 0x1F == 2
    assert drv.port(0).read("ssts") == 0 and drv.port(0).read("tfd") == 0x7F
    assert drv.port(2).read("ssts") == 0x133
    m.close()


def test_sub_dword_and_qword_accesses(setup):
    m, drv, p = setup
    assert m.mmio_read(ABAR + 0x10, 1) == 0x01 and m.mmio_read(ABAR + 0x12, 2) == 0x0001
    assert m.mmio_read(ABAR + 0x08, 8) == drv.read("is") | 1 << 32   # IS, then PI
    p.write("clb", 0)
    m.mmio_write(p.reg_addr("clb") + 1, 1, 0x24)             # bits 15:8 only
    assert p.read("clb") == 0x2400
    m.mmio_write(p.reg_addr("clb"), 8, 0x0000000100003000)   # CLB and CLBU together
    assert p.read("clb") == 0x3000 and p.read("clbu") == 1


# -- start/stop, reset ----------------------------------------------------------------------------
def test_fre_and_st_show_in_fr_and_cr_and_stop_clears_the_issued_commands(setup, disk):
    m, drv, p = setup
    hba = hba_of(m)
    p.start()
    cmd = p.read("cmd")
    assert cmd & regs.CMD_FR and cmd & regs.CMD_CR
    hold, out = threading.Event(), threading.Event()
    disk_dev = hba.ports[0].device
    real_read = disk_dev.backend.read
    disk_dev.backend.read = lambda off, bufs: (out.set(), hold.wait(5), real_read(off, bufs))[2]
    disk_dev.cached_reads = False                              # the worker's way only
    p.issue(3, h2d(READ_DMA_EXT, lba=0, count=1), [(BUF, 512)])
    assert p.read("ci") == 1 << 3
    assert out.wait(5)                 # the port's worker started it: the read is out
    p.stop()
    assert p.read("ci") == 0                                   # ST 1->0 clears PxCI
    assert p.read("cmd") & regs.CMD_CR                         # ...but the read is still out
    hold.set()
    assert hba.wait_idle()
    assert not p.read("cmd") & regs.CMD_CR
    assert not p.read("is") & regs.IS_DHRS                     # its completion was dropped
    p.write("ci", 1 << 5)                                      # ignored while stopped
    assert p.read("ci") == 0


def test_hba_reset_returns_registers_to_reset_values(setup):
    m, drv, p = setup
    p.start(ie=0xFF)
    drv.write("ghc", regs.GHC_IE | regs.GHC_AE)
    drv.write("ghc", regs.GHC_HR)
    assert drv.read("ghc") == regs.GHC_AE                      # HR done, IE cleared
    assert p.read("cmd") == regs.CMD_SUD | regs.CMD_POD
    assert p.read("clb") == 0 and p.read("ie") == 0
    assert p.read("ssts") == 0x133 and p.read("sig") == regs.SIG_ATA


def test_comreset_through_sctl_det(setup):
    m, drv, p = setup
    p.start()
    p.write("serr", 0xFFFFFFFF)
    p.write("is", 0xFFFFFFFF)
    p.stop()
    p.write("sctl", 1)
    assert p.read("ssts") & 0xF == 0 and p.read("tfd") & 0xFF == 0x7F
    m.memory.write(p.fb + 0x40, bytes(20))
    p.write("sctl", 0)
    assert p.read("ssts") == 0x133 and p.read("tfd") & 0xFF == 0x50
    assert p.read("sig") == regs.SIG_ATA
    fis = p.rfis()
    assert fis[0] == 0x34 and fis[2] == 0x50 and fis[12] == 1 and fis[4] == 1  # signature FIS
    assert p.read("serr") & regs.SERR_DIAG_X
    assert p.read("is") & regs.IS_PCS                          # mirrors DIAG.X ...
    p.write("is", regs.IS_PCS)
    assert p.read("is") & regs.IS_PCS                          # ... so IS alone cannot clear it
    p.write("serr", regs.SERR_DIAG_X | regs.SERR_DIAG_N)
    assert not p.read("is") & (regs.IS_PCS | regs.IS_PRCS)


def test_software_reset_with_device_control_fises_and_clo(setup):
    m, drv, p = setup
    p.start()
    p.run(0, h2d(0, control=regs.CONTROL_SRST, is_command=False))
    assert p.read("tfd") & regs.ST_BSY
    p.write("cmd", p.read("cmd") | regs.CMD_CLO)               # override the BSY
    assert not p.read("tfd") & regs.ST_BSY and not p.read("cmd") & regs.CMD_CLO
    p.write("is", 0xFFFFFFFF)
    is_ = p.run(1, h2d(0, control=0, is_command=False))
    assert is_ & regs.IS_DHRS and p.read("tfd") == 0x50 and p.read("sig") == regs.SIG_ATA


# -- commands ---------------------------------------------------------------------------------------
def test_fragmented_prds_scatter_and_gather(setup, disk):
    m, drv, p = setup
    p.start()
    sizes = [2, 510, 1000, 14, 2048, 522]                      # 4096 bytes in six pieces
    addrs = [BUF + i * 0x10000 + 2 * i for i in range(len(sizes))]
    is_ = p.run(0, h2d(READ_DMA_EXT, lba=3, count=8), list(zip(addrs, sizes)))
    assert is_ & regs.IS_DHRS and not is_ & regs.IS_TFES
    got = b"".join(m.memory.read(a, n) for a, n in zip(addrs, sizes))
    assert got == disk.read_bytes()[3 * 512:3 * 512 + 4096]
    assert p.prdbc(0) == 4096 and p.read("ci") == 0
    # and back: write the same scattered pieces to sector 100
    for i, (a, n) in enumerate(zip(addrs, sizes)):
        m.memory.write(a, bytes([i + 1]) * n)
    p.run(1, h2d(WRITE_DMA_EXT, lba=100, count=8), list(zip(addrs, sizes)), write=True)
    assert disk.read_bytes()[100 * 512:100 * 512 + 4096] == \
        b"".join(bytes([i + 1]) * n for i, n in enumerate(sizes))


def wait_level(m, line, level, timeout=10.0):
    """The port's worker completes a command (PxCI, PxIS) and then drives the line: a
    polling test sees the registers first."""
    end = time.monotonic() + timeout
    while m.irq_levels.get(line) != level and time.monotonic() < end:
        time.sleep(0.001)
    return m.irq_levels.get(line)


def test_interrupt_through_intx(setup):
    m, drv, p = setup
    line = drv.config_read(0x3C, 1)
    p.start(ie=regs.IS_DHRS | regs.IS_PSS)
    drv.write("ghc", regs.GHC_AE | regs.GHC_IE)
    p.run(0, h2d(IDENTIFY_DEVICE), [(BUF, 512)])
    assert wait_level(m, line, 1) == 1 and drv.read("is") == 1
    assert drv.config_read(0x06, 2) & 0x08                     # PCI status: interrupt
    p.write("is", 0xFFFFFFFF)
    assert m.irq_levels[line] == 1                             # IS.IPS is sticky ...
    drv.write("is", 1)
    assert m.irq_levels[line] == 0                             # ... until software clears it
    p.run(1, h2d(IDENTIFY_DEVICE), [(BUF, 512)])
    wait_level(m, line, 1)
    drv.write("is", 1)                                         # port still pending: stays up
    assert drv.read("is") == 1 and m.irq_levels[line] == 1
    drv.write("ghc", regs.GHC_AE)                              # GHC.IE off masks it
    assert m.irq_levels[line] == 0


def test_interrupt_through_msi(setup):
    m, drv, p = setup
    cap = drv.config_read(0x34, 1)
    while drv.config_read(cap, 1) != 0x05:
        cap = drv.config_read(cap + 1, 1)
    drv.config_write(cap + 4, 0xFEE00000)
    drv.config_write(cap + 12, 0x41, 2)
    drv.config_write(cap + 2, 1, 2)                            # MSI enable
    p.start(ie=regs.IS_DHRS)
    drv.write("ghc", regs.GHC_AE | regs.GHC_IE)
    line = drv.config_read(0x3C, 1)
    # PxCI clears before PxIS is set and the message sent (what an interrupt handler that
    # reads PxCI needs): a driver polling PxCI sees the command done a moment before its
    # interrupt, so each check waits for the completion to be over.
    hba = hba_of(m)
    p.run(0, h2d(IDENTIFY_DEVICE), [(BUF, 512)])
    assert hba.wait_idle(5)
    assert m.msis == [(0xFEE00000, 0x41)]
    assert not m.irq_levels.get(line)
    p.run(1, h2d(IDENTIFY_DEVICE), [(BUF, 512)])               # IS still set: no new message
    assert hba.wait_idle(5)
    assert len(m.msis) == 1
    drv.write("is", 1)                                         # handler clears IS, PxIS still
    assert len(m.msis) == 2                                    # pending: a new message
    p.write("is", 0xFFFFFFFF)
    drv.write("is", 1)
    assert len(m.msis) == 2


# -- errors ------------------------------------------------------------------------------------------
def test_task_file_error_stops_the_port_until_st_is_toggled(setup):
    m, drv, p = setup
    p.start(ie=regs.IS_TFES)
    p.prepare(1, h2d(IDENTIFY_DEVICE), [(BUF, 512)])
    is_ = p.run(0, h2d(0xFE))                                  # no such command
    assert is_ & regs.IS_TFES and is_ & regs.IS_DHRS
    assert p.tfd() == (0x51, regs.ERR_ABRT)
    assert p.rfis()[2:4] == bytes((0x51, 0x04))
    assert p.read("ci") == 1                                   # failed slot stays issued
    assert (p.read("cmd") >> 8) & 0x1F == 0                    # CCS names it
    p.write("ci", 1 << 1)                                      # not processed while halted
    assert p.read("ci") == 0b11
    assert drv.read("is") == 1
    p.recover()
    assert p.read("ci") == 0 and p.read("tfd") & 0xFF == 0x51
    is_ = p.run(1, h2d(IDENTIFY_DEVICE), [(BUF, 512)])
    assert not is_ & regs.IS_TFES and p.read("ci") == 0 and p.tfd() == (0x50, 0)


def test_command_table_outside_ram_is_a_host_bus_fatal_error(setup):
    m, drv, p = setup
    p.start()
    is_ = p.run(2, h2d(IDENTIFY_DEVICE), [(BUF, 512)], table=0x7F000000)
    assert is_ & regs.IS_HBFS and p.read("ci") == 1 << 2
    assert p.read("serr") & regs.SERR_ERR_E
    p.recover()
    assert not p.run(2, h2d(IDENTIFY_DEVICE), [(BUF, 512)]) & regs.IS_FATAL


def test_prd_outside_ram_and_too_small_prds(setup, disk):
    m, drv, p = setup
    p.start()
    before = disk.read_bytes()
    m.memory.write(BUF, b"\xAA" * 512)
    is_ = p.run(0, h2d(WRITE_DMA_EXT, lba=0, count=2), [(BUF, 512), (0x7FFFFE00, 512)],
                write=True)
    assert is_ & regs.IS_HBFS and disk.read_bytes() == before
    p.recover()
    is_ = p.run(0, h2d(READ_DMA_EXT, lba=0, count=2), [(BUF, 512)])
    assert is_ & regs.IS_OFS and p.read("ci") == 1
    p.recover()
    # a 64-bit address past the end of RAM
    is_ = p.run(0, h2d(READ_DMA_EXT, lba=0, count=1), [(1 << 40, 512)])
    assert is_ & regs.IS_HBFS


def test_fis_area_outside_ram_or_fis_receive_off(setup):
    m, drv, p = setup
    p.start()
    p.write("cmd", p.read("cmd") & ~regs.CMD_ST)
    p.write("cmd", p.read("cmd") & ~regs.CMD_FRE)
    assert not p.read("cmd") & regs.CMD_FR
    p.write("cmd", p.read("cmd") | regs.CMD_ST)
    m.memory.write(p.fb + 0x40, bytes(20))
    is_ = p.run(0, h2d(IDENTIFY_DEVICE), [(BUF, 512)])
    assert p.read("ci") == 0 and is_ & regs.IS_DHRS and p.rfis() == bytes(20)
    p.stop()
    p.write("fb", 0x7FFFFF00)
    p.write("cmd", p.read("cmd") | regs.CMD_FRE | regs.CMD_ST)
    is_ = p.run(0, h2d(IDENTIFY_DEVICE), [(BUF, 512)])
    assert is_ & regs.IS_HBFS


def test_bad_command_fis_is_aborted(setup):
    m, drv, p = setup
    p.start()
    bad_type = bytes([0x34]) + h2d(IDENTIFY_DEVICE)[1:]
    assert p.run(0, bad_type, [(BUF, 512)]) & regs.IS_TFES
    assert p.tfd()[1] == regs.ERR_ABRT
    p.recover()
    assert p.run(0, h2d(IDENTIFY_DEVICE), [(BUF, 512)], cfl=2) & regs.IS_TFES
    p.recover()
    assert not p.run(0, h2d(IDENTIFY_DEVICE), [(BUF, 512)]) & regs.IS_TFES


def test_slot_issued_twice_runs_once(setup, disk):
    m, drv, p = setup
    p.start()
    hba = hba_of(m)
    calls = []
    dev = hba.ports[0].device
    real = dev.backend.read
    dev.backend.read = lambda off, bufs: (calls.append(off), real(off, bufs))[1]
    dev.cached_reads = False                                   # the worker's way only
    p.prepare(0, h2d(READ_DMA_EXT, lba=1, count=1), [(BUF, 512)])
    with hba.lock:                                             # both writes before completion
        p.write("ci", 1)
        p.write("ci", 1)
    p.wait(1)
    assert hba.wait_idle() and calls == [512]


def test_a_cached_read_completes_without_a_block_queue_hand_off(setup, disk):
    # What SeaBIOS polls for is read from the page cache by the port's worker as it starts
    # the command (the PxCI exit itself only hands the slot over, without the GIL); an
    # uncached one goes on to the disk's block queue.
    m, drv, p = setup
    p.start()
    hba = hba_of(m)
    dev = hba.ports[0].device
    data = os.urandom(1024)
    os.pwrite(dev.backend.fd, data, 4096)
    calls = []
    real = dev.backend.read
    dev.backend.read = lambda off, bufs: (calls.append(off), real(off, bufs))[1]
    p.prepare(0, h2d(READ_DMA_EXT, lba=8, count=2), [(BUF, 1024)])
    p.write("ci", 1)
    p.wait(1)
    assert p.read("ci") == 0 and not p.read("is") & regs.IS_TFES
    assert m.memory.read(BUF, 1024) == data and calls == []
    dev.cached_reads = False
    p.prepare(0, h2d(READ_DMA_EXT, lba=8, count=2), [(BUF + 4096, 1024)])
    p.write("ci", 1)
    p.wait(1)
    assert hba.wait_idle() and calls == [4096]
    assert m.memory.read(BUF + 4096, 1024) == data


# -- checkpoint -----------------------------------------------------------------------------
def test_checkpoint_moves_ports_disk_and_cdrom_to_a_new_machine(disk, tmp_path):
    """A disk written through a non-queued and an NCQ command, a CD-ROM left with sense data,
    a READ issued while quiesced (held, not started): the record and RAM put into a machine
    built from the same line, where the held READ completes, the driver reads back what it
    wrote with both command kinds, and REQUEST SENSE returns the sense the CD-ROM had."""
    from hvframe.errors import ConfigError
    from hvframe.snapshot.state import decode_into, encode
    from hvframe_ahci import atapi
    from hvframe_ahci.ata import READ_FPDMA_QUEUED, WRITE_FPDMA_QUEUED
    iso = tmp_path / "cd.iso"
    iso.write_bytes(os.urandom(16 * 2048))
    line = f"{SLOT},ahci,hd:{disk},cd:{iso}"
    packet = h2d(atapi.ATA_PACKET, features=1)
    machines = []
    try:
        ma = build_machine(line)
        machines.append(ma)
        drv = AhciDriver(ma, SLOT)
        drv.write("ghc", regs.GHC_AE | regs.GHC_IE)
        p0, p1 = drv.port(0), drv.port(1)
        p0.start(ie=regs.IS_DHRS | regs.IS_SDBS)
        p1.start()
        plain, queued = os.urandom(8192), os.urandom(4096)
        ma.memory.write(BUF, plain)
        assert not p0.run(0, h2d(WRITE_DMA_EXT, lba=16, count=16), [(BUF, 8192)],
                          write=True) & regs.IS_FATAL
        ma.memory.write(BUF + 0x10000, queued)
        p0.issue(3, h2d(WRITE_FPDMA_QUEUED, lba=40, count=3 << 3, features=8),
                 [(BUF + 0x10000, 4096)], ncq=True, write=True)
        assert not p0.wait(1 << 3) & regs.IS_FATAL
        assert p1.run(0, packet, atapi=True, acmd=bytes([0xF3]).ljust(12, b"\0")) \
            & regs.IS_TFES                            # unknown opcode: ILLEGAL REQUEST
        p1.recover()

        hba_a = hba_of(ma)
        hba_a.quiesce()
        ma.memory.write(BUF + 0x20000, bytes(8192))
        p0.issue(5, h2d(READ_DMA_EXT, lba=16, count=16), [(BUF + 0x20000, 8192)])
        time.sleep(0.05)
        assert p0.read("ci") & 1 << 5                 # held while quiesced
        record = encode(hba_a)
        ram = ma.memory.read(0, ma.memory.size)
        hba_a.unquiesce()
        assert not p0.wait(1 << 5) & regs.IS_FATAL    # and started after
        assert ma.memory.read(BUF + 0x20000, 8192) == plain
        ma.close()

        mb = build_machine(line)
        machines.append(mb)
        mb.memory.write(0, ram)
        hba_b = hba_of(mb)
        decode_into(hba_b, record, "ahci")
        drv_b = AhciDriver(mb, SLOT)
        q0, q1 = drv_b.port(0), drv_b.port(1)
        assert not q0.wait(1 << 5) & regs.IS_FATAL    # the held READ ran here
        assert mb.memory.read(BUF + 0x20000, 8192) == plain
        assert q0.read("cmd") & regs.CMD_ST and q0.read("ie") == regs.IS_DHRS | regs.IS_SDBS
        assert drv_b.read("ghc") & regs.GHC_IE
        assert hba_b.intx_level == 1                  # PxIS events pending: INTA asserted
        q0.write("is", 0xFFFFFFFF)
        drv_b.write("is", 0xFFFFFFFF)
        assert hba_b.intx_level == 0                  # and dropped once they are cleared
        mb.memory.write(BUF, bytes(0x20000))
        assert not q0.run(1, h2d(READ_DMA_EXT, lba=16, count=16), [(BUF, 8192)]) \
            & regs.IS_FATAL
        assert mb.memory.read(BUF, 8192) == plain
        q0.issue(7, h2d(READ_FPDMA_QUEUED, lba=40, count=7 << 3, features=8),
                 [(BUF + 0x10000, 4096)], ncq=True)
        assert not q0.wait(1 << 7) & regs.IS_FATAL
        assert mb.memory.read(BUF + 0x10000, 4096) == queued
        assert not q1.run(0, packet, [(BUF, 18)], atapi=True,
                          acmd=bytes([atapi.REQUEST_SENSE, 0, 0, 0, 18]).ljust(12, b"\0")) \
            & regs.IS_TFES
        s = mb.memory.read(BUF, 18)
        assert (s[2] & 0xF, s[12], s[13]) == (atapi.ILLEGAL_REQUEST, 0x20, 0x00)

        with pytest.raises(ConfigError, match="state version 2") as e:
            decode_into(hba_b, b"\x02\x00" + record[2:], "ahci")
        assert "\n" not in str(e.value)
        mc = build_machine(f"{SLOT},ahci,hd:{disk},locking=off")
        machines.append(mc)
        with pytest.raises(ConfigError, match="2 ports saved"):
            decode_into(hba_of(mc), record, "ahci")
    finally:
        for m in machines:
            m.close()
