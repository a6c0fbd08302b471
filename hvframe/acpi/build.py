"""Lay the ACPI tables out for a guest-physical region and write them into guest memory.

Where: by default the 64 KiB at [0xE0000, 0xF0000), in the legacy BIOS area. The RSDP sits at
the start of that region (16-byte aligned), inside 0xE0000-0xFFFFF where an OS scans for it
when the boot protocol does not pass it; the other tables follow, each 64-byte aligned (the FACS
needs that). This is for direct kernel boot only: a boot ROM mapped over 0xE0000-0xFFFFF brings
its own tables. Mark [base, base + size) as E820 ACPI (type 3) in the guest's memory map; also
mark the ECAM window reserved so the OS trusts MCFG (see ``acpi_e820``).
"""
from __future__ import annotations

from ..memory import E820_ACPI, E820_RESERVED, FOUR_GIB, GuestMemory
from ..pci.windows import ECAM_BASE, ECAM_BUSES, MMIO32_WINDOW
from ..platform.acpi_pm import PM1A_CNT, PM1A_EVT, PM_TMR
from ..platform.reset_control import RESET_CONTROL_PORT as RESET_PORT
from . import tables as T

L = T.LAYOUTS      # the tables' compiled layouts
from .dsdt import build_dsdt_aml

ACPI_BASE = 0xE0000
ACPI_SIZE = 0x10000
LAPIC_ADDRESS = 0xFEE00000
IOAPIC_ADDRESS = 0xFEC00000
MMIO64_DEFAULT_SIZE = 1 << 35      # 32 GiB of 64-bit BAR space above RAM
RESET_VALUE = 0x06                 # to RESET_PORT (0xcf9): full reset, CPU reset
SCI_IRQ = 9
MADT_REVISION = 5
MCFG_REVISION = 1
DSDT_REVISION = 2      # 64-bit integers
XSDT_REVISION = 1
RSDT_REVISION = 1
ALIGN = 64


def _align(x: int, a: int = ALIGN) -> int:
    return (x + a - 1) & ~(a - 1)


def _io_gas(port: int, length: int) -> dict:
    access = {1: T.ACCESS_BYTE, 2: T.ACCESS_WORD, 4: T.ACCESS_DWORD}[min(length, 4)]
    return dict(space_id=T.GAS_SYSTEM_IO, bit_width=8 * length, bit_offset=0,
                access_size=access if port else 0, address=port)


_NO_GAS = dict(space_id=0, bit_width=0, bit_offset=0, access_size=0, address=0)


def build_fadt(*, facs: int, dsdt: int) -> bytes:
    return T.build_sdt(L.Fadt, dict(
        header=T.header("FACP", T.FADT_REVISION),
        firmware_ctrl=facs, dsdt=dsdt, reserved0=0, preferred_pm_profile=0,
        sci_int=SCI_IRQ, smi_cmd=0, acpi_enable=0, acpi_disable=0, s4bios_req=0, pstate_cnt=0,
        pm1a_evt_blk=PM1A_EVT, pm1b_evt_blk=0, pm1a_cnt_blk=PM1A_CNT, pm1b_cnt_blk=0,
        pm2_cnt_blk=0, pm_tmr_blk=PM_TMR, gpe0_blk=0, gpe1_blk=0,
        pm1_evt_len=4, pm1_cnt_len=2, pm2_cnt_len=0, pm_tmr_len=4, gpe0_blk_len=0,
        gpe1_blk_len=0, gpe1_base=0, cst_cnt=0,
        p_lvl2_lat=101, p_lvl3_lat=1001,          # > 100 / > 1000: C2 / C3 not supported
        flush_size=0, flush_stride=0, duty_offset=0, duty_width=0,
        day_alrm=0, mon_alrm=0, century=0x32,
        iapc_boot_arch=T.BOOT_ARCH_LEGACY_DEVICES | T.BOOT_ARCH_8042, reserved1=0,
        flags=(T.FADT_WBINVD | T.FADT_PROC_C1 | T.FADT_SLP_BUTTON | T.FADT_FIX_RTC
               | T.FADT_RESET_REG_SUP),
        reset_reg=_io_gas(RESET_PORT, 1), reset_value=RESET_VALUE,
        arm_boot_arch=0, fadt_minor_version=T.FADT_MINOR_VERSION,
        # X_FIRMWARE_CTRL must be zero when FIRMWARE_CTRL is set (ACPI 6.x table 5.9).
        x_firmware_ctrl=0, x_dsdt=dsdt,
        x_pm1a_evt_blk=_io_gas(PM1A_EVT, 4), x_pm1b_evt_blk=_NO_GAS,
        x_pm1a_cnt_blk=_io_gas(PM1A_CNT, 2), x_pm1b_cnt_blk=_NO_GAS,
        x_pm2_cnt_blk=_NO_GAS, x_pm_tmr_blk=_io_gas(PM_TMR, 4),
        x_gpe0_blk=_NO_GAS, x_gpe1_blk=_NO_GAS,
        sleep_control_reg=_NO_GAS, sleep_status_reg=_NO_GAS,
        hypervisor_vendor_identity=0,
    ))


def build_facs() -> bytes:
    return L.Facs.build(dict(hardware_signature=0, firmware_waking_vector=0, global_lock=0,
                             flags=0, x_firmware_waking_vector=0, version=T.FACS_VERSION,
                             ospm_flags=0))


def _madt_entry(kind: int, **body) -> dict:
    # The entry's length is a Rebuild in the declaration; a compiled layout is given it.
    return dict(type=kind, length=2 + L.MadtEntry.case(kind).sizeof(), body=body)


def build_madt(ncpus: int, ioapic_id: int | None = None) -> bytes:
    if not 1 <= ncpus <= 255:
        raise ValueError(f"ncpus must be 1..255 for xAPIC MADT entries, not {ncpus}")
    entries = [_madt_entry(T.MADT_LOCAL_APIC, processor_uid=i, apic_id=i, flags=T.LAPIC_ENABLED)
               for i in range(ncpus)]
    entries.append(_madt_entry(T.MADT_IO_APIC, io_apic_id=ncpus if ioapic_id is None else ioapic_id,
                               reserved=0, address=IOAPIC_ADDRESS, gsi_base=0))
    entries.append(_madt_entry(T.MADT_INT_SRC_OVERRIDE, bus=0, source=0, gsi=2,
                               flags=T.MPS_INTI_CONFORMING))
    entries.append(_madt_entry(T.MADT_INT_SRC_OVERRIDE, bus=0, source=SCI_IRQ, gsi=SCI_IRQ,
                               flags=T.MPS_INTI_ACTIVE_HIGH | T.MPS_INTI_LEVEL))
    entries.append(_madt_entry(T.MADT_LOCAL_APIC_NMI, processor_uid=0xFF,
                               flags=T.MPS_INTI_ACTIVE_HIGH | T.MPS_INTI_EDGE, lint=1))
    return T.build_sdt(L.Madt, dict(header=T.header("APIC", MADT_REVISION),
                                    local_apic_address=LAPIC_ADDRESS,
                                    flags=T.MADT_PCAT_COMPAT, entries=entries))


def build_mcfg(ecam_base: int = ECAM_BASE, buses: int = ECAM_BUSES) -> bytes:
    return T.build_sdt(L.Mcfg, dict(header=T.header("MCFG", MCFG_REVISION), allocations=[
        dict(base_address=ecam_base, segment=0, start_bus=0, end_bus=buses - 1)]))


def build_dsdt(**kwargs) -> bytes:
    return T.build_sdt(L.Dsdt, dict(header=T.header("DSDT", DSDT_REVISION),
                                    aml=build_dsdt_aml(**kwargs)))


def mmio64_window(highmem_end: int, size: int = MMIO64_DEFAULT_SIZE,
                  bars_end: int = 0) -> tuple[int, int]:
    """[start, end) of the 64-bit BAR window: from max(end of high RAM, 4 GiB), where
    hvframe.pci.bus places 64-bit BARs, for `size` bytes or up to bars_end if that is further."""
    start = max(highmem_end, FOUR_GIB)
    return start, max(start + size, bars_end)


def build_acpi(*, ncpus: int, base: int = ACPI_BASE, size: int = ACPI_SIZE,
               highmem_end: int = 0, mmio64: tuple[int, int] | None = None,
               ecam_base: int = ECAM_BASE, ecam_buses: int = ECAM_BUSES,
               lpc_slot: int = 31, com_ports=(1, 2), isa_devices=None) -> dict:
    """All tables laid out for guest-physical [base, base + size).

    Returns a dict: ``blob`` (bytes to write at base), ``rsdp`` (its address), ``tables``
    (signature -> (address, bytes); the RSDP under "RSDP"), ``e820`` (entries to add to the
    guest memory map).
    """
    if base % 16:
        raise ValueError("the ACPI region must be 16-byte aligned (RSDP alignment)")
    if mmio64 is None:
        mmio64 = mmio64_window(highmem_end)
    dsdt = build_dsdt(ncpus=ncpus, ecam_base=ecam_base, ecam_buses=ecam_buses,
                      mmio32=MMIO32_WINDOW, mmio64=mmio64, lpc_slot=lpc_slot,
                      com_ports=com_ports, isa_devices=isa_devices)
    facs = build_facs()
    madt = build_madt(ncpus)
    mcfg = build_mcfg(ecam_base, ecam_buses)

    # Addresses first (sizes of RSDT/XSDT/FADT do not depend on the addresses they hold).
    order = ["RSDP", "XSDT", "RSDT", "FACS", "FACP", "APIC", "MCFG", "DSDT"]
    sizes = {"RSDP": L.Rsdp.sizeof(), "XSDT": 36 + 8 * 3, "RSDT": 36 + 4 * 3, "FACS": len(facs),
             "FACP": L.Fadt.sizeof(), "APIC": len(madt), "MCFG": len(mcfg), "DSDT": len(dsdt)}
    addr, off = {}, 0
    for sig in order:
        off = _align(off)
        addr[sig] = base + off
        off += sizes[sig]
    if off > size:
        raise ValueError(f"ACPI tables need {off:#x} bytes, region has {size:#x}")
    if base + off > 1 << 32:
        raise ValueError("ACPI tables must lie below 4 GiB (32-bit pointers in RSDT/FADT)")

    pointed = [addr["FACP"], addr["APIC"], addr["MCFG"]]
    built = {
        "FACS": facs, "APIC": madt, "MCFG": mcfg, "DSDT": dsdt,
        "FACP": build_fadt(facs=addr["FACS"], dsdt=addr["DSDT"]),
        "XSDT": T.build_sdt(L.Xsdt, dict(header=T.header("XSDT", XSDT_REVISION), entries=pointed)),
        "RSDT": T.build_sdt(L.Rsdt, dict(header=T.header("RSDT", RSDT_REVISION), entries=pointed)),
        "RSDP": T.build_rsdp(addr["XSDT"], addr["RSDT"]),
    }
    blob = bytearray(off)
    for sig in order:
        assert len(built[sig]) == sizes[sig], sig
        o = addr[sig] - base
        blob[o:o + sizes[sig]] = built[sig]
    return dict(blob=bytes(blob), rsdp=addr["RSDP"], base=base, size=size,
                tables={sig: (addr[sig], built[sig]) for sig in order},
                e820=acpi_e820(base, size, ecam_base, ecam_buses))


def acpi_e820(base: int = ACPI_BASE, size: int = ACPI_SIZE, ecam_base: int = ECAM_BASE,
              ecam_buses: int = ECAM_BUSES) -> list[tuple[int, int, int]]:
    """E820 entries for the tables (ACPI reclaimable) and the ECAM window (reserved)."""
    return [(base, size, E820_ACPI), (ecam_base, ecam_buses << 20, E820_RESERVED)]


def merge_e820(entries, extra) -> list[tuple[int, int, int]]:
    """entries plus extra, sorted; parts of entries that extra overlaps are cut out of them."""
    out = []
    for a, length, kind in entries:
        pieces = [(a, a + length)]
        for ea, elen, _ in extra:
            nxt = []
            for s, e in pieces:
                if e <= ea or s >= ea + elen:
                    nxt.append((s, e))
                    continue
                if s < ea:
                    nxt.append((s, ea))
                if e > ea + elen:
                    nxt.append((ea + elen, e))
            pieces = nxt
        out += [(s, e - s, kind) for s, e in pieces]
    return sorted(out + list(extra))


def install_acpi(memory: GuestMemory, base: int = ACPI_BASE, ncpus: int = 1, **kwargs) -> int:
    """Build the tables for this guest's memory layout, write them at base (zeroing the rest
    of the region) and return the RSDP's guest-physical address."""
    info = build_acpi(ncpus=ncpus, base=base, highmem_end=memory.highmem_end, **kwargs)
    memory.fill(base, info["size"])
    memory.write(base, info["blob"])
    return info["rsdp"]


def _pci_layout(machine) -> tuple[list[int], int]:
    """Populated slots on bus 0 and the end of the highest 64-bit BAR above 4 GiB."""
    bus = machine.pci
    if bus is None:
        return [], 0
    slots, bars_end = set(), 0
    for (b, s, _f), fn in bus.functions.items():
        if b == 0:
            slots.add(s)
        for bar in fn.all_bars():
            if bar.mapped_at is not None and bar.mapped_at >= FOUR_GIB:
                bars_end = max(bars_end, bar.mapped_at + bar.size)
    return sorted(slots), bars_end


def install_direct_boot_tables(machine, *, acpi_base: int = ACPI_BASE, mptable: bool = True) -> dict:
    """ACPI tables and the MP table for a machine about to boot a kernel directly.

    Call after the PCI functions are added and their BARs assigned and before the kernel is
    loaded. Returns ``rsdp`` (for PVH start_info.rsdp_paddr / boot_params.acpi_rsdp_addr),
    ``mptable`` (address or None) and ``e820`` (machine.memory.e820() with the ACPI region
    and the ECAM window added: pass it to load_kernel(e820=...)).
    """
    from .mptable import MP_BASE, install_mptable
    memory = machine.memory
    ncpus = int(machine.cpus)
    slots, bars_end = _pci_layout(machine)
    window = mmio64_window(memory.highmem_end, bars_end=bars_end)
    # Describe what the devices say they are (the COM ports that exist, say).
    isa = [d for dev in machine.devices for d in dev.acpi_isa_devices()]
    info = build_acpi(ncpus=ncpus, base=acpi_base, mmio64=window, isa_devices=isa)
    memory.fill(acpi_base, info["size"])
    memory.write(acpi_base, info["blob"])
    mp = None
    if mptable:
        try:
            mp = install_mptable(memory, MP_BASE, ncpus, slots)
        except ValueError:        # many slots: use the BIOS area above the ACPI region
            mp = install_mptable(memory, 0xF0000, ncpus, slots)
    return dict(rsdp=info["rsdp"], mptable=mp, e820=merge_e820(memory.e820(), info["e820"]))
