"""ACPI tables: checksums, contents parsed back through the construct declarations, the AML
encoder, installation into guest memory, and a round trip through iasl (acpica-tools)."""
import shutil
import subprocess

import pytest

from hvframe.acpi import aml
from hvframe.acpi import tables as T
from hvframe.acpi.build import (ACPI_BASE, ACPI_SIZE, ECAM_BASE, acpi_e820, build_acpi,
                                install_acpi, merge_e820)
from hvframe.memory import E820_ACPI, E820_RAM, E820_RESERVED, GuestMemory, MiB

SDT_SIGS = ["XSDT", "RSDT", "FACP", "APIC", "MCFG", "DSDT"]
PARSERS = {"XSDT": T.Xsdt, "RSDT": T.Rsdt, "FACP": T.Fadt, "APIC": T.Madt, "MCFG": T.Mcfg,
           "DSDT": T.Dsdt}


@pytest.fixture(scope="module", params=[1, 2, 4])
def info(request):
    return build_acpi(ncpus=request.param, highmem_end=0)


def table(info, sig):
    return info["tables"][sig][1]


def test_sdt_checksums_and_lengths(info):
    for sig in SDT_SIGS:
        raw = table(info, sig)
        assert sum(raw) % 256 == 0, sig
        hdr = T.SdtHeader.parse(raw)
        assert hdr.signature == sig and hdr.length == len(raw)
        assert hdr.oem_id == T.OEM_ID


def test_rsdp(info):
    raw = table(info, "RSDP")
    assert len(raw) == 36 and raw[:8] == b"RSD PTR "
    assert sum(raw[:20]) % 256 == 0
    assert sum(raw) % 256 == 0
    rsdp = T.Rsdp.parse(raw)
    assert rsdp.revision == 2 and rsdp.length == 36
    assert rsdp.xsdt_address == info["tables"]["XSDT"][0]
    assert rsdp.rsdt_address == info["tables"]["RSDT"][0]
    assert info["rsdp"] == ACPI_BASE and info["rsdp"] % 16 == 0


def test_tables_are_what_the_declarations_build_from_their_fields(info):
    # build_sdt and build_rsdp build once and patch length and checksums in place: the bytes
    # must be exactly what construct builds with those values given.
    for sig in SDT_SIGS:
        raw = table(info, sig)
        assert PARSERS[sig].build(PARSERS[sig].parse(raw)) == raw, sig
    raw = table(info, "RSDP")
    assert T.Rsdp.build(T.Rsdp.parse(raw)) == raw


def test_layout_inside_region(info):
    for sig, (addr, raw) in info["tables"].items():
        assert ACPI_BASE <= addr and addr + len(raw) <= ACPI_BASE + ACPI_SIZE, sig
        assert info["blob"][addr - ACPI_BASE:addr - ACPI_BASE + len(raw)] == raw
    assert info["tables"]["FACS"][0] % 64 == 0


def test_xsdt_and_rsdt_point_at_tables(info):
    addrs = {a: sig for sig, (a, _) in info["tables"].items()}
    for sig in ("XSDT", "RSDT"):
        entries = PARSERS[sig].parse(table(info, sig)).entries
        assert sorted(addrs[e] for e in entries) == ["APIC", "FACP", "MCFG"]


def test_fadt(info):
    f = T.Fadt.parse(table(info, "FACP"))
    assert len(table(info, "FACP")) == 276 and f.header.revision == 6
    assert (f.pm1a_evt_blk, f.pm1a_cnt_blk, f.pm_tmr_blk) == (0x400, 0x404, 0x408)
    assert (f.pm1_evt_len, f.pm1_cnt_len, f.pm_tmr_len) == (4, 2, 4)
    assert f.sci_int == 9
    assert not f.flags & T.FADT_HW_REDUCED_ACPI
    assert f.flags & T.FADT_RESET_REG_SUP
    assert f.reset_reg.space_id == T.GAS_SYSTEM_IO and f.reset_reg.address == 0xCF9
    assert f.reset_reg.bit_width == 8 and f.reset_value == 6
    assert f.iapc_boot_arch == T.BOOT_ARCH_LEGACY_DEVICES | T.BOOT_ARCH_8042
    assert f.x_pm1a_evt_blk.address == 0x400 and f.x_pm1a_evt_blk.bit_width == 32
    assert f.x_pm1a_cnt_blk.address == 0x404 and f.x_pm1a_cnt_blk.bit_width == 16
    assert f.x_pm_tmr_blk.address == 0x408 and f.x_pm_tmr_blk.bit_width == 32
    dsdt_addr = info["tables"]["DSDT"][0]
    facs_addr = info["tables"]["FACS"][0]
    assert f.dsdt == f.x_dsdt == dsdt_addr
    assert f.firmware_ctrl == facs_addr and f.x_firmware_ctrl == 0
    facs = T.Facs.parse(table(info, "FACS"))
    assert facs.version == T.FACS_VERSION and len(table(info, "FACS")) == 64


def test_madt(info):
    m = T.Madt.parse(table(info, "APIC"))
    assert m.local_apic_address == 0xFEE00000 and m.flags & T.MADT_PCAT_COMPAT
    lapics = [e for e in m.entries if e.type == T.MADT_LOCAL_APIC]
    ncpus = len(lapics)
    assert ncpus in (1, 2, 4)
    assert [e.body.apic_id for e in lapics] == list(range(ncpus))
    assert all(e.body.flags & T.LAPIC_ENABLED and e.length == 8 for e in lapics)
    ioapics = [e for e in m.entries if e.type == T.MADT_IO_APIC]
    assert len(ioapics) == 1
    io = ioapics[0].body
    assert (io.io_apic_id, io.address, io.gsi_base) == (ncpus, 0xFEC00000, 0)
    isos = {e.body.source: e.body for e in m.entries if e.type == T.MADT_INT_SRC_OVERRIDE}
    assert isos[0].gsi == 2
    assert isos[9].gsi == 9 and isos[9].flags == T.MPS_INTI_ACTIVE_HIGH | T.MPS_INTI_LEVEL
    nmis = [e.body for e in m.entries if e.type == T.MADT_LOCAL_APIC_NMI]
    assert len(nmis) == 1 and nmis[0].lint == 1 and nmis[0].processor_uid == 0xFF


def test_madt_counts_match_request():
    for n in (1, 3, 8):
        m = T.Madt.parse(build_acpi(ncpus=n)["tables"]["APIC"][1])
        assert sum(e.type == T.MADT_LOCAL_APIC and e.body.flags & 1 for e in m.entries) == n


def test_mcfg(info):
    m = T.Mcfg.parse(table(info, "MCFG"))
    assert len(m.allocations) == 1
    a = m.allocations[0]
    assert (a.base_address, a.segment, a.start_bus, a.end_bus) == (ECAM_BASE, 0, 0, 255)


def test_dsdt_contents(info):
    body = T.Dsdt.parse(table(info, "DSDT")).aml
    for needle in (b"PCI0", aml.eisaid("PNP0A03")[1:], b"_PRT", aml.eisaid("PNP0501")[1:],
                   aml.eisaid("PNP0B00")[1:], b"_S5_", b"_CRS"):
        assert needle in body, needle


def test_mmio64_window_follows_high_ram():
    hi = build_acpi(ncpus=1, highmem_end=(4 << 30) + (3 << 30))
    lo = build_acpi(ncpus=1, highmem_end=0)
    q_hi = aml.qword_memory(7 << 30, (7 << 30) + (1 << 35) - 1)
    q_lo = aml.qword_memory(4 << 30, (4 << 30) + (1 << 35) - 1)
    assert q_hi in hi["tables"]["DSDT"][1] and q_lo in lo["tables"]["DSDT"][1]


# -- the AML encoder --------------------------------------------------------------------------
def test_aml_integers_smallest_encoding():
    assert aml.integer(0) == b"\x00" and aml.integer(1) == b"\x01"
    assert aml.integer(2) == b"\x0a\x02" and aml.integer(0xFF) == b"\x0a\xff"
    assert aml.integer(0x100) == b"\x0b\x00\x01"
    assert aml.integer(0x10000) == b"\x0c\x00\x00\x01\x00"
    assert aml.integer(1 << 32) == b"\x0e" + (1 << 32).to_bytes(8, "little")
    assert aml.integer((1 << 64) - 1) == b"\xff"
    with pytest.raises(aml.AmlError):
        aml.integer(-1)


def test_aml_pkg_length():
    assert aml.pkg_length(0) == b"\x01" and aml.pkg_length(62) == b"\x3f"
    assert aml.pkg_length(63) == bytes([0x40 | (65 & 0xF), 65 >> 4])
    n = 5000
    enc = aml.pkg_length(n)
    total = n + len(enc)
    assert enc[0] >> 6 == len(enc) - 1
    assert (enc[0] & 0xF) | sum(b << (4 + 8 * i) for i, b in enumerate(enc[1:])) == total


def test_aml_names_strings_eisaid():
    assert aml.namestring("\\_SB.PCI0") == b"\\\x2e_SB_PCI0"
    assert aml.namestring("\\_SB.PCI0.ISA") == b"\\\x2f\x03_SB_PCI0ISA_"
    assert aml.namestring("^COM1") == b"^COM1"
    assert aml.string("ACPI0007") == b"\x0dACPI0007\x00"
    assert aml.eisaid("PNP0A03") == b"\x0c\x41\xd0\x0a\x03"
    assert aml.eisaid("PNP0501") == b"\x0c\x41\xd0\x05\x01"
    with pytest.raises(aml.AmlError):
        aml.nameseg("TOOLONG")


def test_aml_resource_template_end_tag():
    rt = aml.resource_template(aml.io(0x3F8, 0x3F8, 1, 8), aml.irq_noflags(4))
    assert rt[0] == aml.BUFFER_OP
    assert rt.endswith(b"\x79\x00")
    # BufferOp, PkgLength (1 byte), BufferSize 13 (ByteConst: 2 bytes), then the descriptors
    assert rt[2:4] == b"\x0a\x0d" and len(rt) == 4 + 13
    assert aml.IoDescriptor.parse(rt[4:]).min == 0x3F8
    assert aml.IrqNoFlagsDescriptor.parse(rt[12:]).mask == 1 << 4


# -- installation and e820 --------------------------------------------------------------------
def test_install_acpi_into_guest_memory():
    mem = GuestMemory(16 * MiB)
    try:
        rsdp = install_acpi(mem, ACPI_BASE, ncpus=2)
        assert rsdp == ACPI_BASE and mem.read(rsdp, 8) == b"RSD PTR "
        r = T.Rsdp.parse(mem.read(rsdp, 36))
        xsdt = T.Xsdt.parse(mem.read(r.xsdt_address, mem.read_u32(r.xsdt_address + 4)))
        sigs = {mem.read(a, 4) for a in xsdt.entries}
        assert sigs == {b"FACP", b"APIC", b"MCFG"}
        fadt_addr = [a for a in xsdt.entries if mem.read(a, 4) == b"FACP"][0]
        f = T.Fadt.parse(mem.read(fadt_addr, 276))
        assert mem.read(f.x_dsdt, 4) == b"DSDT" and mem.read(f.firmware_ctrl, 4) == b"FACS"
    finally:
        mem.close()


def test_e820_merge():
    mem = GuestMemory(16 * MiB)
    try:
        e820 = merge_e820(mem.e820(), acpi_e820())
    finally:
        mem.close()
    assert (ACPI_BASE, ACPI_SIZE, E820_ACPI) in e820
    assert (ECAM_BASE, 256 * MiB, E820_RESERVED) in e820
    assert e820 == sorted(e820)
    for (a, la, _), (b, _, _) in zip(e820, e820[1:]):
        assert a + la <= b
    assert merge_e820([(0, 0x100000, E820_RAM)], [(0xE0000, 0x10000, E820_ACPI)]) == [
        (0, 0xE0000, E820_RAM), (0xE0000, 0x10000, E820_ACPI), (0xF0000, 0x10000, E820_RAM)]


# -- iasl round trip ------------------------------------------------------------------------
IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(IASL is None, reason="iasl not installed "
                                "(apt-get install acpica-tools)")


def _iasl(args, cwd):
    p = subprocess.run([IASL] + args, cwd=cwd, capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout + p.stderr


@needs_iasl
@pytest.mark.parametrize("sig", ["XSDT", "RSDT", "FACP", "FACS", "APIC", "MCFG", "DSDT"])
def test_iasl_disassembles(tmp_path, sig):
    info = build_acpi(ncpus=2)
    name = sig.lower()
    (tmp_path / f"{name}.dat").write_bytes(info["tables"][sig][1])
    rc, out = _iasl(["-d", f"{name}.dat"], tmp_path)
    dsl = (tmp_path / f"{name}.dsl").read_text()
    assert rc == 0, out
    assert "Error" not in out and "Error" not in dsl, out
    if sig == "DSDT":
        for needle in ("PNP0A03", "_PRT", "PNP0501", "PNP0B00", "_S5_", "WordBusNumber",
                       "QWordMemory", "DWordIO"):
            assert needle in dsl, needle
    # and the disassembly compiles back without errors
    rc, out = _iasl([f"{name}.dsl"], tmp_path)
    assert rc == 0 and " 0 Errors" in out, out


ACPIEXEC = shutil.which("acpiexec")


@pytest.mark.skipif(ACPIEXEC is None, reason="acpiexec not installed (apt-get install acpica-tools)")
def test_acpiexec_loads_and_evaluates(tmp_path):
    """ACPICA's own interpreter loads FADT, FACS, MADT, MCFG and the DSDT and evaluates the
    objects an OS reads at boot."""
    info = build_acpi(ncpus=2)
    files = []
    for sig in ("FACP", "FACS", "APIC", "MCFG", "DSDT"):
        f = tmp_path / f"{sig.lower()}.dat"
        f.write_bytes(info["tables"][sig][1])
        files.append(str(f))
    cmds = "; ".join(f"evaluate {p}" for p in (
        "\\_SB.PCI0._PRT", "\\_SB.PCI0._CRS", "\\_SB.PCI0.ISA.COM1._CRS",
        "\\_SB.PCI0.ISA.COM1._STA", "\\_SB.PCI0.ISA.RTC._CRS", "\\_SB.MRES._CRS", "\\_S5"))
    p = subprocess.run([ACPIEXEC, "-b", cmds] + files, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    for bad in ("Error", "Exception", "Warning", "could not"):
        assert bad.lower() not in out.lower(), out
    assert out.count("returned object") == 7, out


def test_install_direct_boot_tables_on_a_machine_like_object():
    from types import SimpleNamespace

    from hvframe.acpi.build import install_direct_boot_tables
    from hvframe.acpi.mptable import MP_BASE, MpFloatingPointer
    from hvframe.device import AcpiIsaDevice
    bar = SimpleNamespace(kind="mmio64", size=1 << 36, mapped_at=1 << 36)
    fn = SimpleNamespace(all_bars=lambda: [bar])
    mem = GuestMemory(16 * MiB)
    try:
        com1 = AcpiIsaDevice("COM1", "PNP0501", 1, 0x3F8, 8, 4)
        uart = SimpleNamespace(acpi_isa_devices=lambda: (com1,))
        m = SimpleNamespace(memory=mem, cpus=2, devices=[uart],
                            pci=SimpleNamespace(functions={(0, 0, 0): fn, (0, 3, 0): fn}))
        out = install_direct_boot_tables(m)
        assert out["rsdp"] == ACPI_BASE and mem.read(ACPI_BASE, 8) == b"RSD PTR "
        assert out["mptable"] == MP_BASE and mem.read(MP_BASE, 4) == b"_MP_"
        assert MpFloatingPointer.parse(mem.read(MP_BASE, 16)).physptr == MP_BASE + 16
        assert (ACPI_BASE, ACPI_SIZE, E820_ACPI) in out["e820"]
        # the 64-bit window reaches past the highest 64-bit BAR
        xsdt_addr = T.Rsdp.parse(mem.read(ACPI_BASE, 36)).xsdt_address
        xsdt = T.Xsdt.parse(mem.read(xsdt_addr, mem.read_u32(xsdt_addr + 4)))
        fadt = [T.Fadt.parse(mem.read(a, 276)) for a in xsdt.entries if mem.read(a, 4) == b"FACP"][0]
        dsdt = T.Dsdt.parse(mem.read(fadt.x_dsdt, mem.read_u32(fadt.x_dsdt + 4))).aml
        assert aml.qword_memory(1 << 32, (1 << 37) - 1) in dsdt
        assert b"COM1" in dsdt and b"COM2" not in dsdt      # only the UART the devices declare
    finally:
        mem.close()
