"""Fuzz target: virtio-blk through its PCI transport, driven like a guest would.

A SyntheticMachine (guarded RAM: [0, 2 MiB) and [4 GiB, 4 GiB + 256 KiB)) with a host bridge
and a virtio-blk function at 00:02.0 on a small temporary image. Every access goes through
the dispatch core (ports 0xcf8/0xcfc, the BARs as MMIO and port exits). The queue workers
are replaced by a synchronous pump: after each operation the target serves every queue whose
doorbell rang or whose worker was woken (``VirtioPciFunction.service_queue``, the worker's
own loop body, native cycle included), so a run is deterministic and an exception escaping
the service loop -- which would kill a worker thread -- surfaces here.

Operations: a driver bring-up (legacy or modern, MSI-X or INTx, features, queue size, ring
placement), well-formed requests of every type, raw descriptors and avail entries, kicks,
raw register accesses to BAR0 (legacy header), BAR4 (modern regions) and BAR1 (MSI-X table),
raw configuration-space accesses (BAR moves, command, MSI-X control, the virtio PCI
configuration access window), device status writes and raw RAM bytes.

Invariants: no handler exception (dispatch core reports), no hvframe ERROR log, no exception
out of the service loop, the image keeps its size (and its bytes when opened read-only), and
at the end, after a device reset and a fresh bring-up, a READ still completes with the
image's bytes (nothing the guest did may wedge the device for good).
"""
if __name__ == "__main__":
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fuzzlib.runner import run_target
    run_target(os.path.abspath(__file__))
    raise SystemExit(0)

import struct
from contextlib import closing

from fuzzlib import machines, virtio
from fuzzlib.observe import Finding, Observer, check_image
from fuzzlib.provider import Provider, operations
from fuzzlib.virtio import RINGS, SIZES, TABLES

from hvframe.memory import FOUR_GIB, GuestMemoryError
from hvframe.testing import rig
from hvframe.virtio.device import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, bit
from hvframe_virtio_blk.virtio_blk import (F_BLK_SIZE, F_DISCARD, F_FLUSH, F_MQ, F_RO,
                                           F_SEG_MAX, F_TOPOLOGY, F_WRITE_ZEROES, S_OK,
                                           T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT,
                                           T_WRITE_ZEROES)

LOW, HIGH = 2 << 20, 256 << 10
SLOT = 2
SECTORS = 64
HDRS, STATUS, DATA = 0x178000, 0x17C000, 0x180000   # data: 0x8000 a slot, 8 slots
FEATURE_BITS = (F_SEG_MAX, F_BLK_SIZE, F_FLUSH, F_TOPOLOGY, F_DISCARD, F_WRITE_ZEROES, F_RO,
                F_MQ, 28, 29, 32, 27)   # 28 indirect, 29 event idx, 32 VERSION_1, 27 any layout
TYPES = (T_IN, T_OUT, T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES, 7)
SECTOR_CHOICES = (0, 1, 7, SECTORS - 1, SECTORS, SECTORS + 1, 2**55, 2**64 - 1)
DATA_LENS = (0, 512, 1024, 4096, 16, 100, 513, 32)
MAX_OPS = 48
(OP_INIT, OP_REQUEST, OP_DESC, OP_AVAIL, OP_KICK, OP_BAR4, OP_BAR0, OP_CFG, OP_MSIX,
 OP_STATUS, OP_RAM) = range(11)
N_OPS = 11


class Rig(virtio.VirtioRig):
    slot = SLOT
    pump_rounds = 4

    def __init__(self, ro: bool, eventfds: bool):
        self.ro = ro
        self.image = machines.pattern(SECTORS * 512, 11)
        self.path = machines.image("vblk.img", self.image)
        self.m = m = machines.synthetic_machine(LOW, HIGH, irqfd_eventfds=eventfds)
        self.mem = m.memory
        rig(m, "-s 0,hostbridge", direct_boot=False)
        # locking=off: where the block layer locks images (see open_backend)
        conf = f"{self.path},ser=FUZZ,locking=off" + (",ro" if ro else "")
        (self.fn,) = (fn,) = rig(m, f"-s {SLOT},virtio-blk,{conf}", direct_boot=False)
        virtio.synchronous_workers(fn)
        self.drive()

    def check_image(self, where: str) -> None:
        check_image(self.path, self.image, self.ro, where)


def one_input(data: bytes) -> None:
    p = Provider(data)
    flags = p.u8()
    with Observer() as obs, closing(Rig(ro=bool(flags & 1), eventfds=bool(flags & 2))) as rig:
        obs.check("set-up")
        for step, op in operations(p, MAX_OPS, N_OPS):
            _op(rig, p, op)
            rig.pump()
            obs.check(f"step {step}")
        rig.check_image("after the operations")
        _recover(rig)
        obs.check("recovery")


def _op(rig: Rig, p: Provider, op: int) -> None:
    OPERATIONS[op](rig, p)


def _init(rig: Rig, p: Provider) -> None:
    b = virtio.BringUp.decode(p, rig.mem, FEATURE_BITS, (RINGS, LOW - 0x10000, FOUR_GIB), 9)
    if not b.bits & 4:
        b.features &= ~bit(F_RING_EVENT_IDX)
    if not b.bits & 8:
        b.features &= ~bit(F_RING_INDIRECT_DESC)
    b.run(rig.drv)


def _msix(rig: Rig, p: Provider) -> None:
    """A write into the MSI-X table (BAR1), and perhaps to MSI-X control."""
    m = rig.m
    table = rig.bar_addr(1)
    off = (p.u8() % 0x90) * 4 if p.u8() & 3 else p.u16() % 0x1000
    size = p.PickValueInList(SIZES)
    m.mmio_write(table + off, size, p.u64() & ((1 << 8 * size) - 1))
    if p.ConsumeBool() and rig.drv.msix_cap:   # and MSI-X control (enable, function mask)
        machines.cfg_write(m, SLOT, rig.drv.msix_cap + 2, 2, p.u16())


def _request(rig: Rig, p: Provider) -> None:
    """A well-formed request on a queue the driver set up (header, data, status), kicked."""
    q = virtio.queue(rig, p)
    if q is None:
        return
    mem = rig.mem
    slot = p.u8() % 8
    bits = p.u8()
    rtype = p.PickValueInList(TYPES)
    sector = p.PickValueInList(SECTOR_CHOICES)
    n = p.PickValueInList(DATA_LENS)
    hdr = HDRS + 16 * slot
    machines.ram_write(mem, hdr, struct.pack("<IIQ", rtype, 0, sector))
    base = (FOUR_GIB + 0x8000 * (slot % 4)) if bits & 16 else DATA + 0x8000 * slot
    to_device = rtype in (T_OUT, T_DISCARD, T_WRITE_ZEROES)
    if n and to_device:
        if rtype == T_OUT:
            machines.ram_write(mem, base, bytes([0xA0 + slot]) * n)
        else:                         # discard / write-zeroes segments
            seg = struct.pack("<QII", p.PickValueInList(SECTOR_CHOICES), p.u8(), p.u8() & 1)
            machines.ram_write(mem, base, seg * (n // 16 + 1))
    bufs = [(hdr, 8, False), (hdr + 8, 8, False)] if bits & 8 else [(hdr, 16, False)]
    split = 1 + (bits & 3)
    if n:
        step = -(-n // split)
        for off in range(0, n, step):
            bufs.append((base + off, min(step, n - off), not to_device))
    bufs.append((STATUS + slot, 1, True))
    if len(bufs) > len(q.free):
        return                        # the driver's table is full: nothing to add
    try:
        rig.drv.submit(q.index, bufs, indirect_at=TABLES + 0x400 * slot if bits & 4 else None)
    except GuestMemoryError:
        return
    rig.drv.kick(q.index)


def _recover(rig: Rig) -> None:
    """Put the BARs back, reset and bring the device up again: a READ must work."""
    drv = rig.drv
    rig.recover(bit(F_FLUSH))
    mem = rig.mem
    sector = 5
    mem.write(HDRS, struct.pack("<IIQ", T_IN, 0, sector))
    mem.write(STATUS, b"\xee")
    mem.fill(DATA, 512, 0)
    drv.submit(0, [(HDRS, 16, False), (DATA, 512, True), (STATUS, 1, True)])
    drv.kick(0)
    rig.pump()
    done = drv.queues[0].reap()
    if done != [(done[0][0] if done else 0, 513)] or mem.read(STATUS, 1)[0] != S_OK:
        raise Finding(f"after a reset a READ does not complete: used {done}, status "
                      f"{mem.read(STATUS, 1)[0]:#x}, device status {drv.status():#x}")
    rig.check_image("after recovery")
    with open(rig.path, "rb") as f:
        f.seek(sector * 512)
        expected = f.read(512)
    if mem.read(DATA, 512) != expected:
        raise Finding("after a reset a READ returns other bytes than the image has")


OPERATIONS = {OP_INIT: _init, OP_REQUEST: _request, OP_DESC: virtio.op_desc,
              OP_AVAIL: virtio.op_avail, OP_KICK: virtio.op_kick, OP_BAR4: virtio.op_bar4,
              OP_BAR0: virtio.op_bar0, OP_CFG: virtio.op_cfg, OP_MSIX: _msix,
              OP_STATUS: virtio.op_status, OP_RAM: virtio.op_ram}
