"""KVM backend: the VM, its memory slots, in-kernel irqchip and PIT, and vCPUs.

Everything is done through ioctls on cffi structures laid out by <linux/kvm.h>; the hot
loop itself is in the native core (hv_vcpu_run).
"""
from __future__ import annotations

import errno
import heapq
import os
import threading
from contextlib import contextmanager

from .core_native import ffi, lib
from .cpuid import CpuidEntry, guest_cpuid
from .errors import HvError
from .memory import HUGE_PAGE, GuestMemory
from . import concurrency

KVM_API_VERSION = 12
TSS_ADDR = 0xFFFBD000          # three pages KVM needs for real-mode emulation on VMX
IDENTITY_MAP_ADDR = 0xFFFBC000
BOOT_GDT_ADDR = 0x500          # flat GDT for direct kernel entry (0x0-0xfff is the VMM's)
BOOT_CS, BOOT_DS, BOOT_TSS = 0x10, 0x18, 0x20   # Linux boot protocol selectors
# GSIs 0-23 belong to the in-kernel irqchip (the IOAPIC's 24 pins, the PICs' 16 inputs);
# message-signalled routes get GSIs from here up.
FIRST_MSI_GSI = 24
IOAPIC_PINS = 24


def default_irqchip_routes() -> list[tuple[int, int, int]]:
    """(gsi, irqchip, pin) of the PC's ISA and PCI interrupt routing, as QEMU's pc machine
    sets it and as the MP table and MADT describe it: GSI 0 (the PIT) goes to IOAPIC pin 2
    (ISA IRQ0's override) and nothing else uses pin 2 or GSI 2 (the PICs' cascade); every
    other GSI n < 24 goes to IOAPIC pin n, and GSIs 0-15 also to the PICs (0-7 master, 8-15
    slave, pin n % 8). KVM's own default table (kvm_setup_default_irq_routing) sends GSI 0 to
    pin 0, where the guest does not look for its timer; and since KVM finds the GSI to tell of
    an IOAPIC EOI from the pin, a second route to pin 2 would keep the PIT from ever seeing
    its tick acknowledged (it stops reinjecting). Set at VM creation and at the head of every
    table after it (KVM_SET_GSI_ROUTING replaces the whole table)."""
    routes = []
    for gsi in range(IOAPIC_PINS):
        if gsi == 2:
            continue
        routes.append((gsi, lib.KVM_IRQCHIP_IOAPIC, 2 if gsi == 0 else gsi))
        if gsi < 16:
            routes.append((gsi, lib.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else lib.KVM_IRQCHIP_PIC_SLAVE,
                           gsi % 8))
    return routes


class KvmError(HvError):
    pass


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise KvmError(f"{what} failed: {os.strerror(-rc)}")
    return rc


def kvm_available() -> str | None:
    """None when /dev/kvm can be used, else the reason it cannot."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible (need rw permission)"
    return None


class Kvm:
    """The /dev/kvm system handle."""

    def __init__(self):
        why = kvm_available()
        if why:
            raise KvmError(why)
        self.fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        ver = lib.hv_ioctl_int(self.fd, lib.KVM_GET_API_VERSION, 0)
        if ver != KVM_API_VERSION:
            raise KvmError(f"unsupported KVM API version {ver}")
        self.vcpu_mmap_size = _check(lib.hv_ioctl_int(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0),
                                     "KVM_GET_VCPU_MMAP_SIZE")
        for cap, name in ((lib.KVM_CAP_IRQCHIP, "in-kernel irqchip"), (lib.KVM_CAP_PIT2, "PIT2"),
                          (lib.KVM_CAP_IMMEDIATE_EXIT, "immediate_exit")):
            if lib.hv_ioctl_int(self.fd, lib.KVM_CHECK_EXTENSION, cap) <= 0:
                raise KvmError(f"KVM lacks {name}")

    def max_vcpus(self) -> int:
        n = lib.hv_ioctl_int(self.fd, lib.KVM_CHECK_EXTENSION, lib.KVM_CAP_MAX_VCPUS)
        return n if n > 0 else max(1, lib.hv_ioctl_int(self.fd, lib.KVM_CHECK_EXTENSION, lib.KVM_CAP_NR_VCPUS))

    def supported_cpuid(self) -> list[CpuidEntry]:
        n = 128
        while True:
            buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + n * ffi.sizeof("struct kvm_cpuid_entry2"))
            c = ffi.cast("struct kvm_cpuid2 *", buf)
            c.nent = n
            rc = lib.hv_ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, c)
            if rc == -errno.E2BIG:
                n *= 2
                continue
            _check(rc, "KVM_GET_SUPPORTED_CPUID")
            return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                    for e in (c.entries[i] for i in range(c.nent))]

    def close(self):
        os.close(self.fd)


class KvmVm:
    def __init__(self, kvm: Kvm, memory: GuestMemory | None = None):
        """The VM and its VM-wide state (irqchip, PIT, the PC's GSI routes); with memory,
        its RAM too (else attach_memory() gives it, before any vCPU runs)."""
        self.kvm = kvm
        self.memory: GuestMemory | None = None
        self.fd = _check(lib.hv_ioctl_int(kvm.fd, lib.KVM_CREATE_VM, 0), "KVM_CREATE_VM")
        try:
            self._setup(kvm)
        except BaseException:
            os.close(self.fd)
            raise
        if memory is not None:
            self.attach_memory(memory)

    def _setup(self, kvm: Kvm) -> None:
        _check(lib.hv_ioctl_int(self.fd, lib.KVM_SET_TSS_ADDR, TSS_ADDR), "KVM_SET_TSS_ADDR")
        addr = ffi.new("uint64_t *", IDENTITY_MAP_ADDR)
        lib.hv_ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, addr)  # VMX only; harmless elsewhere
        _check(lib.hv_ioctl_int(self.fd, lib.KVM_CREATE_IRQCHIP, 0), "KVM_CREATE_IRQCHIP")
        pit = ffi.new("struct kvm_pit_config *")
        pit.flags = lib.KVM_PIT_SPEAKER_DUMMY
        _check(lib.hv_ioctl(self.fd, lib.KVM_CREATE_PIT2, pit), "KVM_CREATE_PIT2")
        self._pit_drop_lost_ticks(kvm)
        self._next_slot = 0
        # GSI routing: the irqchip's default routes plus one MSI route per allocated GSI.
        # Guest table writes (vCPU threads) and devices change routes concurrently; the lock
        # also keeps each KVM_SET_GSI_ROUTING in the order the tables were made.
        self._routes_lock = concurrency.lock(concurrency.KVM, "gsi routes", reentrant=True)
        self._msi_routes: dict[int, tuple[int, int] | None] = {}
        self._free_gsis: list[int] = []
        self._next_gsi = FIRST_MSI_GSI
        self._batch = 0
        self._routes_dirty = False
        self.route_commits = 0     # KVM_SET_GSI_ROUTING calls made (for tests)
        n = lib.hv_ioctl_int(kvm.fd, lib.KVM_CHECK_EXTENSION, lib.KVM_CAP_IRQ_ROUTING)
        self.max_gsi = n if n > 0 else 0   # GSIs (and table entries) KVM accepts
        self.has_irqfd = lib.hv_ioctl_int(self.fd, lib.KVM_CHECK_EXTENSION, lib.KVM_CAP_IRQFD) > 0
        self.has_coalesced_pio = lib.hv_ioctl_int(self.fd, lib.KVM_CHECK_EXTENSION,
                                                  lib.KVM_CAP_COALESCED_PIO) > 0
        self.coalesced = ffi.NULL      # the buffered-writes ring (attach_coalesced)
        if self.max_gsi:
            with self._routes_lock:
                self._commit_routes()      # the PC's routing from the start (the PIT on pin 2)

    def attach_memory(self, memory: GuestMemory) -> None:
        """Guest RAM's memory slots (once, before any vCPU runs)."""
        if self.memory is not None:
            raise KvmError("the VM has its guest RAM already")
        self.memory = memory
        self._host_base = int(ffi.cast("uintptr_t", ffi.from_buffer(memory.buffer)))
        for r in memory.regions:
            self.add_memory_slot(r.gpa, r.size, self._host_base + r.host_offset)

    def _pit_drop_lost_ticks(self, kvm: Kvm) -> None:
        """The PIT drops the ticks it could not deliver, as hardware does (QEMU's
        lost_tick_policy=discard). KVM's default reinjects each one once the guest has
        acknowledged the previous: a guest that falls behind -- an emulated kernel on a nested
        host, a descheduled vCPU -- then takes its backlog back to back, and while it does,
        every device interrupt on a vector below the timer's (0x30) waits: Linux's AHCI
        completions did for seconds and its 5 s IDENTIFY timeouts fired (jiffies advance with
        each reinjected tick). Guests keep time from the TSC, not by counting ticks."""
        if lib.hv_ioctl_int(kvm.fd, lib.KVM_CHECK_EXTENSION, lib.KVM_CAP_REINJECT_CONTROL) <= 0:
            return
        control = ffi.new("struct kvm_reinject_control *")      # pit_reinject = 0
        _check(lib.hv_ioctl(self.fd, lib.KVM_REINJECT_CONTROL, control), "KVM_REINJECT_CONTROL")

    def add_memory_slot(self, gpa: int, size: int, host_addr: int, readonly: bool = False) -> int:
        m = ffi.new("struct kvm_userspace_memory_region *")
        m.slot = self._next_slot
        m.flags = lib.KVM_MEM_READONLY if readonly else 0
        m.guest_phys_addr = gpa
        m.memory_size = size
        m.userspace_addr = host_addr
        _check(lib.hv_ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, m), "KVM_SET_USER_MEMORY_REGION")
        self._next_slot += 1
        return m.slot

    def irq_line(self, irq: int, level: int) -> None:
        lib.hv_irq_line(self.fd, irq, 1 if level else 0)

    def ioeventfd(self, addr: int, length: int, fd: int, *, pio: bool, datamatch: int | None = None,
                  assign: bool = True) -> None:
        """Make guest writes of `length` bytes to addr signal eventfd `fd` inside KVM, with no
        exit to user space (or undo that, assign=False)."""
        e = ffi.new("struct kvm_ioeventfd *")
        e.addr, e.len, e.fd = addr, length, fd
        e.flags = (lib.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | \
            (0 if assign else lib.KVM_IOEVENTFD_FLAG_DEASSIGN)
        if datamatch is not None:
            e.flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
            e.datamatch = datamatch
        _check(lib.hv_ioctl(self.fd, lib.KVM_IOEVENTFD, e), "KVM_IOEVENTFD")

    def attach_coalesced(self, vcpu_fd: int, pio_bus, mmio_bus) -> None:
        """Map the VM's ring of buffered writes (through any vCPU's fd), for the vCPUs to
        drain before their exits and for drain_coalesced()."""
        if self.has_coalesced_pio and self.coalesced == ffi.NULL:
            c = lib.hv_coalesced_new(vcpu_fd, pio_bus, mmio_bus)
            if c == ffi.NULL:
                raise KvmError("mapping the coalesced-writes ring failed")
            self.coalesced = c

    def coalesce(self, addr: int, length: int, *, pio: bool, assign: bool = True) -> None:
        """Have guest writes to [addr, addr + length) buffered in the ring instead of exiting
        (or stop that, assign=False; what is buffered stays there to be drained)."""
        z = ffi.new("struct kvm_coalesced_mmio_zone *")
        z.addr, z.size, z.pio = addr, length, 1 if pio else 0
        req = lib.KVM_REGISTER_COALESCED_MMIO if assign else lib.KVM_UNREGISTER_COALESCED_MMIO
        _check(lib.hv_ioctl(self.fd, req, z), "KVM_(UN)REGISTER_COALESCED_MMIO")

    def drain_coalesced(self) -> int:
        """Hand the buffered writes to their handlers; the caller holds no device lock."""
        return lib.hv_coalesced_drain(self.coalesced) if self.coalesced != ffi.NULL else 0

    def signal_msi(self, address: int, data: int) -> bool:
        """Deliver one MSI through the in-kernel LAPICs; False if KVM refused or nobody took it."""
        m = ffi.new("struct kvm_msi *")
        m.address_lo = address & 0xFFFFFFFF
        m.address_hi = address >> 32
        m.data = data & 0xFFFFFFFF
        return lib.hv_ioctl(self.fd, lib.KVM_SIGNAL_MSI, m) > 0

    # -- GSI routing and irqfds -------------------------------------------------------------
    def alloc_msi_gsi(self) -> int:
        """A GSI for one MSI route (no route until set_msi_route); KvmError when none is left."""
        with self._routes_lock:
            if self._free_gsis:
                gsi = heapq.heappop(self._free_gsis)
            else:
                n_default = len(default_irqchip_routes())
                if self._next_gsi >= self.max_gsi or \
                        n_default + len(self._msi_routes) + 1 > self.max_gsi:
                    raise KvmError(f"no GSI left for an MSI route (KVM allows {self.max_gsi})")
                gsi = self._next_gsi
                self._next_gsi += 1
            self._msi_routes[gsi] = None
            return gsi

    def free_msi_gsi(self, gsi: int) -> None:
        """Give a GSI back. Its route is dropped from the next table set; nothing signals it
        meanwhile once its irqfd is deassigned, so no table is set just for this."""
        with self._routes_lock:
            if self._msi_routes.pop(gsi, False) is not False:
                heapq.heappush(self._free_gsis, gsi)

    def set_msi_route(self, gsi: int, address: int | None, data: int = 0) -> None:
        """Route `gsi` to the MSI (address, data), or to nothing (address None)."""
        msg = None if address is None else (address & 0xFFFFFFFFFFFFFFFF, data & 0xFFFFFFFF)
        with self._routes_lock:
            if gsi not in self._msi_routes:
                raise KvmError(f"GSI {gsi} is not an allocated MSI GSI")
            if self._msi_routes[gsi] == msg:
                return
            self._msi_routes[gsi] = msg
            if self._batch:
                self._routes_dirty = True
            else:
                self._commit_routes()

    def msi_route(self, gsi: int) -> tuple[int, int] | None:
        with self._routes_lock:
            return self._msi_routes.get(gsi)

    @contextmanager
    def routing_batch(self):
        """Route changes made inside take effect together, with one KVM_SET_GSI_ROUTING at
        the end (other threads' route changes wait for it)."""
        with self._routes_lock:
            self._batch += 1
            try:
                yield
            finally:
                self._batch -= 1
                if not self._batch and self._routes_dirty:
                    self._commit_routes()

    def routing_table(self) -> list[tuple]:
        """The table hvframe last gave KVM: ("irqchip", gsi, chip, pin) and ("msi", gsi,
        address, data) tuples."""
        with self._routes_lock:
            return ([("irqchip", g, c, p) for g, c, p in default_irqchip_routes()] +
                    [("msi", g, m[0], m[1]) for g, m in sorted(self._msi_routes.items())
                     if m is not None])

    def _commit_routes(self) -> None:
        # (lock held) The whole table each time: KVM_SET_GSI_ROUTING replaces it.
        table = self.routing_table()
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_irq_routing")
                      + len(table) * ffi.sizeof("struct kvm_irq_routing_entry"))
        r = ffi.cast("struct kvm_irq_routing *", buf)
        r.nr = len(table)
        for i, (kind, gsi, a, b) in enumerate(table):
            e = r.entries[i]
            e.gsi = gsi
            if kind == "irqchip":
                e.type = lib.KVM_IRQ_ROUTING_IRQCHIP
                e.u.irqchip.irqchip, e.u.irqchip.pin = a, b
            else:
                e.type = lib.KVM_IRQ_ROUTING_MSI
                e.u.msi.address_lo, e.u.msi.address_hi = a & 0xFFFFFFFF, a >> 32
                e.u.msi.data = b
        self._routes_dirty = False
        self.route_commits += 1
        _check(lib.hv_ioctl(self.fd, lib.KVM_SET_GSI_ROUTING, r), "KVM_SET_GSI_ROUTING")

    def irqfd(self, fd: int, gsi: int, assign: bool = True) -> None:
        """Make writes to eventfd `fd` raise `gsi` inside KVM (or stop that, assign=False)."""
        a = ffi.new("struct kvm_irqfd *")
        a.fd, a.gsi = fd, gsi
        a.flags = 0 if assign else lib.KVM_IRQFD_FLAG_DEASSIGN
        _check(lib.hv_ioctl(self.fd, lib.KVM_IRQFD, a), "KVM_IRQFD")

    def close(self):
        if self.coalesced != ffi.NULL:
            lib.hv_coalesced_free(self.coalesced)
            self.coalesced = ffi.NULL
        os.close(self.fd)


class VmSetup:
    """/dev/kvm opened and the VM made (a KvmVm, with its guest RAM when its size is given)
    on a thread of its own, while the caller goes on importing and configuring: those
    ioctls take milliseconds (KVM waits out its SRCU grace periods), and so does the first
    touch of the RAM's first huge page, where the boot structures go (GuestMemory.prefault);
    none of it holds the GIL. `hvframe run` starts one before it loads the plugins and hands
    it to the first Machine, which take()s it; close() gives back one never taken. The
    thread belongs to whoever made this; take() and close() join it."""

    def __init__(self, memory_size: int | None = None):
        self._memory_size = memory_size
        self._kvm: Kvm | None = None
        self._vm: KvmVm | None = None
        self._memory: GuestMemory | None = None
        self._error: BaseException | None = None
        self._taken = False
        self._thread = threading.Thread(target=self._run, name="kvm-vm-setup", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        kvm = vm = None
        try:
            kvm = Kvm()
            vm = KvmVm(kvm)
        except BaseException as e:      # noqa: BLE001 - raised again by take()
            if kvm is not None:
                kvm.close()
            self._error = e
            return
        self._kvm, self._vm = kvm, vm
        if self._memory_size:
            memory = None
            try:
                memory = GuestMemory(self._memory_size)
                memory.prefault(0, min(memory.lowmem_end, HUGE_PAGE))
                vm.attach_memory(memory)
                self._memory = memory
            except Exception:       # noqa: BLE001 - the machine makes RAM (and says why not)
                if memory is not None:
                    memory.close()
                self._vm = None     # its slots may hold that RAM
                vm.close()

    def _join(self) -> bool:
        concurrency.may_block("the VM set-up thread")
        self._thread.join(concurrency.JOIN_DEADLINE)
        return not self._thread.is_alive()

    def take(self, memory_size: int | None = None, shared: bool = False
             ) -> tuple[Kvm, KvmVm | None, GuestMemory | None]:
        """The /dev/kvm handle, the VM (None if it could not be kept) and its guest RAM if it
        was made for memory_size (not shared), once; raises what setting up KVM raised."""
        if self._taken:
            raise KvmError("the VM set up ahead was taken already")
        # Taken only once the thread is done: a wait that times out or is interrupted leaves
        # what the thread makes to close(), which joins again.
        if not self._join():
            raise KvmError(f"setting up the VM took more than {concurrency.JOIN_DEADLINE:g} s")
        self._taken = True
        if self._error is not None:
            raise self._error
        vm, memory = self._vm, self._memory
        if memory is not None and (memory.size != memory_size or shared):
            vm.close()          # its memory slots are that RAM's: both go
            memory.close()
            vm = memory = None
        return self._kvm, vm, memory

    def close(self) -> None:
        """Give back the VM (and its RAM) if nobody took them."""
        if self._taken:
            return
        if not self._join():
            return          # still in KVM after the deadline: the process exit reclaims it
        self._taken = True
        if self._kvm is not None:
            if self._vm is not None:
                self._vm.close()
            if self._memory is not None:
                self._memory.close()
            self._kvm.close()


def _flat_segment(seg, selector: int, code: bool) -> None:
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = 0xB if code else 0x3   # execute/read or read/write, accessed
    seg.present = 1
    seg.dpl = 0
    seg.db = 1
    seg.s = 1
    seg.l = 0
    seg.g = 1
    seg.avl = 0
    seg.unusable = 0


def write_boot_gdt(memory: GuestMemory) -> None:
    """null, null, flat code (0x10), flat data (0x18), TSS (0x20), as the boot protocol wants."""
    gdt = [0, 0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF, 0x00008B0000000067]
    memory.write(BOOT_GDT_ADDR, b"".join(d.to_bytes(8, "little") for d in gdt))


class KvmVcpu:
    def __init__(self, vm: KvmVm, index: int, pio_bus, mmio_bus):
        self.vm = vm
        self.index = index
        self.fd = _check(lib.hv_ioctl_int(vm.fd, lib.KVM_CREATE_VCPU, index), "KVM_CREATE_VCPU")
        self.c = lib.hv_vcpu_new(self.fd, index, vm.kvm.vcpu_mmap_size, pio_bus, mmio_bus)
        if self.c == ffi.NULL:
            raise KvmError("mapping the vCPU run area failed")

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + len(entries) * ffi.sizeof("struct kvm_cpuid_entry2"))
        c = ffi.cast("struct kvm_cpuid2 *", buf)
        c.nent = len(entries)
        for i, e in enumerate(entries):
            d = c.entries[i]
            d.function, d.index, d.flags = e.function, e.index, e.flags
            d.eax, d.ebx, d.ecx, d.edx = e.eax, e.ebx, e.ecx, e.edx
        _check(lib.hv_ioctl(self.fd, lib.KVM_SET_CPUID2, c), "KVM_SET_CPUID2")

    def get_regs(self):
        r = ffi.new("struct kvm_regs *")
        _check(lib.hv_ioctl(self.fd, lib.KVM_GET_REGS, r), "KVM_GET_REGS")
        return r

    def set_regs(self, r) -> None:
        _check(lib.hv_ioctl(self.fd, lib.KVM_SET_REGS, r), "KVM_SET_REGS")

    def get_sregs(self):
        s = ffi.new("struct kvm_sregs *")
        _check(lib.hv_ioctl(self.fd, lib.KVM_GET_SREGS, s), "KVM_GET_SREGS")
        return s

    def set_sregs(self, s) -> None:
        _check(lib.hv_ioctl(self.fd, lib.KVM_SET_SREGS, s), "KVM_SET_SREGS")

    def enter_protected_mode(self, rip: int, regs: dict[str, int]) -> None:
        """32-bit flat protected mode, paging and interrupts off: PVH and the 32-bit boot protocol."""
        s = self.get_sregs()
        _flat_segment(s.cs, BOOT_CS, True)
        for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
            _flat_segment(seg, BOOT_DS, False)
        s.tr.base, s.tr.limit, s.tr.selector, s.tr.type = 0, 0x67, BOOT_TSS, 0xB
        s.tr.present, s.tr.s, s.tr.unusable = 1, 0, 0
        s.gdt.base, s.gdt.limit = BOOT_GDT_ADDR, 5 * 8 - 1
        s.idt.base, s.idt.limit = 0, 0
        s.cr0 = 0x11          # PE | ET; caches enabled
        s.cr3 = s.cr4 = 0
        s.efer = 0
        self.set_sregs(s)
        r = ffi.new("struct kvm_regs *")
        r.rflags = 0x2
        r.rip = rip
        for name, value in regs.items():
            setattr(r, name, value)
        self.set_regs(r)

    def translate(self, linear: int) -> int | None:
        t = ffi.new("struct kvm_translation *")
        t.linear_address = linear
        if lib.hv_ioctl(self.fd, lib.KVM_TRANSLATE, t) < 0 or not t.valid:
            return None
        return t.physical_address

    def describe_internal_error(self) -> str:
        """One paragraph for a KVM_EXIT_INTERNAL_ERROR: suberror, RIP and the instruction bytes."""
        c = self.c
        msg = f"KVM internal error on vCPU {self.index}: suberror {c.internal_suberror}"
        if c.internal_suberror == lib.KVM_INTERNAL_ERROR_EMULATION:
            msg += " (instruction emulation failed)"
        try:
            r, s = self.get_regs(), self.get_sregs()
            linear = (s.cs.base + r.rip) & 0xFFFFFFFFFFFFFFFF
            msg += f" at RIP {r.rip:#x} (CS base {s.cs.base:#x}, CR0 {s.cr0:#x})"
            insn = b""
            # kvm_run.emulation_failure: data[0] is flags (bit 0: bytes valid), then a u8
            # insn_size and up to 15 instruction bytes.
            if c.internal_suberror == lib.KVM_INTERNAL_ERROR_EMULATION and c.internal_ndata >= 2 \
                    and c.internal_data[0] & 1:
                raw = b"".join(int(c.internal_data[i]).to_bytes(8, "little")
                               for i in range(1, c.internal_ndata))
                insn = raw[1:1 + min(raw[0], 15)]
            if not insn:
                gpa = self.translate(linear)
                if gpa is not None and self.vm.memory.contains(gpa, 1):
                    n = 15
                    while n and not self.vm.memory.contains(gpa, n):
                        n -= 1
                    insn = self.vm.memory.read(gpa, n)
            if insn:
                msg += ", instruction bytes " + insn.hex(" ")
        except HvError as e:
            msg += f" (registers unavailable: {e})"
        if c.internal_ndata:
            msg += "; data " + " ".join(f"{c.internal_data[i]:#x}" for i in range(c.internal_ndata))
        return msg

    def close(self):
        if self.c != ffi.NULL:
            lib.hv_vcpu_free(self.c)
            self.c = ffi.NULL
        os.close(self.fd)


def setup_vcpus(vm: KvmVm, ncpus: int, pio_bus, mmio_bus, policy: str) -> list[KvmVcpu]:
    supported = vm.kvm.supported_cpuid()
    vcpus = []
    for i in range(ncpus):
        v = KvmVcpu(vm, i, pio_bus, mmio_bus)
        v.set_cpuid(guest_cpuid(supported, i, ncpus, policy))
        vm.attach_coalesced(v.fd, pio_bus, mmio_bus)
        v.c.coalesced = vm.coalesced           # before the vCPU first runs
        vcpus.append(v)
    return vcpus
