"""The uart plugin: pluggy hook, com1-com4 types, and what a factory wires into a machine."""
import pathlib
import tomllib

import pluggy
import pytest

from hvframe.errors import ConfigError
from hvframe.testing import SyntheticMachine, rig
from hvframe_uart import plugin

PYPROJECT = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"


def device_types():
    return {t.name: t for t in plugin.hvframe_device_types()}


def build(name, conf=""):
    machine = SyntheticMachine()
    device, = rig(machine, f"-l {name}{',' + conf if conf else ''}")
    return machine, device


def test_hook_is_found_by_pluggy():
    from hvframe import hookspecs
    pm = pluggy.PluginManager("hvframe")
    pm.add_hookspecs(hookspecs)
    pm.register(plugin)
    names = [t.name for types in pm.hook.hvframe_device_types() for t in types]
    assert names == ["uart", "com1", "com2", "com3", "com4"]


def test_pyproject_declares_the_entry_point():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert project["name"] == "hvframe-uart"
    assert "hvframe" in project["dependencies"]
    # One entry point per device name, "module:kind" (hvframe.plugins), matching the hook.
    assert project["entry-points"]["hvframe.devices"] == {
        t.name: f"hvframe_uart.plugin:{t.kind}" for t in plugin.hvframe_device_types()}


@pytest.mark.parametrize("name, base, irq", [
    ("com1", 0x3F8, 4), ("com2", 0x2F8, 3), ("com3", 0x3E8, 4), ("com4", 0x2E8, 3)])
def test_factory_registers_ports_and_routes_irq(name, base, irq):
    """Through the dispatch core, as a guest's port exits would go."""
    machine, uart = build(name)
    assert device_types()[name].kind == "lpc"
    [rng] = [r for r in machine.pio.ranges() if r.name == name]
    assert (rng.base, rng.length, rng.handler) == (base, 8, uart)
    machine.io_write(base + 4, 1, 0x08)      # MCR.OUT2
    machine.io_write(base + 1, 1, 0x02)      # IER.ETBEI with THR empty -> THRE interrupt
    assert machine.irq_levels[irq] == 1
    assert machine.io_read(base + 2, 1) == 0x02
    assert machine.irq_levels[irq] == 0      # the IIR read took the THRE interrupt away


def test_com1_and_com3_share_irq4():
    machine = SyntheticMachine()
    rig(machine, "-l com1", "-l com3")
    for base in (0x3F8, 0x3E8):
        machine.io_write(base + 4, 1, 0x08)
        machine.io_write(base + 1, 1, 0x02)
    machine.io_read(0x3F8 + 2, 1)            # com1's THRE taken, com3's still pending
    assert machine.irq_levels[4] == 1
    machine.io_read(0x3E8 + 2, 1)
    assert machine.irq_levels[4] == 0


def test_backend_is_positional_and_closed_at_exit(tmp_path):
    log = tmp_path / "com1.log"
    machine, uart = build("com1", f"file={log}")
    uart.start()
    for c in b"boot ok":
        uart.write(0, 1, c)
    machine.close()
    uart.close()                             # a second close is harmless
    assert log.read_bytes() == b"boot ok"


def test_backend_defaults_to_null():
    dtype = device_types()["com2"]
    assert dtype.validate({}).backend == "null"
    machine, uart = build("com2")
    uart.start()
    uart.write(0, 1, ord("x"))
    uart.close()


def test_bad_backend_is_a_config_error_naming_the_port():
    with pytest.raises(ConfigError, match=r"^com3: unknown backend 'bogus'"):
        build("com3", "bogus")
