"""What Linux's libahci does to bring a port up and send its first command, access for access
(ahci_port_start, ahci_do_hardreset, ahci_start_engine, ahci_thaw, ahci_qc_issue in 6.1), for
a disk and a CD on one HBA with MSI on, and a command written to PxCI the moment the port's
worker goes back to sleep. Each command must complete at once with its status, PxCI clear
and PxIS.DHRS set by the time its MSI is sent: a Linux guest that saw the first IDENTIFY time
out (5 s) made these suspects; the cause was the guest's timer (hvframe.kvm, lost PIT ticks)."""
import os
import threading
import time

import pytest

from hvframe_ahci import ata, atapi, regs
from hvframe_ahci.testdriver import AhciDriver, build_machine, h2d

SLOT = 4
BUF = 0x1000000
LINUX_IRQ_MASK = 0x7840007F          # pp->intr_mask: PxIE as Linux writes it when it thaws
MSI_ADDR, MSI_DATA = 0xFEE00000, 0x21
CMD_CR = 1 << 15
DEADLINE = 5.0


@pytest.fixture
def hba(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(1 << 20))
    cd = tmp_path / "cd.iso"
    cd.write_bytes(os.urandom(64 * 2048))
    m = build_machine(f"{SLOT},ahci,hd:{disk},cd:{cd}")
    drv = AhciDriver(m, SLOT)
    cap = drv.config_read(0x34, 1)
    while drv.config_read(cap, 1) != 0x05:
        cap = drv.config_read(cap + 1, 1)
    drv.config_write(cap + 4, MSI_ADDR)
    drv.config_write(cap + 12, MSI_DATA, 2)
    drv.config_write(cap + 2, 1, 2)                          # MSI enable
    drv.write("ghc", regs.GHC_AE | regs.GHC_IE)
    yield m, drv
    m.close()


def poll(what, cond):
    end = time.monotonic() + DEADLINE
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.0002)


def hardreset_and_start(drv, p):
    """ahci_port_start, then the EH's hardreset: stop the engine, put BSY in the D2H FIS
    area, clear what is pending, COMRESET through PxSCTL.DET, wait for the link and for BSY
    to clear, start the engine, classify, thaw."""
    p.write("clb", p.clb)
    p.write("clbu", 0)
    p.write("fb", p.fb)
    p.write("fbu", 0)
    p.write("cmd", p.read("cmd") | regs.CMD_FRE)
    p.write("cmd", p.read("cmd") | regs.CMD_ST)
    p.write("ie", 0)                                         # frozen for the reset
    p.write("cmd", p.read("cmd") & ~regs.CMD_ST)             # ahci_stop_engine
    poll("PxCMD.CR stays set", lambda: not p.read("cmd") & CMD_CR)
    p.m.memory.write(p.fb + 0x40, bytes([0x34, 0, regs.ST_BSY]) + bytes(17))
    p.write("serr", p.read("serr"))                          # ahci_port_clear_pending_irq
    if p.read("is"):
        p.write("is", p.read("is"))
    drv.write("is", 1 << p.n)
    p.write("sctl", 0x301)
    p.write("sctl", 0x300)
    poll("no link", lambda: p.read("ssts") & 0xF == 3)
    p.write("serr", p.read("serr"))
    poll("BSY stays set", lambda: not p.read("tfd") & regs.ST_BSY)
    p.write("cmd", p.read("cmd") | regs.CMD_ST)              # ahci_start_engine
    p.read("cmd")
    sig = p.read("sig")
    p.write("is", p.read("is"))                              # ahci_thaw
    drv.write("is", 1 << p.n)
    p.write("ie", LINUX_IRQ_MASK)
    return sig


def issue_and_check(m, drv, p, slot, command):
    """ahci_qc_issue: PxCI written at once; then what the interrupt handler finds."""
    sent = len(m.msis)
    p.prepare(slot, h2d(command), [(BUF, 512)])
    p.write("ci", 1 << slot)
    poll(f"no MSI for command {command:#x} in slot {slot} (PxCI {p.read('ci'):#x}, "
         f"PxIS {p.read('is'):#x})", lambda: len(m.msis) > sent)
    assert m.msis[-1] == (MSI_ADDR, MSI_DATA)
    assert drv.read("is") & 1 << p.n
    is_ = p.read("is")
    assert is_ & regs.IS_DHRS and not is_ & regs.IS_TFES
    assert p.read("ci") == 0 and p.read("tfd") & 0xFF == regs.ST_OK
    p.write("is", is_)                                       # the handler: PxIS, then HBA IS
    drv.write("is", 1 << p.n)


def test_first_commands_after_comreset_complete_with_their_msi(hba):
    m, drv = hba
    disk, cd = drv.port(0), drv.port(1)
    assert hardreset_and_start(drv, cd) == regs.SIG_ATAPI
    assert hardreset_and_start(drv, disk) == regs.SIG_ATA
    issue_and_check(m, drv, cd, 0, atapi.ATA_IDENTIFY_PACKET)
    issue_and_check(m, drv, disk, 0, ata.IDENTIFY_DEVICE)
    for slot in range(1, 4):                                 # SET FEATURES-like follow-ups
        issue_and_check(m, drv, cd, slot, atapi.ATA_IDENTIFY_PACKET)
        issue_and_check(m, drv, disk, slot, ata.IDENTIFY_DEVICE)
    # and again after a second COMRESET, as the EH does after a timeout
    hardreset_and_start(drv, cd)
    issue_and_check(m, drv, cd, 0, atapi.ATA_IDENTIFY_PACKET)


def test_commands_written_while_the_worker_goes_back_to_sleep_are_all_served(hba):
    """Each PxCI write lands right after the previous completion, i.e. while the port's
    worker is between starting that command and sleeping again; on two ports at once."""
    m, drv = hba
    ports = [drv.port(0), drv.port(1)]
    for p in ports:
        hardreset_and_start(drv, p)
        p.write("ie", 0)                                     # polled: no MSI bookkeeping
    commands = [ata.IDENTIFY_DEVICE, atapi.ATA_IDENTIFY_PACKET]
    errors = []

    def hammer(p, command):
        try:
            for i in range(400):
                slot = i % 32
                p.prepare(slot, h2d(command), [(BUF + 0x10000 * p.n, 512)])
                p.write("ci", 1 << slot)
                end = time.monotonic() + DEADLINE
                while p.read("ci") & 1 << slot:
                    if time.monotonic() > end:
                        errors.append(f"port {p.n}: command {i} (slot {slot}) never ran")
                        return
                p.write("is", p.read("is"))
        except Exception as e:      # reported by the test thread
            errors.append(repr(e))

    threads = [threading.Thread(target=hammer, args=(p, c)) for p, c in zip(ports, commands)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
