"""The CPUID policy and topology, on a made-up supported set (no KVM needed)."""
from hvframe.cpuid import CpuidEntry, guest_cpuid

SUPPORTED = [
    CpuidEntry(0, 0, 0, 0x1F, 0x68747541, 0x444D4163, 0x69746E65),  # an AMD host
    CpuidEntry(1, 0, 0, 0xA0671, 0x00000800, (1 << 26) | (1 << 24) | (1 << 23) | (1 << 21), 0x0F8BFBFF),
    CpuidEntry(4, 0, 1, 0x4000121, 0, 0, 0),
    CpuidEntry(7, 0, 1, 0, (1 << 20) | (1 << 7) | (1 << 0), (1 << 2), 0),
    CpuidEntry(0xB, 0, 1, 0, 0, 0, 1),
    CpuidEntry(0xD, 0, 1, 7, 0x240, 0x240, 0),
]


def leaf(entries, fn, idx=0):
    return next(e for e in entries if e.function == fn and e.index == idx)


def test_apic_id_count_and_htt_per_vcpu():
    for i in range(4):
        e = leaf(guest_cpuid(SUPPORTED, i, 4, "host"), 1)
        assert e.ebx >> 24 == i and (e.ebx >> 16) & 0xFF == 4 and e.edx & (1 << 28)


def test_extended_topology_puts_all_vcpus_in_one_package():
    """Linux derives the package ID from leaf 0xB's core level: it must exist for every vCPU."""
    for i in range(3):
        t = guest_cpuid(SUPPORTED, i, 3, "host")
        smt, core, end = leaf(t, 0xB, 0), leaf(t, 0xB, 1), leaf(t, 0xB, 2)
        assert (smt.ecx >> 8) & 0xFF == 1 and smt.ebx == 1 and smt.eax == 0
        assert (core.ecx >> 8) & 0xFF == 2 and core.ebx == 3
        assert i >> core.eax == 0            # same package for every APIC ID
        assert (end.ecx >> 8) & 0xFF == 0    # invalid level ends the list
        assert all(e.edx == i for e in (smt, core, end))


def test_emulator_safe_policy_masks_features_and_claims_intel():
    t = guest_cpuid(SUPPORTED, 0, 1, "emulator-safe")
    zero = leaf(t, 0)
    assert (zero.ebx, zero.edx, zero.ecx) == (0x756E6547, 0x49656E69, 0x6C65746E)  # GenuineIntel
    one = leaf(t, 1)
    assert not one.ecx & (1 << 26) and not one.ecx & (1 << 23)   # no XSAVE, no POPCNT
    assert not one.ecx & (1 << 24)                               # no TSC-deadline timer
    assert one.ecx & (1 << 21)                                   # x2APIC kept
    seven = leaf(t, 7)
    assert seven.ebx == 0 and seven.ecx == 0                     # no SMAP/SMEP/FSGSBASE/UMIP
    assert not any(e.function == 0xD for e in t)                 # no XSAVE state leaf


def test_host_policy_passes_features_through():
    t = guest_cpuid(SUPPORTED, 0, 1, "host")
    assert leaf(t, 1).ecx & (1 << 26) and leaf(t, 7).ebx & (1 << 20)
