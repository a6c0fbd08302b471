"""The LPC bridge and the legacy PC devices as a built-in plugin:

  rtc       [platform]  RTC/CMOS at 0x70/0x71 (every machine)
  i8042     [platform]  keyboard controller at 0x60/0x64, the reset line (every machine)
  lpc       [pci]       PIIX3-style ISA bridge (`-s 31,lpc`); brings fw_cfg at 0x510
  fwcfg     [lpc]       fw_cfg on its own (`-l fwcfg[,qemu]`, bhyve's spelling); -s ,lpc and a
                        boot ROM bring it too
  bootrom   [platform]  firmware image at the top of 4 GiB, when given a path
                        (`-l bootrom,FILE`, i.e. platform.bootrom.path=FILE)
"""
from ..device import DeviceOptions, DeviceType, NoOptions, PciOptions, option
from ..hookspecs import hookimpl
from . import bootrom, i8042, rtc

# The bridge and fw_cfg bring the PCI bus (and construct) with them: imported when a machine
# has them, not by every machine that only needs this plugin's RTC and i8042.


class LpcOptions(PciOptions):
    reboot_timeout: int | None = option(None, unit="ms", help="how long SeaBIOS waits after "
                                        "'No bootable device' before rebooting (fw_cfg "
                                        "etc/boot-fail-wait)")


class FwCfgOptions(DeviceOptions):
    flavor: str = option("qemu", choices=("qemu",), positional=True, help="interface")


class BootRomOptions(DeviceOptions):
    path: str | None = option(None, type="path", positional=True, example="bios.bin",
                              help="firmware image (none: no ROM)")


def _bridge(machine, options: LpcOptions, address):
    from .bridge import create
    return create(machine, options, address)


def _fw_cfg(machine, options: FwCfgOptions):
    from .bridge import setup_fw_cfg
    return setup_fw_cfg(machine)


@hookimpl
def hvframe_device_types():
    return [
        DeviceType("rtc", "platform", rtc.create, options=NoOptions,
                   summary="RTC and CMOS RAM at 0x70/0x71 (memory size bytes for firmware)"),
        DeviceType("i8042", "platform", i8042.create, options=NoOptions,
                   summary="i8042 keyboard controller at 0x60/0x64 (command 0xfe resets)"),
        DeviceType("lpc", "pci", _bridge, options=LpcOptions,
                   summary="LPC/ISA bridge (PIIX3 8086:7000) with QEMU-compatible fw_cfg "
                           "at 0x510",
                   examples=("-s 31,lpc", "-s 31,lpc,reboot-timeout=1000")),
        DeviceType("fwcfg", "lpc", _fw_cfg, options=FwCfgOptions,
                   summary="QEMU-compatible fw_cfg at 0x510/0x511, DMA at 0x514",
                   examples=("-l fwcfg", "-l fwcfg,qemu")),
        DeviceType("bootrom", "platform", bootrom.create, options=BootRomOptions,
                   summary="boot firmware (e.g. SeaBIOS bios.bin) mapped below 4 GiB, the "
                           "guest starting at its reset vector: -l bootrom,FILE",
                   examples=("-l bootrom,/usr/share/seabios/bios.bin",)),
    ]
