"""One PCI passthrough layer over any DeviceBackend (kernel VFIO or vfio-user).

Configuration space is virtualized; the device's own is read once at start (config region):

* header: vendor, device, revision, class and subsystem are the device's; BARs, the ROM BAR,
  the command register's decode bits, the interrupt line and the status register are ours
  (hvframe sizes and places the BARs from the regions' sizes and the type bits of the
  device's BAR registers, as for any other function);
* MSI and MSI-X capabilities are emulated here (hvframe.pci.msi): the table and PBA live in
  this process, so masking, pending bits and the guest's messages never reach the device;
* every other capability is copied into our list (same order, our offsets) and its body
  passed through: reads and writes go to the device at the body's offset there;
* the rest of the 256 bytes reads 0 and ignores writes; extended space is not passed through.

Write mask (what a guest write reaches the device with): the command register's
PASSTHRU_COMMAND_BITS (bus master, parity, SERR, INTx disable) and the bodies of passed-
through capabilities; nothing else.

BARs: every access is trapped and forwarded as a region read or write (except the MSI-X table
and PBA, answered here). Doorbells the device offers (DEVICE_GET_REGION_IO_FDS) are bound as
KVM ioeventfds at their place in the BAR and follow it when the guest moves it.

Interrupts: each vector of each index the device has gets a relay eventfd handed to the
device; a relay thread turns a signal into msix.notify(v), msi.notify() or INTx assertion
here, which then take the usual path (irqfds under KVM, masking and pending bits as the guest
set them). The device's MSI-X (or MSI) is switched on and off with the guest's enable bit.
An MSI-X vector whose gate is open (MsixCapability: enabled, unmasked, its irqfd routed to
its message) is handed the guest's irqfd itself instead, as QEMU hands KVM's irqfds to VFIO,
so the device's completion reaches KVM with no stop here; the capability tells us
(gate_changed) before a mask, message change or disable takes effect, and the vector is
switched back to its relay first, so a signal while masked still sets the pending bit.
INTx is level-triggered and automasked: asserted when the device signals, deasserted again
after the next forwarded BAR access (the guest's interrupt handler acknowledging), when the
device is unmasked so that it signals again if its line is still up.

Failure: when the backend is lost, reads of the device answer all ones and writes are
dropped (a surprise-removed function), the device's FailurePolicy completes what the driver
has in flight with the device's own error status, and a reconnect thread tries to reach the
device again; when it is back (DMA map, eventfds and doorbells afresh) the guest driver
resets the device and carries on.
"""
from __future__ import annotations

import os
import select
import threading

from hvframe import concurrency
from hvframe.errors import ConfigError
from hvframe.machine import IOEVENTFD_SIZES
from hvframe.pci.config_space import (CAP_PTR_OFFSET, CMD_BUS_MASTER, CMD_INTX_DISABLE,
                                      CMD_PARITY, CMD_SERR, COMMAND_OFFSET)
from hvframe.pci.device import PciFunction
from hvframe.pci.msi import CAP_ID_MSI, CAP_ID_MSIX, MsiCapability, MsixCapability

from . import protocol as p
from .backend import BackendLost, DeviceBackend, IoFd


PASSTHRU_COMMAND_BITS = CMD_BUS_MASTER | CMD_PARITY | CMD_SERR | CMD_INTX_DISABLE
CONFIG_SIZE = 256
MAX_CAPS = 48
MAX_ROM = 16 << 20
RECONNECT_INTERVAL = 0.1
LIVENESS_INTERVAL_MS = 100


def _u(data: bytes, off: int, n: int) -> int:
    return int.from_bytes(data[off:off + n], "little")


class FailurePolicy:
    """What the client does for a device whose backend is lost: by default nothing beyond
    the surprise-removal view (all-ones reads). Device-specific policies see every forwarded
    write (to know the driver's set-up) and complete in-flight requests with the device's
    error status."""

    def attach(self, fn: "PassthruFunction") -> None:
        self.fn = fn

    def observe_write(self, region: int, offset: int, size: int, value: int) -> None:
        pass

    def observe_read(self, region: int, offset: int, size: int, value: int) -> None:
        """A read the device answered (a policy may keep registers to answer for later)."""

    def lost(self) -> None:
        """The backend is gone; called once, on the thread that noticed."""

    def read_while_lost(self, region: int, offset: int, size: int) -> int | None:
        """A read of the lost device; None: all ones."""
        return None

    def may_resume(self) -> bool:
        """Whether forwarding may start again as soon as the device is reachable; if not, the
        policy calls fn.resume() itself (a virtio driver must first reset the device)."""
        return True

    def recovered(self) -> None:
        """Forwarding starts again."""

    def close(self) -> None:
        """The function is closing: stop whatever the policy started (threads, fds)."""


class _ForwardedBar:
    """A BAR's handler: region reads and writes (the MSI-X table and PBA excepted)."""

    def __init__(self, fn: "PassthruFunction", index: int):
        self.fn, self.index = fn, index
        self.msix_ranges: list[tuple[int, int]] = []

    def _msix(self, offset: int) -> bool:
        return any(a <= offset < b for a, b in self.msix_ranges)

    def read(self, offset: int, size: int) -> int:
        if self.msix_ranges and self._msix(offset):
            return self.fn.msix.bar_read(offset, size)
        return self.fn.bar_read(self.index, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if self.msix_ranges and self._msix(offset):
            self.fn.msix.bar_write(offset, size, value)
            return
        self.fn.bar_write(self.index, offset, size, value)


class _Doorbell:
    """A device's ioeventfd bound under KVM at its place in a BAR (on the synthetic backend
    the write reaches the BAR handler, which signals the eventfd itself)."""

    def __init__(self, machine, iofd: IoFd):
        self.machine, self.iofd, self.addr = machine, iofd, None

    def move(self, base: int | None) -> None:
        vm = self.machine.vm
        f = self.iofd
        addr = None if base is None else base + f.offset
        if vm is None or addr == self.addr:
            self.addr = addr
            return
        if self.addr is not None:
            vm.ioeventfd(self.addr, f.size, f.fd, pio=f.pio, datamatch=f.datamatch,
                         assign=False)
            self.addr = None
        if addr is not None:
            vm.ioeventfd(addr, f.size, f.fd, pio=f.pio, datamatch=f.datamatch)
            self.addr = addr

    def close(self) -> None:
        try:
            self.move(None)
        finally:
            os.close(self.iofd.fd)


class PassthruFunction(PciFunction):
    """A guest PCI function whose device model is behind a DeviceBackend."""

    def __init__(self, backend: DeviceBackend, *, name: str, policy: FailurePolicy | None = None):
        self.backend = backend
        cfg = backend.region_read(p.PCI_CONFIG_REGION, 0, CONFIG_SIZE)
        self.device_config = cfg
        intx = backend.irq_info(p.PCI_INTX_IRQ).count
        super().__init__(_u(cfg, 0, 2), _u(cfg, 2, 2), _u(cfg, 9, 3), revision=cfg[8],
                         subsystem_vendor=_u(cfg, 0x2C, 2), subsystem_id=_u(cfg, 0x2E, 2),
                         pin=cfg[0x3D] if intx and 1 <= cfg[0x3D] <= 4 else 0, name=name)
        self.lost = False
        self._reconnected = False
        self._lost_lock = concurrency.lock(concurrency.LEAF, f"{name} lost")
        if policy is None:
            from .failure import policy_for
            policy = policy_for(cfg)
        self.policy = policy
        self.policy.attach(self)
        self._bars: dict[int, _ForwardedBar] = {}
        self._declare_bars(cfg)
        self._passthrough: list[tuple[int, int, int]] = []   # (our offset, device offset, len)
        self._declare_capabilities(cfg)
        self._msix_on = self._msi_on = False
        self._doorbells: dict[int, list[_Doorbell]] = {}
        self._relay: _IrqRelay | None = None
        self._reconnector: concurrency.DeviceThread | None = None
        self._reconnect_wake = threading.Event()

    # -- declaration ------------------------------------------------------------------------
    def _declare_bars(self, cfg: bytes) -> None:
        i = 0
        while i < 6:
            size = self.backend.region_info(i).size
            low = _u(cfg, 0x10 + 4 * i, 4)
            if not size:
                i += 1
                continue
            kind = "io" if low & 1 else ("mmio64" if low & 4 and i < 5 else "mmio32")
            if kind == "io" and size > 256 or kind != "io" and size < 16:
                size = max(size, 16) if kind != "io" else size
            h = self._bars[i] = _ForwardedBar(self, i)
            try:
                self.add_bar(i, size, kind, h, prefetchable=bool(low & 8) and kind != "io")
            except ConfigError as e:
                raise ConfigError(f"{self.name}: the device's BAR{i} cannot be passed through: "
                                  f"{e}") from None
            i += 2 if kind == "mmio64" else 1
        rom = self.backend.region_info(p.PCI_ROM_REGION).size
        if rom:
            if rom > MAX_ROM:
                raise ConfigError(f"{self.name}: expansion ROM of {rom} bytes is too large")
            self.set_rom(self.backend.region_read(p.PCI_ROM_REGION, 0, rom))

    def _declare_capabilities(self, cfg: bytes) -> None:
        found, seen = [], set()
        ptr = cfg[CAP_PTR_OFFSET] & 0xFC if cfg[6] & 0x10 else 0
        while ptr >= 0x40 and ptr not in seen and len(found) < MAX_CAPS:
            seen.add(ptr)
            found.append((ptr, cfg[ptr]))
            ptr = cfg[ptr + 1] & 0xFC
        offsets = sorted(o for o, _ in found)
        for off, cap_id in found:
            later = [o for o in offsets if o > off]
            length = (later[0] if later else CONFIG_SIZE) - off
            if cap_id == CAP_ID_MSI and self.backend.irq_info(p.PCI_MSI_IRQ).count:
                MsiCapability(self)
                self.watch_config(self.msi.offset, 4, self._msi_written)
            elif cap_id == CAP_ID_MSIX and self.backend.irq_info(p.PCI_MSIX_IRQ).count:
                self._emulate_msix(cfg, off)
            else:
                if cap_id == 0x09:          # vendor specific: its length is in byte 2
                    length = min(length, max(cfg[off + 2], 2))
                ours = self.add_capability(cap_id, cfg[off + 2:off + length])
                self._passthrough.append((ours + 2, off + 2, length - 2))

    def _emulate_msix(self, cfg: bytes, off: int) -> None:
        ctl, table, pba = _u(cfg, off + 2, 2), _u(cfg, off + 4, 4), _u(cfg, off + 8, 4)
        vectors = (ctl & 0x7FF) + 1
        bir, pba_bir = table & 7, pba & 7
        h = self._bars.get(bir)
        if h is None or pba_bir != bir:
            raise ConfigError(f"{self.name}: MSI-X table and PBA must share one BAR of the "
                              f"device")
        MsixCapability(self, vectors, bir, table_offset=table & ~7, pba_offset=pba & ~7,
                       add_bar=False)
        x = self.msix
        # Per vector: the guest's irqfd eventfd while its gate is open (see gate_changed).
        self._msix_irqfds: list[int | None] = [None] * vectors
        # False once the device refused a hand-over: every vector stays on its relay.
        self._irqfd_handover = True
        x.gate_listener = self
        h.msix_ranges = [(x.table_offset, x.table_offset + x.table_len),
                         (x.pba_offset, x.pba_offset + x.pba_len)]
        self.watch_config(x.offset, 4, self._msix_written)

    # -- configuration space ------------------------------------------------------------------
    def _passed(self, offset: int, size: int):
        for ours, theirs, n in self._passthrough:
            if ours <= offset and offset + size <= ours + n:
                return theirs + offset - ours
        return None

    def config_read(self, offset: int, size: int) -> int:
        dev = self._passed(offset, size)
        if dev is not None:
            return self._forward_read(p.PCI_CONFIG_REGION, dev, size)
        return super().config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        dev = self._passed(offset, size)
        if dev is not None:
            self._forward_write(p.PCI_CONFIG_REGION, dev, size, value)
            return
        super().config_write(offset, size, value)
        if offset <= COMMAND_OFFSET < offset + size:
            self._forward_write(p.PCI_CONFIG_REGION, COMMAND_OFFSET, 2,
                                self.command & PASSTHRU_COMMAND_BITS)

    # -- forwarding ---------------------------------------------------------------------------
    def _forward_read(self, region: int, offset: int, size: int) -> int:
        if not self.lost:
            try:
                v = int.from_bytes(self.backend.region_read(region, offset, size), "little")
                self.policy.observe_read(region, offset, size, v)
                return v
            except BackendLost as e:
                self._lose(e)
            except p.RemoteError as e:
                self.log.warning("%s: read of region %d at %#x: %s", self.name, region, offset, e)
                return (1 << 8 * size) - 1
        v = self.policy.read_while_lost(region, offset, size)
        if v is None and region == p.PCI_CONFIG_REGION:
            # Capability bodies as the device had them: a driver probing while the device is
            # away still finds its structure.
            return _u(self.device_config, offset, size)
        return (1 << 8 * size) - 1 if v is None else v

    def _forward_write(self, region: int, offset: int, size: int, value: int) -> None:
        self.policy.observe_write(region, offset, size, value)
        if self.lost:
            return
        try:
            self.backend.region_write(region, offset, value.to_bytes(size, "little"))
        except BackendLost as e:
            self._lose(e)
        except p.RemoteError as e:
            self.log.warning("%s: write of region %d at %#x: %s", self.name, region, offset, e)

    def bar_read(self, index: int, offset: int, size: int) -> int:
        v = self._forward_read(index, offset, size)
        self._intx_ack()
        return v

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        value &= (1 << 8 * size) - 1
        if self._ring_doorbell(index, offset, size, value):
            return
        self._forward_write(index, offset, size, value)
        self._intx_ack()

    def _ring_doorbell(self, index: int, offset: int, size: int, value: int) -> bool:
        """A write to one of the device's doorbells that reached us (the synthetic backend,
        where no KVM ioeventfd catches it) signals the doorbell's eventfd, as KVM would,
        instead of travelling over the socket."""
        for d in self._doorbells.get(index, ()):
            f = d.iofd
            if f.offset == offset and f.size in (0, size) and \
                    (f.datamatch is None or f.datamatch == value):
                self.policy.observe_write(index, offset, size, value)
                os.eventfd_write(f.fd, 1)
                return True
        return False

    def _intx_ack(self) -> None:
        """An access after INTx was raised: drop the line and let the device say again."""
        if self.intx_level and not self.lost:
            self.set_intx(0)
            try:
                self.backend.unmask_intx()
            except BackendLost as e:
                self._lose(e)
            except p.RemoteError:
                pass

    # -- interrupts ---------------------------------------------------------------------------
    def _msix_fds(self) -> list[int]:
        """(MSI-X lock held) What each vector is to signal: the guest's irqfd while its gate
        is open, else its relay."""
        relay = self._relay.msix_fds
        if not self._irqfd_handover:
            return list(relay)
        return [relay[v] if fd is None else fd for v, fd in enumerate(self._msix_irqfds)]

    def _msix_written(self) -> None:
        # Under the capability's lock, so gate_changed and this agree on what the device has
        # (the server answers SET_IRQS without calling back: no round trip can wait on us).
        with self.msix.lock:
            on = self.msix.enabled
            if on == self._msix_on:
                return
            self._msix_on = on
            lost = self._send_irqs(p.PCI_MSIX_IRQ, self._msix_fds() if on else [], lose=False)
        if lost is not None:
            self._lose(lost)

    def _rehand_msix(self) -> None:
        """After a reconnect: the MSI-X eventfds as they are now, under the capability's lock
        (the backend replays the other indices; a replay of MSI-X's could race a gate change
        and leave a masked vector on the guest's irqfd)."""
        if self.msix is None or self._relay is None:
            return
        with self.msix.lock:
            if self._msix_on:
                # A loss here is noticed again by the relay thread's liveness check.
                self._send_irqs(p.PCI_MSIX_IRQ, self._msix_fds(), lose=False)

    def gate_changed(self, vector: int, fd: int | None) -> None:
        """MsixGateListener, under the MSI-X lock: the vector's gate opened on the guest's
        irqfd `fd` (hand it to the device) or shut (hand the relay back, before the guest's
        change takes effect: the device's next signal goes through msix.notify())."""
        self._msix_irqfds[vector] = fd
        if not self._msix_on or self._relay is None or not self._irqfd_handover:
            return                         # handed over with the rest when MSI-X goes on
        target = self._relay.msix_fds[vector] if fd is None else fd
        try:
            self.backend.set_irq_eventfd(p.PCI_MSIX_IRQ, vector, target)
        except BackendLost:
            # Recorded for the reconnect; the relay thread's liveness check reports the loss
            # (not here, under the capability's lock).
            pass
        except p.RemoteError as e:
            # The device may have kept the irqfd of a vector the guest is masking (vfio-user),
            # or be left with no eventfd at all (kernel VFIO frees the old trigger first):
            # every vector back on its relay, and no more hand-overs for this function.
            self._irqfd_handover = False
            self.log.warning("%s: MSI-X vector %d eventfd refused (%s); its interrupts go "
                             "through the relay from now on", self.name, vector, e)
            try:
                self.backend.set_irq_eventfds(p.PCI_MSIX_IRQ, list(self._relay.msix_fds))
            except BackendLost:
                pass
            except p.RemoteError as e2:
                self.log.error("%s: the device refused its MSI-X eventfds: %s", self.name, e2)

    def _msi_written(self) -> None:
        on = self.msi.enabled
        if on != self._msi_on:
            self._msi_on = on
            self._send_irqs(p.PCI_MSI_IRQ, self._relay.msi_fds if on else [])

    def _send_irqs(self, index: int, fds: list[int], lose: bool = True) -> BackendLost | None:
        # While lost, the backend still records what a reconnect must hand the device.
        try:
            self.backend.set_irq_eventfds(index, fds)
        except BackendLost as e:
            if not lose:
                return e
            self._lose(e)
        except p.RemoteError as e:
            self.log.warning("%s: interrupt set-up refused: %s", self.name, e)
        return None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """(Runner) Guest RAM to the device, the relay thread, INTx's eventfd, doorbells."""
        m = self.pci_bus.machine
        self.backend.dma_map_all(m.memory)
        self._relay = _IrqRelay(self)
        if self.pin:
            self.backend.set_irq_eventfds(p.PCI_INTX_IRQ, self._relay.intx_fds)
        self._bind_doorbells()

    def _bind_doorbells(self) -> None:
        m = self.pci_bus.machine
        for i, h in self._bars.items():
            for d in self._doorbells.pop(i, []):
                d.close()
            bar = self.bars[i]
            bells = []
            for f in self.backend.region_io_fds(i):
                # Inside its BAR and of a size KVM matches, or not bound at all (its writes
                # stay trapped): a doorbell past the BAR would swallow writes meant for
                # whatever is mapped there.
                if f.size in IOEVENTFD_SIZES and 0 <= f.offset and f.offset + f.size <= bar.size:
                    bells.append(_Doorbell(m, f))
                else:
                    os.close(f.fd)
            self._doorbells[i] = bells
            for d in bells:
                d.move(bar.mapped_at)

    def bar_remapped(self, bar, address) -> None:
        for d in self._doorbells.get(bar.index, []):
            d.move(address)

    def _lose(self, why: Exception) -> None:
        with self._lost_lock:
            if self.lost and self._reconnector is not None and self._reconnector.is_alive():
                return
            first = not self.lost
            self.lost = True
            self._reconnected = False
        if first:
            self.log.error("%s: device lost (%s); failing its requests until it is back",
                      self.name, why)
            try:
                self.policy.lost()
            except Exception:
                self.log.exception("%s: failure policy", self.name)
        if self._relay is not None and self.pci_bus is not None:
            self._reconnect_wake.clear()
            self._reconnector = concurrency.DeviceThread(
                f"{self.name} reconnect", self._reconnect_loop,
                wake=self._reconnect_wake.set).start()

    def _reconnect_loop(self, thread: concurrency.DeviceThread) -> None:
        while not thread.stopping:
            if self.backend.reconnect():
                self._rehand_msix()
                with self._lost_lock:
                    self._reconnected = True
                self.log.warning("%s: device server back", self.name)
                if self.policy.may_resume():
                    self.resume()
                return
            self._reconnect_wake.wait(RECONNECT_INTERVAL)

    def resume(self) -> bool:
        """Forward to the device again, once it is reachable (the policy calls this when the
        driver has reset the device); False while it is not."""
        with self._lost_lock:
            if not self.lost or not self._reconnected:
                return not self.lost
        try:
            self._bind_doorbells()
            self.policy.recovered()       # (may write the driver's set-up to the device)
        except BackendLost as e:
            with self._lost_lock:
                self._reconnected = False
            self._lose(e)
            return False
        with self._lost_lock:
            self.lost = False
            self._reconnected = False
        return True

    def doorbell_fds(self) -> list[int]:
        """The device's doorbell eventfds (still signalled by KVM while the device is lost)."""
        return [d.iofd.fd for bells in self._doorbells.values() for d in bells]

    def doorbell_fd_at(self, space: str, addr: int, size: int, value: int) -> int:
        """The doorbell eventfd a guest's write at addr ("pio" or "mmio") rings, matched as
        KVM matches the ioeventfd _Doorbell.move binds (-1: none), for a driver written in C
        that kicks by writing it (benchmarks/rawloop.py). Valid until the doorbells are bound
        again (a lost device coming back), which closes it."""
        for bells in self._doorbells.values():
            for d in bells:
                f = d.iofd
                length = f.size if f.size in (1, 2, 4, 8) else 0
                if (d.addr == addr and f.pio == (space == "pio") and length in (0, size)
                        and (f.datamatch is None or f.datamatch == value)):
                    return f.fd
        return -1

    def close(self) -> None:
        if self._reconnector is not None:
            self._reconnector.stop()
        if self._relay is not None:
            self._relay.stop()
        self.policy.close()
        for bells in self._doorbells.values():
            for d in bells:
                try:
                    d.close()
                except Exception:
                    pass
        self._doorbells = {}
        self.backend.close()


class _IrqRelay:
    """Relay eventfds the device signals, turned into our emulated interrupts (one thread,
    owned by the function, stopped by its close())."""

    def __init__(self, fn: PassthruFunction):
        self.fn = fn
        mk = lambda: os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # noqa: E731
        self.msix_fds = [mk() for _ in range(fn.msix.vectors)] if fn.msix else []
        self.msi_fds = [mk()] if fn.msi else []
        self.intx_fds = [mk()] if fn.pin else []
        self.wake_fd = mk()
        self.msix_relayed = 0      # MSI-X signals that came this way (tests, diagnostics)
        self._what = {fd: ("msix", v) for v, fd in enumerate(self.msix_fds)}
        self._what.update({fd: ("msi", 0) for fd in self.msi_fds})
        self._what.update({fd: ("intx", 0) for fd in self.intx_fds})
        self.thread = concurrency.DeviceThread(f"{fn.name} irq relay", self._run,
                                               wake=self.wake).start()

    def wake(self) -> None:
        os.eventfd_write(self.wake_fd, 1)

    def _run(self, thread) -> None:
        poller = select.poll()
        for fd in (*self._what, self.wake_fd):
            poller.register(fd, select.POLLIN)
        fn = self.fn
        while not thread.stopping:
            ready = poller.poll(LIVENESS_INTERVAL_MS)
            if not fn.lost:
                # A device whose requests arrive by doorbell alone would never notice its
                # server dying: look at the connection now and then.
                try:
                    fn.backend.check_alive()
                except BackendLost as e:
                    fn._lose(e)
            for fd, _ in ready:
                try:
                    os.eventfd_read(fd)
                except (BlockingIOError, OSError):
                    continue
                kind, v = self._what.get(fd, (None, 0))
                if kind == "msix":
                    self.msix_relayed += 1
                    fn.msix.notify(v)
                elif kind == "msi":
                    fn.msi.notify(0)
                elif kind == "intx":
                    fn.set_intx(1)

    def stop(self) -> None:
        if self.thread.stop():
            for fd in (*self._what, self.wake_fd):
                os.close(fd)


def open_function(backend: DeviceBackend, where: str, name: str) -> PassthruFunction:
    """The PCI function over a backend just opened (either kind); the backend is closed if
    the function cannot be made, and a lost device is one ConfigError line."""
    try:
        return PassthruFunction(backend, name=name)
    except BackendLost as e:
        backend.close()
        raise ConfigError(f"{where}: {e}") from None
    except BaseException:
        backend.close()
        raise
