"""Message-signalled interrupts for PciFunction: the MSI and MSI-X capabilities.

Both are helpers a device builds in its __init__, before the function goes on a bus:

    self.msi = MsiCapability(self)                      # capability 0x05, one vector
    self.msix = MsixCapability(self, vectors=4, bar=1)  # capability 0x11, table + PBA in BAR1

and the device raises interrupts with `fn.interrupt(vector)` (PciFunction), which uses MSI-X
when the guest enabled it, else MSI, else asserts INTx; or with `cap.notify(vector)` directly.

Layouts follow PCI Local Bus Specification 3.0, section 6.8:

MSI (64-bit address, per-vector masking, a single vector):
    +2  Message Control: bit 0 enable (RW); bits 3:1 multiple message capable and 6:4
        multiple message enable (both 0: one vector, read-only); bit 7 64-bit capable;
        bit 8 per-vector masking capable
    +4  Message Address (bits 1:0 reserved)   +8  Message Upper Address
    +12 Message Data (16 bits)                 +16 Mask Bits   +20 Pending Bits (RO)

MSI-X:
    +2  Message Control: bits 10:0 table size - 1 (RO), bit 14 function mask, bit 15 enable
    +4  Table offset (bits 31:3) | Table BIR (bits 2:0)
    +8  PBA offset (bits 31:3) | PBA BIR (bits 2:0)
  Table entry n at table offset + 16n: address low, address high, data, vector control
  (bit 0 mask; set at reset). PBA: one pending bit per vector, in qwords, read-only.

A vector that fires while masked (per vector, or by the function mask) sets its pending bit
and is delivered, pending bit cleared, once it is unmasked.

Delivery goes through one irqfd per vector (Machine.add_msi_irqfd), made when the guest
first lets the vector fire: its route follows the guest's table and capability writes
(brought up to date whenever a write leaves the vector deliverable, i.e. enabled and
unmasked), so raising an unmasked vector from any thread is a state check and one eventfd
write, with no ioctl. Should no irqfd be available, PciFunction.send_msi (KVM_SIGNAL_MSI)
is used instead. An MSI-X vector's gate (the irqfd native code may write directly) opens
and shuts in one place, which tells the capability's gate_listener (MsixGateListener), a
shut before the guest's change that causes it takes effect. Table and PBA accesses of any
size, alignment or offset never raise: only aligned 4- and 8-byte accesses mean anything,
the rest read 0 and are ignored.
"""
from __future__ import annotations

from ..core_native import api_ffi as ffi
from ..errors import ConfigError, HvError
from .. import concurrency

# typing stays out of a run (hvframe.device says why); type checkers see the Protocol.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    from .device import PciFunction
else:
    Protocol = object

CAP_ID_MSI = 0x05
CAP_ID_MSIX = 0x11

# MSI Message Control bits.
MSI_ENABLE = 1 << 0
MSI_64BIT = 1 << 7
MSI_PER_VECTOR_MASK = 1 << 8
# MSI register offsets from the capability start.
MSI_CONTROL, MSI_ADDR_LO, MSI_ADDR_HI, MSI_DATA, MSI_MASK, MSI_PENDING = 2, 4, 8, 12, 16, 20
MSI_CAP_SIZE = 24

# MSI-X Message Control bits.
MSIX_TABLE_SIZE_MASK = 0x7FF
MSIX_FUNCTION_MASK = 1 << 14
MSIX_ENABLE = 1 << 15
MSIX_CONTROL, MSIX_TABLE, MSIX_PBA = 2, 4, 8
_MSIX_CTL_HI = (MSIX_ENABLE | MSIX_FUNCTION_MASK) >> 8   # both live in the control's high byte
_MSIX_ENABLED_HI = MSIX_ENABLE >> 8
MSIX_MAX_VECTORS = 2048
MSIX_ENTRY_SIZE = 16
# Table entry dwords.
ENTRY_ADDR_LO, ENTRY_ADDR_HI, ENTRY_DATA, ENTRY_CONTROL = 0, 1, 2, 3
ENTRY_MASKED = 1 << 0
PAGE = 4096


def _le(value: int, size: int) -> bytes:
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


_NO_IRQFD = object()   # irqfd creation failed: deliver through fn.send_msi


def _new_irqfd(fn: "PciFunction"):
    """An irqfd of fn's machine; None while fn is on no bus, _NO_IRQFD if none can be had."""
    bus = fn.pci_bus
    if bus is None:
        return None
    try:
        return bus.machine.add_msi_irqfd()
    except HvError:
        return _NO_IRQFD   # out of GSIs, say: KVM_SIGNAL_MSI still works


class MsixGateListener(Protocol):
    """Told when an MSI-X vector's gate opens or shuts (MsixCapability.gate_listener); a
    device whose interrupts are raised elsewhere (a passthrough server) hands that side the
    irqfd itself while the gate is open, and its own relay while it is shut."""

    def gate_changed(self, vector: int, fd: int | None) -> None:
        """(MSI-X lock held) The vector's gate is now open on irqfd eventfd `fd` (the route
        is the vector's message), or shut (None). A shut is told before the guest-visible
        change that causes it (mask, message, disable) takes effect: when this returns,
        whatever raised the vector through `fd` must be raising it through notify().
        (An irqfd itself goes away only in Machine.close, after every device's close().)"""


class MsiCapability:
    """The MSI capability of `fn`: one vector, 64-bit address, per-vector mask."""

    def __init__(self, fn: "PciFunction"):
        self.fn = fn
        self.lock = concurrency.lock(concurrency.MSI, f"{fn.name} msi", reentrant=True)
        control = MSI_64BIT | MSI_PER_VECTOR_MASK
        body = (_le(control, 2) + _le(0, 4) + _le(0, 4) + _le(0, 2) + _le(0, 2)
                + _le(0, 4) + _le(0, 4))
        wmask = (_le(MSI_ENABLE, 2) + _le(0xFFFFFFFC, 4) + _le(0xFFFFFFFF, 4) + _le(0xFFFF, 2)
                 + _le(0, 2) + _le(1, 4) + _le(0, 4))
        self.offset = fn.add_capability(CAP_ID_MSI, body, wmask)
        self._irqfd = None           # made when the guest first lets the vector fire
        self._fast = None            # the irqfd, while its route is known to be current
        # The gate native device code fires the vector through (hv_irq_gate), open exactly
        # when notify()'s lock-free path would fire the same irqfd.
        self._gate = ffi.new("struct hv_irq_gate *")
        self._gate.fd = -1
        self._control_byte = self.offset + MSI_CONTROL   # enable is bit 0
        self._mask_byte = self.offset + MSI_MASK
        fn.msi = self
        fn.watch_config(self.offset, MSI_CAP_SIZE, self._config_written)

    def _get(self, reg: int, size: int) -> int:
        return self.fn.config.get(self.offset + reg, size)

    @property
    def enabled(self) -> bool:
        return bool(self._get(MSI_CONTROL, 2) & MSI_ENABLE)

    @property
    def masked(self) -> bool:
        return bool(self._get(MSI_MASK, 4) & 1)

    @property
    def pending(self) -> bool:
        return bool(self._get(MSI_PENDING, 4) & 1)

    def message(self) -> tuple[int, int]:
        """(address, data) as the guest programmed them."""
        addr = self._get(MSI_ADDR_LO, 4) | self._get(MSI_ADDR_HI, 4) << 32
        return addr, self._get(MSI_DATA, 2)

    def _set_pending(self, on: bool) -> None:
        self.fn.config.put(self.offset + MSI_PENDING, 4, 1 if on else 0)

    def gate(self):
        """The vector's ``struct hv_irq_gate *`` for native device code: while open,
        writing its fd is notify(0); while shut, it must call notify()."""
        return self._gate

    def _refresh_gate(self) -> None:
        """(lock held) Open the gate exactly when notify()'s lock-free path would fire."""
        g, irq = self._gate, self._fast
        if irq is not None and irq.eventfd_delivery and irq.fd >= 0 and self.enabled \
                and not self.masked and self.fn.pci_bus is not None:
            g.fd = irq.fd
            g.open = 1
        else:
            g.open = 0

    def _sync_route(self):
        """(lock held, vector deliverable) The irqfd, routed to the current message."""
        irq = self._irqfd
        if irq is None:
            irq = self._irqfd = _new_irqfd(self.fn)
        if irq is not None and irq is not _NO_IRQFD:
            irq.set_message(*self.message())
            self._fast = irq
            if self._gate not in irq.gates:
                irq.gates.append(self._gate)
        self._refresh_gate()
        return irq

    def _deliver(self) -> None:
        """(lock held) Through the irqfd, its route brought up to date first; through
        send_msi when there is none (dropped while on no bus)."""
        irq = self._sync_route()
        if irq is None or irq is _NO_IRQFD or self.fn.pci_bus is None:
            self.fn.send_msi(*self.message())
        else:
            irq.fire()

    def notify(self, vector: int = 0) -> bool:
        """Fire the vector: delivered (True) when MSI is enabled and the vector unmasked;
        held pending when masked; dropped when MSI is disabled or the vector does not exist.
        Safe from any thread; enabled and unmasked with an irqfd, it is a look at two config
        bytes and one eventfd write, without the lock (see MsixCapability.notify)."""
        data = self.fn.config.data
        irq = self._fast
        if vector == 0 and irq is not None and \
                data[self._control_byte] & MSI_ENABLE and not data[self._mask_byte] & 1 and \
                self.fn.pci_bus is not None:
            irq.fire()
            return True
        with self.lock:
            if vector != 0 or not data[self._control_byte] & MSI_ENABLE:
                return False
            if data[self._mask_byte] & 1:
                self._set_pending(True)
                return False
            self._deliver()
            return True

    def _config_written(self) -> None:
        # The route follows address/data while the vector can fire; an unmask (or enable)
        # lets a pending message out.
        with self.lock:
            if self.enabled and not self.masked:
                self._sync_route()
                if self.pending:
                    self._set_pending(False)
                    self._deliver()
            else:
                # The message may change before the vector can fire again: until then (and
                # a sync) notify() takes the locked path.
                self._fast = None
                self._gate.open = 0


class MsixCapability:
    """The MSI-X capability of `fn`, with its table and PBA in BAR `bar`.

    By default the BAR is declared here (32-bit memory, large enough for table and PBA, at
    least 4 KiB) with this object as its handler. With add_bar=False the device declares the
    BAR itself and passes accesses inside [table_offset, ...) on to bar_read/bar_write."""

    def __init__(self, fn: "PciFunction", vectors: int, bar: int, *, table_offset: int = 0,
                 pba_offset: int | None = None, add_bar: bool = True,
                 bar_size: int | None = None):
        if not 1 <= vectors <= MSIX_MAX_VECTORS:
            raise ConfigError(f"{fn.name}: MSI-X needs 1-{MSIX_MAX_VECTORS} vectors")
        if not 0 <= bar <= 5:
            raise ConfigError(f"{fn.name}: MSI-X BAR index {bar} out of range")
        table_len = vectors * MSIX_ENTRY_SIZE
        pba_len = ((vectors + 63) // 64) * 8
        if pba_offset is None:
            pba_offset = (table_offset + table_len + PAGE - 1) & ~(PAGE - 1) \
                if table_len + pba_len > PAGE else table_offset + table_len
            pba_offset = (pba_offset + 7) & ~7
        if table_offset & 7 or pba_offset & 7:
            raise ConfigError(f"{fn.name}: MSI-X table and PBA offsets must be 8-byte aligned")
        if table_offset < pba_offset + pba_len and pba_offset < table_offset + table_len:
            raise ConfigError(f"{fn.name}: MSI-X table and PBA overlap")
        self.fn = fn
        self.vectors = vectors
        self.bar = bar
        self.table_offset, self.table_len = table_offset, table_len
        self.pba_offset, self.pba_len = pba_offset, pba_len
        self.lock = concurrency.lock(concurrency.MSI, f"{fn.name} msi-x", reentrant=True)
        # Per vector: [addr_lo, addr_hi, data, control]; every vector starts masked.
        self.entries = [[0, 0, 0, ENTRY_MASKED] for _ in range(vectors)]
        self.pending_bits = 0
        # Per vector: its irqfd, made when the guest first lets the vector fire; and the
        # same irqfd in _fast only while its route is known to be the entry's message (the
        # lock-free path of notify() uses only those).
        self._irqfds: list = [None] * vectors
        self._fast: list = [None] * vectors
        # Per vector: the gate native queue workers fire through (hv_irq_gate), open exactly
        # when the lock-free path of notify() would fire the same irqfd.
        self._gates = ffi.new("struct hv_irq_gate[]", vectors)
        for g in self._gates:
            g.fd = -1
        # Who is told when a gate opens or shuts (one, set by the device), what it was last
        # told per vector, and how many control-register writes are under way (gates stay
        # shut meanwhile: see before_control_write).
        self.gate_listener: MsixGateListener | None = None
        self._told: list[int | None] = [None] * vectors
        self._control_writes = 0
        if add_bar:
            end = max(table_offset + table_len, pba_offset + pba_len)
            size = bar_size or PAGE
            while size < end:
                size <<= 1
            fn.add_bar(bar, size, "mmio32", self)
        control = vectors - 1
        body = _le(control, 2) + _le(table_offset | bar, 4) + _le(pba_offset | bar, 4)
        wmask = _le(MSIX_ENABLE | MSIX_FUNCTION_MASK, 2) + _le(0, 4) + _le(0, 4)
        self.offset = fn.add_capability(CAP_ID_MSIX, body, wmask)
        self._control_hi = self.offset + MSIX_CONTROL + 1   # the byte with enable and mask
        fn.msix = self
        fn.watch_config(self.offset, 2 + len(body), self._config_written)

    # -- state ----------------------------------------------------------------------------
    @property
    def control(self) -> int:
        return self.fn.config.get(self.offset + MSIX_CONTROL, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & MSIX_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.control & MSIX_FUNCTION_MASK)

    def vector_masked(self, vector: int) -> bool:
        return bool(self.entries[vector][ENTRY_CONTROL] & ENTRY_MASKED)

    def is_pending(self, vector: int) -> bool:
        return bool(self.pending_bits >> vector & 1)

    def message(self, vector: int) -> tuple[int, int]:
        e = self.entries[vector]
        return e[ENTRY_ADDR_LO] | e[ENTRY_ADDR_HI] << 32, e[ENTRY_DATA]

    def irqfd(self, vector: int):
        """The vector's irqfd (hvframe.machine.MsiIrqFd), or None if it has none yet."""
        irq = self._irqfds[vector]
        return None if irq is _NO_IRQFD else irq

    def gate(self, vector: int):
        """The vector's ``struct hv_irq_gate *`` for native device threads: while open,
        writing its fd is notify(vector); while shut, they must call notify()."""
        return self._gates + vector if 0 <= vector < self.vectors else ffi.NULL

    def _refresh_gate(self, v: int) -> None:
        """(lock held) Open the vector's gate exactly when notify()'s lock-free path would
        fire its irqfd with the eventfd alone."""
        irq = self._fast[v]
        if irq is not None and irq.eventfd_delivery and irq.fd >= 0 and self._deliverable(v) \
                and self.fn.pci_bus is not None and not self._control_writes:
            self._set_gate(v, irq.fd)
        else:
            self._set_gate(v, None)

    def _set_gate(self, v: int, fd: int | None) -> None:
        """(lock held) The one place a vector's gate opens (on `fd`) or shuts (None): shut
        here first, then the listener told, so neither path raises a stale route."""
        g = self._gates[v]
        if fd is None:
            g.open = 0
        if self._told[v] != fd:
            self._told[v] = fd
            if self.gate_listener is not None:
                self.gate_listener.gate_changed(v, fd)
        if fd is not None:
            g.fd = fd
            g.open = 1

    def _refresh_gates(self) -> None:
        for v in range(self.vectors):
            self._refresh_gate(v)

    def control_changed_by(self, offset: int, size: int, value: int) -> bool:
        """Whether a config write at offset/size changes the enable or function-mask bit
        (a rewrite of the same bits leaves the gates, and a passthrough server, alone)."""
        hi = self.offset + MSIX_CONTROL + 1
        if not offset <= hi < offset + size:
            return False
        new = (value >> (8 * (hi - offset))) & 0xFF
        return bool((new ^ self.fn.config.data[hi]) & _MSIX_CTL_HI)

    def before_control_write(self) -> None:
        """(PciFunction.config_write, before the guest's write reaches the control register)
        Shut every gate, listeners told, and keep them shut until after_control_write: a
        disable or function mask must not find a vector still raised past notify()."""
        with self.lock:
            self._control_writes += 1
            for v in range(self.vectors):
                self._set_gate(v, None)

    def after_control_write(self) -> None:
        with self.lock:
            self._control_writes -= 1
            self._refresh_gates()

    # -- delivery -------------------------------------------------------------------------
    def notify(self, vector: int = 0) -> bool:
        """Fire `vector`: delivered (True) when MSI-X is enabled and neither the function nor
        the vector is masked; otherwise, if MSI-X is enabled, its pending bit is set. With
        MSI-X disabled, or for a vector past the table, nothing happens (False).
        Safe from any thread. An unmasked vector whose irqfd exists takes the fast path: a
        look at the control byte and the entry, then one eventfd write, without the lock (a
        guest masking or retargeting the vector meanwhile sees the message as in flight, as
        from real hardware). Everything else, pending bits above all, is decided under the
        lock, so a vector masked and then unmasked never loses an interrupt."""
        if 0 <= vector < self.vectors:
            irq = self._fast[vector]
            if irq is not None and \
                    self.fn.config.data[self._control_hi] & _MSIX_CTL_HI == _MSIX_ENABLED_HI and \
                    not self.entries[vector][ENTRY_CONTROL] & ENTRY_MASKED and \
                    self.fn.pci_bus is not None:
                irq.fire()
                return True
        with self.lock:
            if not 0 <= vector < self.vectors:
                return False
            ctl = self.fn.config.data[self._control_hi]
            if not ctl & (MSIX_ENABLE >> 8):
                return False
            if ctl & (MSIX_FUNCTION_MASK >> 8) or self.entries[vector][ENTRY_CONTROL] & ENTRY_MASKED:
                self.pending_bits |= 1 << vector
                return False
            self._deliver_slow(vector)
            return True

    def _deliverable(self, vector: int) -> bool:
        return self.enabled and not self.function_masked and not self.vector_masked(vector)

    def _sync_route(self, vector: int):
        """(lock held, vector deliverable) The vector's irqfd, routed to its entry."""
        irq = self._irqfds[vector]
        if irq is None:
            irq = self._irqfds[vector] = _new_irqfd(self.fn)
        if irq is not None and irq is not _NO_IRQFD:
            irq.set_message(*self.message(vector))
            self._fast[vector] = irq
            gate = self._gates + vector
            if gate not in irq.gates:
                irq.gates.append(gate)
        self._refresh_gate(vector)
        return irq

    def _deliver_slow(self, vector: int) -> None:
        """(lock held) Deliver through the irqfd after bringing its route up to date, or
        through send_msi when there is none (and drop while on no bus)."""
        irq = self._sync_route(vector)
        if irq is None or irq is _NO_IRQFD or self.fn.pci_bus is None:
            self.fn.send_msi(*self.message(vector))
        else:
            irq.fire()

    def _flush_pending(self) -> None:
        """Deliver every pending vector that is no longer masked (lock held)."""
        if not self.pending_bits or not self.enabled or self.function_masked:
            return
        for v in range(self.vectors):
            if self.pending_bits >> v & 1 and not self.vector_masked(v):
                self.pending_bits &= ~(1 << v)
                self._deliver_slow(v)

    def _config_written(self) -> None:
        with self.lock:
            if self.enabled and not self.function_masked and self.fn.pci_bus is not None:
                # Enabled or unmasked as a whole: every unmasked vector's route, in one
                # routing-table update.
                with self.fn.pci_bus.machine.msi_route_batch():
                    for v in range(self.vectors):
                        if not self.vector_masked(v):
                            self._sync_route(v)
            self._flush_pending()
            self._refresh_gates()

    # -- table and PBA (BAR accesses) -------------------------------------------------------
    def _dword_read(self, offset: int) -> int:
        t = offset - self.table_offset
        if 0 <= t < self.table_len:
            return self.entries[t // MSIX_ENTRY_SIZE][(t % MSIX_ENTRY_SIZE) // 4]
        p = offset - self.pba_offset
        if 0 <= p < self.pba_len:
            return (self.pending_bits >> (8 * p)) & 0xFFFFFFFF
        return 0

    def _dword_write(self, offset: int, value: int) -> None:
        t = offset - self.table_offset
        if not 0 <= t < self.table_len:
            return  # the PBA is read-only; anything else is not ours
        vector, reg = t // MSIX_ENTRY_SIZE, (t % MSIX_ENTRY_SIZE) // 4
        e = self.entries[vector]
        # Off the lock-free path until the route is the entry again (below, or when the
        # vector next becomes deliverable): an unmask must never fire a stale message.
        self._fast[vector] = None
        self._set_gate(vector, None)
        if reg == ENTRY_ADDR_LO:
            e[reg] = value & 0xFFFFFFFC
        elif reg == ENTRY_CONTROL:
            e[reg] = value & ENTRY_MASKED
        else:
            e[reg] = value & 0xFFFFFFFF
        # A vector that can fire has its route follow the entry (written masked, as drivers
        # do, the route is brought up to date by the unmask).
        if self._deliverable(vector):
            self._sync_route(vector)
            if reg == ENTRY_CONTROL:
                self._flush_pending()

    def bar_read(self, offset: int, size: int) -> int:
        with self.lock:
            if size == 4 and offset % 4 == 0:
                return self._dword_read(offset)
            if size == 8 and offset % 8 == 0:
                return self._dword_read(offset) | self._dword_read(offset + 4) << 32
            return 0

    def bar_write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if size == 4 and offset % 4 == 0:
                self._dword_write(offset, value)
            elif size == 8 and offset % 8 == 0:
                # Low dword first: a qword write of address+data never leaves a half message.
                self._dword_write(offset, value & 0xFFFFFFFF)
                self._dword_write(offset + 4, (value >> 32) & 0xFFFFFFFF)

    # The BAR handler interface when this object is the BAR's handler.
    read = bar_read
    write = bar_write
