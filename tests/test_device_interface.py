"""The interfaces between the framework and devices are declared: no getattr/hasattr probing
for optional hooks on devices or the machine; every device is a Device; the machine's
services are its own attributes; typed options; `hvframe devices NAME`; rig()."""
from __future__ import annotations

import ast
import pathlib
import typing
from dataclasses import dataclass

import pytest

from conftest import run_hvframe
from hvframe.device import (AcpiIsaDevice, Device, DeviceOptions, DeviceType, NoOptions,
                            PciAddress, PciOptions, _type_of, group, option)
from hvframe.errors import ConfigError
from hvframe.testing import SyntheticMachine, rig

REPO = pathlib.Path(__file__).resolve().parent.parent

# getattr/hasattr uses that are not about devices or the machine: a module's optional
# constants, thread-local state, an exception's optional attribute, a field named by a
# keyword, register names mapped to attributes. (file, the object's source text)
ALLOWED = {
    ("hvframe/concurrency.py", "_tls"),
    ("hvframe/memory.py", "mmap"),
    ("plugins/passthru/hvframe_passthru/dmamem.py", "mmap"),
    ("hvframe/control/qmp.py", "e"),
    ("plugins/passthru/hvframe_passthru/server.py", "e"),
    ("plugins/passthru/hvframe_passthru/confine.py", "mod"),    # a module's __file__
    ("plugins/ahci/hvframe_ahci/hba.py", "self._regs"),
}
HOOK_NAMES = {"start", "close", "pause", "resume", "serve_cycle", "native_setup",
              "bar_remapped", "save_state", "load_state", "quiesce", "acpi_isa_devices",
              "pci", "lpc", "fw_cfg", "bootrom", "irqfd_eventfds", "_vcpu_threads"}
MACHINE_NAMES = {"m", "machine", "self.m", "self.machine", "self.bus.machine"}


def probes():
    """(file:line, text) of every getattr/hasattr that could be looking for an optional
    hook: any hasattr, any getattr with a default or a literal name, any on the machine or
    naming a device hook."""
    found = []
    for top in ("hvframe", "plugins"):
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if "/tests/" in rel or "/build/" in rel:
                continue
            tree = ast.parse(path.read_text(), rel)
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id in ("getattr", "hasattr") and node.args):
                    continue
                obj = ast.unparse(node.args[0])
                name = node.args[1] if len(node.args) > 1 else None
                literal = isinstance(name, ast.Constant) and isinstance(name.value, str)
                suspicious = (node.func.id == "hasattr" or len(node.args) > 2 or literal
                              or obj in MACHINE_NAMES or obj.endswith(".machine")
                              or (literal and name.value in HOOK_NAMES))
                if (literal and name.value in HOOK_NAMES) or obj in MACHINE_NAMES:
                    found.append((f"{rel}:{node.lineno}", ast.unparse(node)))
                elif suspicious and (rel, obj) not in ALLOWED:
                    found.append((f"{rel}:{node.lineno}", ast.unparse(node)))
    return found


def test_no_getattr_or_hasattr_probes_for_hooks():
    found = probes()
    assert not found, ("declare the hook (hvframe.device.Device, hvframe.machine.Machine) "
                       "instead of probing for it:\n" +
                       "\n".join(f"  {where}: {text}" for where, text in found))


def test_the_probe_check_finds_a_probe(tmp_path, monkeypatch):
    """The check above can fail: a module probing a device for `start` is reported."""
    fake = tmp_path / "hvframe"
    fake.mkdir()
    (fake / "bad.py").write_text("def go(d):\n    s = getattr(d, 'start', None)\n"
                                 "    return hasattr(d, 'close')\n")
    (tmp_path / "plugins").mkdir()
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    assert [w for w, _ in probes()] == ["hvframe/bad.py:2", "hvframe/bad.py:3"]


# -- Device ------------------------------------------------------------------------------------

def test_device_defaults_and_logger(caplog):
    class Plain(Device):
        name = "plain 0:3:0"

    d = Plain()
    d.start(), d.pause(), d.resume(), d.close()        # all optional: nothing happens
    assert d.acpi_isa_devices() == ()
    d.log.warning("hello")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("hvframe.device.plain 0:3:0", "hello")]


def test_machine_calls_every_device_hook_in_order():
    calls = []

    class Recorder(Device):
        name = "rec"

        def start(self):
            calls.append("start")

        def pause(self):
            calls.append("pause")

        def resume(self):
            calls.append("resume")

        def close(self):
            calls.append("close")

    m = SyntheticMachine()
    m.add_device(Recorder())
    m.start_devices()
    assert m.pause()
    m.resume()
    m.close()
    assert calls == ["start", "pause", "resume", "close"]


def test_machine_refuses_what_is_not_a_device():
    m = SyntheticMachine()
    try:
        with pytest.raises(TypeError, match="not an hvframe.device.Device"):
            m.add_device(object())
    finally:
        m.close()


def test_machine_services_are_declared_and_set_by_the_machine():
    m = SyntheticMachine()
    try:
        assert (m.pci, m.lpc, m.fw_cfg, m.bootrom) == (None, None, None, None)
        assert m.irqfd_eventfds is False
        bus = m.pci_bus()
        assert m.pci is bus and m.pci_bus() is bus
        with pytest.raises(AttributeError):
            m.pci = None                     # not set from outside
        lpc, = rig(m, "-s 31,lpc")
        assert m.lpc is lpc and m.fw_cfg is not None
        with pytest.raises(ConfigError, match="already"):
            rig(m, "-s 30,lpc")
        assert m.bus("pio") is m.pio and m.bus("mmio") is m.mmio
    finally:
        m.close()


def test_dsdt_describes_the_com_ports_the_devices_declare():
    from hvframe.acpi.dsdt import build_dsdt_aml
    m = SyntheticMachine()
    try:
        rig(m, "-l com2,null", "-l com4,null")
        isa = [d for dev in m.devices for d in dev.acpi_isa_devices()]
        assert isa == [AcpiIsaDevice("COM2", "PNP0501", 2, 0x2F8, 8, 3),
                       AcpiIsaDevice("COM4", "PNP0501", 4, 0x2E8, 8, 3)]
        aml = build_dsdt_aml(ncpus=1, ecam_base=0xE0000000, isa_devices=isa)
        assert b"COM2" in aml and b"COM4" in aml and b"COM1" not in aml
    finally:
        m.close()


# -- typed options -----------------------------------------------------------------------------

@dataclass
class DiskOptions(DeviceOptions):
    path: str | None = option(None, required=True, positional=True, help="image")
    ro: bool = option(False, help="read-only")


@dataclass
class ToyOptions(PciOptions):
    path: str | None = option(None, positional=True, help="image")
    queue_size: int = option(256, unit="descriptors", min=16, max=1024, help="queue size")
    mode: str = option("fast", choices=("fast", "safe"), help="how")
    base: int = option(0x1000, hex=True, help="where")
    size: int = option(1 << 20, type="size", help="how much")
    disks: dict[int, DiskOptions] = group(DiskOptions, name="disk", max_count=4)

    def check(self):
        if self.mode == "safe" and self.queue_size > 256:
            raise ValueError("mode=safe takes queue-size up to 256")


def toy_type(made):
    def factory(machine, options: ToyOptions, address: PciAddress):
        made.append((options, address))
        return None
    return DeviceType("toy", "pci", factory, options=ToyOptions, summary="a toy")


def test_options_dataclass_parses_converts_and_fills_defaults():
    dt = toy_type([])
    assert [o.name for o in dt.options] == ["path", "queue-size", "mode", "base", "size", "rom"]
    assert dt.positional == ("path",)
    raw = dt.parse_conf("a.img,queue-size=0x40,mode=safe,size=2M")
    raw["disk"] = {"1": {"path": "d1.img", "ro": "on"}, "0": {"path": "d0.img"}}
    o = dt.validate(raw, where="-s 3")
    assert isinstance(o, ToyOptions)
    assert (o.path, o.queue_size, o.mode, o.base, o.size, o.rom) == \
        ("a.img", 64, "safe", 0x1000, 2 << 20, None)
    assert list(o.disks) == [0, 1] and o.disks[1] == DiskOptions("d1.img", True)


@pytest.mark.parametrize("conf, message", [
    ("a.img,queue-size=big", "-s 3: queue-size: not an integer: 'big'"),
    ("a.img,queue-size=8", "-s 3: queue-size=8 must be 16-1024"),
    ("a.img,mode=slow", "-s 3: mode: 'slow' is not one of fast, safe"),
    ("a.img,mode=safe,queue-size=512", "-s 3: mode=safe takes queue-size up to 256"),
    ("a.img,colour=red", "toy: unexpected option 'colour=red'"),
    ("a.img,b.img", "toy: unexpected option 'b.img'"),
])
def test_bad_option_values_are_one_line_config_errors(conf, message):
    dt = toy_type([])
    with pytest.raises(ConfigError) as e:
        dt.validate(dt.parse_conf(conf), where="-s 3")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_bad_group_entries_are_config_errors():
    dt = toy_type([])
    with pytest.raises(ConfigError, match="disk.7: disks are numbered 0-3"):
        dt.validate({"disk": {"7": {"path": "x"}}}, where="-s 3")
    with pytest.raises(ConfigError, match=r"disk.0: the device needs path="):
        dt.validate({"disk": {"0": {"ro": "on"}}}, where="-s 3")


def test_create_passes_machine_options_and_address():
    made = []
    dt = toy_type(made)
    m = SyntheticMachine()
    try:
        assert dt.create(m, dt.validate({}), PciAddress(0, 5, 0)) is None
        assert made == [(ToyOptions(), (0, 5, 0))] and str(made[0][1]) == "0:5:0"
    finally:
        m.close()


def test_a_factory_that_returns_a_non_device_is_refused():
    dt = DeviceType("odd", "lpc", lambda m, o: object(), options=NoOptions)
    m = SyntheticMachine()
    try:
        with pytest.raises(ConfigError, match="odd: its factory returned object, not an"):
            dt.create(m, dt.validate({}))
    finally:
        m.close()


def test_pci_options_must_carry_the_rom():
    with pytest.raises(TypeError, match="derive from hvframe.device.PciOptions"):
        DeviceType("bad", "pci", lambda m, o, a: None, options=DiskOptions)


# -- the command line ---------------------------------------------------------------------------

def test_devices_name_prints_options_units_groups_and_examples():
    r = run_hvframe(["devices", "virtio-blk", "hostbridge", "ahci"])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "queue-size=<int> [descriptors] (default 256)" in out
    assert "num-queues=<int> (default 1) (range 1-63)" in out
    assert "vendor=<int> (default 0x8086) (range 0x0-0xffff)" in out     # IDs in hex
    assert "port.N.<option>  N = 0-31" in out and "        nmrr=<int> [rpm]" in out
    assert "    examples:\n        -s 2,virtio-blk,disk.img\n" in out


@pytest.mark.parametrize("args, message", [
    (["-s", "2,virtio-blk,/nonexistent.img,num-queues=0"], "num-queues=0 must be 1-63"),
    (["-s", "0,hostbridge,vendor=0x10000"], "vendor=0x10000 must be 0x0-0xffff"),
    (["-s", "3,virtio-net,tap0,queue-size=100"], "queue-size=100 must be one of"),
    (["-s", "4,ahci,hd:/nonexistent.img,nmrr=2"], "nmrr=2: use 0"),
    (["-l", "com1,stdio,native=maybe"], "native: not a boolean"),
    (["-s", "5,passthru"], "give exactly one of vfio-user=PATH"),
])
def test_run_reports_bad_options_in_one_line_with_status_4(args, message):
    r = run_hvframe(["run", *args])
    assert r.returncode == 4, r.stderr
    assert message in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


# -- rig ----------------------------------------------------------------------------------------

def test_rig_builds_like_the_runner(tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    m = SyntheticMachine(64 << 20)
    try:
        com, blk = rig(m, f"-s 3,virtio-blk,{disk},ro", "-l com1,null")   # LPC first
        assert m.pci.lookup(0, 3, 0) is blk and blk.name == "virtio-blk 0:3:0"
        assert all(b.mapped_at is not None for b in blk.all_bars())   # placed and decoded
        assert com.name == "com1" and m.pio.find(0x3F8) is not None
        assert m.devices == [com, blk]             # no platform devices unless asked
        with pytest.raises(ConfigError, match="rig: 'x': give -s"):
            rig(m, "x")
    finally:
        m.close()


def test_pytest_fixtures(device_rig, pci_config):
    m, (tb,) = device_rig("-s 5,pci-testdev")
    cfg = pci_config(m, 5)
    assert (cfg.vendor_id, cfg.device_id) == (0x1B36, 0x0005)
    assert cfg.bar(0) == tb.bar(0).mapped_at and cfg.bar_size(0) == tb.bar(0).size
    assert cfg.capability(0x05) is not None and cfg.capability(0x11) is not None


def test_the_readme_example_device_works():
    """The plugin example in README.md, as written: typed options, a Device, the factory."""
    text = (REPO / "README.md").read_text()
    start = text.index("```python\nfrom dataclasses import dataclass")
    code = text[start + len("```python\n"):text.index("```", start + 10)]
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    dt, = ns["hvframe_device_types"]()
    m = SyntheticMachine()
    try:
        dev = dt.create(m, dt.validate(dt.parse_conf("0x2e8"), where="-l scratch,0x2e8"))
        m.io_write(0x2E8, 1, 0x5A)
        assert m.io_read(0x2E8, 1) == 0x5A and m.devices == [dev]
        with pytest.raises(ConfigError, match="port=0x10000 must be 0x0-0xffff"):
            dt.validate(dt.parse_conf("0x10000"), where="-l scratch")
    finally:
        m.close()


def test_the_older_option_tuple_declaration_still_works():
    """Plugins declaring options as a tuple of Option get a dict with "pci.address", as
    before; what they return must be a Device now."""
    from hvframe.device import Option
    from hvframe.pci.device import PciFunction
    seen = []

    def factory(machine, options):
        seen.append(dict(options))
        return PciFunction(0x1234, 0x5678, 0xFF0000, name="old-style")

    dt = DeviceType("old", "pci", factory, options=(Option("level", "int", 3),),
                    positional=("level",))
    m = SyntheticMachine()
    try:
        fn = dt.create(m, dt.validate(dt.parse_conf("7")), PciAddress(0, 6, 0))
        assert seen == [{"level": 7, "rom": None, "pci.address": (0, 6, 0)}]
        assert m.pci.lookup(0, 6, 0) is fn and m.devices == [fn]
    finally:
        m.close()


def test_virtio_models_log_through_their_device_logger(tmp_path, caplog):
    """A virtio model (VirtioBlk behind its transport) logs as the device it is part of."""
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    m = SyntheticMachine(16 << 20)
    try:
        fn, = rig(m, f"-s 3,virtio-blk,{image},locking=off", direct_boot=False)
        assert fn.device.log is fn.log
        fn.device.log.warning("from the model")
        assert [r.name for r in caplog.records if r.getMessage() == "from the model"] == [
            "hvframe.device." + fn.name]
    finally:
        m.close()


# -- options classes as plugin authors write them -------------------------------------------
class QueueBase(DeviceOptions):
    queue_size: int = option(256, help="descriptors")
    name_: str = option("q", name="label", help="a label")


class NarrowerQueue(QueueBase):
    queue_size: int = option(64, help="descriptors (16-128)", min=16, max=128)


def lpc_type(options) -> DeviceType:
    return DeviceType("opts", "lpc", lambda m, o: None, options=options)


def test_a_redefined_option_keeps_its_place_and_takes_the_new_declaration():
    assert NarrowerQueue(queue_size=32).queue_size == 32
    assert NarrowerQueue().queue_size == 64
    opts, _ = NarrowerQueue.declared()
    assert [o.name for o in opts] == ["queue-size", "label"]
    assert (opts[0].default, opts[0].min, opts[0].max) == (64, 16, 128)
    dt = lpc_type(NarrowerQueue)
    assert dt.validate(dt.parse_conf("queue-size=32")).queue_size == 32
    with pytest.raises(ConfigError, match="queue-size=512 must be 16-128"):
        dt.validate(dt.parse_conf("queue-size=512"))
    # the base is untouched by its subclass
    assert QueueBase.declared()[0][0].default == 256 and QueueBase().queue_size == 256


def test_a_slots_dataclass_keeps_its_options():
    @dataclass(slots=True)
    class Slotted(DeviceOptions):
        rate: int = option(1, help="rate")
    dt = lpc_type(Slotted)
    assert [o.name for o in dt.options] == ["rate"]
    assert dt.validate(dt.parse_conf("rate=3")).rate == 3


def test_a_plain_subclass_of_a_dataclass_options_class_has_all_its_fields():
    @dataclass
    class DataBase(DeviceOptions):
        level: int = option(1, help="level")

    class PlainMore(DataBase):
        extra: int = option(0, help="extra")

    a, b = PlainMore(level=2, extra=2), PlainMore(level=2, extra=3)
    assert a != b and a == PlainMore(level=2, extra=2)
    assert "extra=2" in repr(a)
    dt = lpc_type(PlainMore)
    o = dt.validate(dt.parse_conf("level=4,extra=5"))
    assert (o.level, o.extra) == (4, 5)


def test_a_plain_options_class_with_a_group_needs_no_dataclass_machinery():
    """A plain class's groups get a dict per instance from __init__ (a dataclass's, from a
    default_factory); defining and using one imports no dataclasses (AHCI's ports)."""
    import subprocess
    import sys
    code = (
        "import sys\n"
        "from hvframe.device import DeviceOptions, group, option\n"
        "class Port(DeviceOptions):\n"
        "    path: str | None = option(None, help='image')\n"
        "class Hba(DeviceOptions):\n"
        "    ports: dict = group(Port, name='port', max_count=4)\n"
        "a, b = Hba(), Hba()\n"
        "a.ports[0] = Port(path='x')\n"
        "o = Hba.from_raw({'port': {'1': {'path': 'y'}}}, 'probe')\n"
        "print(b.ports, o.ports, 'dataclasses' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["{}", "{1:", "Port(path='y')}", "False"]


def test_a_frozen_dataclass_pci_options_class_takes_rom(tmp_path):
    @dataclass(frozen=True)
    class Frozen(PciOptions):
        depth: int = option(2, help="depth")
    rom = tmp_path / "rom.bin"
    rom.write_bytes(b"\x55\xaa" + bytes(510))
    dt = DeviceType("frozen", "pci", lambda m, o, a: None, options=Frozen)
    o = dt.validate(dt.parse_conf(f"depth=3,rom={rom}"))
    assert (o.depth, o.rom) == (3, str(rom))


def test_a_mutable_option_default_is_refused_where_the_class_is_written():
    with pytest.raises(TypeError, match="mutable default"):
        class Shared(DeviceOptions):
            items: list = option([], help="shared by every instance")


Count = int     # an alias, as an options class's annotation may name one


class Annotated(DeviceOptions):
    """Fields typed by their annotations only: plain ones (read without typing) and typing
    constructs (read by typing.get_type_hints, as before)."""
    plain_int: int = option(1)
    plain_bool: bool = option(False)
    plain_str: str = option("x")
    optional_int: int | None = option(None)
    alias: Count = option(2)
    bool_or_int: bool | int = option(True)
    typing_optional: typing.Optional[bool] = option(None)
    typing_annotated: typing.Annotated[int, "units"] = option(3)
    generic: list[int] | None = option(None)
    unannotated = option("u")


def test_option_types_from_annotations_are_what_typing_reads():
    expected = {"plain_int": "int", "plain_bool": "bool", "plain_str": "str",
                "optional_int": "int", "alias": "int", "bool_or_int": "bool",
                "typing_optional": "bool", "typing_annotated": "int", "generic": "str",
                "unannotated": "str"}
    hints = typing.get_type_hints(Annotated)
    assert {o.attr: o.type for o in Annotated.options()} == expected == {
        attr: _type_of(hints.get(attr)) for attr in expected}


def test_an_annotation_that_names_nothing_is_still_typing_s_error():
    # class Broken(DeviceOptions): level: NoSuchType = option(1)
    Broken = type("Broken", (DeviceOptions,), {"__annotations__": {"level": "NoSuchType"},
                                               "level": option(1)})
    with pytest.raises(NameError, match="NoSuchType"):
        Broken.options()
