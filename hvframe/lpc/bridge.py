"""The LPC bridge (`-s 31,lpc`): a PCI-to-ISA bridge function with Intel PIIX3 IDs
(8086:7000, class 0x060100), the ISA bridge SeaBIOS looks for next to an i440FX host bridge.

Its PIRQ route registers (config 0x60-0x63) are writable, initialised to "disabled" (0x80)
as on PIIX3; they are only recorded (INTx reaches the IOAPIC at GSI 16-19 whatever they say).
Creating the bridge also creates the fw_cfg interface (hvframe.lpc.fw_cfg), so firmware
finds one whenever the machine has an LPC bridge; `machine.fw_cfg` is that device.
"""
from __future__ import annotations

import struct
import uuid

from ..acpi import smbios
from ..pci.bus import place
from ..pci.device import PciFunction
from ..snapshot.pci import PlainPciState
from .fw_cfg import FwCfg

PIIX3_VENDOR, PIIX3_ISA_DEVICE = 0x8086, 0x7000
CLASS_ISA_BRIDGE = 0x060100
PIRQ_ROUTE = 0x60
COM1_PORT = 0x3F8


class LpcBridge(PciFunction, PlainPciState):
    name = "lpc"

    def __init__(self, vendor: int = PIIX3_VENDOR, device: int = PIIX3_ISA_DEVICE):
        super().__init__(vendor, device, CLASS_ISA_BRIDGE)
        cs = self.config
        for i in range(4):
            cs.put(PIRQ_ROUTE + i, 1, 0x80)
        cs.set_mask(PIRQ_ROUTE, 4, 0x8F8F8F8F)

    def pirq_routes(self) -> list[int | None]:
        """The ISA IRQ each of PIRQA-D is routed to, None where disabled."""
        out = []
        for i in range(4):
            v = self.config.get(PIRQ_ROUTE + i, 1)
            out.append(None if v & 0x80 else v & 0x0F)
        return out


def setup_fw_cfg(machine, *, boot_fail_wait_ms: int | None = None) -> FwCfg:
    """machine.fw_cfg, created on first use with the files a PC firmware wants."""
    fw = machine.fw_cfg_device()
    if boot_fail_wait_ms is not None:
        fw.add_file("etc/boot-fail-wait", struct.pack("<I", boot_fail_wait_ms))
    return fw


def new_fw_cfg(machine) -> FwCfg:
    """A new fw_cfg interface with the files PC firmware wants (Machine.fw_cfg_device)."""
    fw = FwCfg(machine)
    # SeaBIOS mirrors its console to this port (and reads keys from it).
    if machine.pio.find_overlap(COM1_PORT, 1) is not None:
        fw.add_file("etc/sercon-port", struct.pack("<H", COM1_PORT))
    # No interactive boot menu wait (SeaBIOS shows one unless told not to).
    fw.add_file("etc/show-boot-menu", struct.pack("<H", 0))
    fw.add_file("bootorder", b"")
    # Ready-made SMBIOS tables: firmware installs them instead of building its own.
    anchor, tables = smbios.build(machine.cpus, [(r.gpa, r.size) for r in machine.memory.regions],
                                  machine.system_uuid or machine_uuid())
    fw.add_file("etc/smbios/smbios-anchor", anchor)
    fw.add_file("etc/smbios/smbios-tables", tables)
    return fw


def machine_uuid() -> uuid.UUID:
    """The system UUID of a machine built without a plan: this host's, as
    hvframe.runner.system_uuid derives it for an unnamed VM (the one formula)."""
    from ..config import Config
    from ..runner import system_uuid
    return system_uuid(Config())


def create(machine, options, address) -> LpcBridge:
    """DeviceType factory (options: hvframe.lpc.plugin.LpcOptions)."""
    bridge = LpcBridge()
    place(machine, bridge, address, options.rom)
    timeout = options.reboot_timeout
    setup_fw_cfg(machine, boot_fail_wait_ms=timeout if timeout is not None and timeout >= 0 else None)
    machine.set_lpc_bridge(bridge)
    return bridge
