"""rig(): devices built from command-line arguments, as `hvframe run` builds them.

    m = SyntheticMachine(64 << 20)
    blk, = rig(m, "-s 3,virtio-blk,disk.img,ro")
    com1, = rig(m, "-l com1,null")

Each argument is one `-s SLOT,DEVICE[,conf]`, `-l DEVICE[,conf]` or `-o path=value`, parsed
into a configuration tree by the runner's own functions and built by the runner's
add_devices(): option parsing, validation into the device's options dataclass, defaults, the
factory's PCI address, the expansion ROM, BAR placement and decoding all happen as in a run.
Returns the devices those arguments made, in the order the runner made them.
"""
from __future__ import annotations

from typing import Sequence

from ..config import Config
from ..device import Device
from ..errors import ConfigError


def parse_args(args: Sequence[str], registry, cfg: Config | None = None) -> Config:
    """A configuration tree from `-s ...`, `-l ...`, `-o ...` arguments (one string each, or
    the flag and its value as two strings)."""
    from ..runner import add_lpc, add_option, add_slot
    cfg = cfg if cfg is not None else Config()
    items = list(args)
    i = 0
    while i < len(items):
        flag, _, value = items[i].strip().partition(" ")
        if not value and flag in ("-s", "-l", "-o") and i + 1 < len(items):
            value, i = items[i + 1], i + 1
        value = value.strip()
        if flag == "-s":
            add_slot(cfg, registry, value)
        elif flag == "-l":
            add_lpc(cfg, registry, value)
        elif flag == "-o":
            add_option(cfg, value)
        else:
            raise ConfigError(f"rig: {items[i]!r}: give -s SLOT,DEVICE[,conf], -l DEVICE[,conf] "
                              f"or -o path=value")
        i += 1
    return cfg


def rig(machine, *args: str, registry=None, platform: bool = False,
        direct_boot: bool = True) -> list[Device]:
    """Build the devices of `args` on machine through the runner's path (see the module
    docstring). platform: also build the platform devices every machine has (RTC, i8042,
    ACPI PM, ...), as `hvframe run` does; off by default, so a test sees only its devices.
    direct_boot: place BARs and turn decoding on, as for a kernel booted without firmware
    (False leaves decoding to the test, as firmware would)."""
    from ..plugins import Registry
    from ..runner import add_devices
    if registry is None:
        registry = Registry(platform=platform)
    cfg = parse_args(args, registry)
    before = len(machine.devices)
    add_devices(machine, cfg, registry, direct_boot=direct_boot, platform=platform)
    return machine.devices[before:]
