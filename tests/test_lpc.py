"""The LPC bridge and legacy devices through the synthetic machine: RTC/CMOS, i8042,
fw_cfg (ports and DMA), the boot ROM and the LPC bridge's PCI identity."""
import calendar
import struct
import time

import pytest

from hvframe.lpc import bootrom, bridge, fw_cfg, i8042, rtc
from hvframe.plugins import Registry
from hvframe.testing import SyntheticMachine, rig

MiB, GiB = 1 << 20, 1 << 30


def cmos(m, reg):
    m.io_write(0x70, 1, reg)
    return m.io_read(0x71, 1)


# -- RTC / CMOS --------------------------------------------------------------------------------

@pytest.mark.parametrize("size, ext, above16, high", [
    (16 * MiB, 15 * 1024, 0, 0),
    (32 * MiB, 31 * 1024, (32 - 16) * 16, 0),
    (128 * MiB, 0xFFFF, (128 - 16) * 16, 0),
    (2 * GiB, 0xFFFF, (2048 - 16) * 16, 0),
    (3 * GiB, 0xFFFF, (3072 - 16) * 16, 0),
    (5 * GiB, 0xFFFF, (3072 - 16) * 16, 2 * GiB // (64 << 10)),
])
def test_cmos_memory_bytes(size, ext, above16, high):
    m = SyntheticMachine(memory_size=size, cpus=2)
    rtc.Rtc(m)
    assert cmos(m, 0x15) | cmos(m, 0x16) << 8 == 640
    assert cmos(m, 0x17) | cmos(m, 0x18) << 8 == ext
    assert cmos(m, 0x30) | cmos(m, 0x31) << 8 == ext
    assert cmos(m, 0x34) | cmos(m, 0x35) << 8 == above16
    assert cmos(m, 0x5B) | cmos(m, 0x5C) << 8 | cmos(m, 0x5D) << 16 == high
    assert cmos(m, 0x5F) == 1
    s = sum(cmos(m, r) for r in range(0x10, 0x2E))
    assert cmos(m, 0x2E) << 8 | cmos(m, 0x2F) == s


def test_cmos_nmi_bit_masked_and_ram_bytes_writable():
    m = SyntheticMachine()
    dev = rtc.Rtc(m)
    m.io_write(0x70, 1, 0x80 | 0x0D)         # NMI disable + status D
    assert m.io_read(0x71, 1) == 0x80        # valid RAM
    assert dev.nmi_disabled
    m.io_write(0x70, 1, 0x40)
    m.io_write(0x71, 1, 0x5A)
    assert cmos(m, 0x40) == 0x5A
    assert cmos(m, 0x0A) & 0x80 == 0         # never update-in-progress


def _fixed_rtc(t):
    m = SyntheticMachine()
    dev = rtc.Rtc(m, clock=lambda: t)
    return m, dev


def test_rtc_bcd_and_binary_time():
    t = 1700000000 + 0.5                     # 2023-11-14 22:13:20 UTC, a Tuesday
    m, _ = _fixed_rtc(t)
    assert cmos(m, 0x0B) & 0x06 == 0x02      # BCD, 24-hour by default
    assert [cmos(m, r) for r in (0, 2, 4, 6, 7, 8, 9, 0x32)] == \
        [0x20, 0x13, 0x22, 0x03, 0x14, 0x11, 0x23, 0x20]
    m.io_write(0x70, 1, 0x0B)
    m.io_write(0x71, 1, 0x06)                # binary, 24 h
    assert [cmos(m, r) for r in (0, 2, 4, 7, 8, 9)] == [20, 13, 22, 14, 11, 23]
    m.io_write(0x70, 1, 0x0B)
    m.io_write(0x71, 1, 0x00)                # BCD, 12 h: 22 h is 10 PM
    assert cmos(m, 4) == 0x80 | 0x10


def test_rtc_guest_sets_time():
    t = 1700000000.0
    m, dev = _fixed_rtc(t)
    m.io_write(0x70, 1, 0x09)
    m.io_write(0x71, 1, 0x30)                # year 2030
    assert cmos(m, 0x09) == 0x30
    assert cmos(m, 0x08) == 0x11 and cmos(m, 0x07) == 0x14
    assert dev.offset == calendar.timegm((2030, 11, 14, 22, 13, 20, 0, 0, 0)) - int(t)


def test_rtc_status_c_read_clears():
    m = SyntheticMachine()
    dev = rtc.Rtc(m)
    dev.cmos[0x0C] = 0x90
    assert cmos(m, 0x0C) == 0x90
    assert cmos(m, 0x0C) == 0


# -- i8042 ------------------------------------------------------------------------------------

def test_i8042_status_empty_and_reset_exit():
    m = SyntheticMachine()
    i8042.I8042(m)
    assert m.io_read(0x64, 1) & 0x01 == 0    # nothing to read
    m.io_write(0x64, 1, 0xDD)                # A20 commands are accepted
    m.io_write(0x64, 1, 0xDF)
    assert not m.exited
    m.io_write(0x64, 1, 0xFE)                # pulse reset
    assert m.exited and m.exit_code == 0 and "i8042" in m.exit_reason


def test_i8042_self_test_and_command_byte():
    m = SyntheticMachine()
    i8042.I8042(m)
    m.io_write(0x64, 1, 0xAA)
    assert m.io_read(0x64, 1) & 0x01
    assert m.io_read(0x60, 1) == 0x55
    assert m.io_read(0x64, 1) & 0x01 == 0
    m.io_write(0x64, 1, 0x60)
    m.io_write(0x60, 1, 0x00)                # interrupts off
    m.io_write(0x64, 1, 0x20)
    assert m.io_read(0x60, 1) == 0x00
    m.io_write(0x60, 1, 0xFF)                # keyboard reset: ACK, self test passed
    assert [m.io_read(0x60, 1), m.io_read(0x60, 1)] == [0xFA, 0xAA]
    assert m.irq_levels.get(1, 0) == 0


def test_i8042_output_port_write_resets():
    m = SyntheticMachine()
    i8042.I8042(m)
    m.io_write(0x64, 1, 0xD1)
    m.io_write(0x60, 1, 0x03)                # A20 on, reset line high: no reset
    assert not m.exited
    m.io_write(0x64, 1, 0xD1)
    m.io_write(0x60, 1, 0x02)
    assert m.exit_code == 0


def test_i8042_command_flood_without_reads_holds_one_byte():
    """A guest writing 0x20 (read command byte) to 0x64 over and over, never reading 0x60:
    the controller's single output register holds the answer, nothing piles up."""
    m = SyntheticMachine()
    ctl = i8042.I8042(m)
    m.exit_batch([(0x64, 1, 0x20, True)] * 100_000)
    assert ctl.held == 1 and ctl.held_peak == 1
    assert m.io_read(0x64, 1) & 0x01
    assert m.io_read(0x60, 1) == ctl.ccb
    assert m.io_read(0x64, 1) & 0x01 == 0    # one read empties it: nothing was queued behind
    assert ctl.held == 0


def test_i8042_newer_controller_answer_replaces_an_unread_one():
    m = SyntheticMachine()
    ctl = i8042.I8042(m)
    m.io_write(0x64, 1, 0xAA)                # self test: 0x55, not read
    m.io_write(0x64, 1, 0x20)                # command byte replaces it
    assert m.io_read(0x60, 1) == ctl.ccb
    for value in range(256):                 # 0xd2 echoes: the last one is what is read
        m.io_write(0x64, 1, 0xD2)
        m.io_write(0x60, 1, value)
    assert ctl.held_peak == 1
    assert m.io_read(0x64, 1) & 0x21 == 0x01
    assert m.io_read(0x60, 1) == 0xFF
    m.io_write(0x64, 1, 0xD3)                # aux echo: the aux bit follows the byte
    m.io_write(0x60, 1, 0x42)
    assert m.io_read(0x64, 1) & 0x21 == 0x21
    assert m.io_read(0x60, 1) == 0x42
    assert m.io_read(0x64, 1) & 0x01 == 0


def test_i8042_keyboard_command_flood_keeps_only_the_last_answer():
    """Keyboard commands (identify, 3 answer bytes) written to 0x60 without reading: each new
    command drops what the keyboard had not sent, so at most the register plus one answer
    is held, and the host then reads one whole, ordered answer."""
    m = SyntheticMachine()
    ctl = i8042.I8042(m)
    m.exit_batch([(0x60, 1, 0xF2, True)] * 20_000)
    assert ctl.held <= 4 and ctl.held_peak <= 4 <= i8042.CAPACITY
    got = []
    while m.io_read(0x64, 1) & 0x01:
        got.append(m.io_read(0x60, 1))
    assert got[-3:] == [0xFA, 0xAB, 0x83] and len(got) <= 4
    assert ctl.held == 0


def test_i8042_reset_line_and_self_test_still_work_after_a_flood():
    m = SyntheticMachine()
    ctl = i8042.I8042(m)
    m.exit_batch([(0x64, 1, 0xD2, True), (0x60, 1, 0x11, True)] * 10_000
                 + [(0x60, 1, 0xFF, True)] * 1_000)
    assert ctl.held_peak <= i8042.CAPACITY
    while m.io_read(0x64, 1) & 0x01:         # drain, as SeaBIOS and Linux do first
        m.io_read(0x60, 1)
    m.io_write(0x64, 1, 0xAA)
    assert m.io_read(0x60, 1) == 0x55
    m.io_write(0x60, 1, 0xFF)                # keyboard reset: ACK then BAT passed
    assert [m.io_read(0x60, 1), m.io_read(0x60, 1)] == [0xFA, 0xAA]
    assert not m.exited
    m.io_write(0x64, 1, 0xFE)
    assert m.exited and m.exit_code == 0 and "i8042" in m.exit_reason


def test_i8042_irq1_pulses_for_each_byte_of_a_keyboard_answer():
    """IRQ 1 is edge-triggered: the line drops when the host reads a byte and rises again
    for the next one, so an interrupt-driven driver gets one interrupt per byte."""
    m = SyntheticMachine()
    i8042.I8042(m)
    seen = []
    drive = m._drive

    def record(line, level):
        if line == 1:
            seen.append(level)
        drive(line, level)
    m._drive = record
    m.io_write(0x60, 1, 0xF2)                # identify: 0xfa 0xab 0x83
    assert [m.io_read(0x60, 1) for _ in range(3)] == [0xFA, 0xAB, 0x83]
    assert seen == [1, 0, 1, 0, 1, 0]


# -- fw_cfg ----------------------------------------------------------------------------------

def read_item(m, key, n):
    m.io_write(0x510, 2, key)
    return bytes(m.io_read(0x511, 1) for _ in range(n))


def make_fw(size=64 * MiB, cpus=1):
    m = SyntheticMachine(memory_size=size, cpus=cpus)
    return m, fw_cfg.FwCfg(m)


def test_fw_cfg_signature_and_id():
    m, _ = make_fw()
    assert read_item(m, 0x0000, 4) == b"QEMU"
    assert struct.unpack("<I", read_item(m, 0x0001, 4))[0] == 3   # traditional + DMA
    assert struct.unpack("<Q", read_item(m, 0x0003, 8))[0] == 64 * MiB
    assert read_item(m, 0x0000, 6) == b"QEMU\0\0"    # zeros past the end


def test_fw_cfg_unknown_key_reads_zeros():
    m, _ = make_fw()
    assert read_item(m, 0x1234, 8) == bytes(8)
    assert read_item(m, 0x8003, 4) == bytes(4)


def test_fw_cfg_file_directory():
    m, fw = make_fw()
    k1 = fw.add_file("opt/zeta", b"zz")
    k2 = fw.add_file("etc/alpha", b"hello")
    count = struct.unpack(">I", read_item(m, 0x19, 4))[0]
    assert count == 2
    raw = read_item(m, 0x19, 4 + 64 * count)[4:]
    entries = [struct.unpack(">IHH56s", raw[i * 64:(i + 1) * 64]) for i in range(count)]
    assert [(s, k, n.rstrip(b"\0")) for s, k, _, n in entries] == \
        [(5, k2, b"etc/alpha"), (2, k1, b"opt/zeta")]           # sorted by name
    assert read_item(m, k2, 5) == b"hello"


def dma(m, desc_addr):
    m.io_write(0x514, 4, int.from_bytes((desc_addr >> 32).to_bytes(4, "big"), "little"))
    m.io_write(0x518, 4, int.from_bytes((desc_addr & 0xFFFFFFFF).to_bytes(4, "big"), "little"))


def test_fw_cfg_dma_read_into_guest_memory():
    m, fw = make_fw()
    key = fw.add_file("etc/blob", bytes(range(100)))
    desc, buf = 0x1000, 0x2000
    m.memory.write(desc, struct.pack(">IIQ", key << 16 | 0x08 | 0x02, 40, buf))
    dma(m, desc)
    assert m.memory.read(desc, 4) == bytes(4)                  # done, no error
    assert m.memory.read(buf, 40) == bytes(range(40))
    # skip 10, then read past the end: the tail is zero-filled
    m.memory.write(desc, struct.pack(">IIQ", 0x04, 10, 0))
    dma(m, desc)
    m.memory.fill(buf, 64, 0xEE)
    m.memory.write(desc, struct.pack(">IIQ", 0x02, 64, buf))
    dma(m, desc)
    assert m.memory.read(desc, 4) == bytes(4)
    assert m.memory.read(buf, 64) == bytes(range(50, 100)) + bytes(14)


def test_fw_cfg_dma_outside_ram_sets_error():
    m, fw = make_fw(size=16 * MiB)
    desc = 0x1000
    m.memory.write(desc, struct.pack(">IIQ", 0x08 | 0x02, 16, 0xF0000000))  # 0 << 16: signature
    dma(m, desc)
    assert struct.unpack(">I", m.memory.read(desc, 4))[0] & 0x01
    m.memory.write(desc, struct.pack(">IIQ", 0x02, 16, 16 * MiB - 8))   # straddles the end
    dma(m, desc)
    assert struct.unpack(">I", m.memory.read(desc, 4))[0] & 0x01
    dma(m, 0xFFFF0000)                      # descriptor itself outside RAM: ignored
    m.memory.write(desc, struct.pack(">IIQ", 0x08 | 0x10, 4, 0x2000))  # write to read-only
    dma(m, desc)
    assert struct.unpack(">I", m.memory.read(desc, 4))[0] & 0x01


def test_fw_cfg_dma_signature_and_writable_file():
    m, fw = make_fw()
    assert m.io_read(0x514, 4).to_bytes(4, "little") == b"QEMU"
    assert m.io_read(0x518, 4).to_bytes(4, "little") == b" CFG"
    key = fw.add_file("etc/rw", bytes(4), writable=True)
    m.memory.write(0x2000, b"abcd")
    m.memory.write(0x1000, struct.pack(">IIQ", key << 16 | 0x08 | 0x10, 4, 0x2000))
    dma(m, 0x1000)
    assert m.memory.read(0x1000, 4) == bytes(4)
    assert fw.file("etc/rw") == b"abcd"


def test_sercon_port_follows_com1():
    m = SyntheticMachine()
    m.pio.register(0x3F8, 8, type("U", (), {"read": lambda s, o, n: 0,
                                            "write": lambda s, o, n, v: None})(), name="com1")
    fw = bridge.setup_fw_cfg(m)
    assert fw.file("etc/sercon-port") == struct.pack("<H", 0x3F8)
    m2 = SyntheticMachine()
    assert bridge.setup_fw_cfg(m2).file("etc/sercon-port") is None


# -- LPC bridge, boot ROM, plugin ------------------------------------------------------------

def test_lpc_bridge_pci_identity_and_fw_cfg():
    m = SyntheticMachine()
    dev, = rig(m, "-s 31,lpc,reboot-timeout=500")
    assert m.pci.lookup(0, 31, 0) is dev and m.lpc is dev
    assert m.pci.config_read(0, 31, 0, 0, 4) == 0x70008086
    assert m.pci.config_read(0, 31, 0, 8, 4) >> 8 == 0x060100
    m.pci.config_write(0, 31, 0, 0x60, 1, 0x0B)
    assert dev.pirq_routes() == [11, None, None, None]
    assert m.fw_cfg.file("etc/boot-fail-wait") == struct.pack("<I", 500)
    assert read_item(m, 0, 4) == b"QEMU"


def test_platform_devices_registered():
    reg = Registry()
    assert reg.get("rtc", "platform") and reg.get("i8042", "platform")
    assert reg.get("bootrom", "platform") and reg.get("lpc", "pci")


def test_bootrom_maps_image(tmp_path):
    image = bytes(i & 0xFF for i in range(128 << 10)) + b"\xea" + bytes(4095)
    image = image[:-4096] + b"\xea" * 4096          # a recognisable last page
    path = tmp_path / "rom.bin"
    path.write_bytes(image)
    m = SyntheticMachine(memory_size=16 * MiB)
    rom = bootrom.BootRom(m, str(path))
    assert rom.base == (1 << 32) - len(image)
    assert m.mmio_read(0xFFFFFFF0, 1) == 0xEA
    assert m.mmio_read(rom.base, 4) == int.from_bytes(image[:4], "little")
    assert m.memory.read(0xE0000, 128 << 10) == image[-(128 << 10):]
    m.mmio_write(0xFFFFFFF0, 1, 0)                     # writes are ignored
    assert m.mmio_read(0xFFFFFFF0, 1) == 0xEA


def test_bootrom_rejects_bad_sizes(tmp_path):
    from hvframe.errors import ConfigError
    m = SyntheticMachine()
    for n in (0, 1000, 512 << 10):
        p = tmp_path / f"r{n}"
        p.write_bytes(bytes(n))
        with pytest.raises(ConfigError):
            bootrom.BootRom(m, str(p))


def test_command_line_bootrom_goes_to_platform(tmp_path):
    from hvframe.cli import config_from_args, make_parser
    from hvframe.runner import build_machine
    rom = tmp_path / "rom.bin"
    rom.write_bytes(b"\xf4" * 65536)
    reg = Registry()
    args = make_parser().parse_args(["run", "-m", "32M", "-s", "0,hostbridge", "-s", "31,lpc",
                                     "-l", f"bootrom,{rom}"])
    cfg = config_from_args(args, reg)
    assert cfg.get("platform.bootrom.path") == str(rom)
    m, plan = build_machine(cfg, reg, backend="synthetic")
    try:
        assert plan.firmware and not plan.demo
        assert m.bootrom.base == (1 << 32) - 65536
        assert m.fw_cfg is not None and m.lpc is not None
        # firmware assigns BARs and enables decoding: the runner left command registers at 0
        assert all(fn.command == 0 for fn in m.pci.functions.values())
    finally:
        m.close()


def test_rtc_periodic_interrupt_on_irq8():
    m = SyntheticMachine()
    dev = rtc.Rtc(m)
    dev.start()
    try:
        assert m.irq_levels.get(8, 0) == 0
        m.io_write(0x70, 1, 0x0A)
        m.io_write(0x71, 1, 0x26)            # 1024 Hz
        m.io_write(0x70, 1, 0x0B)
        m.io_write(0x71, 1, 0x42)            # PIE, 24 h, BCD
        deadline = time.monotonic() + 2
        while m.irq_levels.get(8, 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert m.irq_levels.get(8) == 1
        c = cmos(m, 0x0C)
        assert c & 0xC0 == 0xC0              # IRQF | PF
        m.io_write(0x70, 1, 0x0B)
        m.io_write(0x71, 1, 0x02)            # PIE off
        cmos(m, 0x0C)
        assert m.irq_levels.get(8) == 0
        time.sleep(0.02)
        assert m.irq_levels.get(8) == 0 and cmos(m, 0x0C) & 0xC0 == 0
    finally:
        dev.close()


def test_i8042_keyboard_data_raises_irq1_when_enabled():
    m = SyntheticMachine()
    i8042.I8042(m)
    m.io_write(0x60, 1, 0xEE)                # echo, with keyboard interrupts on (default)
    assert m.irq_levels.get(1) == 1
    assert m.io_read(0x64, 1) & 0x21 == 0x01  # keyboard (not aux) data waiting
    assert m.io_read(0x60, 1) == 0xEE
    assert m.irq_levels.get(1) == 0
    m.io_write(0x64, 1, 0xD4)                # to the mouse: none there
    m.io_write(0x60, 1, 0xF4)
    assert m.io_read(0x64, 1) & 0x21 == 0x21
    assert m.io_read(0x60, 1) == 0xFE


def test_fw_cfg_firmware_files():
    m = SyntheticMachine()
    fw = bridge.setup_fw_cfg(m)
    assert bridge.setup_fw_cfg(m) is fw           # one per machine
    assert fw.file("etc/show-boot-menu") == struct.pack("<H", 0)
    assert fw.file("etc/boot-fail-wait") is None  # SeaBIOS's default (60 s) unless asked


@pytest.mark.parametrize("args, message", [
    (["-l", "bootrom"], "-l bootrom: bootrom needs its settings"),
    (["-l", "bootrom,/no/such/rom.bin"], "-l bootrom,/no/such/rom.bin: path: no such file"),
])
def test_bootrom_command_line_errors(args, message):
    from conftest import run_hvframe
    p = run_hvframe(["run", *args], input="")
    assert p.returncode == 4
    assert message in p.stderr


def test_bootrom_and_kernel_conflict(tmp_path):
    from conftest import run_hvframe
    rom = tmp_path / "rom.bin"
    rom.write_bytes(bytes(4096))
    p = run_hvframe(["run", "-l", f"bootrom,{rom}", "--kernel", str(rom)], input="")
    assert p.returncode == 4 and "cannot be used with a boot ROM" in p.stderr
