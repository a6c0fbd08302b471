"""A machine: guest memory, the port and MMIO buses, interrupt lines, devices and vCPUs.

Devices see only this object (see hvframe/device.py). The backend is KVM for real guests or
"synthetic" for unit tests and device benchmarks, which drive the same buses with made-up
exits and record interrupt lines instead of raising them.
"""
from __future__ import annotations

import os
import sys
import threading
import time

from .core_native import ffi, lib
from .dispatch import Bus
from .errors import HvError
from .memory import GuestMemory
from . import concurrency
from .control.pause import PauseGate

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable
    import uuid

    from .device import Device
    from .kvm import VmSetup
    from .lpc.bootrom import BootRom
    from .lpc.bridge import LpcBridge
    from .lpc.fw_cfg import FwCfg
    from .pci.bus import PciBus

# bhyve's exit statuses
EXIT_REBOOT, EXIT_POWEROFF, EXIT_HALT, EXIT_TRIPLEFAULT, EXIT_ERROR = 0, 1, 2, 3, 4


# Write sizes a KVM ioeventfd matches (KVM_IOEVENTFD takes these, and 0 for any write without
# a datamatch; it refuses any other length).
IOEVENTFD_SIZES = (1, 2, 4, 8)


class IoEventFd:
    """An eventfd KVM signals on guest writes to one address; see Machine.add_ioeventfd."""

    def __init__(self, machine, space: str, addr: int, length: int, datamatch: int | None):
        self.machine, self.space, self.addr = machine, space, addr
        self.length, self.datamatch = length, datamatch
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self._assign(True)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def _assign(self, assign: bool) -> None:
        if self.addr is None:
            return
        if self.machine.vm is not None:
            self.machine.vm.ioeventfd(self.addr, self.length, self.fd, pio=self.space == "pio",
                                      datamatch=self.datamatch, assign=assign)
        elif assign:
            self.machine.check_ioeventfd(self)

    def collides(self, other: "IoEventFd") -> bool:
        """Whether KVM would refuse both bound at once (EEXIST, ioeventfd_check_collision):
        the same space and address, and either matching any write (length 0) or the same
        length with no datamatch on either side or the same one."""
        if other is self or other.space != self.space or other.addr != self.addr \
                or other.addr is None or other.fd < 0:
            return False
        if self.length == 0 or other.length == 0:
            return True
        return self.length == other.length and (
            self.datamatch is None or other.datamatch is None
            or self.datamatch == other.datamatch)

    def move(self, addr: int | None) -> None:
        """Follow a BAR the guest moved: the old address must stop signalling. None parks
        the doorbell (the BAR is not decoded); the eventfd stays open."""
        if addr != self.addr:
            self._assign(False)
            self.addr = addr
            try:
                self._assign(True)
            except BaseException:
                self.addr = None        # bound nowhere: a later move starts from nothing
                raise

    def signal(self) -> None:
        os.eventfd_write(self.fd, 1)

    def take(self) -> int:
        """Writes seen since the last take (0 if none)."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self._assign(False)
            except HvError:
                pass
            os.close(self.fd)
            self.fd = -1


class MsiIrqFd:
    """An eventfd wired to one MSI route: writing it interrupts the guest without a trip
    through Python or an ioctl (KVM_IRQFD on a GSI routed by KVM_SET_GSI_ROUTING). See
    Machine.add_msi_irqfd. Any thread may call fire(); set_message() follows the guest's
    programming of the message (address, data)."""

    def __init__(self, machine, address: int | None = None, data: int = 0):
        self.machine = machine
        self.address: int | None = None
        self.data = 0
        self.gsi: int | None = None
        # set_message/close against each other, not fire(); taken inside the VM's route lock
        # (msi_route_batch), which both also change.
        self._lock = concurrency.lock(concurrency.LEAF, "irqfd")
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Native threads that write the eventfd themselves (hv_irq_gate); shut on close.
        self.gates: list = []
        vm = machine.vm
        if vm is not None:
            try:
                self.gsi = vm.alloc_msi_gsi()
                try:
                    vm.irqfd(self.fd, self.gsi)
                except BaseException:
                    vm.free_msi_gsi(self.gsi)
                    raise
            except BaseException:
                os.close(self.fd)
                self.fd = -1
                raise
        if address is not None:
            self.set_message(address, data)

    @property
    def message(self) -> tuple[int, int] | None:
        return None if self.address is None else (self.address, self.data)

    @property
    def eventfd_delivery(self) -> bool:
        """Whether writing ``fd`` is the interrupt (under KVM, or a synthetic machine made
        with irqfd_eventfds): a native thread may then fire it with one write."""
        return self.gsi is not None or self.machine.irqfd_eventfds

    def set_message(self, address: int | None, data: int = 0) -> None:
        """Route the eventfd to this (address, data); None routes it nowhere (fire() is then
        dropped). Free when nothing changed; otherwise one KVM_SET_GSI_ROUTING."""
        if address is not None:
            address &= 0xFFFFFFFFFFFFFFFF
            data &= 0xFFFFFFFF
        else:
            data = 0
        if address == self.address and data == self.data:
            return
        with self.machine.msi_route_batch(), self._lock:
            if self.fd < 0:
                return
            if self.gsi is not None:
                self.machine.vm.set_msi_route(self.gsi, address, data)
            self.address, self.data = address, data

    def fire(self) -> None:
        """Send the message once. Under KVM this is one eventfd write (the kernel delivers);
        on the synthetic backend the message is recorded in machine.msis as signal_msi does.
        Dropped when no message is set or the irqfd is closed."""
        fd = self.fd
        if self.eventfd_delivery:
            if fd >= 0:
                os.eventfd_write(fd, 1)
        elif self.address is not None and fd >= 0:
            self.machine.msis.append((self.address, self.data))

    def close(self) -> None:
        with self.machine.msi_route_batch(), self._lock:
            fd = self.fd
            if fd < 0:
                return
            for gate in self.gates:         # no native writer may use the number again
                gate.open = 0
                gate.fd = -1
            self.fd = -1
            vm = self.machine.vm
            if self.gsi is not None and vm is not None:
                try:
                    vm.irqfd(fd, self.gsi, assign=False)
                except HvError:
                    pass
                vm.free_msi_gsi(self.gsi)
            os.close(fd)
        self.machine._forget_irqfd(self)


class CoalescedWrites:
    """Guest writes to one address range that the VM buffers instead of exiting for each
    (Machine.coalesce_writes). They reach the bus handler later, in order, before any later
    exit of any vCPU is handled, and at the latest 2 ms (20 ms after a quiet spell) after
    they were made (the machine's drain thread), at a pause and at close: a handler sees them
    exactly as it would have, only not at once. So a device enables it only while a write has
    no effect a guest waits for without making another access (an interrupt, say).

    Turning it off takes effect at once; turning it on again takes one of BURST tokens, of
    which one comes back every SETTLE seconds. Without one, the drain thread (settle()) turns
    it on once a token is back, the writes exiting until then: each KVM (un)registration
    waits for an SRCU grace period (milliseconds under nested KVM), and a guest decides how
    often the device flips (a 16550's ETBEI, around every write burst of Linux's 8250
    driver), so a guest that flips it all the time must not cost one each time."""

    BURST = 4        # re-registrations allowed at once (a driver's set-up flips a few times)
    SETTLE = 1.0     # seconds for one more

    def __init__(self, machine: "Machine", space: str, addr: int, length: int):
        self.machine, self.space, self.addr, self.length = machine, space, addr, length
        self.enabled = False      # registered with KVM now
        self.wanted = False       # the device would have it on
        self.refused = False      # KVM would not buffer the range: its writes always exit
        self._tokens = float(self.BURST)
        self._tokens_at = time.monotonic()
        # Held across the (un)register ioctl; taken under the device's lock (enable()).
        self._lock = concurrency.lock(concurrency.KVM, f"coalesced {space} {addr:#x}")

    def enable(self, on: bool) -> None:
        """Buffer the range's writes (True) or let each exit again (False); what was buffered
        before is still handed on in order. Called from a guest's register write: if KVM
        refuses (ENOSPC on a full bus, ENOMEM), that is said once and the range's writes
        simply exit from then on, which is always correct, rather than failing the write."""
        with self._lock:
            self.wanted = on
            if on == self.enabled or (on and self.refused):
                return
            if on and not self._take_token():
                return            # settle() turns it on once a token is back
            self._set(on)

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(float(self.BURST),
                           self._tokens + (now - self._tokens_at) / self.SETTLE)
        self._tokens_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def settle(self) -> None:
        """Turn the range on if it is wanted and a token is back (the machine's drain
        thread, every few milliseconds; no lock held)."""
        if not self.wanted or self.enabled or self.refused:
            return
        with self._lock:
            if self.wanted and not self.enabled and not self.refused and self._take_token():
                self._set(True)

    def _set(self, on: bool) -> None:
        try:
            self.machine._coalesce(self, on)
        except (HvError, OSError) as e:     # KvmError, or the ioctl's OSError
            # Refused on: writes keep exiting. Refused off: still registered, so writes stay
            # buffered and reach the handler in order at the next exit or drain, only late.
            self._refuse(e, on)
            return
        self.enabled = on

    def _refuse(self, e: BaseException, on: bool) -> None:
        if not self.refused:
            then = ("each write exits instead" if on else
                    "its writes stay buffered, handed on at the next exit or drain")
            print(f"hvframe: KVM would not {'buffer' if on else 'stop buffering'} guest writes "
                  f"to {self.space} {self.addr:#x}+{self.length}: {e}; {then}", file=sys.stderr)
        self.refused = True

    def close(self) -> None:
        """Stop buffering and hand on what was buffered (with no lock held)."""
        self.enable(False)
        self.machine.drain_coalesced()


class Machine:
    """What every device sees. Its services, all declared here:

      memory         guest RAM (GuestMemory: read/write/view guest-physical addresses)
      pio, mmio      the port and MMIO buses handlers are registered on
      irq(), irq_source(), signal_msi(), add_msi_irqfd()   interrupts
      add_ioeventfd()                                      doorbells
      coalesce_writes()                                    writes buffered, not exited for
      pci            the PCI bus (None until pci_bus() makes it)
      lpc            the LPC bridge, when the machine has one (set_lpc_bridge)
      fw_cfg         the fw_cfg interface, when it has one (fw_cfg_device() makes it)
      bootrom        the boot ROM, when it has one (set_bootrom)
      on_close()     something to release when the machine closes
      request_exit() end the run with a bhyve exit status
    """

    memory: GuestMemory
    pio: Bus
    mmio: Bus
    devices: "list[Device]"
    # Whether MSI irqfds behave as under KVM (their eventfd is the interrupt) on the
    # synthetic backend (hvframe.synthetic.SyntheticMachine); always so under KVM.
    irqfd_eventfds: bool = False

    def __init__(self, memory_size: int, cpus: int = 1, *, backend: str = "kvm",
                 cpu_policy: str = "auto", shared_memory: bool = False,
                 vm_setup: "VmSetup | None" = None):
        """vm_setup (KVM only): the VM made ahead on a thread (hvframe.kvm.VmSetup), with
        its guest RAM when made for this size, taken here instead of making them."""
        if cpus < 1:
            raise HvError("cpus must be at least 1")
        self.cpus = cpus
        self.backend = backend
        self.cpu_policy = cpu_policy
        kvm = vm = memory = None
        if backend == "kvm" and vm_setup is not None:
            kvm, vm, memory = vm_setup.take(memory_size, shared_memory)
        if memory is None:
            try:
                # Shared (memfd-backed) when a device in another process must map guest RAM.
                memory = GuestMemory(memory_size, shared=shared_memory)
            except BaseException:
                if vm is not None:
                    vm.close()
                if kvm is not None:
                    kvm.close()
                raise
        self.memory = memory
        self.pio = Bus("port")
        self.mmio = Bus("MMIO")
        self.devices = []
        self._pci: PciBus | None = None
        self._lpc: LpcBridge | None = None
        self._fw_cfg: FwCfg | None = None
        # SMBIOS's system UUID (hvframe.runner.system_uuid); None: the host's (lpc.bridge).
        self.system_uuid: uuid.UUID | None = None
        self._bootrom: BootRom | None = None
        self._vcpu_threads: list[threading.Thread] = []
        self.irq_levels: dict[int, int] = {}
        self.msis: list[tuple[int, int]] = []
        self._irq_sources: dict[int, list[int]] = {}
        self._irq_owned: dict[int, Callable[[int], None]] = {}
        self._irq_owned_lock = concurrency.lock(concurrency.MACHINE, "irq owners")
        self._irq_lock = concurrency.lock(concurrency.KVM, "irq lines")
        self._closers: list[Callable[[], None]] = []
        self._irqfds: list[MsiIrqFd] = []
        self._irqfds_lock = concurrency.lock(concurrency.LEAF, "irqfd list")
        self._exit = threading.Event()
        self.pause_gate = PauseGate()       # where vCPU threads park while paused
        self.exit_code: int | None = None
        self.exit_reason = ""
        self.vcpus: list = []
        self.vm = None
        self._kvm = None
        self._coalesced_zones: list[CoalescedWrites] = []   # run() starts the drain thread
        self._drain_stop = threading.Event()
        self._coalesced_abandoned = False  # close() found a drainer stuck: drain no more
        self._drain_thread: threading.Thread | None = None
        if backend == "kvm":
            from .kvm import Kvm, KvmVm
            self._kvm, self.vm = kvm, vm
            try:
                if self._kvm is None:
                    self._kvm = Kvm()
                limit = self._kvm.max_vcpus()
                if cpus > limit:
                    raise HvError(f"-c {cpus}: this host's KVM allows at most {limit} vCPUs")
                if self.vm is None:
                    self.vm = KvmVm(self._kvm, self.memory)
                elif self.vm.memory is None:
                    self.vm.attach_memory(self.memory)
            except BaseException:   # no machine to close(): give back what was taken
                if self.vm is not None:
                    self.vm.close()
                    self.vm = None
                if self._kvm is not None:
                    self._kvm.close()
                    self._kvm = None
                self.memory.close()
                raise
        elif backend != "synthetic":
            raise HvError(f"unknown backend {backend!r}")

    def bus(self, space: str) -> Bus:
        """The bus of an address space: "pio" (ports) or "mmio"."""
        if space == "pio":
            return self.pio
        if space == "mmio":
            return self.mmio
        raise ValueError(f"no address space {space!r} (pio or mmio)")

    # -- platform services -----------------------------------------------------------------
    @property
    def pci(self) -> "PciBus | None":
        """The PCI bus, once pci_bus() has made it."""
        return self._pci

    def pci_bus(self, **layout) -> "PciBus":
        """The PCI bus, created and registered (0xcf8, 0xcfc, ECAM) on first use; layout
        (ecam_base, ecam_buses) applies to that first call."""
        if self._pci is None:
            from .pci.bus import PciBus
            bus = PciBus(self, **layout)
            bus.register()
            self._pci = bus
        return self._pci

    @property
    def lpc(self) -> "LpcBridge | None":
        """The LPC/ISA bridge (its PIRQ routes steer INTx to ISA IRQs), if there is one."""
        return self._lpc

    def set_lpc_bridge(self, bridge: "LpcBridge") -> None:
        from .errors import ConfigError
        if self._lpc is not None and self._lpc is not bridge:
            raise ConfigError("the machine has an LPC bridge already (one -s N,lpc)")
        self._lpc = bridge

    @property
    def fw_cfg(self) -> "FwCfg | None":
        """The fw_cfg interface, if something made it (fw_cfg_device())."""
        return self._fw_cfg

    def fw_cfg_device(self) -> "FwCfg":
        """The fw_cfg interface at 0x510, made on first use with the files PC firmware wants."""
        if self._fw_cfg is None:
            from .lpc.bridge import new_fw_cfg
            self._fw_cfg = new_fw_cfg(self)
        return self._fw_cfg

    @property
    def bootrom(self) -> "BootRom | None":
        return self._bootrom

    def set_bootrom(self, rom: "BootRom") -> None:
        from .errors import ConfigError
        if self._bootrom is not None and self._bootrom is not rom:
            raise ConfigError("the machine has a boot ROM already")
        self._bootrom = rom

    # -- interrupts ------------------------------------------------------------------------
    def _drive(self, line: int, level: int) -> None:
        if self.irq_levels.get(line) == level:
            return
        self.irq_levels[line] = level
        if self.vm is not None:
            self.vm.irq_line(line, level)

    def irq(self, line: int, level: int) -> None:
        """Set a line from a device that owns one source of it (the i8042, the RTC). Like every
        source, it is ORed with the others on the same line (a PCI PIRQ routed there, say)."""
        source = self._irq_owned.get(line)
        if source is None:
            with self._irq_owned_lock:  # one source per line, even when two threads race here
                source = self._irq_owned.get(line)
                if source is None:
                    source = self._irq_owned[line] = self.irq_source(line)
        source(level)

    def irq_source(self, line: int) -> Callable[[int], None]:
        """One of several sources sharing a line (COM1 and COM3 on IRQ 4): the line is the OR."""
        with self._irq_lock:
            levels = self._irq_sources.setdefault(line, [])
            slot = len(levels)
            levels.append(0)

        def set_level(level: int) -> None:
            with self._irq_lock:
                levels[slot] = 1 if level else 0
                self._drive(line, 1 if any(levels) else 0)
        return set_level

    def signal_msi(self, address: int, data: int) -> None:
        """Send a message-signalled interrupt (an MSI or MSI-X table entry's address/data).
        The synthetic backend records it in `msis` instead."""
        if self.vm is not None:
            self.vm.signal_msi(address, data)
        else:
            self.msis.append((address, data))

    def add_msi_irqfd(self, address: int | None = None, data: int = 0) -> MsiIrqFd:
        """An interrupt a device thread raises by writing an eventfd: `.fire()` (or
        os.eventfd_write(irq.fd, 1) under KVM) sends the message given to `.set_message()`.
        Under KVM the eventfd is a KVM irqfd on a GSI of its own (from 24 up) with an MSI
        route; on the synthetic backend fire() records in `msis` as signal_msi does. Closed
        with the machine (after its devices, so their threads can still fire until then)."""
        irq = MsiIrqFd(self, address, data)
        with self._irqfds_lock:
            self._irqfds.append(irq)
        return irq

    def _forget_irqfd(self, irq: MsiIrqFd) -> None:
        with self._irqfds_lock:
            if irq in self._irqfds:
                self._irqfds.remove(irq)

    def msi_route_batch(self):
        """A context in which set_message() calls take effect together (one routing-table
        update at the end under KVM); a no-op context on the synthetic backend."""
        from contextlib import nullcontext
        return self.vm.routing_batch() if self.vm is not None else nullcontext()

    def check_ioeventfd(self, ev: IoEventFd) -> None:
        """(No KVM) Refuse ev where KVM would (HvError, as KVM's EEXIST): the synthetic
        backend keeps no doorbells of its own, so there is nothing to collide with here."""

    def add_ioeventfd(self, space: str, addr: int | None, length: int,
                      datamatch: int | None = None) -> "IoEventFd":
        """A doorbell: guest writes to addr (space "pio" or "mmio") increment an eventfd that a
        device thread waits on. Under KVM the write never leaves the kernel; on the synthetic
        backend it reaches the bus handler as usual, so a device must treat both alike."""
        if space not in ("pio", "mmio"):
            raise ValueError("space must be 'pio' or 'mmio'")
        # KVM_IOEVENTFD's own rules, on both backends: a synthetic machine that took what KVM
        # refuses (EINVAL) would let a device pass its tests and fail on real hardware.
        if length != 0 and length not in IOEVENTFD_SIZES:
            raise ValueError(f"ioeventfd length {length}: KVM takes 0, 1, 2, 4 or 8")
        if length == 0 and datamatch is not None:
            raise ValueError("ioeventfd of length 0 (any write) with a datamatch: KVM refuses it")
        if datamatch is not None and not 0 <= datamatch < 1 << 64:
            raise ValueError(f"ioeventfd datamatch {datamatch}: KVM takes a 64-bit value")
        ev = IoEventFd(self, space, addr, length, datamatch)
        self.on_close(ev.close)
        return ev

    # How long a buffered write may wait for the next exit before the drain thread hands it on:
    # while the guest has been writing lately, and after QUIET seconds without a write (an
    # idle or halted guest), when waking every 2 ms would cost a few % of a core for nothing.
    COALESCED_DRAIN_INTERVAL = 0.002
    COALESCED_IDLE_INTERVAL = 0.02
    COALESCED_QUIET = 0.1

    def coalesce_writes(self, space: str, addr: int, length: int) -> CoalescedWrites | None:
        """Writes to [addr, addr + length) buffered by KVM instead of exiting one by one
        (KVM_REGISTER_COALESCED_MMIO); see CoalescedWrites. None when this machine cannot
        (no KVM_CAP_COALESCED_PIO, or ports asked for on MMIO-only support)."""
        if space not in ("pio", "mmio"):
            raise ValueError("space must be 'pio' or 'mmio'")
        if self.vm is not None and not self.vm.has_coalesced_pio:
            return None
        zone = CoalescedWrites(self, space, addr, length)
        self._coalesced_zones.append(zone)
        self.on_close(zone.close)
        return zone

    def _coalesce(self, zone: CoalescedWrites, on: bool) -> None:
        if self.vm is not None:
            self.vm.coalesce(zone.addr, zone.length, pio=zone.space == "pio", assign=on)

    def drain_coalesced(self) -> int:
        """Hand every buffered write to its handler now (also done before each exit, by the
        drain thread, at a pause and at close). Never call it holding a lock."""
        if self.vm is None or not self._coalesced_zones or self._coalesced_abandoned:
            return 0
        concurrency.may_block("handing on buffered guest writes")
        return self.vm.drain_coalesced()

    def _drain_loop(self) -> None:
        # Owned by the machine, stopped by close(). Writes a guest buffered and then made no
        # exit for (it halted, say) reach their handler within the interval. The ring's count
        # of writes handed on (by any drainer: mostly the vCPUs' own exits) says whether the
        # guest is writing: the last bytes of a burst come right after other writes.
        ring = self.vm.coalesced
        interval, seen, active_at = self.COALESCED_DRAIN_INTERVAL, -1, time.monotonic()
        while not self._drain_stop.wait(interval):
            self.drain_coalesced()
            self.settle_coalesced()
            drained, now = ring.drained, time.monotonic()
            if drained != seen:
                seen, active_at = drained, now
            interval = (self.COALESCED_DRAIN_INTERVAL if now - active_at < self.COALESCED_QUIET
                        else self.COALESCED_IDLE_INTERVAL)

    def settle_coalesced(self) -> None:
        """Turn back on the coalesced ranges a device has wanted on long enough (see
        CoalescedWrites.SETTLE); the drain thread calls it. No lock may be held."""
        for zone in self._coalesced_zones:
            zone.settle()

    # -- lifecycle -------------------------------------------------------------------------
    def add_device(self, device: "Device") -> "Device":
        """Hold a device: started, paused, resumed and closed with the machine."""
        from .device import Device
        if not isinstance(device, Device):
            raise TypeError(f"{type(device).__name__} is not an hvframe.device.Device")
        self.devices.append(device)
        return device

    def on_close(self, fn: Callable[[], None]) -> None:
        self._closers.append(fn)

    def request_exit(self, code: int, reason: str) -> None:
        """End the run with a bhyve exit status; the first request wins."""
        with self._irq_lock:
            if self.exit_code is not None:
                return
            self.exit_code, self.exit_reason = code, reason
        self._exit.set()
        self.pause_gate.end()
        for v in self.vcpus:
            lib.hv_vcpu_stop(v.c)

    def pause(self, deadline: float = concurrency.JOIN_DEADLINE) -> bool:
        """Stop every vCPU between two KVM_RUNs (see hvframe.control.pause); True once all
        running vCPU threads have parked. Before run() it only arms the gate."""
        self.pause_gate.close()
        for v in self.vcpus:
            lib.hv_vcpu_stop(v.c)
        running = [t for t in self._vcpu_threads if t.is_alive()]
        parked = self.pause_gate.wait_parked(len(running), deadline)
        self.drain_coalesced()          # the devices see every write before they pause
        for d in self.devices:
            d.pause()
        return parked

    def resume(self) -> None:
        for d in self.devices:
            d.resume()
        self.pause_gate.open()

    def vcpu_thread_ids(self) -> dict[int, int]:
        """vCPU index -> the native thread id of its running thread."""
        return {i: t.native_id for i, t in enumerate(self._vcpu_threads)
                if t.is_alive() and t.native_id is not None}

    @property
    def exited(self) -> bool:
        return self._exit.is_set()

    def start_devices(self) -> None:
        for d in self.devices:
            d.start()

    def close(self) -> None:
        """Release everything the machine holds; later calls do nothing. In order: the vCPU
        threads are stopped and joined; on_close() callbacks (ioeventfds among them), then
        every device's close() (which stops and joins the device's threads and closes its
        files and eventfds) and the irqfds; the device handlers left on the port and MMIO
        buses (the native dispatch table holds references to them); the vCPUs, the VM and
        /dev/kvm; last, guest RAM, which is unmapped (see GuestMemory.close). A vCPU thread
        that does not stop within its deadline is reported by name, and its vCPU, the VM
        and guest RAM are left alone rather than pulled from under it."""
        if threading.current_thread() in self._vcpu_threads:
            raise HvError("Machine.close() called from a vCPU thread: end the run with "
                          "request_exit() and close from the thread that runs the machine")
        # dict.setdefault is atomic: of two threads closing at once, one does the work.
        token = object()
        if self.__dict__.setdefault("_closed_by", token) is not token:
            return
        stuck = self._stop_vcpu_threads()
        self._drain_stop.set()
        if self._drain_thread is not None:
            self._drain_thread.join(concurrency.JOIN_DEADLINE)
            if self._drain_thread.is_alive():
                print("hvframe: while closing: coalesced-drain did not stop; the VM and guest "
                      "RAM are left as they are", file=sys.stderr)
                stuck = [*stuck, self._drain_thread.name]
        if stuck:
            # A thread that did not stop may be inside the ring's drain, holding its lock
            # (a handler that blocks): draining now (here, or a device's close) would wait
            # for it for ever, and freeing the VM would unmap the ring under it.
            self._coalesced_abandoned = True
        else:
            self.drain_coalesced()      # what the guest wrote last reaches its device
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception as e:  # closing must go on for the rest
                print(f"hvframe: while closing: {e}", file=sys.stderr)
        self._closers.clear()
        for d in self.devices:
            try:
                d.close()
            except Exception as e:
                print(f"hvframe: while closing {d.name or type(d).__name__}: {e}", file=sys.stderr)
        with self._irqfds_lock:
            irqfds, self._irqfds = self._irqfds, []
        for irq in irqfds:
            try:
                irq.close()
            except Exception as e:
                print(f"hvframe: while closing an irqfd: {e}", file=sys.stderr)
        for bus in (self.pio, self.mmio):
            for r in bus.ranges():
                try:
                    bus.unregister(r.base)
                except KeyError:       # gone meanwhile
                    pass
        if stuck:
            return
        self._release_kvm_and_ram()

    def _release_kvm_and_ram(self) -> None:
        """The last of close(): the vCPUs, the VM, /dev/kvm and guest RAM. Also for a test
        whose stuck thread has since returned, to give back what close() left alone."""
        vcpus, self.vcpus = self.vcpus, []     # request_exit() no longer reaches them
        for v in vcpus:
            v.close()
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self._kvm is not None:
            self._kvm.close()
            self._kvm = None
        self.memory.close()

    def _stop_vcpu_threads(self, deadline: float = concurrency.JOIN_DEADLINE) -> list[str]:
        """Stop the vCPU threads run() started (a run still going, or one that outlived
        run()'s join) and join them; returns the names of those still running."""
        threads = [t for t in self._vcpu_threads if t.is_alive()]
        if not threads:
            return []
        self.request_exit(EXIT_ERROR, "machine closed while running")
        concurrency.may_block("vCPU threads to stop")
        import time
        end = time.monotonic() + deadline
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            print(f"hvframe: while closing: {', '.join(stuck)} did not stop; its vCPU, the VM "
                  "and guest RAM are left as they are", file=sys.stderr)
        return stuck

    # -- running (KVM) ---------------------------------------------------------------------
    def create_vcpus(self) -> None:
        from .kvm import setup_vcpus
        lib.hv_init()
        self.vcpus = setup_vcpus(self.vm, self.cpus, self.pio.c_bus, self.mmio.c_bus, self.cpu_policy)

    def boot_direct(self, boot) -> None:
        """Enter a loaded kernel (hvframe.loader.BootState) on the boot vCPU."""
        from .kvm import write_boot_gdt
        write_boot_gdt(self.memory)
        self.vcpus[0].enter_protected_mode(boot.rip, boot.regs)

    def _vcpu_thread(self, vcpu) -> None:
        try:
            self._run_vcpu(vcpu)
        except BaseException as e:  # a VMM bug: report it and end the run, never hang
            self.request_exit(EXIT_ERROR, f"vCPU {vcpu.index} thread failed: {type(e).__name__}: {e}")

    def _run_vcpu(self, vcpu) -> None:
        while not self._exit.is_set():
            rc = lib.hv_vcpu_run(vcpu.c)
            c = vcpu.c
            if rc == lib.HV_EXIT_STOPPED:
                if self._exit.is_set():
                    return
                c.stop = 0
                self.pause_gate.park()      # a pause kicked it out (after c.stop = 0: no stop lost)
                continue
            if rc == lib.HV_EXIT_SHUTDOWN:
                self.request_exit(EXIT_TRIPLEFAULT, f"triple fault on vCPU {vcpu.index}")
            elif rc == lib.HV_EXIT_INTERNAL:
                self.request_exit(EXIT_ERROR, vcpu.describe_internal_error())
            elif rc == lib.HV_EXIT_HLT:
                self.request_exit(EXIT_HALT, f"vCPU {vcpu.index} halted")
            elif rc == lib.HV_EXIT_SYSTEM_EVENT:
                if c.event_type == lib.KVM_SYSTEM_EVENT_RESET:
                    self.request_exit(EXIT_REBOOT, "guest reset")
                elif c.event_type == lib.KVM_SYSTEM_EVENT_SHUTDOWN:
                    self.request_exit(EXIT_POWEROFF, "guest powered off")
                else:
                    self.request_exit(EXIT_ERROR, f"guest system event {c.event_type} (crash)")
            elif rc == lib.HV_EXIT_FAIL_ENTRY:
                self.request_exit(EXIT_ERROR, f"vCPU {vcpu.index}: KVM entry failed, "
                                              f"hardware reason {c.fail_reason:#x}")
            elif rc == lib.HV_EXIT_ERROR:
                import os
                self.request_exit(EXIT_ERROR, f"vCPU {vcpu.index}: KVM_RUN failed: {os.strerror(c.last_errno)}")
            else:
                self.request_exit(EXIT_ERROR, f"vCPU {vcpu.index}: unhandled KVM exit reason {c.last_exit_reason}")
            return

    def run(self, timeout: float | None = None) -> int:
        """Run all vCPUs until the guest or the VMM ends the run; returns the exit status."""
        if not self.vcpus:
            raise HvError("no vCPUs: call create_vcpus() first")
        threads = [threading.Thread(target=self._vcpu_thread, args=(v,), name=f"vcpu{v.index}",
                                    daemon=True) for v in self.vcpus]
        self._vcpu_threads = threads       # close() stops and joins any still running
        for t in threads:                  # the guest first: the drain thread is for later
            t.start()
        if self._coalesced_zones and self.vm is not None and self.vm.coalesced != ffi.NULL \
                and self._drain_thread is None:
            self._drain_thread = threading.Thread(target=self._drain_loop, name="coalesced-drain",
                                                  daemon=True)
            self._drain_thread.start()      # close() stops and joins it
        try:
            # Wait in short slices so that Ctrl-C (when the terminal is not raw) is seen.
            remaining = timeout
            while not self._exit.wait(0.2 if remaining is None else min(0.2, remaining)):
                if remaining is not None:
                    remaining -= 0.2
                    if remaining <= 0:
                        self.request_exit(EXIT_ERROR, f"timed out after {timeout} s")
        except KeyboardInterrupt:
            self.request_exit(EXIT_ERROR, "interrupted")
        for t in threads:
            t.join(5)
        return self.exit_code
