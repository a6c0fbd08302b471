"""A small host-side AHCI driver for tests and benchmarks: it does what a guest's driver
does -- config-space accesses through ports 0xcf8/0xcfc, ABAR accesses as MMIO exits, command
lists, tables and PRDs built in guest RAM -- against a SyntheticMachine.

    m, hba = build_machine("4,ahci,hd:disk.img")
    drv = AhciDriver(m, slot=4)
    p = drv.port(0); p.start()
    p.issue(0, h2d(READ_DMA_EXT, lba=0, count=8), prds=[(0x800000, 4096)])
    p.wait(0)
"""
from __future__ import annotations

import struct
import time

from .regs import (CMD_FRE, CMD_HEADER, CMD_ST, FIS_H2D, GHC_OFFSETS, H2D, H2D_COMMAND,
                   HDR_ATAPI, HDR_WRITE, IS_FATAL, PORT_BASE, PORT_OFFSETS, PORT_STRIDE, PRD,
                   PRD_SIZE)

ABAR = 0xD0000000
PCI_COMMAND_MEMORY_MASTER = 0x6
CONFIG_BAR5 = 0x24
PORT_AREA = 0x100000             # per port: command list, FIS area, 32 command tables
PORT_AREA_BASE = 0x200000
TABLE_SIZE = 0x1000              # 128 bytes of header + up to 248 PRDs


def h2d(command: int, lba: int = 0, count: int = 0, features: int = 0, device: int = 0x40,
        control: int = 0, is_command: bool = True) -> bytes:
    """A Register FIS, host to device."""
    return H2D.pack(FIS_H2D, H2D_COMMAND if is_command else 0, command, features & 0xFF,
                    lba & 0xFF, lba >> 8 & 0xFF, lba >> 16 & 0xFF, device, lba >> 24 & 0xFF,
                    lba >> 32 & 0xFF, lba >> 40 & 0xFF, features >> 8 & 0xFF, count & 0xFF,
                    count >> 8 & 0xFF, 0, control)


def build_machine(*slots: str, memory: int = 64 << 20, irqfd_eventfds: bool = False):
    """A synthetic machine with the given -s arguments (a host bridge at slot 0 is added),
    built as `hvframe run` builds them (hvframe.testing.rig), decoding left to the driver.
    irqfd_eventfds: MSIs are eventfd writes, as under KVM (hvframe.testing.synthetic)."""
    from hvframe.testing import SyntheticMachine, rig

    m = SyntheticMachine(memory, irqfd_eventfds=irqfd_eventfds)
    try:
        rig(m, *(f"-s {s}" for s in ("0,hostbridge", *slots)), direct_boot=False)
    except BaseException:
        m.close()
        raise
    return m


class AhciDriver:
    def __init__(self, machine, slot: int, abar: int = ABAR):
        self.m, self.slot, self.abar = machine, slot, abar
        self.config_write(CONFIG_BAR5, abar)
        self.config_write(0x04, PCI_COMMAND_MEMORY_MASTER, 2)

    def config_read(self, reg: int, size: int = 4) -> int:
        self.m.io_write(0xCF8, 4, 0x80000000 | self.slot << 11 | (reg & ~3))
        return self.m.io_read(0xCFC + (reg & 3), size)

    def config_write(self, reg: int, value: int, size: int = 4) -> None:
        self.m.io_write(0xCF8, 4, 0x80000000 | self.slot << 11 | (reg & ~3))
        self.m.io_write(0xCFC + (reg & 3), size, value)

    def read(self, reg: str | int) -> int:
        off = GHC_OFFSETS[reg] if isinstance(reg, str) else reg
        return self.m.mmio_read(self.abar + off, 4)

    def write(self, reg: str | int, value: int) -> None:
        off = GHC_OFFSETS[reg] if isinstance(reg, str) else reg
        self.m.mmio_write(self.abar + off, 4, value)

    def port(self, n: int) -> "PortDriver":
        return PortDriver(self, n)


class PortDriver:
    def __init__(self, drv: AhciDriver, n: int):
        self.drv, self.n, self.m = drv, n, drv.m
        self.base = PORT_AREA_BASE + n * PORT_AREA
        self.clb = self.base
        self.fb = self.base + 0x400
        self.tables = self.base + 0x1000

    def reg_addr(self, name: str) -> int:
        return self.drv.abar + PORT_BASE + PORT_STRIDE * self.n + PORT_OFFSETS[name]

    def read(self, name: str) -> int:
        return self.m.mmio_read(self.reg_addr(name), 4)

    def write(self, name: str, value: int) -> None:
        self.m.mmio_write(self.reg_addr(name), 4, value)

    def start(self, ie: int = 0) -> None:
        """Point the port at its command list and FIS area, clear errors, start it."""
        self.write("clb", self.clb)
        self.write("clbu", 0)
        self.write("fb", self.fb)
        self.write("fbu", 0)
        self.write("serr", 0xFFFFFFFF)
        self.write("is", 0xFFFFFFFF)
        self.write("ie", ie)
        self.write("cmd", self.read("cmd") | CMD_FRE)
        self.write("cmd", self.read("cmd") | CMD_ST)

    def stop(self) -> None:
        self.write("cmd", self.read("cmd") & ~CMD_ST)

    def table(self, slot: int) -> int:
        return self.tables + slot * TABLE_SIZE

    def prepare(self, slot: int, fis: bytes, prds=(), *, write: bool = False,
                atapi: bool = False, acmd: bytes = b"", cfl: int | None = None,
                table: int | None = None, prdtl: int | None = None) -> None:
        """Fill the command header and table of `slot` (without issuing it)."""
        mem = self.m.memory
        ctba = self.table(slot) if table is None else table
        flags = (len(fis) // 4 if cfl is None else cfl) | (HDR_WRITE if write else 0) \
            | (HDR_ATAPI if atapi else 0)
        n = len(prds) if prdtl is None else prdtl
        mem.write(self.clb + slot * 32, CMD_HEADER.pack(flags, n, 0, ctba & 0xFFFFFFFF,
                                                       ctba >> 32))
        if mem.contains(ctba, 0x80):
            mem.write(ctba, fis.ljust(64, b"\0") + acmd.ljust(16, b"\0") + bytes(48))
        for i, (addr, length, *ioc) in enumerate(prds):
            dbc = (length - 1) | (1 << 31 if ioc and ioc[0] else 0)
            if mem.contains(ctba + 0x80 + i * PRD_SIZE, PRD_SIZE):
                mem.write(ctba + 0x80 + i * PRD_SIZE,
                          PRD.pack(addr & 0xFFFFFFFF, addr >> 32, dbc))

    def issue(self, slot: int, fis: bytes, prds=(), *, ncq: bool = False, **kw) -> None:
        self.prepare(slot, fis, prds, **kw)
        if ncq:
            self.write("sact", 1 << slot)
        self.write("ci", 1 << slot)

    def wait(self, slots: int | None = None, timeout: float = 10.0, sact: bool = True) -> int:
        """Poll until the slots' PxCI (and PxSACT) bits clear or a fatal error shows;
        returns PxIS. `slots` is a bit mask (default: everything outstanding)."""
        end = time.monotonic() + timeout
        while True:
            busy = self.read("ci") | (self.read("sact") if sact else 0)
            is_ = self.read("is")
            if not busy & (slots if slots is not None else 0xFFFFFFFF) or is_ & IS_FATAL:
                return is_
            if time.monotonic() > end:
                raise TimeoutError(f"port {self.n}: CI {self.read('ci'):#x} "
                                   f"SACT {self.read('sact'):#x} IS {is_:#x}")
            time.sleep(0.0005)

    def run(self, slot: int, fis: bytes, prds=(), **kw) -> int:
        """Issue one command and wait for it; returns PxIS."""
        self.issue(slot, fis, prds, **kw)
        return self.wait(1 << slot)

    def tfd(self) -> tuple[int, int]:
        v = self.read("tfd")
        return v & 0xFF, v >> 8 & 0xFF

    def rfis(self) -> bytes:
        return self.m.memory.read(self.fb + 0x40, 20)

    def psfis(self) -> bytes:
        return self.m.memory.read(self.fb + 0x20, 20)

    def sdbfis(self) -> bytes:
        return self.m.memory.read(self.fb + 0x58, 8)

    def prdbc(self, slot: int) -> int:
        return struct.unpack_from("<I", self.m.memory.read(self.clb + slot * 32 + 4, 4))[0]

    def recover(self) -> None:
        """Error recovery as AHCI 1.3.1 section 6.2.2.1 has it: ST off, wait for CR, clear
        SERR and IS, ST on."""
        self.stop()
        end = time.monotonic() + 5
        while self.read("cmd") & (1 << 15):
            if time.monotonic() > end:
                raise TimeoutError("PxCMD.CR stays set")
            time.sleep(0.0005)
        self.write("serr", 0xFFFFFFFF)
        self.write("is", 0xFFFFFFFF)
        self.write("cmd", self.read("cmd") | CMD_ST)
