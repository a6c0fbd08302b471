"""The PCI UART (-s N,uart,BACKEND) and rom=FILE, through the configuration tree, the PCI
bus and the dispatch core, as a guest's port exits would go."""
import pytest

from hvframe.config import Config
from hvframe.errors import ConfigError
from hvframe.pci.bus import add_pci_devices
from hvframe.plugins import Registry
from hvframe.runner import add_slot
from hvframe.synthetic import SyntheticMachine


def cfg_addr(m, b, s, f, reg):
    m.io_write(0xCF8, 4, 0x80000000 | b << 16 | s << 11 | f << 8 | reg)


def config_read(m, s, reg, size=4):
    cfg_addr(m, 0, s, 0, reg & ~3)
    return m.io_read(0xCFC + (reg & 3), size)


def build(*slots):
    registry = Registry()
    cfg = Config()
    for s in slots:
        add_slot(cfg, registry, s)
    m = SyntheticMachine(64 << 20)
    add_pci_devices(m, registry, cfg.group("pci"), direct_boot=True)
    return m


def test_pci_uart_ids_bar_output_and_interrupt(tmp_path):
    log = tmp_path / "pci-uart.log"
    m = build("0,hostbridge", f"4,uart,file={log}")
    assert config_read(m, 4, 0) == 0x00021B36
    assert config_read(m, 4, 8) >> 8 == 0x070002
    bar0 = config_read(m, 4, 0x10)
    assert bar0 & 1 and bar0 & ~3  # an I/O BAR, assigned
    port = bar0 & ~3
    pin, line = config_read(m, 4, 0x3D, 1), config_read(m, 4, 0x3C, 1)
    assert pin == 1 and line == 16 + (4 + 1 - 1) % 4
    for d in m.devices:
        getattr(d, "start", lambda: None)()
    for c in b"pci uart ok":
        assert m.io_read(port + 5, 1) & 0x20  # THRE
        m.io_write(port, 1, c)
    m.io_write(port + 4, 1, 0x08)  # OUT2
    m.io_write(port + 1, 1, 0x02)  # ETBEI with THR empty: THRE interrupt on INTA
    assert m.irq_levels[line] == 1
    assert m.io_read(port + 2, 1) & 0x0F == 0x02
    assert m.irq_levels[line] == 0
    m.close()
    assert log.read_bytes() == b"pci uart ok"


def test_rom_option_puts_the_image_behind_the_rom_bar(tmp_path):
    rom = tmp_path / "option.rom"
    rom.write_bytes(b"\x55\xaa" + bytes(range(254)) * 8)
    m = build("0,hostbridge", f"3,pci-testdev,rom={rom}")
    cfg_addr(m, 0, 3, 0, 0x30)
    m.io_write(0xCFC, 4, 0xFFFFFFFF)
    assert m.io_read(0xCFC, 4) & 0xFFFFF800 == 0xFFFFF800  # sized: at least 2 KiB
    cfg_addr(m, 0, 3, 0, 0x30)
    m.io_write(0xCFC, 4, 0xD0000000 | 1)            # place and enable it
    assert m.mmio_read(0xD0000000, 2) == 0xAA55
    assert m.mmio_read(0xD0000002, 1) == 0


def test_rom_option_needs_an_existing_file():
    with pytest.raises(ConfigError, match="rom: no such file"):
        build("0,hostbridge", "3,pci-testdev,rom=/nonexistent.rom")
