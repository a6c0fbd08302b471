"""Fuzz target: PCI configuration space, BAR decoding, MSI and MSI-X.

A SyntheticMachine (guarded RAM) with a host bridge (00:00.0), a pci-testdev with an
expansion ROM (00:03.0: register BAR0, MSI, MSI-X in BAR1, INTA), a two-function slot of
PCI 16550s (00:04.0 and 00:04.1, I/O BAR0), the LPC bridge (00:1f.0: PIRQ routes, fw_cfg)
and a 16550 on bus 1 (01:00.0, reachable through both mechanism #1 and ECAM). Accesses go
through the dispatch core: raw writes to 0xcf8, byte/word/dword accesses to 0xcfc-0xcff,
structured configuration reads and writes through mechanism #1 or ECAM, BAR sizing and
moves (to RAM, onto other ranges, over 0xcf8, past 64 KiB of I/O, across 4 GiB), command
register changes, MSI capability and MSI-X table/PBA accesses, interrupts raised through
the test device, and raw port and MMIO accesses at every mapped range.

The test device's delayed interrupt (REG_RAISE_LATER, a timer thread) is made immediate so
that every message arrives during the access that caused it.

Invariants after every access: no handler exception, no hvframe ERROR log; every BAR is
mapped exactly where decode_target says, on its own handler and size, or is unmapped only
because something else occupies that range; no MMIO BAR overlaps RAM, no I/O BAR passes
0xffff; identity registers (vendor, device, class, header type) are unchanged; each IOAPIC
line equals the OR of the INTx pins routed to it; every MSI sent is the message of a
vector that may fire (MSI-X enabled, function and vector unmasked; or MSI enabled and
unmasked); an MSI-X vector's native gate is open only while the vector may fire.
"""
if __name__ == "__main__":
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fuzzlib.runner import run_target
    run_target(os.path.abspath(__file__))
    raise SystemExit(0)

from contextlib import closing

from fuzzlib import machines
from fuzzlib.observe import Finding, Observer
from fuzzlib.provider import Provider, operations

from hvframe.memory import FOUR_GIB
from hvframe.pci.bus import ECAM_BASE, INTX_GSI_BASE, attach, ensure_pci_bus
from hvframe.testing import rig
from hvframe.pci.config_space import CMD_INTX_DISABLE
from hvframe.pci.msi import MSI_CONTROL, MSI_MASK, MSIX_CONTROL
from hvframe.pci.testdev import (MSIX_PBA_OFFSET, REG_ACK, REG_RAISE, REG_RAISE_LATER,
                                 PciTestDev)
from hvframe_uart.backends import NullBackend
from hvframe_uart.pci_uart import PciUart

LOW, HIGH = 1 << 20, 64 << 10
TESTDEV, UART0, UART1, LPC, BUS1 = (0, 3, 0), (0, 4, 0), (0, 4, 1), (0, 31, 0), (1, 0, 0)
ADDRESSES = [(0, 0, 0), TESTDEV, UART0, UART1, LPC, BUS1]
ROM_IMAGE = bytes([0x55, 0xAA]) + bytes(range(256)) * 12
IDENTITY = [(0x00, 4), (0x08, 4), (0x0E, 1)]      # vendor+device, revision+class, header type
BAR_TARGETS = (0, 0x1000, LOW - 0x1000, LOW, FOUR_GIB, FOUR_GIB + HIGH, 0xCF8, 0xCFC, 0x3F8,
               0x510, 0xC000, 0xFFF8, 0xFFFC, 0x10000, 0xC0000000, 0xD0000000, 0xDFFFF000,
               0xE0000000, 0xFEE00000, 0xFFFFF000, 0xFFFFFFFF, 0xFFFFFFFE)
COMMANDS = (0, 1, 2, 3, 7, 0x400, 0x403, 0x407, 0xFFFF)
SIZES = (1, 2, 4)
MAX_OPS = 64
(OP_CF8, OP_CFC, OP_CFG, OP_BAR, OP_CMD, OP_MSI, OP_MSIX, OP_RAISE, OP_PIO, OP_MMIO,
 OP_MSIX_CTL) = range(11)
N_OPS = 11


class Rig:
    def __init__(self, eventfds: bool):
        self.m = m = machines.synthetic_machine(LOW, HIGH, irqfd_eventfds=eventfds)
        rig(m, "-s 0,hostbridge", direct_boot=False)
        self.bus = pci = ensure_pci_bus(m, ecam_buses=2)
        self.testdev = td = PciTestDev()
        td.raise_later = lambda vector, delay: td.interrupt(vector)   # no timer threads
        td.set_rom(ROM_IMAGE)
        attach(m, td, {"pci.address": TESTDEV})
        for address in (UART0, UART1, BUS1):
            u = PciUart(NullBackend(), name=f"uart {address}")
            attach(m, u, {"pci.address": address})
            m.add_device(u)
        m.add_device(td)
        rig(m, "-s {}:{}:{},lpc".format(*LPC), direct_boot=False)
        pci.assign_bars()
        pci.enable_all()
        self.identity = {a: [fn.config.get(o, n) for o, n in IDENTITY]
                         for a, fn in pci.functions.items()}
        self.msis_seen = 0

    def close(self):
        machines.teardown(self.m)

    # -- checks -------------------------------------------------------------------------------
    def check(self, where: str) -> None:
        m, pci = self.m, self.bus
        for address, fn in pci.functions.items():
            now = [fn.config.get(o, n) for o, n in IDENTITY]
            if now != self.identity[address]:
                raise Finding(f"{where}: identity registers of {address} changed: "
                              f"{self.identity[address]} -> {now}")
            for bar in fn.all_bars():
                space = m.pio if bar.kind == "io" else m.mmio
                target = fn.decode_target(bar, m)
                if bar.mapped_at is not None:
                    r = space.find(bar.mapped_at)
                    if r is None or r.base != bar.mapped_at or r.length != bar.size \
                            or r.handler is not bar.handler:
                        raise Finding(f"{where}: {fn.name} BAR{bar.index} says mapped at "
                                      f"{bar.mapped_at:#x}, the bus has {r}")
                    if bar.mapped_at != target:
                        raise Finding(f"{where}: {fn.name} BAR{bar.index} mapped at "
                                      f"{bar.mapped_at:#x}, decodes at {target}")
                    if bar.kind == "io" and bar.mapped_at + bar.size > 0x10000:
                        raise Finding(f"{where}: I/O BAR past 64 KiB at {bar.mapped_at:#x}")
                    if bar.kind != "io":
                        for reg in m.memory.regions:
                            if bar.mapped_at < reg.end and reg.gpa < bar.mapped_at + bar.size:
                                raise Finding(f"{where}: {fn.name} BAR{bar.index} at "
                                              f"{bar.mapped_at:#x} overlaps RAM")
                elif target is not None and space.find_overlap(target, bar.size) is None:
                    raise Finding(f"{where}: {fn.name} BAR{bar.index} should decode at "
                                  f"{target:#x} (free) but is unmapped")
        self._check_intx(where)
        self._check_msis(where)

    def _check_intx(self, where: str) -> None:
        want: dict[int, int] = {}
        for (b, s, f), fn in self.bus.functions.items():
            if fn.pin:
                gsi = INTX_GSI_BASE + (s + fn.pin - 1) % 4
                up = bool(fn.intx_level and not fn.command & CMD_INTX_DISABLE)
                want[gsi] = want.get(gsi, 0) | up
        for gsi, level in want.items():
            if self.m.irq_levels.get(gsi, 0) != level:
                raise Finding(f"{where}: IOAPIC line {gsi} is {self.m.irq_levels.get(gsi, 0)}, "
                              f"the INTx pins routed to it say {level}")

    def _check_msis(self, where: str) -> None:
        td = self.testdev
        msix, msi = td.msix, td.msi
        allowed = set()
        if msix.enabled and not msix.function_masked:
            allowed |= {msix.message(v) for v in range(msix.vectors) if not msix.vector_masked(v)}
        if msi.enabled and not msi.masked:
            allowed.add(msi.message())
        new = self.m.msis[self.msis_seen:]
        self.msis_seen = len(self.m.msis)
        for address, data in new:
            if (address, data) not in allowed:
                raise Finding(f"{where}: MSI {address:#x}/{data:#x} sent, but the only "
                              f"messages that may fire are {sorted(allowed)}")
        for v in range(msix.vectors):
            g = msix.gate(v)
            if g.open and not msix._deliverable(v):
                raise Finding(f"{where}: MSI-X vector {v}'s native gate is open while the "
                              f"vector may not fire")


def _fn_at(rig: Rig, p: Provider):
    address = p.PickValueInList(ADDRESSES) if p.u8() & 7 else (p.u8() & 1, p.u8() & 31, p.u8() & 7)
    return address, rig.bus.functions.get(address)


def _cfg(rig: Rig, address, reg: int, size: int, value: int | None, ecam: bool) -> int:
    m = rig.m
    b, s, f = address
    if ecam:
        at = ECAM_BASE + (b << 20 | s << 15 | f << 12 | reg)
        if value is None:
            return m.mmio_read(at, size)
        m.mmio_write(at, size, value)
        return 0
    if value is None:
        return machines.cfg_read(m, s, reg, size, func=f, bus=b)
    machines.cfg_write(m, s, reg, size, value, func=f, bus=b)
    return 0


def one_input(data: bytes) -> None:
    p = Provider(data)
    flags = p.u8()
    with Observer() as obs, closing(Rig(eventfds=bool(flags & 1))) as rig:
        rig.check("set-up")
        for step, op in operations(p, MAX_OPS, N_OPS):
            _op(rig, p, op)
            obs.check(f"step {step}")
            rig.check(f"step {step}")


def _op(rig: Rig, p: Provider, op: int) -> None:
    m = rig.m
    if op == OP_CF8:
        size = p.PickValueInList((4, 4, 4, 1, 2))
        m.io_write(0xCF8 + (p.u8() & 3 if size != 4 else 0), size, p.u32() & ((1 << 8 * size) - 1))
    elif op == OP_CFC:
        port = 0xCFC + (p.u8() & 3)
        size = p.PickValueInList(SIZES)
        if p.ConsumeBool():
            m.io_write(port, size, p.u32() & ((1 << 8 * size) - 1))
        else:
            m.io_read(port, size)
    elif op == OP_CFG:
        address, _ = _fn_at(rig, p)
        ecam = p.ConsumeBool()
        reg = (p.u16() & 0xFFF) if ecam else p.u8()
        size = p.PickValueInList(SIZES + (8,) if ecam else SIZES)
        value = p.u64() & ((1 << 8 * size) - 1) if p.ConsumeBool() else None
        _cfg(rig, address, reg, size, value, ecam)
    elif op == OP_BAR:
        address, fn = _fn_at(rig, p)
        index = p.u8() % 7
        reg = 0x30 if index == 6 else 0x10 + 4 * index
        ecam = p.ConsumeBool()
        how = p.u8()
        if how & 1:                       # size it: all ones, read back
            _cfg(rig, address, reg, 4, 0xFFFFFFFF, ecam)
            _cfg(rig, address, reg, 4, None, ecam)
        if how & 2:
            target = p.PickValueInList(BAR_TARGETS) if how & 4 else p.u32()
            _cfg(rig, address, reg, 4, target | (1 if index == 6 and how & 8 else 0), ecam)
        if how & 16:                      # the upper half of a 64-bit BAR
            _cfg(rig, address, reg + 4, 4, p.u32() if how & 32 else 0, ecam)
    elif op == OP_CMD:
        address, _ = _fn_at(rig, p)
        _cfg(rig, address, 0x04, 2, p.PickValueInList(COMMANDS) if p.u8() & 3 else p.u16(),
             p.ConsumeBool())
    elif op == OP_MSI:
        msi = rig.testdev.msi
        reg = p.u8() % 24
        size = p.PickValueInList(SIZES)
        choice = p.u8()
        value = (p.PickValueInList((0, 1, 0xFEE00000, 0x4041)) if choice & 1 else p.u32())
        _cfg(rig, TESTDEV, msi.offset + (reg if choice & 2 else
                                          p.PickValueInList((MSI_CONTROL, MSI_MASK, 4, 8, 12))),
             size, value & ((1 << 8 * size) - 1), p.ConsumeBool())
    elif op == OP_MSIX:
        bar = rig.testdev.bar(1)
        base = bar.mapped_at if bar.mapped_at is not None else rig.testdev.bar_address(1)
        how = p.u8()
        if how & 1:
            off = MSIX_PBA_OFFSET + (p.u8() % 16) * 4
        else:
            off = (p.u8() % 6) * 16 + (p.u8() % 4) * 4
        if how & 2:
            off = p.u16() % 0x1000
        size = p.PickValueInList((4, 4, 8, 1, 2))
        if how & 4:
            m.mmio_read(base + off, size)
        else:
            value = p.PickValueInList((0, 1, 0xFEE00000, 0x40, 0xFEE0000000000041)) \
                if how & 8 else p.u64()
            m.mmio_write(base + off, size, value & ((1 << 8 * size) - 1))
    elif op == OP_MSIX_CTL:
        msix = rig.testdev.msix
        _cfg(rig, TESTDEV, msix.offset + MSIX_CONTROL, 2,
             p.PickValueInList((0, 0x8000, 0xC000, 0x4000)) if p.u8() & 3 else p.u16(),
             p.ConsumeBool())
    elif op == OP_RAISE:
        bar = rig.testdev.bar(0)
        base = bar.mapped_at if bar.mapped_at is not None else rig.testdev.bar_address(0)
        reg = p.PickValueInList((REG_RAISE, REG_RAISE, REG_ACK, REG_RAISE_LATER))
        m.mmio_write(base + reg, 4, p.u8() % 6 if p.u8() & 3 else p.u32())
    elif op == OP_PIO:
        bases = [r.base for r in m.pio.ranges()] + [0xCF8, 0xC000]
        port = (p.PickValueInList(bases) + p.u8() % 16) & 0xFFFF if p.u8() & 3 else p.u16()
        size = p.PickValueInList(SIZES)
        if p.ConsumeBool():
            m.io_write(port, size, p.u32() & ((1 << 8 * size) - 1))
        else:
            m.io_read(port, size)
    else:
        bases = [r.base for r in m.mmio.ranges()]
        at = (p.PickValueInList(bases) + p.u16() % 0x1000) if bases and p.u8() & 3 else p.u64()
        size = p.PickValueInList((1, 2, 4, 8))
        if p.ConsumeBool():
            m.mmio_write(at, size, p.u64() & ((1 << 8 * size) - 1))
        else:
            m.mmio_read(at, size)
