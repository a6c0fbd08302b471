"""The CPUID a guest sees: KVM's supported set, shaped for topology and filtered by policy.

Policies (`-o cpu.policy=...`):
  host           everything KVM_GET_SUPPORTED_CPUID offers (real hardware KVM).
  emulator-safe  for nested KVM whose guest kernel mode is run by KVM's instruction emulator
                 (the `kvm_pvm` module, see shared/PLATFORM.md): vendor GenuineIntel (the AMD
                 paths of Linux use x87 instructions the emulator lacks), none of the
                 features whose instructions it cannot execute (XSAVE family, SMAP/SMEP/UMIP/
                 PKU, AVX*, BMI, POPCNT, MOVBE, AES, RDRAND, ...), and none of KVM's
                 hypercall-based paravirtual features.
  auto           emulator-safe where /sys/module/kvm_pvm exists, host elsewhere.
"""
from __future__ import annotations

import os

POLICIES = ("auto", "host", "emulator-safe")


class CpuidEntry:
    """One entry of KVM's CPUID table (struct kvm_cpuid_entry2), changed in place while the
    guest's table is made from the host's."""
    __slots__ = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")

    def __init__(self, function: int, index: int, flags: int, eax: int, ebx: int, ecx: int,
                 edx: int):
        self.function, self.index, self.flags = function, index, flags
        self.eax, self.ebx, self.ecx, self.edx = eax, ebx, ecx, edx

    def _values(self) -> tuple[int, ...]:
        return (self.function, self.index, self.flags, self.eax, self.ebx, self.ecx, self.edx)

    def copy(self) -> "CpuidEntry":
        return CpuidEntry(*self._values())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CpuidEntry):
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None     # changed in place

    def __repr__(self) -> str:
        return ("CpuidEntry(function={:#x}, index={}, flags={}, eax={:#x}, ebx={:#x}, ecx={:#x}, "
                "edx={:#x})".format(*self._values()))


def bits(*positions: int) -> int:
    v = 0
    for p in positions:
        v |= 1 << p
    return v


# (leaf, subleaf, register) -> bits to clear under emulator-safe.
EMULATOR_UNSAFE = {
    # leaf 1 ECX: PCLMULQDQ 1, FMA 12, PCID 17, MOVBE 22, POPCNT 23, TSC-deadline 24,
    # AES 25, XSAVE 26, OSXSAVE 27, AVX 28, F16C 29, RDRAND 30. TSC-deadline: Linux 6.1 with
    # the LAPIC timer in TSC-deadline mode stalled for good after "vgaarb: loaded" (where it
    # switches clocksource) in about half its boots here, in one-shot mode never; QEMU's
    # default CPU model does not offer it either.
    (1, 0, "ecx"): bits(1, 12, 17, 22, 23, 24, 25, 26, 27, 28, 29, 30),
    # leaf 7.0 EBX: FSGSBASE 0, BMI1 3, HLE 4, AVX2 5, SMEP 7, BMI2 8, ERMS 9, INVPCID 10,
    # RTM 11, AVX512F 16, AVX512DQ 17, RDSEED 18, ADX 19, SMAP 20, AVX512IFMA 21,
    # CLFLUSHOPT 23, CLWB 24, AVX512PF 26, AVX512ER 27, AVX512CD 28, SHA 29, AVX512BW 30,
    # AVX512VL 31
    (7, 0, "ebx"): bits(0, 3, 4, 5, 7, 8, 9, 10, 11, 16, 17, 18, 19, 20, 21, 23, 24, 26, 27,
                        28, 29, 30, 31),
    # leaf 7.0 ECX: AVX512VBMI 1, UMIP 2, PKU 3, OSPKE 4, WAITPKG 5, AVX512VBMI2 6,
    # GFNI 8, VAES 9, VPCLMULQDQ 10, AVX512VNNI 11, AVX512BITALG 12, AVX512VPOPCNTDQ 14,
    # RDPID 22, MOVDIRI 27, MOVDIR64B 28
    (7, 0, "ecx"): bits(1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 14, 22, 27, 28),
    # leaf 7.0 EDX: FSRM 4, AVX512 4VNNIW/4FMAPS 2-3, SERIALIZE 14, AMX 22/24/25
    (7, 0, "edx"): bits(2, 3, 4, 14, 22, 24, 25),
    # leaf 7.1 EAX: AVX-VNNI 4, AVX512_BF16 5, FZRM 10, FSRS 11, FSRC 12
    (7, 1, "eax"): bits(4, 5, 10, 11, 12),
    # leaf 0x80000001 ECX: ABM/LZCNT 5, SSE4A 6, XOP 11, FMA4 16, TBM 21
    (0x80000001, 0, "ecx"): bits(5, 6, 11, 16, 21),
    # KVM's paravirtual features that work by hypercall, which never returns on these hosts
    # (Linux with 2 vCPUs hung in kvm_hypercall4 from PV IPIs/spinlock kicks): PV_UNHALT 7,
    # PV_SEND_IPI 11, PV_SCHED_YIELD 13, HC_MAP_GPA_RANGE 16, MIGRATION_CONTROL 17.
    (0x40000001, 0, "eax"): bits(7, 11, 13, 16, 17),
}
# Leaves dropped entirely under emulator-safe: XSAVE state enumeration.
EMULATOR_UNSAFE_LEAVES = {0xD}

KVM_CPUID_FLAG_SIGNIFICANT_INDEX = 1
GENUINE_INTEL = (0x756E6547, 0x6C65746E, 0x49656E69)  # EBX, ECX, EDX of leaf 0


def resolve_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"cpu.policy must be one of {', '.join(POLICIES)}")
    if policy == "auto":
        return "emulator-safe" if os.path.exists("/sys/module/kvm_pvm") else "host"
    return policy


def guest_cpuid(supported: list[CpuidEntry], cpu_index: int, ncpus: int, policy: str) -> list[CpuidEntry]:
    """The entries for vCPU cpu_index (its APIC ID) of an ncpus machine."""
    policy = resolve_policy(policy)
    out: list[CpuidEntry] = []
    # One core per vCPU in one package; x2APIC ID shift covers ncpus.
    core_shift = max(0, (ncpus - 1).bit_length())
    for e in supported:
        e = e.copy()
        if policy == "emulator-safe":
            if e.function in EMULATOR_UNSAFE_LEAVES:
                continue
            for reg in ("eax", "ebx", "ecx", "edx"):
                mask = EMULATOR_UNSAFE.get((e.function, e.index, reg))
                if mask:
                    setattr(e, reg, getattr(e, reg) & ~mask)
            if e.function == 0:
                e.ebx, e.ecx, e.edx = GENUINE_INTEL
        if e.function == 1:
            # APIC ID, logical processor count, HTT so that the count is meaningful.
            e.ebx = (e.ebx & 0x0000FFFF) | (ncpus << 16) | (cpu_index << 24)
            e.edx |= 1 << 28
        elif e.function == 4:
            # Cores per package - 1 in EAX[31:26]; one thread per cache-sharing group.
            if e.eax & 0x1F:
                e.eax = (e.eax & 0x03FFFFFF) | ((ncpus - 1) << 26)
                e.eax &= ~(0xFFF << 14)
        elif e.function in (0xB, 0x1F):
            continue  # rebuilt below: KVM offers only subleaf 0
        out.append(e)
    # Extended topology: SMT level (one thread per core), core level spanning the package,
    # then the terminating invalid level. Without the core level, Linux puts every vCPU in a
    # package of its own.
    for leaf in sorted({e.function for e in supported} & {0xB, 0x1F}):
        out += [CpuidEntry(leaf, 0, KVM_CPUID_FLAG_SIGNIFICANT_INDEX, 0, 1, (1 << 8) | 0, cpu_index),
                CpuidEntry(leaf, 1, KVM_CPUID_FLAG_SIGNIFICANT_INDEX, core_shift, ncpus, (2 << 8) | 1, cpu_index),
                CpuidEntry(leaf, 2, KVM_CPUID_FLAG_SIGNIFICANT_INDEX, 0, 0, 2, cpu_index)]
    return out
