"""What a device plugin declares, and what the machine asks of every device.

A plugin module returns DeviceType objects from the `hvframe_device_types` hook. A device type
names its factory and its options, declared as a DeviceOptions subclass whose fields are
made with option() and group() (a plain subclass, or a dataclass):

    class RngOptions(PciOptions):
        rate: int = option(1 << 20, help="bytes per second the guest may take", unit="B/s")

    def create(machine: Machine, options: RngOptions, address: PciAddress) -> VirtioPciFunction:
        ...

    DeviceType("virtio-rng", "pci", create, options=RngOptions, summary="...")

The runner turns `-s slot,name,conf` / `-l name,conf` / `-o path=value` into that class
(DeviceType.parse_conf, then DeviceType.validate: every value converted and checked, a bad one
is a ConfigError, i.e. one line and exit status 4) and builds the device with
DeviceType.create(machine, options, address): a PCI factory gets the function's PciAddress as
its third argument, LPC and platform factories take (machine, options). A PCI factory may
return its PciFunction without adding it to the bus: create() puts it at the address, with the
expansion ROM of `rom=FILE`. hvframe.testing.rig() takes the same path.

Whatever a factory returns is a Device (the base class below): the machine starts, pauses,
resumes and closes every device through these methods, whose defaults do nothing (or say
"not supported"), and never looks for optional methods by name.

Port and MMIO handlers are plain objects with
    read(offset, size) -> int          offset within the registered range, size 1/2/4/8
    write(offset, size, value) -> None
registered on `machine.pio` / `machine.mmio`. They are called from vCPU threads.

Device types whose options are a tuple of Option (the older declaration) still work: their
factory gets (machine, dict) with the PCI address in options["pci.address"].
"""
from __future__ import annotations

import os
import sys
import types
from collections import namedtuple

from .errors import ConfigError
from .logs import LazyLogger, logger

# typing stays out of a run (its import is about 4 ms of start-up): names it gives are for
# annotations only, and type checkers see the Protocol below.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Protocol, Sequence

    from .bench import Benchmarks
else:
    Protocol = object

KINDS = ("pci", "lpc", "platform")


class PortHandler(Protocol):
    """A port or MMIO handler (see the module docstring); handlers need not subclass it."""
    def read(self, offset: int, size: int) -> int: ...
    def write(self, offset: int, size: int, value: int) -> None: ...


# ---- the device interface ----------------------------------------------------------------------

class AcpiIsaDevice(namedtuple("AcpiIsaDevice", "name hid uid io_base io_length irq")):
    """A device the DSDT describes under the LPC bridge's ISA scope (_HID, one I/O range,
    one IRQ), e.g. a COM port: Device.acpi_isa_devices returns these.

    name: str, the AML name segment, e.g. "COM1"; hid: str, EISA id, e.g. "PNP0501";
    uid, io_base, io_length, irq: int."""
    __slots__ = ()


class PciAddress(namedtuple("PciAddress", "bus slot func")):
    """Where a PCI function sits: bus, slot (device) and function numbers (int)."""
    __slots__ = ()

    def __str__(self) -> str:
        return f"{self.bus}:{self.slot}:{self.func}"


class Device:
    """The base of every device model a factory returns; the machine holds them in
    `machine.devices` and calls these, in this order over a run:

      start()            once, before the vCPUs run: start the device's threads
      pause(), resume()  around a QMP `stop`/`cont`, after every vCPU has parked and before
                         they run again: a device with threads doing guest-visible work (DMA,
                         interrupts) holds them; the default does nothing
      close()            once, after the vCPUs stopped: stop and join threads, close files

    A device a checkpoint can carry also subclasses hvframe.snapshot.state.DeviceState (its
    record's construct layout and version, save_state/load_state, quiesce/unquiesce); a
    machine holding a device that does not is refused a checkpoint, naming it.
    acpi_isa_devices() lists what the DSDT should
    describe for this device (none by default). PCI functions (hvframe.pci.PciFunction) add
    bar_remapped(), called when the guest moves or disables a BAR.

    `name` says which device this is in messages (e.g. "virtio-blk 0:2:0"); `log` is the
    device's own logger, named hvframe.device.<name>."""

    name: str = ""

    @property
    def log(self) -> LazyLogger:
        """This device's logger: logging.getLogger("hvframe.device." + name)."""
        label = self.name or type(self).__name__
        lg = self.__dict__.get("_device_log")
        if lg is None or lg.name != "hvframe.device." + label:
            lg = self.__dict__["_device_log"] = logger("hvframe.device." + label)
        return lg

    def start(self) -> None:
        """Start the device's threads (before the first vCPU runs)."""

    def pause(self) -> None:
        """Hold guest-visible work of the device's own threads (the vCPUs are parked)."""

    def resume(self) -> None:
        """Undo pause()."""

    def close(self) -> None:
        """Stop and join the device's threads, close its files. Called once, vCPUs stopped."""

    def acpi_isa_devices(self) -> Sequence[AcpiIsaDevice]:
        """ISA devices the DSDT describes for this device (COM ports, say)."""
        return ()


# ---- option values -----------------------------------------------------------------------------

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


OPTION_TYPES = ("str", "int", "size", "bool", "path", "choice")


class Option(namedtuple("Option", "name type default help choices required unit hex positional "
                                  "example attr min max",
                        defaults=("str", None, "", (), False, "", False, False, "", "", None, None))):
    """One typed device option. type: str, int, size, bool, path (must exist), choice.
    hex: shown (defaults, examples) in hex; unit: what a number counts (shown in listings);
    positional: a bare conf item may give it (in declaration order); attr: the field of the
    options class that holds it (name with - as _ by default).

    Fields and defaults: name: str; type: str = "str"; default: Any = None; help: str = "";
    choices: Sequence[str] = (); required: bool = False; unit: str = ""; hex: bool = False;
    positional: bool = False; example: str = ""; attr: str = ""; min: int | None = None;
    max: int | None = None."""
    __slots__ = ()

    def convert(self, value: Any) -> Any:
        t = self.type
        if t == "str":
            out: Any = str(value)
        elif t == "int":
            if isinstance(value, bool):
                raise ValueError(f"not an integer: {value!r}")
            if isinstance(value, int):
                out = value
            else:
                try:
                    out = int(str(value), 0)
                except ValueError:
                    raise ValueError(f"not an integer: {value!r}") from None
        elif t == "size":
            out = value if isinstance(value, int) else parse_size(value)
        elif t == "bool":
            out = _to_bool(value)
        elif t == "path":
            p = os.path.expanduser(str(value))
            if not os.path.exists(p):
                raise ValueError(f"no such file: {p}")
            out = p
        elif t == "choice":
            if str(value) not in self.choices:
                raise ValueError(f"{value!r} is not one of {', '.join(self.choices)}")
            out = str(value)
        else:
            raise TypeError(f"unknown option type {t!r}")
        if isinstance(out, int) and not isinstance(out, bool):
            if self.min is not None and out < self.min or self.max is not None and out > self.max:
                lo = self.format(self.min) if self.min is not None else ""
                hi = self.format(self.max) if self.max is not None else ""
                raise ValueError(f"{self.name}={self.format(out)} must be {lo}-{hi}")
        return out

    def format(self, value: Any) -> str:
        """A value as the user would write it (hex where that is natural for the option)."""
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, int) and self.hex:
            return f"{value:#x}"
        return str(value)

    def describe(self) -> str:
        s = f"{self.name}=<{self.type if self.type != 'choice' else '|'.join(self.choices)}>"
        if self.unit:
            s += f" [{self.unit}]"
        if self.default is not None:
            s += f" (default {self.format(self.default)})"
        if self.required:
            s += " (required)"
        if self.min is not None or self.max is not None:
            s += f" (range {self.format(self.min) if self.min is not None else ''}-" \
                 f"{self.format(self.max) if self.max is not None else ''})"
        return s + (f"  {self.help}" if self.help else "")


ROM_OPTION = Option("rom", "path", help="expansion ROM image behind the ROM BAR")


class _Declared:
    """What option() and group() leave in a DeviceOptions class body, until the class is
    made (DeviceOptions.__init_subclass__ takes them out)."""
    __slots__ = ("default", "spec")

    def __init__(self, default: Any, spec: dict):
        self.default, self.spec = default, spec


def option(default: Any = None, *, help: str = "", type: str | None = None,
           choices: Sequence[str] = (), unit: str = "", hex: bool = False,
           required: bool = False, positional: bool = False, name: str | None = None,
           example: str = "", min: int | None = None, max: int | None = None) -> Any:
    """A field of a DeviceOptions class: one option of the device.

    type defaults from the field's annotation (bool, int, str; "choice" when choices are
    given); say "size" for 512M-style sizes and "path" for files that must exist. name is the
    option as written on the command line (default: the field name with _ as -)."""
    if isinstance(default, (list, dict, set, bytearray)):
        # One object would be shared by every instance (a dataclass refuses it too).
        raise TypeError(f"option(): a mutable default ({default.__class__.__name__}) would be shared "
                        "by every instance; use None or a tuple")
    spec = dict(help=help, type=type, choices=tuple(choices), unit=unit, hex=hex,
                required=required, positional=positional, name=name, example=example,
                min=min, max=max)
    return _Declared(default, spec)


class Group(namedtuple("Group", "name options_class attr help max_count", defaults=("", None))):
    """A nested, numbered set of options, e.g. AHCI's port.N.{path,ro,...}: the field holds
    {N: options_class instance} in the order of N.

    name: str; options_class: type; attr: str; help: str = ""; max_count: int | None = None."""
    __slots__ = ()


def group(options_class: type, *, name: str, help: str = "", max_count: int | None = None) -> Any:
    """A field of a DeviceOptions class holding numbered groups of options_class (a
    DeviceOptions subclass), written NAME.N.OPTION in the configuration tree."""
    return _Declared(None, dict(group=options_class, name=name, help=help, max_count=max_count))


_COMMON_FIELDS: set[str] = set()     # PciOptions' fields, once it is defined below


def _plain_hint(cls: type, attr: str) -> Any:
    """The annotation of cls's field attr as typing.get_type_hints(cls) has it, when that is
    a class or X | Y of classes, without importing typing; else _NOT_PLAIN. Names are looked
    up as get_type_hints does: the declaring class's module, then its namespace, then
    builtins."""
    for base in cls.__mro__:
        ann = base.__dict__.get("__annotations__")
        if isinstance(ann, dict) and attr in ann:
            break
    else:
        # None found in the classes' dicts: none at all, or (Python 3.14, no `from __future__
        # import annotations`) annotations not yet made; typing knows which.
        return _NOT_PLAIN
    value = ann[attr]
    if value is None:
        return type(None)
    if isinstance(value, str):
        module = sys.modules.get(base.__module__)
        try:
            value = eval(value, dict(vars(base)), vars(module) if module is not None else {})
        except Exception:
            return _NOT_PLAIN       # typing raises it, naming the annotation
    if isinstance(value, types.UnionType):
        if all(isinstance(a, type) for a in value.__args__):
            return value
    elif isinstance(value, type) and not isinstance(value, types.GenericAlias):
        return value
    return _NOT_PLAIN


_NOT_PLAIN = object()


def _type_of(annotation: Any) -> str:
    if isinstance(annotation, types.UnionType):
        args = [a for a in annotation.__args__ if a is not type(None)]
    elif annotation is None or isinstance(annotation, type) and not isinstance(
            annotation, types.GenericAlias):
        args = []           # what typing.get_args gives a class
    else:
        import typing       # a typing construct: its module imported typing already
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    if base is bool:
        return "bool"
    if base is int:
        return "int"
    return "str"


class DeviceOptions:
    """Base of a device's options class, whose fields are made with option() and group()
    (see the module docstring). check() runs after every field is converted: cross-field
    rules, raising ValueError (or ConfigError).

    A subclass is a declaration: its fields, in order, are what option() and group() made
    (those of its bases first). It may be a dataclass (@dataclass, which then makes
    __init__, __eq__ and __repr__ as for any dataclass) or a plain subclass, which gets
    them from here: keyword arguments, defaults for the rest, equal when of one class with
    equal fields. hvframe's own devices are plain subclasses, so a run imports no dataclass
    machinery (about a tenth of a short run's start-up)."""

    # attr -> (spec, default) of every field, bases' first; a redefinition keeps the base's
    # position and replaces its declaration. Made once per class, by __init_subclass__.
    _hvframe_fields: dict = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = {}
        for attr, value in list(vars(cls).items()):
            if isinstance(value, _Declared):
                own[attr] = (value.spec, value.default)
                dataclasses = sys.modules.get("dataclasses")
                if "group" in value.spec and dataclasses is not None:
                    # A dict for each instance: for a dataclass, by its default_factory (a
                    # class to be made a dataclass has imported dataclasses already; a plain
                    # class gets its dicts from __init__, and a run no dataclass machinery).
                    setattr(cls, attr, dataclasses.field(default_factory=dict))
                else:
                    setattr(cls, attr, value.default)
        if not own and "_hvframe_own" in vars(cls):
            # @dataclass(slots=True) makes the class again from its namespace, where the
            # declarations are already taken out: the first run's record stands.
            own = vars(cls)["_hvframe_own"]
        cls._hvframe_own = own
        fields: dict = {}
        for klass in reversed(cls.__mro__[1:]):
            fields.update(vars(klass).get("_hvframe_own", {}))
        fields.update(own)
        cls._hvframe_fields = fields
        if "_hvframe_declared" in vars(cls):
            delattr(cls, "_hvframe_declared")      # made again from these fields
        if own and "__init__" not in vars(cls) and any(
                "__dataclass_fields__" in vars(k) for k in cls.__mro__[1:]):
            # A subclass of a dataclass options class: the dataclass's methods know nothing
            # of this class's fields. Ours know them all (and @dataclass on this class keeps
            # them: it does not replace methods a class defines).
            cls.__init__ = DeviceOptions.__init__
            cls.__eq__ = DeviceOptions.__eq__
            cls.__repr__ = DeviceOptions.__repr__
            cls.__hash__ = None

    def __init__(self, **values: Any):
        for attr, (spec, default) in type(self)._hvframe_fields.items():
            if attr in values:
                value = values.pop(attr)
            else:
                value = {} if "group" in spec else default
            object.__setattr__(self, attr, value)
        if values:
            raise TypeError(f"{type(self).__name__}() got unexpected options: "
                            f"{', '.join(sorted(values))}")

    def _values(self) -> tuple:
        return tuple(getattr(self, a) for a in self._field_names())

    @classmethod
    def _field_names(cls) -> list[str]:
        return list(cls._hvframe_fields)

    def __eq__(self, other: Any) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None     # mutable, as a dataclass with eq

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}(" + ", ".join(
            f"{a}={getattr(self, a)!r}" for a in self._field_names()) + ")"

    @classmethod
    def _make(cls, values: dict[str, Any]) -> "DeviceOptions":
        """An instance from {attr: value}. A dataclass subclass's __init__ takes only its
        dataclass fields: those of plain bases (PciOptions.rom) are set after it."""
        fields = next((vars(k)["__dataclass_fields__"] for k in cls.__mro__
                       if "__dataclass_fields__" in vars(k)), None)
        if fields is None or cls.__init__ is DeviceOptions.__init__:
            return cls(**values)
        inst = cls(**{k: v for k, v in values.items() if k in fields})
        for attr, (spec, default) in cls._hvframe_fields.items():
            if attr not in fields:
                # object.__setattr__: a frozen dataclass refuses setattr
                object.__setattr__(inst, attr, values.get(attr, {} if "group" in spec
                                                          else default))
        return inst

    @classmethod
    def declared(cls) -> tuple[tuple[Option, ...], tuple[Group, ...]]:
        """The options and groups the class declares (made once per class)."""
        cached = cls.__dict__.get("_hvframe_declared")
        if cached is not None:
            return cached
        hints = None        # typing.get_type_hints(cls), made if an annotation is not plain
        opts, groups = [], []
        for attr, (spec, default) in cls._hvframe_fields.items():
            if "group" in spec:
                groups.append(Group(spec["name"], spec["group"], attr, spec["help"],
                                    spec["max_count"]))
                continue
            choices = spec["choices"]
            otype = spec["type"] or ("choice" if choices else None)
            if otype is None:
                hint = _plain_hint(cls, attr)
                if hint is _NOT_PLAIN:
                    if hints is None:
                        import typing
                        hints = typing.get_type_hints(cls)
                    hint = hints.get(attr)
                otype = _type_of(hint)
            opts.append(Option(spec["name"] or attr.replace("_", "-"), otype, default,
                               spec["help"], choices, spec["required"], spec["unit"],
                               spec["hex"], spec["positional"], spec["example"], attr,
                               spec["min"], spec["max"]))
        # Options every PCI device has (rom) after the device's own, in listings.
        opts.sort(key=lambda o: o.attr in _COMMON_FIELDS)
        out = (tuple(opts), tuple(groups))
        cls._hvframe_declared = out
        return out

    @classmethod
    def options(cls) -> tuple[Option, ...]:
        return cls.declared()[0]

    @classmethod
    def from_raw(cls, raw: dict[str, Any], where: str, device: str = "") -> "DeviceOptions":
        """Convert a configuration group ({option: text, group: {N: {...}}}) into the
        options class; ConfigError names the bad value."""
        opts, groups = cls.declared()
        by_name = {o.name: o for o in opts}
        by_group = {g.name: g for g in groups}
        known = ", ".join([*by_name, *(f"{g}.N.*" for g in by_group)]) or "none"
        for key in raw:
            if key != "device" and key not in by_name and key not in by_group:
                raise ConfigError(f"{where}: unknown option {key!r}"
                                  f"{' for ' + device if device else ''}; options are: {known}")
        values: dict[str, Any] = {}
        for o in opts:
            if o.name in raw:
                try:
                    values[o.attr] = o.convert(raw[o.name])
                except ValueError as e:
                    said = str(e)
                    raise ConfigError(f"{where}: {said}" if said.startswith(o.name + "=")
                                      else f"{where}: {o.name}: {said}") from None
            elif o.required:
                raise ConfigError(f"{where}: {device or 'the device'} needs {o.name}=")
        for g in groups:
            items = raw.get(g.name, {})
            if not isinstance(items, dict):
                raise ConfigError(f"{where}: {g.name}: give {g.name}.N.OPTION=VALUE")
            out = {}
            for index in sorted(items, key=lambda i: (not str(i).isdigit(), int(i) if str(i).isdigit() else 0)):
                if not str(index).isdigit() or (g.max_count is not None and int(index) >= g.max_count):
                    top = f"0-{g.max_count - 1}" if g.max_count else "from 0"
                    raise ConfigError(f"{where}: {g.name}.{index}: {g.name}s are numbered {top}")
                sub = items[index]
                if not isinstance(sub, dict):
                    raise ConfigError(f"{where}: {g.name}.{index}: give its options")
                out[int(index)] = g.options_class.from_raw(sub, f"{where}: {g.name}.{index}")
            values[g.attr] = out
        inst = cls._make(values)
        try:
            inst.check()
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        return inst

    def check(self) -> None:
        """Rules across options; raise ValueError("what is wrong and what to write")."""

    def to_raw(self) -> dict[str, Any]:
        """The options as a configuration group again (what from_raw reads)."""
        opts, groups = self.declared()
        out: dict[str, Any] = {}
        for o in opts:
            v = getattr(self, o.attr)
            if v is not None:
                out[o.name] = o.format(v)
        for g in groups:
            out[g.name] = {str(i): sub.to_raw() for i, sub in getattr(self, g.attr).items()}
        return out


class PciOptions(DeviceOptions):
    """Options every PCI device has (derive a PCI device's options from this)."""
    rom: str | None = option(None, type="path", help="expansion ROM image behind the ROM BAR")


_COMMON_FIELDS = set(PciOptions._field_names())


class NoOptions(DeviceOptions):
    """For a device without options."""


class NoPciOptions(PciOptions):
    """For a PCI device without options of its own."""


# ---- device types ------------------------------------------------------------------------------

class DeviceType:
    """A kind of device a plugin offers.

    options: the options class (a DeviceOptions subclass; PciOptions for PCI devices), or,
    the older way, a tuple of Option (the factory then gets a dict). factory: see create().

    positional: older declarations' names given, in order, to conf items that are not
    `key=value` with a known key (an options class marks its positional options with
    option(positional=)). package: filled in by the plugin manager. shared_memory: guest RAM
    must be shareable (memfd) for a device of this type: its model runs in another process
    that maps it (passthru to a vfio-user server). benchmarks: what `hvframe bench NAME`
    measures (hvframe.bench.Benchmarks): register exits and data paths; None: one read at
    the start of each range the device registers; a function returning one is called by
    `hvframe bench` only, so a run need not import hvframe.bench. examples: command lines
    shown by `hvframe devices NAME`, e.g. ("-s 3,virtio-blk,disk.img,ro",)."""

    def __init__(self, name: str, kind: str, factory: Callable[..., Any], summary: str = "",
                 aliases: tuple[str, ...] = (), options: Any = (),
                 positional: tuple[str, ...] = (), package: str = "",
                 shared_memory: bool = False,
                 benchmarks: Benchmarks | Callable[[], Benchmarks] | None = None,
                 examples: tuple[str, ...] = ()):
        self.name, self.kind, self.factory, self.summary = name, kind, factory, summary
        self.aliases, self.options, self.positional = aliases, options, positional
        self.package, self.shared_memory, self.benchmarks = package, shared_memory, benchmarks
        self.examples = examples
        self.options_class: type | None = None
        if self.kind not in KINDS:
            raise ValueError(f"device {self.name}: kind must be one of {KINDS}")
        if isinstance(self.options, type):
            if not issubclass(self.options, DeviceOptions):
                raise TypeError(f"device {self.name}: options must be a DeviceOptions subclass")
            if self.kind == "pci" and not issubclass(self.options, PciOptions):
                raise TypeError(f"device {self.name}: a PCI device's options derive from "
                                f"hvframe.device.PciOptions")
            self.options_class = self.options
            opts = self.options_class.options()
            self.options = opts
            if not self.positional:
                self.positional = tuple(o.name for o in opts if o.positional)
        else:
            self.options = tuple(self.options)
            if self.kind == "pci" and self.option("rom") is None:
                # Any PCI device can carry an expansion ROM, as with bhyve's rom=FILE.
                self.options = (*self.options, ROM_OPTION)

    def __repr__(self) -> str:
        return (f"DeviceType({self.name!r}, {self.kind!r}, summary={self.summary!r}, "
                f"package={self.package!r})")

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def groups(self) -> tuple[Group, ...]:
        return self.options_class.declared()[1] if self.options_class else ()

    def option(self, name: str) -> Option | None:
        for o in self.options:
            if o.name == name:
                return o
        return None

    def parse_conf(self, conf: str) -> dict[str, str]:
        """'disk.img,ro,sectorsize=512' -> {'path': 'disk.img', 'ro': 'on', 'sectorsize': '512'}."""
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

    def validate(self, raw: dict[str, Any], where: str = "") -> Any:
        """Typed options with defaults filled in (the options class, or a dict for older
        declarations); raises ConfigError naming the bad value."""
        label = f"{where or self.name}"
        if self.options_class is not None:
            return self.options_class.from_raw(raw, label, self.name)
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

    def create(self, machine, options: Any, address: PciAddress | None = None) -> Device | None:
        """Build one device from validated options, as `hvframe run` does: factory(machine,
        options, address) for PCI, factory(machine, options) otherwise. A PciFunction the
        factory did not put on the bus is added at `address` (with its ROM). None means the
        configuration asks for nothing (a platform device that is off)."""
        if self.kind == "pci" and address is None:
            address = PciAddress(0, 0, 0)
        if self.options_class is None:
            opts = dict(options)
            if self.kind == "pci":
                opts["pci.address"] = tuple(address)
            dev = self.factory(machine, opts)
            rom = opts.get("rom")
        else:
            if not isinstance(options, self.options_class):
                raise TypeError(f"{self.name}: options must be {self.options_class.__name__}")
            dev = (self.factory(machine, options, PciAddress(*address)) if self.kind == "pci"
                   else self.factory(machine, options))
            rom = options.rom if self.kind == "pci" else None     # PciOptions.rom
        if dev is None:
            return None
        if not isinstance(dev, Device):
            raise ConfigError(f"{self.name}: its factory returned {type(dev).__name__}, not an "
                              f"hvframe.device.Device (plugin {self.package or 'unknown'})")
        if self.kind == "pci":
            from .pci.bus import place
            from .pci.device import PciFunction
            if isinstance(dev, PciFunction) and dev.pci_bus is None:
                place(machine, dev, PciAddress(*address), rom)
        machine.add_device(dev)
        return dev

    def example_lines(self) -> list[str]:
        if self.examples:
            return list(self.examples)
        flag = "-s 3," if self.kind == "pci" else ("-l " if self.kind == "lpc" else "-o platform.")
        if self.kind == "platform":
            o = next((o for o in self.options), None)
            return [f"-o platform.{self.name}.{o.name}={o.example or o.format(o.default)}"] if o else []
        parts = [self.name]
        for o in self.options:
            if o.positional or o.name in self.positional:
                parts.append(o.example or o.name.upper())
        return [flag + ",".join(parts)]
