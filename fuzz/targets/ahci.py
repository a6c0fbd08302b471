"""Fuzz target: the AHCI HBA -- registers, command lists, command tables, PRDs, NCQ.

A SyntheticMachine (guarded RAM: [0, 4 MiB) and [4 GiB, 4 GiB + 256 KiB)) with a host
bridge and an AHCI HBA at 00:04.0: an ATA disk on port 0 (a small temporary image,
read-only when the input says so) and an ATAPI CD-ROM on port 1. The guest side is
hvframe_ahci.testdriver (config space through 0xcf8/0xcfc, ABAR accesses as MMIO exits,
command structures written into guest RAM), so everything reaches the HBA through the
dispatch core. Command headers, FISes, ATAPI packets and PRD tables are built from the input
with addresses steered into RAM, to its last bytes and outside it; NCQ READ/WRITE FPDMA
QUEUED batches take the native path (hvframe_ahci/ncq.c), whose guest-RAM accesses hit guard pages
if they stray.

Operations: start a port (optionally with its command list / FIS area anywhere), prepare a
command slot, issue slots (PxSACT and PxCI), raw ABAR register accesses, configuration-space
accesses, error recovery (ST off, wait for CR, clear, ST on), raw RAM bytes.

Invariants: no handler exception, no hvframe ERROR log, no dead thread; after every
operation the HBA goes idle within 10 s (no hang) and every running port that is not
stopped by an error has started all it was given (PxCI clear, nothing pending or busy);
the image keeps its size, and its bytes when read-only.
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
from fuzzlib.observe import Finding, Observer, check_image
from fuzzlib.provider import Provider, operations

from hvframe.memory import FOUR_GIB, GuestMemoryError
from hvframe.pci.bus import attach, ensure_pci_bus
from hvframe.testing import rig
from hvframe_ahci import ata, atapi, regs
from hvframe_ahci.ata import AtaDisk
from hvframe_ahci.atapi import AtapiCdrom
from hvframe_ahci.hba import AhciHba
from hvframe_ahci.testdriver import AhciDriver, PortDriver, h2d

LOW, HIGH = 4 << 20, 256 << 10
SLOT = 4
HD_SECTORS, CD_SECTORS = 128, 16
BUF = 0x100000                    # data buffers: [1 MiB, 2 MiB) and the high region
IDLE_TIMEOUT = 10.0
MAX_OPS = 40
ATA_OPS = (ata.READ_DMA_EXT, ata.WRITE_DMA_EXT, ata.READ_FPDMA_QUEUED, ata.WRITE_FPDMA_QUEUED,
           ata.READ_DMA, ata.WRITE_DMA, ata.WRITE_DMA_FUA_EXT, ata.READ_SECTORS,
           ata.READ_SECTORS_EXT, ata.WRITE_SECTORS, ata.WRITE_SECTORS_EXT, ata.READ_VERIFY_EXT,
           ata.FLUSH_CACHE_EXT, ata.IDENTIFY_DEVICE, ata.SET_FEATURES, ata.CHECK_POWER_MODE,
           ata.DATA_SET_MANAGEMENT, atapi.ATA_PACKET, atapi.ATA_IDENTIFY_PACKET, ata.NOP)
SCSI_OPS = (atapi.TEST_UNIT_READY, atapi.REQUEST_SENSE, atapi.INQUIRY, atapi.START_STOP_UNIT,
            atapi.PREVENT_ALLOW, atapi.READ_CAPACITY, atapi.READ_10, atapi.READ_12,
            atapi.READ_TOC, atapi.GET_CONFIGURATION, atapi.GET_EVENT_STATUS,
            atapi.MODE_SENSE_10)
LBAS = (0, 1, 7, HD_SECTORS - 8, HD_SECTORS - 1, HD_SECTORS, 2**28 - 1, 2**48 - 1)
COUNTS = (1, 2, 8, 0, 0x100, 0xFFFF, 16, 4)
(OP_START, OP_PREPARE, OP_ISSUE, OP_REG, OP_CFG, OP_RECOVER, OP_RAM, OP_NCQ_BATCH) = range(8)
N_OPS = 8


class Rig:
    def __init__(self, ro: bool):
        self.ro = ro
        self.image = machines.pattern(HD_SECTORS * 512, 13)
        self.hd_path = machines.image("ahci-hd.img", self.image)
        self.cd_path = machines.image("ahci-cd.iso", machines.pattern(CD_SECTORS * 2048, 5))
        self.m = m = machines.synthetic_machine(LOW, HIGH)
        self.mem = m.memory
        rig(m, "-s 0,hostbridge", direct_boot=False)
        disk = AtaDisk(machines.open_backend(self.hd_path, readonly=ro, serial="FUZZHD"),
                       name="fuzz-hd")
        cd = AtapiCdrom(machines.open_backend(self.cd_path, readonly=True, serial="FUZZCD"),
                        name="fuzz-cd")
        self.hba = AhciHba(m, {0: disk, 1: cd}, name="ahci-fuzz")
        attach(m, self.hba, {"pci.address": (0, SLOT, 0)})
        m.add_device(self.hba)
        ensure_pci_bus(m).assign_bars()
        self.drv = AhciDriver(m, SLOT)
        self.ports = [self.drv.port(0), self.drv.port(1)]

    def close(self):
        try:
            self.hba.wait_idle(IDLE_TIMEOUT)
        finally:
            machines.teardown(self.m)

    def settle(self, where: str) -> None:
        if not self.hba.wait_idle(IDLE_TIMEOUT):
            raise Finding(f"{where}: commands still with the device after {IDLE_TIMEOUT} s "
                          f"(inflight {[p.inflight for p in self.hba.ports]})")
        with self.hba.lock:
            for p in self.hba.ports:
                if p.cmd & regs.CMD_ST and not p.halted and not p.draining:
                    if p.busy is not None or p.pending or p.ci:
                        raise Finding(f"{where}: port {p.index} is running, not stopped by an "
                                      f"error and idle, yet holds commands: PxCI {p.ci:#x}, "
                                      f"pending {list(p.pending)}, busy {p.busy}")

    def check_image(self, where: str) -> None:
        check_image(self.hd_path, self.image, self.ro, where)


def one_input(data: bytes) -> None:
    p = Provider(data)
    flags = p.u8()
    with Observer() as obs:
        with closing(Rig(ro=bool(flags & 1))) as rig:
            if flags & 2:
                rig.drv.write("ghc", regs.GHC_AE | regs.GHC_IE)
            for step, op in operations(p, MAX_OPS, N_OPS):
                _op(rig, p, op)
                rig.settle(f"step {step}")
                obs.check(f"step {step}")
            rig.check_image("at the end")
        obs.check("closing")


def _prds(p: Provider, mem, n: int):
    out = []
    for _ in range(n):
        a = machines.addr(p, mem)
        length = (machines.length(p) & regs.PRD_DBC_MASK) + 1
        out.append((a, length, p.ConsumeBool()))
    return out


def _op(rig: Rig, p: Provider, op: int) -> None:
    m, mem = rig.m, rig.mem
    if op == OP_START:
        port = rig.ports[p.u8() & 1]
        bits = p.u8()
        if bits & 1:                  # command list / FIS area somewhere else
            port.clb = machines.addr(p, mem) & ~0x3FF
            port.fb = machines.addr(p, mem) & ~0xFF
        port.start(ie=p.u32() if bits & 2 else 0)
        if bits & 4:
            port.write("clbu", port.clb >> 32)
            port.write("fbu", port.fb >> 32)
    elif op == OP_PREPARE:
        _prepare(rig, p)
    elif op == OP_ISSUE:
        port = rig.ports[p.u8() & 1]
        bits = p.u8()
        mask = p.u32()
        if bits & 1:
            port.write("sact", mask if bits & 2 else p.u32())
        port.write("ci", mask)
    elif op == OP_REG:
        off = p.u16() % regs.ABAR_SIZE if p.u8() & 3 else \
            regs.PORT_BASE + regs.PORT_STRIDE * (p.u8() & 1) + (p.u8() & 0x7C)
        size = p.PickValueInList((1, 2, 4, 8))
        if p.ConsumeBool():
            m.mmio_write(rig.drv.abar + off, size, p.u64() & ((1 << 8 * size) - 1))
        else:
            m.mmio_read(rig.drv.abar + off, size)
    elif op == OP_CFG:
        machines.cfg_access(p, m, SLOT)
        rig.drv.abar = machines.cfg_read(m, SLOT, 0x24) & ~0xF   # follow a moved ABAR
    elif op == OP_RECOVER:
        port = rig.ports[p.u8() & 1]
        port.stop()
        rig.hba.wait_idle(IDLE_TIMEOUT)
        port.write("serr", 0xFFFFFFFF)
        port.write("is", 0xFFFFFFFF)
        port.write("cmd", port.read("cmd") | regs.CMD_ST)
    elif op == OP_RAM:
        machines.raw_ram(p, mem)
    else:
        _ncq_batch(rig, p)


def _prepare(rig: Rig, p: Provider) -> None:
    port: PortDriver = rig.ports[p.u8() & 1]
    slot = p.u8() % 32
    bits = p.u8()
    cmd = p.PickValueInList(ATA_OPS) if bits & 3 else p.u8()
    lba = p.PickValueInList(LBAS) if p.u8() & 3 else p.u64()
    count = p.PickValueInList(COUNTS)
    features = p.u16() if bits & 4 else 0
    if cmd in (ata.READ_FPDMA_QUEUED, ata.WRITE_FPDMA_QUEUED) and not bits & 8:
        count, features = slot << 3, count   # the tag, and the sector count
    if cmd == atapi.ATA_PACKET:
        features = p.u8() & 1                # DMA or PIO
    if cmd == ata.DATA_SET_MANAGEMENT:
        features, count = ata.DSM_TRIM, 1
    fis = h2d(cmd, lba=lba, count=count, features=features,
              device=0x40 | (p.u8() & 0x80), control=p.u8() if bits & 16 else 0,
              is_command=not bits & 32)
    if bits & 64:
        fis = bytes([p.u8()]) + fis[1:]      # FIS type
    acmd = bytes([p.PickValueInList(SCSI_OPS)]) + p.ConsumeBytes(11)
    nprd = p.u8() % 9
    prds = _prds(p, rig.mem, nprd)
    more = p.u8()
    table = machines.addr(p, rig.mem) & ~0x7F if more & 1 else None
    cfl = p.u8() % 32 if more & 2 else None
    prdtl = p.u16() if more & 4 else None
    write = (cmd in (ata.WRITE_DMA_EXT, ata.WRITE_FPDMA_QUEUED, ata.WRITE_DMA,
                     ata.WRITE_DMA_FUA_EXT, ata.WRITE_SECTORS, ata.WRITE_SECTORS_EXT,
                     ata.DATA_SET_MANAGEMENT)) != bool(more & 8)
    try:
        port.prepare(slot, fis, prds, write=write, atapi=port.n == 1, acmd=acmd, cfl=cfl,
                     table=table, prdtl=prdtl)
    except GuestMemoryError:
        pass                          # the command list is not in RAM: nothing to write


def _ncq_batch(rig: Rig, p: Provider) -> None:
    """Several well-formed NCQ commands issued by one PxSACT/PxCI write (the native path)."""
    port = rig.ports[0]
    n = p.u8() % 32 + 1
    first = p.u8() % 32
    mask = 0
    for i in range(n):
        slot = (first + i) % 32
        write = p.ConsumeBool()
        nsect = p.u8() % 9 or 1
        lba = p.u8() % (HD_SECTORS + 2)
        base = FOUR_GIB + 0x2000 * (slot % 32) if p.u8() & 8 else BUF + 0x8000 * slot
        split = p.u8() % 4 + 1
        length = nsect * 512
        step = -(-length // split)
        prds = [(base + off, min(step, length - off), off == 0) for off in range(0, length, step)]
        fis = h2d(ata.WRITE_FPDMA_QUEUED if write else ata.READ_FPDMA_QUEUED, lba=lba,
                  count=slot << 3, features=nsect, device=0x40 | (0x80 if p.u8() & 1 else 0))
        try:
            port.prepare(slot, fis, prds, write=write)
        except GuestMemoryError:
            return                    # the command list is not in RAM
        mask |= 1 << slot
    port.write("sact", mask)
    port.write("ci", mask)
