"""Device types ahci, ahci-hd and ahci-cd, with bhyve's command line:

    -s 4,ahci,hd:disk.img,ro,sectorsize=512/4096,cd:install.iso    ports 0 and 1
    -s 4,ahci-hd,disk.img,ser=ABC123                                one disk on port 0
    -s 5,ahci-cd,install.iso                                        one CD-ROM on port 0

Each `hd:PATH` / `cd:PATH` starts the next port; the options after it belong to that port.
In the configuration tree a port is `pci.B.S.F.port.N.{type,path,ro,...}` (as in bhyve), so
`-o pci.0.4.0.port.2.path=...` works too.
"""
from __future__ import annotations

from hvframe.block.backend import BlockOptions, open_from_options
from hvframe.device import DeviceType, PciAddress, PciOptions, group, option
from hvframe.errors import ConfigError
from hvframe.hookspecs import hookimpl

from .ata import AtaDisk
from .atapi import CD_SECTOR, AtapiCdrom
from .hba import AhciHba
from .regs import MAX_PORTS

# typing stays out of a run; type checkers see Any.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

PORT_TYPES = ("hd", "cd")
MODEL_MAX = 40


class AhciPortOptions(BlockOptions):
    """One port: the shared block options plus the ATA identity (port.N.* in the tree)."""
    type: str | None = option(None, choices=PORT_TYPES, help="hd (ATA disk) or cd (ATAPI CD-ROM)")
    # Not required here: AhciDeviceType says which command line would give it.
    path: str | None = option(None, positional=True, example="disk.img",
                              help="raw disk image (file or block device)")
    model: str | None = option(None, help=f"model number (at most {MODEL_MAX} characters)")
    nmrr: int = option(0, help="nominal media rotation rate: 0 unknown, 1 SSD, 1025-65534 rpm",
                       unit="rpm")

    def check(self) -> None:
        if self.type is None:
            self.type = "hd"
        model = self.model
        if model is not None and (len(model) > MODEL_MAX or
                                  not all(32 <= ord(c) < 127 for c in model)):
            raise ValueError(f"model {model!r} must be at most {MODEL_MAX} printable "
                             f"ASCII characters")
        if not (self.nmrr in (0, 1) or 0x401 <= self.nmrr <= 0xFFFE):
            raise ValueError(f"nmrr={self.nmrr}: use 0 (unknown), 1 (SSD) or a rotation "
                             f"rate of 1025-65534 rpm")
        if self.type == "cd":
            if self.sectorsize not in (None, str(CD_SECTOR)):
                raise ValueError(f"a CD-ROM has {CD_SECTOR}-byte sectors; drop "
                                 f"sectorsize={self.sectorsize}")
            self.ro = True                           # an ISO image is never written
            self.sectorsize = str(CD_SECTOR)


class AhciOptions(PciOptions):
    ports: dict[int, AhciPortOptions] = group(AhciPortOptions, name="port", max_count=MAX_PORTS,
                                              help="the controller's ports, port.N.OPTION")


# Every option a port takes, for parsing the bhyve-style conf.
PORT_OPTIONS = AhciPortOptions.options()
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

    def validate(self, raw: dict[str, Any], where: str = "") -> AhciOptions:
        """AhciOptions; first the mistakes a command line makes, said in its terms."""
        label = where or self.name
        for key in raw:
            if key not in ("device", "rom", "port"):
                raise ConfigError(f"{label}: unknown option {key!r} for {self.name}; port "
                                  f"options go in port.N.{key}")
        ports = raw.get("port")
        if not isinstance(ports, dict) or not ports:
            raise ConfigError(f"{label}: {self.name} needs a port, e.g. "
                              f"-s 4,{self.name},{'' if self.port_type else 'hd:'}disk.img")
        raw = dict(raw, port={i: (dict(g, type=g.get("type") or self.port_type or "hd")
                                  if isinstance(g, dict) else g) for i, g in ports.items()})
        for index, g in raw["port"].items():
            if isinstance(g, dict) and not g.get("path"):
                example = f"{self.name},disk.img" if self.port_type else f"{g['type']}:disk.img"
                raise ConfigError(f"{label}: port.{index}: needs a path, e.g. -s 4,{example}")
        return super().validate(raw, where)


def open_port_device(options: AhciPortOptions, where: str):
    backend = open_from_options(options, where)
    try:
        if options.type == "cd":
            return AtapiCdrom(backend, model=options.model, serial=options.ser,
                              name=f"{where}-cd")
        return AtaDisk(backend, model=options.model, serial=options.ser,
                       nmrr=options.nmrr, name=f"{where}-hd")
    except BaseException:
        backend.close()
        raise


def ahci_factory(machine, options: AhciOptions, address: PciAddress) -> AhciHba:
    name = f"ahci {address}"
    devices: dict[int, Any] = {}
    try:
        for index, port in options.ports.items():
            devices[index] = open_port_device(port, f"{name} port {index}")
        return AhciHba(machine, devices, name=name)
    except BaseException:
        for dev in devices.values():
            dev.close()
        raise


def ahci_device_types() -> list[DeviceType]:
    common = dict(kind="pci", factory=ahci_factory, options=AhciOptions)
    types = []
    for name, port_type, summary, positional in (
            ("ahci", None, "AHCI SATA controller (Intel ICH9 8086:2922), up to 32 ports "
                           "given as hd:PATH[,opts] / cd:PATH[,opts]", ()),
            ("ahci-hd", "hd", "AHCI controller with one ATA disk on port 0", ("path",)),
            ("ahci-cd", "cd", "AHCI controller with one ATAPI CD-ROM on port 0 (ISO image)",
             ("path",))):
        examples = {"ahci": ("-s 4,ahci,hd:disk.img,ro,cd:install.iso",
                             "-s 4,ahci,hd:disk.img,sectorsize=512/4096,ser=ABC123,model=My Disk",
                             "-o pci.0.4.0.port.2.path=more.img"),
                    "ahci-hd": ("-s 4,ahci-hd,disk.img,ser=ABC123",),
                    "ahci-cd": ("-s 5,ahci-cd,install.iso",)}[name]
        t = AhciDeviceType(name=name, summary=summary, positional=positional,
                           examples=examples, **common)
        t.port_type = port_type
        types.append(t)
    return types


@hookimpl
def hvframe_device_types() -> list[DeviceType]:
    return ahci_device_types()
