"""QEMU's firmware configuration interface (fw_cfg), x86 port I/O flavour, as SeaBIOS and
OVMF expect it (facts from QEMU's docs/specs/fw_cfg.rst):

  0x510  selector, 16-bit write: the item to read; resets the data offset
  0x511  data, 8-bit read: the next byte of the selected item (zeros past its end; an
         unknown selector reads as zeros); writes are ignored
  0x514  DMA address, 64-bit big-endian, as two 32-bit halves (high at 0x514, low at 0x518);
         writing the low half starts the transfer. Reading it gives "QEMU CFG".

A DMA request is a big-endian structure in guest memory, {u32 control; u32 length;
u64 address}. Control bits: 0x01 error, 0x02 read, 0x04 skip, 0x08 select (selector in bits
31:16), 0x10 write. The device writes back control = 0 when done, or with the error bit set.
Every guest address is checked against guest RAM: a transfer touching anything else sets
the error bit, and the VMM never raises.

Items: 0x0000 signature "QEMU", 0x0001 features (traditional + DMA), 0x0002 UUID (zeros),
0x0003 RAM size, 0x0005 CPU count, 0x000f max CPUs, 0x0019 the file directory
({be32 count; {be32 size; be16 select; be16 reserved; char name[56]}...}, sorted by name),
files from 0x0020 on. The files are what the machine builder adds (see the LPC bridge):
`etc/sercon-port` (COM1 when it is configured), `etc/show-boot-menu`, `bootorder`, ...
Writes through DMA are refused (error bit) unless the file was added writable.
"""
from __future__ import annotations

from ..device import Device

import struct

from ..memory import GuestMemoryError
from .. import concurrency
from ..packed import declared_later
from ..snapshot.state import DeviceState

SELECTOR_PORT = 0x510
DATA_PORT = 0x511
DMA_PORT = 0x514

KEY_SIGNATURE = 0x0000
KEY_ID = 0x0001
KEY_UUID = 0x0002
KEY_RAM_SIZE = 0x0003
KEY_NOGRAPHIC = 0x0004
KEY_NB_CPUS = 0x0005
KEY_MAX_CPUS = 0x000F
KEY_FILE_DIR = 0x0019
KEY_FILE_FIRST = 0x0020
KEY_WRITE = 0x4000       # selector bit asking for write access (legacy; ignored)
KEY_MASK = 0xBFFF        # the key without the write bit (keeps the arch bit 0x8000)

ID_TRADITIONAL = 0x01
ID_DMA = 0x02

DMA_ERROR = 0x01
DMA_READ = 0x02
DMA_SKIP = 0x04
DMA_SELECT = 0x08
DMA_WRITE = 0x10
DMA_SIGNATURE = b"QEMU CFG"
DMA_STRUCT = struct.Struct(">IIQ")

FILE_NAME_LEN = 56
DIR_ENTRY = struct.Struct(">IHH56s")


class FwCfg(Device, DeviceState):
    name = "fw_cfg"
    # The items come from the configuration (rebuilt alike on restore); what the guest can
    # change is where it reads, the DMA address it is writing, and the writable files.
    state_version = 1

    @declared_later
    def state_layout():
        from construct import Bytes, Int16ul, Int32ul, PrefixedArray, Prefixed, GreedyBytes, Struct
        return Struct(
            "selector" / Int16ul, "offset" / Int32ul, "dma_addr" / Bytes(8),
            "writable" / PrefixedArray(Int16ul, Struct("key" / Int16ul,
                                                       "data" / Prefixed(Int32ul, GreedyBytes))))

    def __init__(self, machine, *, register: bool = True):
        self.machine = machine
        self._lock = concurrency.lock(concurrency.DEVICE, "fw_cfg")
        self.items: dict[int, bytearray] = {}
        self.files: dict[str, int] = {}      # name -> key
        self.writable: set[int] = set()
        self.selector = 0
        self.offset = 0
        self.dma_addr = bytearray(8)
        self.add_item(KEY_SIGNATURE, b"QEMU")
        self.add_item(KEY_ID, struct.pack("<I", ID_TRADITIONAL | ID_DMA))
        self.add_item(KEY_UUID, bytes(16))
        self.add_item(KEY_RAM_SIZE, struct.pack("<Q", machine.memory.size))
        self.add_item(KEY_NOGRAPHIC, struct.pack("<H", 1))
        self.add_item(KEY_NB_CPUS, struct.pack("<H", machine.cpus))
        self.add_item(KEY_MAX_CPUS, struct.pack("<H", machine.cpus))
        self._rebuild_dir()
        if register:
            machine.pio.register(SELECTOR_PORT, 2, _Ports(self), name="fw_cfg")
            machine.pio.register(DMA_PORT, 8, _DmaPort(self), name="fw_cfg-dma")

    # -- items ------------------------------------------------------------------------------
    def add_item(self, key: int, data: bytes) -> None:
        with self._lock:
            self.items[key & KEY_MASK] = bytearray(data)

    def add_file(self, name: str, data: bytes, *, writable: bool = False) -> int:
        """Add (or replace) a named file; returns its selector key."""
        raw = name.encode()
        if not raw or len(raw) >= FILE_NAME_LEN:
            raise ValueError(f"fw_cfg file name {name!r} must be 1-55 bytes")
        with self._lock:
            key = self.files.get(name)
            if key is None:
                key = KEY_FILE_FIRST + len(self.files)
                if key >= KEY_WRITE:
                    raise ValueError("too many fw_cfg files")
                self.files[name] = key
            self.items[key] = bytearray(data)
            if writable:
                self.writable.add(key)
            self._rebuild_dir()
        return key

    def _rebuild_dir(self) -> None:
        entries = sorted(self.files.items())
        d = struct.pack(">I", len(entries)) + b"".join(
            DIR_ENTRY.pack(len(self.items[key]), key, 0, name.encode()) for name, key in entries)
        self.items[KEY_FILE_DIR] = bytearray(d)

    def file(self, name: str) -> bytes | None:
        key = self.files.get(name)
        return None if key is None else bytes(self.items[key])

    def save_state(self) -> dict:
        with self._lock:
            return dict(selector=self.selector, offset=self.offset,
                        dma_addr=bytes(self.dma_addr),
                        writable=[dict(key=k, data=bytes(self.items[k]))
                                  for k in sorted(self.writable)])

    def load_state(self, s) -> None:
        with self._lock:
            self.selector, self.offset = s.selector & KEY_MASK, s.offset
            self.dma_addr[:] = s.dma_addr
            for w in s.writable:
                if w.key in self.writable and len(w.data) == len(self.items[w.key]):
                    self.items[w.key][:] = w.data

    # -- port interface ---------------------------------------------------------------------
    def select(self, key: int) -> None:
        self.selector = key & KEY_MASK
        self.offset = 0

    def read_byte(self) -> int:
        item = self.items.get(self.selector)
        if item is None or self.offset >= len(item):
            return 0
        b = item[self.offset]
        self.offset += 1
        return b

    # -- DMA --------------------------------------------------------------------------------
    def dma_write_reg(self, offset: int, size: int, value: int) -> None:
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        end = min(offset + size, 8)
        self.dma_addr[offset:end] = data[:end - offset]
        if end == 8:                    # the low half (last byte) was written: go
            addr = int.from_bytes(self.dma_addr, "big")
            self.dma_addr[:] = bytes(8)
            self.dma(addr)

    def dma_read_reg(self, offset: int, size: int) -> int:
        chunk = DMA_SIGNATURE[offset:offset + size]
        return int.from_bytes(chunk.ljust(size, b"\0"), "little")

    def dma(self, addr: int) -> None:
        """Run the DMA request whose descriptor is at guest address `addr`."""
        mem = self.machine.memory
        try:
            control, length, address = DMA_STRUCT.unpack(mem.read(addr, DMA_STRUCT.size))
        except GuestMemoryError:
            return                      # no descriptor to report an error in
        ok = self._transfer(control, length, address)
        try:
            mem.write(addr, struct.pack(">I", 0 if ok else DMA_ERROR))
        except GuestMemoryError:
            pass

    def _transfer(self, control: int, length: int, address: int) -> bool:
        mem = self.machine.memory
        if control & DMA_SELECT:
            self.select(control >> 16)
        key = self.selector
        item = self.items.get(key)
        if control & DMA_READ:
            if not mem.contains(address, length):
                return False
            avail = b"" if item is None else bytes(item[self.offset:self.offset + length])
            mem.write(address, avail)
            if len(avail) < length:     # past the end of the item: zeros
                mem.fill(address + len(avail), length - len(avail))
            self.offset += len(avail)
            return True
        if control & DMA_WRITE:
            if item is None or key not in self.writable:
                return False
            if self.offset + length > len(item):
                return False
            try:
                data = mem.read(address, length)
            except GuestMemoryError:
                return False
            item[self.offset:self.offset + length] = data
            self.offset += length
            return True
        if control & DMA_SKIP:
            if item is not None:
                self.offset = min(self.offset + length, len(item))
            return True
        return True                     # select only (or nothing)


class _Ports:
    """0x510 (selector, 16 bits) and 0x511 (data, 8 bits)."""

    def __init__(self, fw: FwCfg):
        self.fw = fw

    def read(self, offset: int, size: int) -> int:
        with self.fw._lock:
            if offset == 1:
                return self.fw.read_byte()
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        with self.fw._lock:
            if offset == 0:
                self.fw.select(value & (0xFFFF if size >= 2 else 0xFF))
            # data port writes are ignored, as QEMU does since 2.4


class _DmaPort:
    def __init__(self, fw: FwCfg):
        self.fw = fw

    def read(self, offset: int, size: int) -> int:
        return self.fw.dma_read_reg(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        with self.fw._lock:
            self.fw.dma_write_reg(offset, size, value)
