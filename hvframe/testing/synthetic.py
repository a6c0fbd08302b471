"""The synthetic backend: a machine with no KVM, whose "exits" are made up by the caller and
fed to the same native dispatch core a vCPU uses. For deterministic device tests and for
device benchmarks.

    m = SyntheticMachine(memory_size=64 << 20)
    uart = registry.get("com1").factory(m, {...})
    m.io_write(0x3f8, 1, ord("A")); m.io_read(0x3fd, 1); m.irq_levels[4]
"""
from __future__ import annotations

import mmap

from ..core_native import ffi, lib
from .. import concurrency
from ..errors import HvError
from ..machine import Machine


# Writes KVM's coalesced ring holds before the next one exits as usual: one page of 24-byte
# entries after an 8-byte header, one slot kept free to tell full from empty.
COALESCED_RING_WRITES = (mmap.PAGESIZE - 8) // 24 - 1


class SyntheticMachine(Machine):
    """Exits fed by the caller, no KVM.

    MSI irqfds record each message in ``msis`` when fired. With ``irqfd_eventfds=True`` they
    behave as under KVM instead: firing writes the irqfd's eventfd (device threads may write
    it directly) and the caller, standing in for KVM, reads it (MsiIrqFd.fd).

    With ``ioeventfds=True`` a write that an assigned ioeventfd matches (same space and
    address, the registered length, its datamatch if it has one) signals that eventfd and
    goes no further, as KVM_IOEVENTFD does: under KVM such a write never reaches user space,
    so no bus handler runs and no GIL is taken. Without it the write is dispatched to the
    handler as usual (which for a virtio doorbell signals the same eventfd from Python).

    Writes to a range a device coalesces (Machine.coalesce_writes, enabled) are held back as
    KVM holds them and reach the bus, in order, before the next access that is not one of
    them, or at drain_coalesced(); as many as KVM's ring holds, the next one exits."""

    def __init__(self, memory_size: int = 16 << 20, cpus: int = 1, *,
                 irqfd_eventfds: bool = False, shared_memory: bool = False,
                 ioeventfds: bool = False):
        super().__init__(memory_size, cpus, backend="synthetic", shared_memory=shared_memory)
        self.irqfd_eventfds = irqfd_eventfds
        self.ioeventfds = ioeventfds
        self._doorbells: list = []
        self._zones: list = []              # coalesced ranges enabled now
        self._buffered: list[tuple] = []    # (bus, address, size, value) held back

    def _coalesce(self, zone, on: bool) -> None:
        # Held back here, in the caller's thread: no drain thread on the synthetic backend.
        if on:
            self._zones.append(zone)
        else:
            self._zones.remove(zone)

    def drain_coalesced(self) -> int:
        concurrency.may_block("handing on buffered guest writes")
        held, self._buffered = self._buffered, []
        for bus, addr, size, value in held:
            lib.hv_bus_dispatch(bus, addr, size, value, 1)
        return len(held)

    def _coalesced(self, space: str, addr: int, size: int) -> bool:
        return any(z.space == space and z.addr <= addr and addr + size <= z.addr + z.length
                   for z in self._zones)

    def add_ioeventfd(self, space, addr, length, datamatch=None):
        ev = super().add_ioeventfd(space, addr, length, datamatch)
        self._doorbells.append(ev)
        return ev

    def check_ioeventfd(self, ev) -> None:
        """KVM's EEXIST, here too: a doorbell bound where another is (see IoEventFd.collides)
        would be refused on real hardware, so it is refused in tests as well."""
        for other in self._doorbells:
            if ev.collides(other):
                raise HvError(f"KVM_IOEVENTFD: {ev.space} {ev.addr:#x} is another doorbell's "
                              f"(EEXIST)")

    def _matching_ioeventfd(self, space: str, addr: int, size: int, value: int):
        """KVM's ioeventfd match for a guest write (same space and address, the registered
        length, its datamatch if it has one), or None."""
        for ev in self._doorbells:
            if (ev.space == space and ev.addr == addr and ev.fd >= 0
                    and ev.length in (0, size)
                    and (ev.datamatch is None or ev.datamatch == value)):
                return ev
        return None

    def ioeventfd_for(self, space: str, addr: int, size: int, value: int) -> int:
        """The eventfd a guest's write would signal under KVM (-1: none matches), for a
        driver written in C that kicks by writing it, as KVM does (benchmarks/rawloop.py)."""
        ev = self._matching_ioeventfd(space, addr, size, value)
        return ev.fd if ev is not None else -1

    def _doorbell(self, space: str, addr: int, size: int, value: int) -> bool:
        """KVM's ioeventfd match for a guest write: signalled, True; else False."""
        ev = self._matching_ioeventfd(space, addr, size, value)
        if ev is None:
            return False
        ev.signal()
        return True

    # One exit each, through hv_bus_dispatch as KVM_EXIT_IO / KVM_EXIT_MMIO would go; first,
    # as KVM does, what a coalesced range buffered (or, a write to one, only buffered).
    def _guest_access(self, space: str, addr: int, size: int, value: int, is_write: int) -> int:
        bus = self.pio.c_bus if space == "pio" else self.mmio.c_bus
        if (is_write and self._zones and len(self._buffered) < COALESCED_RING_WRITES
                and self._coalesced(space, addr, size)):
            self._buffered.append((bus, addr, size, value))
            return 0
        if self._buffered:
            self.drain_coalesced()
        if is_write and self.ioeventfds and self._doorbell(space, addr, size, value):
            return 0
        return lib.hv_bus_dispatch(bus, addr, size, value, is_write)

    def io_read(self, port: int, size: int = 1) -> int:
        return self._guest_access("pio", port, size, 0, 0)

    def io_write(self, port: int, size: int, value: int) -> None:
        self._guest_access("pio", port, size, value, 1)

    def mmio_read(self, addr: int, size: int = 4) -> int:
        return self._guest_access("mmio", addr, size, 0, 0)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        self._guest_access("mmio", addr, size, value, 1)

    def exit_batch(self, accesses, mmio: bool = False) -> list[int]:
        """Run many exits in one call into C: accesses are (address, size, value, is_write).
        Returns the value of every access (reads filled in)."""
        return self.prepare_exits(accesses, mmio).run()

    def prepare_exits(self, accesses, mmio: bool = False) -> "ExitBatch":
        """The same, built once and run as often as wanted (for benchmarks)."""
        return ExitBatch(self, accesses, mmio)


class ExitBatch:
    def __init__(self, machine: SyntheticMachine, accesses, mmio: bool):
        self.n = len(accesses)
        self.bus = machine.mmio.c_bus if mmio else machine.pio.c_bus
        self.addrs = ffi.new("uint64_t[]", [a[0] for a in accesses])
        self.sizes = ffi.new("uint8_t[]", [a[1] for a in accesses])
        self.initial = [a[2] for a in accesses]
        self.values = ffi.new("uint64_t[]", self.initial)
        self.writes = ffi.new("uint8_t[]", [1 if a[3] else 0 for a in accesses])

    def run(self) -> list[int]:
        self.values[0:self.n] = self.initial
        lib.hv_synthetic_exits(self.bus, self.addrs, self.sizes, self.values, self.writes, self.n)
        return list(self.values)

    def run_only(self) -> None:
        """Dispatch again without resetting or collecting values (write-only batches)."""
        lib.hv_synthetic_exits(self.bus, self.addrs, self.sizes, self.values, self.writes, self.n)
