"""ACPI table layouts (ACPI 6.x chapter 5.2), declared with construct.

These declarations are the single source of truth: tables are built through them and tests
parse them back through them. Length and checksum fields are filled by ``build_sdt`` /
``build_rsdp`` (build once with zeros, then set the length and the byte that makes the sum
of the table zero).
"""
from __future__ import annotations

from ..packed import Declarations, Packed

OEM_ID = "HVFRME"
OEM_TABLE_ID = "HVFRAME"
OEM_REVISION = 1
CREATOR_ID = "HVFR"
CREATOR_REVISION = 1

# Generic Address Structure (5.2.3.2)
GAS_SYSTEM_MEMORY = 0
GAS_SYSTEM_IO = 1
ACCESS_UNDEFINED, ACCESS_BYTE, ACCESS_WORD, ACCESS_DWORD, ACCESS_QWORD = range(5)

RSDP_V1_LENGTH = 20
# FADT flags (5.2.9, table 5.10)
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4      # set: power button is a control-method device or absent
FADT_SLP_BUTTON = 1 << 5      # set: sleep button is a control-method device or absent
FADT_FIX_RTC = 1 << 6         # set: RTC wake status is not in the fixed register space
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
# IA-PC boot architecture flags
BOOT_ARCH_LEGACY_DEVICES = 1 << 0
BOOT_ARCH_8042 = 1 << 1
FADT_REVISION = 6
FADT_MINOR_VERSION = 0

FACS_VERSION = 2
# MADT (5.2.12)
MADT_PCAT_COMPAT = 1 << 0
MADT_LOCAL_APIC, MADT_IO_APIC, MADT_INT_SRC_OVERRIDE, MADT_NMI_SRC, MADT_LOCAL_APIC_NMI = range(5)
LAPIC_ENABLED = 1 << 0
# MPS INTI flags: polarity bits 1:0 (1 active high, 3 active low), trigger bits 3:2 (1 edge, 3 level)
MPS_INTI_CONFORMING = 0
MPS_INTI_ACTIVE_HIGH = 0x1
MPS_INTI_ACTIVE_LOW = 0x3
MPS_INTI_EDGE = 0x1 << 2
MPS_INTI_LEVEL = 0x3 << 2


def _declare():
    from construct import (Bytes, Const, GreedyBytes, GreedyRange, Int8ul, Int16ul, Int32ul,
                           Int64ul, PaddedString, Padding, Rebuild, Struct, Switch, this)

    SdtHeader = Struct(
        "signature" / PaddedString(4, "ascii"),
        "length" / Int32ul,
        "revision" / Int8ul,
        "checksum" / Int8ul,
        "oem_id" / PaddedString(6, "ascii"),
        "oem_table_id" / PaddedString(8, "ascii"),
        "oem_revision" / Int32ul,
        "creator_id" / PaddedString(4, "ascii"),
        "creator_revision" / Int32ul,
    )
    assert SdtHeader.sizeof() == 36

    Gas = Struct(
        "space_id" / Int8ul,
        "bit_width" / Int8ul,
        "bit_offset" / Int8ul,
        "access_size" / Int8ul,
        "address" / Int64ul,
    )
    assert Gas.sizeof() == 12

    Rsdp = Struct(
        "signature" / Const(b"RSD PTR "),
        "checksum" / Int8ul,            # over the first 20 bytes (the ACPI 1.0 structure)
        "oem_id" / PaddedString(6, "ascii"),
        "revision" / Int8ul,            # 2: ACPI 2.0 and later
        "rsdt_address" / Int32ul,
        "length" / Int32ul,             # 36
        "xsdt_address" / Int64ul,
        "extended_checksum" / Int8ul,   # over all 36 bytes
        Padding(3),
    )
    assert Rsdp.sizeof() == 36

    Rsdt = Struct("header" / SdtHeader, "entries" / GreedyRange(Int32ul))
    Xsdt = Struct("header" / SdtHeader, "entries" / GreedyRange(Int64ul))

    Fadt = Struct(
        "header" / SdtHeader,
        "firmware_ctrl" / Int32ul,
        "dsdt" / Int32ul,
        "reserved0" / Int8ul,
        "preferred_pm_profile" / Int8ul,
        "sci_int" / Int16ul,
        "smi_cmd" / Int32ul,
        "acpi_enable" / Int8ul,
        "acpi_disable" / Int8ul,
        "s4bios_req" / Int8ul,
        "pstate_cnt" / Int8ul,
        "pm1a_evt_blk" / Int32ul,
        "pm1b_evt_blk" / Int32ul,
        "pm1a_cnt_blk" / Int32ul,
        "pm1b_cnt_blk" / Int32ul,
        "pm2_cnt_blk" / Int32ul,
        "pm_tmr_blk" / Int32ul,
        "gpe0_blk" / Int32ul,
        "gpe1_blk" / Int32ul,
        "pm1_evt_len" / Int8ul,
        "pm1_cnt_len" / Int8ul,
        "pm2_cnt_len" / Int8ul,
        "pm_tmr_len" / Int8ul,
        "gpe0_blk_len" / Int8ul,
        "gpe1_blk_len" / Int8ul,
        "gpe1_base" / Int8ul,
        "cst_cnt" / Int8ul,
        "p_lvl2_lat" / Int16ul,
        "p_lvl3_lat" / Int16ul,
        "flush_size" / Int16ul,
        "flush_stride" / Int16ul,
        "duty_offset" / Int8ul,
        "duty_width" / Int8ul,
        "day_alrm" / Int8ul,
        "mon_alrm" / Int8ul,
        "century" / Int8ul,
        "iapc_boot_arch" / Int16ul,
        "reserved1" / Int8ul,
        "flags" / Int32ul,
        "reset_reg" / Gas,
        "reset_value" / Int8ul,
        "arm_boot_arch" / Int16ul,
        "fadt_minor_version" / Int8ul,
        "x_firmware_ctrl" / Int64ul,
        "x_dsdt" / Int64ul,
        "x_pm1a_evt_blk" / Gas,
        "x_pm1b_evt_blk" / Gas,
        "x_pm1a_cnt_blk" / Gas,
        "x_pm1b_cnt_blk" / Gas,
        "x_pm2_cnt_blk" / Gas,
        "x_pm_tmr_blk" / Gas,
        "x_gpe0_blk" / Gas,
        "x_gpe1_blk" / Gas,
        "sleep_control_reg" / Gas,
        "sleep_status_reg" / Gas,
        "hypervisor_vendor_identity" / Int64ul,
    )
    assert Fadt.sizeof() == 276

    Facs = Struct(
        "signature" / Const(b"FACS"),
        "length" / Const(64, Int32ul),
        "hardware_signature" / Int32ul,
        "firmware_waking_vector" / Int32ul,
        "global_lock" / Int32ul,
        "flags" / Int32ul,
        "x_firmware_waking_vector" / Int64ul,
        "version" / Int8ul,
        Padding(3),
        "ospm_flags" / Int32ul,
        Padding(24),
    )
    assert Facs.sizeof() == 64

    MadtBodies = {
        MADT_LOCAL_APIC: Struct("processor_uid" / Int8ul, "apic_id" / Int8ul, "flags" / Int32ul),
        MADT_IO_APIC: Struct("io_apic_id" / Int8ul, "reserved" / Int8ul, "address" / Int32ul,
                             "gsi_base" / Int32ul),
        MADT_INT_SRC_OVERRIDE: Struct("bus" / Int8ul, "source" / Int8ul, "gsi" / Int32ul,
                                      "flags" / Int16ul),
        MADT_LOCAL_APIC_NMI: Struct("processor_uid" / Int8ul, "flags" / Int16ul, "lint" / Int8ul),
    }

    MadtEntry = Struct(
        "type" / Int8ul,
        "length" / Rebuild(Int8ul, lambda ctx: 2 + MadtBodies[ctx.type].sizeof()),
        "body" / Switch(this.type, MadtBodies, default=Bytes(this.length - 2)),
    )

    Madt = Struct(
        "header" / SdtHeader,
        "local_apic_address" / Int32ul,
        "flags" / Int32ul,
        "entries" / GreedyRange(MadtEntry),
    )

    # MCFG (PCI Firmware Specification 3.x, section 4.1.2)
    McfgAllocation = Struct(
        "base_address" / Int64ul,
        "segment" / Int16ul,
        "start_bus" / Int8ul,
        "end_bus" / Int8ul,
        Padding(4),
    )
    Mcfg = Struct(
        "header" / SdtHeader,
        Padding(8),
        "allocations" / GreedyRange(McfgAllocation),
    )

    # DSDT: a header and a definition block of AML
    Dsdt = Struct("header" / SdtHeader, "aml" / GreedyBytes)
    return locals()


LAYOUTS = Declarations(__name__, __file__, _declare)
__getattr__ = LAYOUTS.module_getattr


def checksum_fix(data: bytes) -> int:
    """The byte that makes the 8-bit sum of data (with that byte at 0) zero."""
    return (-sum(data)) & 0xFF


def header(signature: str, revision: int) -> dict:
    return dict(signature=signature, length=0, revision=revision, checksum=0, oem_id=OEM_ID,
                oem_table_id=OEM_TABLE_ID, oem_revision=OEM_REVISION, creator_id=CREATOR_ID,
                creator_revision=CREATOR_REVISION)


def _patch(raw: bytearray, at: int, value: int, size: int) -> None:
    raw[at:at + size] = value.to_bytes(size, "little")


# Where build_sdt and build_rsdp patch the built bytes (from the declarations above): each
# table is built once with length and checksums 0, and those fields are filled in place;
# building it again with the values in would give the same bytes at three times the cost.
_SDT_LENGTH = LAYOUTS.SdtHeader.fields["length"]
_SDT_CHECKSUM = LAYOUTS.SdtHeader.fields["checksum"][0]
_RSDP_CHECKSUM = LAYOUTS.Rsdp.fields["checksum"][0]
_RSDP_EXTENDED_CHECKSUM = LAYOUTS.Rsdp.fields["extended_checksum"][0]


def build_sdt(struct: Packed, obj: dict) -> bytes:
    """Build a System Description Table whose first field is "header" (SdtHeader), setting
    header.length to the built size and header.checksum so the whole table sums to zero."""
    obj = dict(obj)
    obj["header"] = dict(obj["header"], length=0, checksum=0)
    raw = bytearray(struct.build(obj))
    _patch(raw, _SDT_LENGTH[0], len(raw), _SDT_LENGTH[1])
    raw[_SDT_CHECKSUM] = checksum_fix(raw)
    return bytes(raw)


def build_rsdp(xsdt_address: int, rsdt_address: int = 0) -> bytes:
    obj = dict(checksum=0, oem_id=OEM_ID, revision=2, rsdt_address=rsdt_address,
               length=LAYOUTS.Rsdp.sizeof(), xsdt_address=xsdt_address, extended_checksum=0)
    raw = bytearray(LAYOUTS.Rsdp.build(obj))
    raw[_RSDP_CHECKSUM] = checksum_fix(raw[:RSDP_V1_LENGTH])
    raw[_RSDP_EXTENDED_CHECKSUM] = checksum_fix(raw)
    return bytes(raw)
