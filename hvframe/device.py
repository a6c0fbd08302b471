"""What a device plugin declares: its name, aliases, kind and typed options.

A plugin module returns DeviceType objects from the `hvframe_device_types` hook. The runner
turns `-s slot,name,conf` / `-l name,conf` / `-o path=value` into a typed option dict with
`DeviceType.parse_conf` and `DeviceType.validate`, then calls `factory(machine, options)`.

Port and MMIO handlers are plain objects with
    read(offset, size) -> int          offset within the registered range, size 1/2/4/8
    write(offset, size, value) -> None
registered on `machine.pio` / `machine.mmio`. They are called from vCPU threads.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from .errors import ConfigError

if TYPE_CHECKING:
    from .bench import Benchmarks

KINDS = ("pci", "lpc", "platform")


class PortHandler(Protocol):
    def read(self, offset: int, size: int) -> int: ...
    def write(self, offset: int, size: int, value: int) -> None: ...


_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, default_unit: str = "") -> int:
    """'512M' -> 536870912. A bare number takes default_unit (bhyve's -m takes MiB)."""
    s = str(text).strip().lower()
    if s.endswith("ib"):
        s = s[:-2]
    unit = ""
    if s and s[-1] in "bkmgt":
        unit, s = s[-1], s[:-1]
    if not s.isdigit():
        raise ValueError(f"not a size: {text!r} (use a number with K, M or G)")
    return int(s) * _SUFFIXES[unit or default_unit]


_TRUE = {"1", "true", "yes", "on", ""}
_FALSE = {"0", "false", "no", "off"}


def _to_bool(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    s = str(text).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ValueError(f"not a boolean: {text!r} (use on/off)")


@dataclass(frozen=True)
class Option:
    """One typed device option. type: str, int, size, bool, path (must exist), choice."""

    name: str
    type: str = "str"
    default: Any = None
    help: str = ""
    choices: Sequence[str] = ()
    required: bool = False

    def convert(self, value: Any) -> Any:
        t = self.type
        if t == "str":
            return str(value)
        if t == "int":
            try:
                return int(str(value), 0)
            except ValueError:
                raise ValueError(f"not an integer: {value!r}") from None
        if t == "size":
            return value if isinstance(value, int) else parse_size(value)
        if t == "bool":
            return _to_bool(value)
        if t == "path":
            p = os.path.expanduser(str(value))
            if not os.path.exists(p):
                raise ValueError(f"no such file: {p}")
            return p
        if t == "choice":
            if str(value) not in self.choices:
                raise ValueError(f"{value!r} is not one of {', '.join(self.choices)}")
            return str(value)
        raise TypeError(f"unknown option type {t!r}")

    def describe(self) -> str:
        s = f"{self.name}=<{self.type if self.type != 'choice' else '|'.join(self.choices)}>"
        if self.default is not None:
            s += f" (default {self.default})"
        if self.required:
            s += " (required)"
        return s + (f"  {self.help}" if self.help else "")


ROM_OPTION = Option("rom", "path", help="expansion ROM image behind the ROM BAR")


@dataclass
class DeviceType:
    """A kind of device a plugin offers. factory(machine, options) builds one instance."""

    name: str
    kind: str
    factory: Callable[..., Any]
    summary: str = ""
    aliases: tuple[str, ...] = ()
    options: tuple[Option, ...] = ()
    # Names given, in order, to conf items that are not `key=value` with a known key,
    # e.g. ("path",) makes `-s 2,virtio-blk,disk.img` mean path=disk.img.
    positional: tuple[str, ...] = ()
    package: str = field(default="", compare=False)  # filled in by the plugin manager
    # Guest RAM must be shareable (memfd) for a device of this type: its model runs in
    # another process that maps it (passthru to a vfio-user server).
    shared_memory: bool = False
    # What `hvframe bench NAME` measures (hvframe.bench.Benchmarks): register exits and
    # data paths. None: one read at the start of each range the device registers.
    benchmarks: Benchmarks | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"device {self.name}: kind must be one of {KINDS}")
        if self.kind == "pci" and self.option("rom") is None:
            # Any PCI device can carry an expansion ROM, as with bhyve's rom=FILE.
            self.options = (*self.options, ROM_OPTION)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def option(self, name: str) -> Option | None:
        for o in self.options:
            if o.name == name:
                return o
        return None

    def parse_conf(self, conf: str) -> dict[str, str]:
        """'disk.img,ro,sectorsize=512' -> {'path': 'disk.img', 'ro': '', 'sectorsize': '512'}."""
        out: dict[str, str] = {}
        pos = 0
        for item in (conf.split(",") if conf else []):
            key, eq, val = item.partition("=")
            if eq and self.option(key) is not None:
                out[key] = val
            elif not eq and self.option(item) is not None and self.option(item).type == "bool":
                out[item] = "on"
            elif pos < len(self.positional):
                out[self.positional[pos]] = item
                pos += 1
            else:
                raise ConfigError(f"{self.name}: unexpected option {item!r}; "
                                  f"options are: {', '.join(o.name for o in self.options) or 'none'}")
        return out

    def validate(self, raw: dict[str, Any], where: str = "") -> dict[str, Any]:
        """Typed options with defaults filled in; raises ConfigError naming the bad value."""
        label = f"{where or self.name}"
        out: dict[str, Any] = {}
        for key in raw:
            if key != "device" and self.option(key) is None:
                raise ConfigError(f"{label}: unknown option {key!r} for {self.name}; "
                                  f"options are: {', '.join(o.name for o in self.options) or 'none'}")
        for opt in self.options:
            if opt.name in raw:
                try:
                    out[opt.name] = opt.convert(raw[opt.name])
                except ValueError as e:
                    raise ConfigError(f"{label}: {opt.name}: {e}") from None
            elif opt.required:
                raise ConfigError(f"{label}: {self.name} needs {opt.name}=")
            else:
                out[opt.name] = opt.default
        return out
