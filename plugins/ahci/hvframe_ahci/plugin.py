"""Device types ahci, ahci-hd and ahci-cd, with bhyve's command line:

    -s 4,ahci,hd:disk.img,ro,sectorsize=512/4096,cd:install.iso    ports 0 and 1
    -s 4,ahci-hd,disk.img,ser=ABC123                                one disk on port 0
    -s 5,ahci-cd,install.iso                                        one CD-ROM on port 0

Each `hd:PATH` / `cd:PATH` starts the next port; the options after it belong to that port.
In the configuration tree a port is `pci.B.S.F.port.N.{type,path,ro,...}` (as in bhyve), so
`-o pci.0.4.0.port.2.path=...` works too.
"""
from __future__ import annotations

from typing import Any

from hvframe.block.backend import BLOCK_OPTIONS, open_from_options
from hvframe.device import ROM_OPTION, DeviceType, Option
from hvframe.errors import ConfigError
from hvframe.hookspecs import hookimpl

from .ata import AtaDisk
from .atapi import CD_SECTOR, AtapiCdrom
from .hba import AhciHba
from .regs import MAX_PORTS

PORT_TYPES = ("hd", "cd")
MODEL_MAX = 40
# Options of one port: the shared block options plus the ATA identity.
PORT_OPTIONS: tuple[Option, ...] = (
    Option("type", "choice", None, "hd (ATA disk) or cd (ATAPI CD-ROM)", choices=PORT_TYPES),
    *BLOCK_OPTIONS,
    Option("model", "str", None, f"model number (at most {MODEL_MAX} characters)"),
    Option("nmrr", "int", 0, "nominal media rotation rate: 0 unknown, 1 SSD, 1025-65534 rpm"),
)
_PORT_OPTION = {o.name: o for o in PORT_OPTIONS}


class AhciDeviceType(DeviceType):
    """A DeviceType whose conf is a list of ports (hd:PATH,opts,cd:PATH,opts,...).
    `port_type` fixes a single port's type (ahci-hd, ahci-cd)."""

    port_type: str | None = None

    def _port_key(self, item: str) -> tuple[str, str] | None:
        key, eq, val = item.partition("=")
        if eq and key in _PORT_OPTION and key not in ("type", "path"):
            return key, val
        if not eq and key in _PORT_OPTION and _PORT_OPTION[key].type == "bool":
            return key, "on"
        return None

    def parse_conf(self, conf: str) -> dict[str, str]:
        out: dict[str, str] = {}
        port = 0 if self.port_type else -1
        if self.port_type:
            out["port.0.type"] = self.port_type
        for item in (conf.split(",") if conf else []):
            kind, colon, path = item.partition(":")
            if not self.port_type and colon and kind in PORT_TYPES:
                port += 1
                if port >= MAX_PORTS:
                    raise ConfigError(f"{self.name}: at most {MAX_PORTS} ports")
                if not path:
                    raise ConfigError(f"{self.name}: {item!r} needs a path, e.g. {kind}:disk.img")
                out[f"port.{port}.type"], out[f"port.{port}.path"] = kind, path
                continue
            key, eq, val = item.partition("=")
            if eq and key == "path" and self.port_type:
                out["port.0.path"] = val
                continue
            if eq and key == "rom":
                out["rom"] = val
                continue
            if port < 0:
                raise ConfigError(f"{self.name}: {item!r} before any port; ports are given as "
                                  f"hd:PATH or cd:PATH, e.g. -s 4,ahci,hd:disk.img,ro")
            opt = self._port_key(item)
            if opt is not None:
                out[f"port.{port}.{opt[0]}"] = opt[1]
            elif self.port_type and "port.0.path" not in out and item:
                out["port.0.path"] = item.removeprefix(f"{self.port_type}:")
            else:
                names = ", ".join(o.name for o in PORT_OPTIONS if o.name not in ("type", "path"))
                raise ConfigError(f"{self.name}: unexpected option {item!r}; a port takes "
                                  f"{names}")
        return out

    def validate(self, raw: dict[str, Any], where: str = "") -> dict[str, Any]:
        label = where or self.name
        raw = dict(raw)
        ports_raw = raw.pop("port", {})
        for key in raw:
            if key not in ("device", "rom"):
                raise ConfigError(f"{label}: unknown option {key!r} for {self.name}; port "
                                  f"options go in port.N.{key}")
        out: dict[str, Any] = {"rom": None}
        if raw.get("rom"):
            try:
                out["rom"] = ROM_OPTION.convert(raw["rom"])
            except ValueError as e:
                raise ConfigError(f"{label}: rom: {e}") from None
        if not isinstance(ports_raw, dict) or not ports_raw:
            raise ConfigError(f"{label}: {self.name} needs a port, e.g. "
                              f"-s 4,{self.name},{'' if self.port_type else 'hd:'}disk.img")
        ports: dict[int, dict[str, Any]] = {}
        for index, group in ports_raw.items():
            if not str(index).isdigit() or int(index) >= MAX_PORTS:
                raise ConfigError(f"{label}: port.{index}: ports are numbered 0-{MAX_PORTS - 1}")
            if not isinstance(group, dict):
                raise ConfigError(f"{label}: port.{index}: give its type and path")
            ports[int(index)] = self._validate_port(group, f"{label}: port.{index}")
        out["ports"] = dict(sorted(ports.items()))
        return out

    def _validate_port(self, group: dict[str, Any], where: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in group:
            if key not in _PORT_OPTION:
                raise ConfigError(f"{where}: unknown option {key!r}; a port takes "
                                  f"{', '.join(_PORT_OPTION)}")
        for opt in PORT_OPTIONS:
            if opt.name in group:
                try:
                    out[opt.name] = opt.convert(group[opt.name])
                except ValueError as e:
                    raise ConfigError(f"{where}: {opt.name}: {e}") from None
            else:
                out[opt.name] = opt.default
        if out["type"] is None:
            out["type"] = self.port_type or "hd"
        if not out["path"]:
            example = f"{self.name},disk.img" if self.port_type else f"{out['type']}:disk.img"
            raise ConfigError(f"{where}: needs a path, e.g. -s 4,{example}")
        model = out["model"]
        if model is not None and (len(model) > MODEL_MAX or
                                  not all(32 <= ord(c) < 127 for c in model)):
            raise ConfigError(f"{where}: model {model!r} must be at most {MODEL_MAX} printable "
                              f"ASCII characters")
        nmrr = out["nmrr"]
        if not (nmrr in (0, 1) or 0x401 <= nmrr <= 0xFFFE):
            raise ConfigError(f"{where}: nmrr={nmrr}: use 0 (unknown), 1 (SSD) or a rotation "
                              f"rate of 1025-65534 rpm")
        if out["type"] == "cd":
            if out["sectorsize"] not in (None, str(CD_SECTOR)):
                raise ConfigError(f"{where}: a CD-ROM has {CD_SECTOR}-byte sectors; drop "
                                  f"sectorsize={out['sectorsize']}")
            out["ro"] = True                         # an ISO image is never written
            out["sectorsize"] = str(CD_SECTOR)
        return out


def open_port_device(options: dict[str, Any], where: str):
    backend = open_from_options(options, where)
    try:
        if options["type"] == "cd":
            return AtapiCdrom(backend, model=options["model"], serial=options["ser"],
                              name=f"{where}-cd")
        return AtaDisk(backend, model=options["model"], serial=options["ser"],
                       nmrr=options["nmrr"], name=f"{where}-hd")
    except BaseException:
        backend.close()
        raise


def ahci_factory(machine, options: dict[str, Any]) -> AhciHba:
    b, s, f = options.get("pci.address", (0, 0, 0))
    name = f"ahci {b}:{s}:{f}"
    devices: dict[int, Any] = {}
    try:
        for index, port in options["ports"].items():
            devices[index] = open_port_device(port, f"{name} port {index}")
        return AhciHba(machine, devices, name=name)
    except BaseException:
        for dev in devices.values():
            dev.close()
        raise


def ahci_device_types() -> list[DeviceType]:
    common = dict(kind="pci", factory=ahci_factory,
                  options=tuple(o for o in PORT_OPTIONS if o.name != "type"))
    types = []
    for name, port_type, summary, positional in (
            ("ahci", None, "AHCI SATA controller (Intel ICH9 8086:2922), up to 32 ports "
                           "given as hd:PATH[,opts] / cd:PATH[,opts]", ()),
            ("ahci-hd", "hd", "AHCI controller with one ATA disk on port 0", ("path",)),
            ("ahci-cd", "cd", "AHCI controller with one ATAPI CD-ROM on port 0 (ISO image)",
             ("path",))):
        t = AhciDeviceType(name=name, summary=summary, positional=positional, **common)
        t.port_type = port_type
        types.append(t)
    return types


@hookimpl
def hvframe_device_types() -> list[DeviceType]:
    return ahci_device_types()
