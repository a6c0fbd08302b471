"""The LPC bridge and the legacy PC devices as a built-in plugin:

  rtc       [platform]  RTC/CMOS at 0x70/0x71 (every machine)
  i8042     [platform]  keyboard controller at 0x60/0x64, the reset line (every machine)
  lpc       [pci]       PIIX3-style ISA bridge (`-s 31,lpc`); brings fw_cfg at 0x510
  fwcfg     [lpc]       fw_cfg on its own (`-l fwcfg[,qemu]`, bhyve's spelling); -s ,lpc and a
                        boot ROM bring it too
  bootrom   [platform]  firmware image at the top of 4 GiB, when given a path
                        (`-l bootrom,FILE`, i.e. platform.bootrom.path=FILE)
"""
from ..device import DeviceType, Option
from ..hookspecs import hookimpl
from . import bootrom, i8042, rtc

# The bridge and fw_cfg bring the PCI bus (and construct) with them: imported when a machine
# has them, not by every machine that only needs this plugin's RTC and i8042.


def _bridge(machine, options):
    from .bridge import create
    return create(machine, options)


def _fw_cfg(machine, options):
    from .bridge import setup_fw_cfg
    return setup_fw_cfg(machine)


@hookimpl
def hvframe_device_types():
    return [
        DeviceType("rtc", "platform", rtc.create,
                   summary="RTC and CMOS RAM at 0x70/0x71 (memory size bytes for firmware)"),
        DeviceType("i8042", "platform", i8042.create,
                   summary="i8042 keyboard controller at 0x60/0x64 (command 0xfe resets)"),
        DeviceType("lpc", "pci", _bridge,
                   summary="LPC/ISA bridge (PIIX3 8086:7000) with QEMU-compatible fw_cfg "
                           "at 0x510",
                   options=(Option("reboot-timeout", "int", None,
                                   "ms SeaBIOS waits after 'No bootable device' before "
                                   "rebooting (fw_cfg etc/boot-fail-wait)"),)),
        DeviceType("fwcfg", "lpc", _fw_cfg,
                   summary="QEMU-compatible fw_cfg at 0x510/0x511, DMA at 0x514",
                   options=(Option("flavor", "choice", "qemu", "interface", choices=("qemu",)),),
                   positional=("flavor",)),
        DeviceType("bootrom", "platform", bootrom.create,
                   summary="boot firmware (e.g. SeaBIOS bios.bin) mapped below 4 GiB, the "
                           "guest starting at its reset vector: -l bootrom,FILE",
                   options=(Option("path", "path", None, "firmware image (none: no ROM)"),),
                   positional=("path",)),
    ]
