"""Fuzz target: fw_cfg (hvframe/lpc/fw_cfg.py), port and DMA interfaces.

A SyntheticMachine (guarded RAM: [0, 256 KiB) and [4 GiB, 4 GiB + 64 KiB)) with the fw_cfg a PC
machine gets from its LPC bridge (signature, ID, RAM size, CPUs, the file directory,
etc/show-boot-menu, bootorder) plus a writable 64-byte file and a 5000-byte one, all reached
through the dispatch core at ports 0x510 (selector), 0x511 (data) and 0x514-0x51b (DMA
address, big-endian halves; writing the low half starts the transfer).

Operations: selector writes of any size, data reads, well-formed DMA requests (descriptor
placed in RAM, at its last bytes or outside it; select/read/write/skip control bits; length
and buffer address steered into and around RAM), raw accesses to every fw_cfg port and raw
RAM bytes.

Invariants: no handler exception, no hvframe ERROR log; data-port reads return the selected
item's bytes from the current offset, then zeros; a DMA changes guest RAM only inside its
buffer (a successful read) and in the descriptor's control word, which ends as 0 or the
error bit; a DMA read delivers the item's bytes then zeros; items keep their sizes, read-only
items their bytes, and the file directory stays as built.
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

from fuzzlib import machines
from fuzzlib.observe import Finding, Observer
from fuzzlib.provider import Provider, operations

from hvframe.lpc import bridge
from hvframe.lpc import fw_cfg as fc
from hvframe.memory import FOUR_GIB

LOW, HIGH = 256 << 10, 64 << 10
DESC = 0x8000                     # default descriptor place
BUF = 0x10000                     # default buffer
KEYS = (fc.KEY_SIGNATURE, fc.KEY_ID, fc.KEY_UUID, fc.KEY_RAM_SIZE, fc.KEY_NB_CPUS,
        fc.KEY_MAX_CPUS, fc.KEY_FILE_DIR, fc.KEY_FILE_FIRST, fc.KEY_FILE_FIRST + 1,
        fc.KEY_FILE_FIRST + 2, fc.KEY_FILE_FIRST + 3, 0x4000 | fc.KEY_FILE_FIRST, 0x8000,
        0xFFFF, 0x1234)
CONTROLS = (fc.DMA_READ, fc.DMA_SKIP, fc.DMA_WRITE, fc.DMA_SELECT | fc.DMA_READ,
            fc.DMA_SELECT | fc.DMA_WRITE, fc.DMA_SELECT | fc.DMA_SKIP, fc.DMA_SELECT,
            fc.DMA_READ | fc.DMA_WRITE, fc.DMA_ERROR | fc.DMA_READ, 0)
LENGTHS = (0, 1, 4, 16, 56, 64, 65, 4096, 5000, 0xFFFFFFFF)
MAX_OPS = 48
OP_SELECT, OP_READ, OP_DMA, OP_DMA_RAW, OP_PORT, OP_RAM = range(6)
N_OPS = 6


class Rig:
    def __init__(self):
        self.m = m = machines.synthetic_machine(LOW, HIGH)
        self.mem = m.memory
        self.fw = fw = bridge.setup_fw_cfg(m)
        self.wkey = fw.add_file("etc/fuzz-writable", bytes(range(64)), writable=True)
        fw.add_file("etc/fuzz-table", machines.pattern(5000, 3))
        self.initial = {k: bytes(v) for k, v in fw.items.items()}

    def close(self):
        machines.teardown(self.m)

    def check_items(self, where: str) -> None:
        items = self.fw.items
        if set(items) != set(self.initial):
            raise Finding(f"{where}: the set of fw_cfg items changed")
        for k, v in items.items():
            if len(v) != len(self.initial[k]):
                raise Finding(f"{where}: item {k:#x} changed size "
                              f"{len(self.initial[k])} -> {len(v)}")
            if k not in self.fw.writable and bytes(v) != self.initial[k]:
                raise Finding(f"{where}: read-only item {k:#x} was written")

    def dma(self, desc: int, where: str) -> None:
        """Start the DMA whose descriptor is at `desc` (two big-endian halves), checking what
        it did to guest RAM."""
        m, fw, mem = self.m, self.fw, self.mem
        before = mem.snapshot()
        pre = self._expect(desc)
        for off, half in ((0, desc >> 32), (4, desc & 0xFFFFFFFF)):
            be = int.from_bytes(half.to_bytes(4, "big"), "little")
            m.io_write(fc.DMA_PORT + off, 4, be)
        self._check_ram(before, desc, pre, where)

    def _expect(self, desc: int):
        """(control, length, address, bytes a read delivers) from the state before the DMA."""
        fw, mem = self.fw, self.mem
        if not mem.contains(desc, fc.DMA_STRUCT.size):
            return None
        control, length, address = fc.DMA_STRUCT.unpack(mem.read(desc, fc.DMA_STRUCT.size))
        key = (control >> 16) & fc.KEY_MASK if control & fc.DMA_SELECT else fw.selector
        offset = 0 if control & fc.DMA_SELECT else fw.offset
        item = fw.items.get(key)
        data = None
        if control & fc.DMA_READ and length <= 1 << 24:
            data = b"" if item is None else bytes(item[offset:offset + length])
            data = data.ljust(length, b"\0")
        return control, length, address, data

    def _check_ram(self, before, desc: int, pre, where: str) -> None:
        after = self.mem.snapshot()
        allowed = []
        if pre is not None:
            control, length, address, data = pre
            allowed.append((desc, desc + 4))
            if control & fc.DMA_READ:
                allowed.append((address, address + length))
        for region, x, y in zip(self.mem.regions, before, after):
            if x == y:
                continue
            # Copy the allowed ranges from `after` into `before`: what is left must match.
            expect = bytearray(x)
            for lo, hi in allowed:
                lo, hi = max(lo, region.gpa), min(hi, region.end)
                if lo < hi:
                    expect[lo - region.gpa:hi - region.gpa] = y[lo - region.gpa:hi - region.gpa]
            if expect != y:
                i = next(i for i in range(len(y)) if expect[i] != y[i])
                raise Finding(f"{where}: DMA (descriptor {desc:#x}) changed guest RAM at "
                              f"{region.gpa + i:#x}, outside its buffer and descriptor")
        if pre is None:
            return
        control, length, address, data = pre
        status = struct.unpack(">I", self.mem.read(desc, 4))[0]
        if status not in (0, fc.DMA_ERROR):
            raise Finding(f"{where}: DMA control word ended as {status:#x}")
        if status == 0 and control & fc.DMA_READ and data is not None and length:
            got = self.mem.read(address, length) if self.mem.contains(address, length) else None
            # (the control word may sit inside the buffer: compare around it)
            if got is not None and got != data:
                for i in range(length):
                    if not desc <= address + i < desc + 4 and got[i] != data[i]:
                        raise Finding(f"{where}: DMA read delivered {got[i]:#x} at byte {i}, "
                                      f"the item has {data[i]:#x}")


def one_input(data: bytes) -> None:
    p = Provider(data)
    with Observer() as obs, closing(Rig()) as rig:
        for step, op in operations(p, MAX_OPS, N_OPS):
            _op(rig, p, op, f"step {step}")
            obs.check(f"step {step}")
            rig.check_items(f"step {step}")


def _value(p: Provider, size: int) -> int:
    return p.u64() & ((1 << 8 * size) - 1)


def _op(rig: Rig, p: Provider, op: int, where: str) -> None:
    m, fw, mem = rig.m, rig.fw, rig.mem
    if op == OP_SELECT:
        size = p.PickValueInList((2, 2, 1, 4))
        key = p.PickValueInList(KEYS) if p.u8() & 3 else p.u16()
        m.io_write(fc.SELECTOR_PORT, size, key & ((1 << 8 * size) - 1))
    elif op == OP_READ:
        n = p.u8() % 80
        item = fw.items.get(fw.selector)
        start = fw.offset
        want = (b"" if item is None else bytes(item[start:start + n])).ljust(n, b"\0")
        got = bytes(m.io_read(fc.DATA_PORT, 1) for _ in range(n))
        if got != want:
            raise Finding(f"{where}: data port gave {got.hex()} for item {fw.selector:#x} "
                          f"from {start}, expected {want.hex()}")
    elif op == OP_DMA:
        how = p.u8()
        desc = (DESC, LOW - fc.DMA_STRUCT.size, FOUR_GIB + HIGH - fc.DMA_STRUCT.size,
                None)[how & 3]
        if desc is None:
            desc = machines.addr(p, mem)
        control = p.PickValueInList(CONTROLS) if how & 4 else p.u16()
        control |= (p.PickValueInList(KEYS) if how & 8 else p.u16()) << 16
        length = p.PickValueInList(LENGTHS) if how & 16 else machines.length(p)
        address = BUF if how & 32 else machines.addr(p, mem)
        raw = fc.DMA_STRUCT.pack(control & 0xFFFFFFFF, length & 0xFFFFFFFF,
                                 address & 0xFFFFFFFFFFFFFFFF)
        if mem.contains(desc, len(raw)):
            mem.write(desc, raw)
        rig.dma(desc, where)
    elif op == OP_DMA_RAW:
        off = p.u8() % 8
        size = p.PickValueInList((4, 1, 2, 8))
        value = _value(p, size)
        # What the device's address register will hold: replay the write on a copy.
        reg = bytearray(fw.dma_addr)
        data = value.to_bytes(size, "little")
        end = min(off + size, 8)
        reg[off:end] = data[:end - off]
        before = mem.snapshot()
        pre = rig._expect(int.from_bytes(reg, "big")) if end == 8 else None
        m.io_write(fc.DMA_PORT + off, size, value)
        if end == 8:
            rig._check_ram(before, int.from_bytes(reg, "big"), pre, where)
        elif mem.snapshot() != before:
            raise Finding(f"{where}: a DMA address write that does not start a transfer "
                          f"changed guest RAM")
    elif op == OP_PORT:
        port = 0x510 + p.u8() % 12
        size = p.PickValueInList((1, 2, 4, 8))
        if p.ConsumeBool() and port < fc.DMA_PORT:
            m.io_write(port, size, _value(p, size))
        else:
            m.io_read(port, size)
    else:
        machines.raw_ram(p, mem, most=32)
