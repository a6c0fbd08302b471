"""What the control plane reads from a machine: vCPU registers (KVM_GET_REGS, SREGS,
DEBUGREGS, a few MSRs), exit counts per vCPU and per device range, PCI functions, disks.

Registers are read while the vCPUs are paused (the caller pauses them): a vCPU's fd answers
ioctls from any thread once its own thread is out of KVM_RUN.
"""
from __future__ import annotations

import fcntl
import struct

from ..core_native import lib

_KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (_KVMIO << 8) | nr


# struct kvm_debugregs: db[4], dr6, dr7, flags, reserved[9] (all u64): 128 bytes.
KVM_GET_DEBUGREGS = _ioc(2, 0xA1, 128)
# struct kvm_msrs is a u32 count and padding (8 bytes) followed by the entries.
KVM_GET_MSRS = _ioc(3, 0x88, 8)

MSRS = {"sysenter_cs": 0x174, "sysenter_esp": 0x175, "sysenter_eip": 0x176, "pat": 0x277,
        "apic_base": 0x1B, "fs_base": 0xC0000100, "gs_base": 0xC0000101,
        "kernel_gs_base": 0xC0000102}
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15", "rip", "rflags")
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


def _debugregs(fd: int) -> dict:
    buf = bytearray(128)
    try:
        fcntl.ioctl(fd, KVM_GET_DEBUGREGS, buf, True)
    except OSError:
        return {}
    db0, db1, db2, db3, dr6, dr7 = struct.unpack_from("<6Q", buf)
    return {"dr0": db0, "dr1": db1, "dr2": db2, "dr3": db3, "dr6": dr6, "dr7": dr7}


def _msrs(fd: int) -> dict:
    names = list(MSRS)
    buf = bytearray(8 + 16 * len(names))
    struct.pack_into("<II", buf, 0, len(names), 0)
    for i, n in enumerate(names):
        struct.pack_into("<IIQ", buf, 8 + 16 * i, MSRS[n], 0, 0)
    try:
        got = fcntl.ioctl(fd, KVM_GET_MSRS, buf, True)
    except OSError:
        return {}
    return {n: struct.unpack_from("<Q", buf, 8 + 16 * i + 8)[0]
            for i, n in enumerate(names) if i < got}


def access_rights(seg) -> int:
    """A segment's attributes in the VMX access-rights layout bhyvectl prints."""
    return (seg.type | seg.s << 4 | seg.dpl << 5 | seg.present << 7 | seg.avl << 12
            | seg.l << 13 | seg.db << 14 | seg.g << 15 | seg.unusable << 16)


def vcpu_registers(vcpu) -> dict:
    """One vCPU's state as plain numbers: GPRs, control, debug and segment registers, the
    descriptor tables and some MSRs."""
    r, s = vcpu.get_regs(), vcpu.get_sregs()
    out = {"cpu": vcpu.index}
    for n in GPRS:
        out[n] = getattr(r, n)
    for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
        out[n] = getattr(s, n)
    out.update(_debugregs(vcpu.fd))
    for n in SEGMENTS:
        seg = getattr(s, n)
        out[n] = {"selector": seg.selector, "base": seg.base, "limit": seg.limit,
                  "access": access_rights(seg)}
    for n in ("gdt", "idt"):
        t = getattr(s, n)
        out[n] = {"base": t.base, "limit": t.limit}
    out["msrs"] = _msrs(vcpu.fd)
    return out


def vcpu_exit_counts(vcpu) -> dict:
    c = vcpu.c
    return {"io": int(c.exits_io), "mmio": int(c.exits_mmio), "other": int(c.exits_other)}


def device_access_counts(machine) -> list[dict]:
    """Guest accesses (exits) per registered range, busiest first; ranges never touched are
    left out."""
    rows = []
    for space, bus in (("io", machine.pio), ("mmio", machine.mmio)):
        for r in bus.ranges():
            n = int(lib.hv_bus_hits(bus.c_bus, r.base))
            if n:
                rows.append({"device": r.name, "space": space, "base": r.base,
                             "length": r.length, "count": n})
    rows.sort(key=lambda d: -d["count"])
    return rows


def pci_functions(machine) -> list[dict]:
    """query-pci's view of the PCI bus (QEMU's PciDeviceInfo, the fields hvframe knows)."""
    bus = machine.pci
    if bus is None:
        return []
    devices = []
    for (b, s, f), fn in sorted(bus.functions.items()):
        cfg = fn.config
        regions = []
        for bar in list(fn.bars) + [fn.rom]:
            if bar is None:
                continue
            region = {"bar": bar.index, "type": "io" if bar.kind == "io" else "memory",
                      "address": bar.mapped_at if bar.mapped_at is not None else -1,
                      "size": bar.size}
            if bar.kind in ("mmio32", "mmio64"):
                region["prefetch"] = bool(bar.prefetchable)
                region["mem_type_64"] = bar.kind == "mmio64"
            regions.append(region)
        dev = {"bus": b, "slot": s, "function": f,
               "class_info": {"class": (cfg["class_code"] << 8) | cfg["subclass"]},
               "id": {"vendor": cfg["vendor_id"], "device": cfg["device_id"],
                      "subsystem-vendor": cfg["subsystem_vendor_id"],
                      "subsystem": cfg["subsystem_id"]},
               "qdev_id": fn.name, "regions": regions}
        if fn.pin:
            dev["irq"] = cfg["interrupt_line"]
            dev["irq_pin"] = fn.pin
        devices.append(dev)
    return [{"bus": 0, "devices": devices}] if devices else []
