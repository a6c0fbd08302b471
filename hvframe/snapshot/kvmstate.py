"""The in-kernel half of a machine's state, read and written with KVM's ioctls.

Per vCPU: KVM_GET/SET_REGS, SREGS, XSAVE (KVM_GET_FPU where KVM has no XSAVE), XCRS, every
MSR of KVM_GET_MSR_INDEX_LIST that reads back, MP_STATE, LAPIC, VCPU_EVENTS and DEBUGREGS.
Per VM: the two PICs and the IOAPIC (KVM_GET_IRQCHIP), the PIT (KVM_GET_PIT2) and the KVM
clock (KVM_GET_CLOCK). Each kernel structure is kept as its raw bytes (the x86-64 KVM ABI,
stable across kernels); the records around them are declared with construct below.

The vCPUs must be out of KVM_RUN (paused) while their state is read or written; their fds
answer ioctls from any thread then. Writes follow QEMU's order (kvm_arch_put_registers):
the LAPIC after the MSRs (APIC base) and MP state, the TSC deadline MSR again after the LAPIC
(it only sticks once the LAPIC timer is in TSC-deadline mode), events and debug registers last.
"""
from __future__ import annotations

import errno
import fcntl
import struct

from construct import Bytes, Int32ul, Int64ul, PrefixedArray, Prefixed, GreedyBytes, Struct

from ..core_native import lib
from ..errors import HvError

_KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    # direction: 1 write (_IOW), 2 read (_IOR), 3 both (_IOWR)
    return (direction << 30) | (size << 16) | (_KVMIO << 8) | nr


# Sizes of the kernel structures (x86-64), checked against <linux/kvm.h> by the tests.
SIZES = {"regs": 144, "sregs": 312, "fpu": 416, "lapic": 1024, "events": 64,
         "debugregs": 128, "xsave": 4096, "xcrs": 392, "irqchip": 520, "pit2": 112,
         "clock": 48}
IOCTLS = {
    "KVM_GET_REGS": _ioc(2, 0x81, 144), "KVM_SET_REGS": _ioc(1, 0x82, 144),
    "KVM_GET_SREGS": _ioc(2, 0x83, 312), "KVM_SET_SREGS": _ioc(1, 0x84, 312),
    "KVM_GET_FPU": _ioc(2, 0x8C, 416), "KVM_SET_FPU": _ioc(1, 0x8D, 416),
    "KVM_GET_LAPIC": _ioc(2, 0x8E, 1024), "KVM_SET_LAPIC": _ioc(1, 0x8F, 1024),
    "KVM_GET_MSRS": _ioc(3, 0x88, 8), "KVM_SET_MSRS": _ioc(1, 0x89, 8),
    "KVM_GET_MSR_INDEX_LIST": _ioc(3, 0x02, 4),
    "KVM_GET_MP_STATE": _ioc(2, 0x98, 4), "KVM_SET_MP_STATE": _ioc(1, 0x99, 4),
    "KVM_GET_VCPU_EVENTS": _ioc(2, 0x9F, 64), "KVM_SET_VCPU_EVENTS": _ioc(1, 0xA0, 64),
    "KVM_GET_DEBUGREGS": _ioc(2, 0xA1, 128), "KVM_SET_DEBUGREGS": _ioc(1, 0xA2, 128),
    "KVM_GET_XSAVE": _ioc(2, 0xA4, 4096), "KVM_SET_XSAVE": _ioc(1, 0xA5, 4096),
    "KVM_GET_XCRS": _ioc(2, 0xA6, 392), "KVM_SET_XCRS": _ioc(1, 0xA7, 392),
    # KVM_SET_IRQCHIP is declared _IOR in <linux/kvm.h>, whatever it does.
    "KVM_GET_IRQCHIP": _ioc(3, 0x62, 520), "KVM_SET_IRQCHIP": _ioc(2, 0x63, 520),
    "KVM_GET_PIT2": _ioc(2, 0x9F, 112), "KVM_SET_PIT2": _ioc(1, 0xA0, 112),
    "KVM_GET_CLOCK": _ioc(2, 0x7C, 48), "KVM_SET_CLOCK": _ioc(1, 0x7B, 48),
}
KVM_CAP_XSAVE, KVM_CAP_XCRS = 0x37, 0x38
MSR_IA32_TSC_DEADLINE = 0x6E0
# struct kvm_vcpu_events: flags at byte 20; what SET must be told is valid.
EVENTS_FLAGS_OFFSET = 20
VCPUEVENT_VALID_NMI_PENDING, VCPUEVENT_VALID_SIPI_VECTOR = 0x1, 0x2
IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE, IRQCHIP_IOAPIC = 0, 1, 2

MsrEntry = Struct("index" / Int32ul, "value" / Int64ul)

# One vCPU (record "vcpuN" of a snapshot). xsave is empty where KVM has no XSAVE (fpu then
# carries the FPU/SSE state), xcrs empty without XCRS.
VCPU_RECORD = Struct(
    "regs" / Bytes(SIZES["regs"]),
    "sregs" / Bytes(SIZES["sregs"]),
    "fpu" / Bytes(SIZES["fpu"]),
    "xsave" / Prefixed(Int32ul, GreedyBytes),
    "xcrs" / Prefixed(Int32ul, GreedyBytes),
    "msrs" / PrefixedArray(Int32ul, MsrEntry),
    "mp_state" / Int32ul,
    "lapic" / Bytes(SIZES["lapic"]),
    "events" / Bytes(SIZES["events"]),
    "debugregs" / Bytes(SIZES["debugregs"]),
)
VCPU_RECORD_VERSION = 1

# The VM's in-kernel devices (record "kvm-vm").
VM_RECORD = Struct(
    "pic_master" / Bytes(SIZES["irqchip"]),
    "pic_slave" / Bytes(SIZES["irqchip"]),
    "ioapic" / Bytes(SIZES["irqchip"]),
    "pit2" / Bytes(SIZES["pit2"]),
    "clock" / Bytes(SIZES["clock"]),
)
VM_RECORD_VERSION = 1


def _get(fd: int, name: str, size: int, what: str) -> bytes:
    buf = bytearray(size)
    try:
        fcntl.ioctl(fd, IOCTLS[name], buf, True)
    except OSError as e:
        raise HvError(f"{what}: {name} failed: {e.strerror}") from None
    return bytes(buf)


def _set(fd: int, name: str, data: bytes, what: str) -> None:
    buf = bytearray(data)
    try:
        fcntl.ioctl(fd, IOCTLS[name], buf, True)
    except OSError as e:
        raise HvError(f"{what}: {name} failed: {e.strerror}") from None


def _has(kvm_fd: int, cap: int) -> int:
    return max(0, lib.hv_ioctl_int(kvm_fd, lib.KVM_CHECK_EXTENSION, cap))


def msr_index_list(kvm_fd: int) -> list[int]:
    """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for a guest."""
    n = 0
    while True:
        buf = bytearray(4 + 4 * n)
        struct.pack_into("<I", buf, 0, n)
        try:
            fcntl.ioctl(kvm_fd, IOCTLS["KVM_GET_MSR_INDEX_LIST"], buf, True)
        except OSError as e:
            if e.errno == errno.E2BIG:
                n = struct.unpack_from("<I", buf)[0]
                continue
            raise HvError(f"KVM_GET_MSR_INDEX_LIST failed: {e.strerror}") from None
        count = struct.unpack_from("<I", buf)[0]
        return list(struct.unpack_from(f"<{count}I", buf, 4))


def _msr_call(fd: int, name: str, entries: list[tuple[int, int]]) -> tuple[int, list]:
    """One KVM_GET/SET_MSRS over entries; (how many were done, the entries read back)."""
    buf = bytearray(8 + 16 * len(entries))
    struct.pack_into("<II", buf, 0, len(entries), 0)
    for i, (index, value) in enumerate(entries):
        struct.pack_into("<IIQ", buf, 8 + 16 * i, index, 0, value)
    try:
        done = fcntl.ioctl(fd, IOCTLS[name], buf, True)
    except OSError as e:
        raise HvError(f"{name} failed: {e.strerror}") from None
    out = [struct.unpack_from("<IIQ", buf, 8 + 16 * i) for i in range(len(entries))]
    return done, [(i, v) for i, _, v in out]


def _read_msrs(fd: int, indices: list[int]) -> list[tuple[int, int]]:
    """Every MSR of `indices` that reads back (KVM stops a batch at the first it refuses:
    that one is skipped and the batch goes on after it)."""
    out: list[tuple[int, int]] = []
    rest = [(i, 0) for i in indices]
    while rest:
        done, got = _msr_call(fd, "KVM_GET_MSRS", rest)
        out.extend(got[:done])
        rest = rest[done + 1:]
    return out


def _write_msrs(fd: int, entries: list[tuple[int, int]]) -> list[int]:
    """Write what KVM accepts; returns the indices it refused (read-only ones, say)."""
    refused = []
    rest = list(entries)
    while rest:
        done, _ = _msr_call(fd, "KVM_SET_MSRS", rest)
        if done < len(rest):
            refused.append(rest[done][0])
        rest = rest[done + 1:]
    return refused


class KvmStateIo:
    """Reads and writes the kernel-held state of one KVM machine (hvframe.machine.Machine)."""

    def __init__(self, machine):
        self.machine = machine
        kvm_fd = machine._kvm.fd
        self.has_xsave = _has(kvm_fd, KVM_CAP_XSAVE) > 0
        self.has_xcrs = _has(kvm_fd, KVM_CAP_XCRS) > 0
        self.msr_indices = msr_index_list(kvm_fd)

    # -- vCPUs --------------------------------------------------------------------------------
    def save_vcpu(self, vcpu) -> bytes:
        fd, what = vcpu.fd, f"vCPU {vcpu.index}"
        rec = dict(
            regs=_get(fd, "KVM_GET_REGS", SIZES["regs"], what),
            sregs=_get(fd, "KVM_GET_SREGS", SIZES["sregs"], what),
            fpu=_get(fd, "KVM_GET_FPU", SIZES["fpu"], what),
            xsave=_get(fd, "KVM_GET_XSAVE", SIZES["xsave"], what) if self.has_xsave else b"",
            xcrs=_get(fd, "KVM_GET_XCRS", SIZES["xcrs"], what) if self.has_xcrs else b"",
            msrs=[dict(index=i, value=v) for i, v in _read_msrs(fd, self.msr_indices)],
            mp_state=struct.unpack("<I", _get(fd, "KVM_GET_MP_STATE", 4, what))[0],
            lapic=_get(fd, "KVM_GET_LAPIC", SIZES["lapic"], what),
            events=_get(fd, "KVM_GET_VCPU_EVENTS", SIZES["events"], what),
            debugregs=_get(fd, "KVM_GET_DEBUGREGS", SIZES["debugregs"], what),
        )
        return VCPU_RECORD.build(rec)

    def load_vcpu(self, vcpu, data: bytes) -> None:
        r = VCPU_RECORD.parse(data)
        fd, what = vcpu.fd, f"vCPU {vcpu.index}"
        _set(fd, "KVM_SET_REGS", r.regs, what)
        if r.xsave:
            if not self.has_xsave:
                raise HvError(f"{what}: the snapshot has XSAVE state and this host's KVM "
                              "cannot take it")
            _set(fd, "KVM_SET_XSAVE", r.xsave, what)
        else:
            _set(fd, "KVM_SET_FPU", r.fpu, what)
        if r.xcrs and self.has_xcrs:
            _set(fd, "KVM_SET_XCRS", r.xcrs, what)
        _set(fd, "KVM_SET_SREGS", r.sregs, what)
        msrs = [(m.index, m.value) for m in r.msrs]
        _write_msrs(fd, msrs)
        _set(fd, "KVM_SET_MP_STATE", struct.pack("<I", r.mp_state), what)
        _set(fd, "KVM_SET_LAPIC", r.lapic, what)
        deadline = [(i, v) for i, v in msrs if i == MSR_IA32_TSC_DEADLINE]
        if deadline:
            _write_msrs(fd, deadline)
        events = bytearray(r.events)
        flags = struct.unpack_from("<I", events, EVENTS_FLAGS_OFFSET)[0]
        struct.pack_into("<I", events, EVENTS_FLAGS_OFFSET,
                         flags | VCPUEVENT_VALID_NMI_PENDING | VCPUEVENT_VALID_SIPI_VECTOR)
        _set(fd, "KVM_SET_VCPU_EVENTS", bytes(events), what)
        _set(fd, "KVM_SET_DEBUGREGS", r.debugregs, what)

    # -- the VM's in-kernel devices ----------------------------------------------------------------
    def _irqchip(self, chip: int) -> bytes:
        buf = bytearray(SIZES["irqchip"])
        struct.pack_into("<I", buf, 0, chip)
        try:
            fcntl.ioctl(self.machine.vm.fd, IOCTLS["KVM_GET_IRQCHIP"], buf, True)
        except OSError as e:
            raise HvError(f"KVM_GET_IRQCHIP {chip} failed: {e.strerror}") from None
        return bytes(buf)

    def save_vm(self) -> bytes:
        fd = self.machine.vm.fd
        return VM_RECORD.build(dict(
            pic_master=self._irqchip(IRQCHIP_PIC_MASTER),
            pic_slave=self._irqchip(IRQCHIP_PIC_SLAVE),
            ioapic=self._irqchip(IRQCHIP_IOAPIC),
            pit2=_get(fd, "KVM_GET_PIT2", SIZES["pit2"], "VM"),
            clock=_get(fd, "KVM_GET_CLOCK", SIZES["clock"], "VM")))

    def load_vm(self, data: bytes) -> None:
        r = VM_RECORD.parse(data)
        fd = self.machine.vm.fd
        for name in ("pic_master", "pic_slave", "ioapic"):
            _set(fd, "KVM_SET_IRQCHIP", r[name], "VM")
        _set(fd, "KVM_SET_PIT2", r.pit2, "VM")
        # Only the clock value: the flags of GET (TSC_STABLE...) are not for SET.
        clock = bytearray(r.clock)
        struct.pack_into("<I", clock, 8, 0)
        _set(fd, "KVM_SET_CLOCK", bytes(clock), "VM")
