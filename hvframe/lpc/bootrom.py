"""The boot ROM (`-l bootrom,FILE`, which sets platform.bootrom.path): PC firmware such as
SeaBIOS's bios.bin.

The image is mapped read-only at the top of 4 GiB (a 256 KiB image at 0xFFFC0000, so the
reset vector 0xFFFFFFF0 is its last 16 bytes) from a host mapping of its own, as an extra
KVM memory slot. Its last 128 KiB (or all of a smaller image) is also copied to RAM below
1 MiB, ending at 0xFFFFF, as the legacy BIOS area. That area stays ordinary writable RAM:
the i440FX PAM registers (host bridge config 0x59-0x5f) are not modelled, which is enough
for SeaBIOS (it copies itself there and writes its variables, as under QEMU).

Guest writes to the ROM range exit to the VMM and are ignored. With a boot ROM the runner
loads no kernel: vCPU 0 starts at the reset vector (KVM's state after vCPU creation).
The image may be at most 256 KiB, a multiple of 4 KiB: KVM's real-mode TSS pages sit just
below 0xFFFC0000.
"""
from __future__ import annotations

from ..device import Device

import mmap

from ..core_native import ffi

from ..errors import ConfigError
from ..snapshot.state import DeviceState
from ..packed import declared_later

FOUR_GIB = 1 << 32
MAX_SIZE = 256 << 10
LEGACY_END = 0x100000
LEGACY_MAX = 128 << 10


class BootRom(Device, DeviceState):
    name = "bootrom"
    # Read-only: the image comes from the same file on restore; nothing of it changes.
    state_version = 1

    @declared_later
    def state_layout():
        from construct import Struct
        return Struct()

    def save_state(self) -> dict:
        return {}

    def load_state(self, s) -> None:
        pass

    def __init__(self, machine, path: str):
        self.machine = machine
        self.path = path
        with open(path, "rb") as f:
            image = f.read(MAX_SIZE + 1)
        size = len(image)
        if size == 0 or size % 4096 or size > MAX_SIZE:
            raise ConfigError(f"bootrom {path}: size {size} bytes; a boot ROM must be a "
                              f"multiple of 4 KiB and at most {MAX_SIZE >> 10} KiB")
        self.image = image
        self.size = size
        self.base = FOUR_GIB - size
        mem = machine.memory
        legacy = min(size, LEGACY_MAX)
        self.legacy_base = LEGACY_END - legacy
        if not mem.contains(self.legacy_base, legacy):
            raise ConfigError(f"bootrom {path}: guest RAM does not reach {LEGACY_END:#x}")
        mem.write(self.legacy_base, image[size - legacy:])
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._map[:] = image
        self._host = None
        if machine.vm is not None:
            self._host = ffi.from_buffer(self._map)
            host_addr = int(ffi.cast("uintptr_t", self._host))
            machine.vm.add_memory_slot(self.base, size, host_addr, readonly=True)
        # Writes to a read-only slot exit as MMIO; reads reach this only without KVM.
        machine.mmio.register(self.base, size, self, name="bootrom")
        machine.set_bootrom(self)

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.image[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        pass

    def close(self) -> None:
        """Unmap the image (Machine.close: the vCPUs are stopped, the VM's slot goes next)."""
        self._host = None            # drops the buffer export that keeps the mapping alive
        if not self._map.closed:
            try:
                self._map.close()
            except BufferError:      # still exported somewhere: unmapped when that goes
                pass


def create(machine, options) -> BootRom | None:
    """Platform device factory: a ROM only when platform.bootrom.path is set."""
    path = options.path
    return BootRom(machine, path) if path else None
