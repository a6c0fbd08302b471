"""The ahci, ahci-hd and ahci-cd command lines: ports and their options, and one-line errors
for everything a user can get wrong."""
import pytest

from hvframe.testing.helpers import run_hvframe
from hvframe.config import Config
from hvframe.errors import ConfigError
from hvframe.plugins import Registry
from hvframe.runner import add_option, add_slot
from hvframe_ahci.hba import AhciHba
from hvframe_ahci.testdriver import AhciDriver, build_machine


@pytest.fixture
def images(tmp_path):
    hd, hd2, cd = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "c.iso"
    hd.write_bytes(bytes(1 << 20))
    hd2.write_bytes(bytes(1 << 16))
    cd.write_bytes(bytes(2048 * 16))
    return hd, hd2, cd


def ports_of(arg, *extra):
    reg, cfg = Registry(), Config()
    add_slot(cfg, reg, arg)
    for o in extra:
        add_option(cfg, o)
    slot = arg.split(",")[0]
    group = cfg.group(f"pci.0.{slot}.0")
    return reg.require(group["device"], "pci", "test").validate(group).ports


def test_registered_device_types():
    reg = Registry()
    for name in ("ahci", "ahci-hd", "ahci-cd"):
        t = reg.get(name, "pci")
        assert t is not None and t.package.startswith("hvframe-ahci")


def test_ports_with_their_own_options(images):
    hd, hd2, cd = images
    ports = ports_of(f"4,ahci,hd:{hd},ro,sectorsize=512/4096,ser=S1,cd:{cd},hd:{hd2},"
                     f"nmrr=1,model=My Disk")
    assert list(ports) == [0, 1, 2]
    assert ports[0].type == "hd" and ports[0].path == str(hd) and ports[0].ro
    assert ports[0].sectorsize == "512/4096" and ports[0].ser == "S1"
    assert ports[1].type == "cd" and ports[1].ro                     # CDs are read-only
    assert ports[2].nmrr == 1 and ports[2].model == "My Disk" and not ports[2].ro


def test_bhyve_single_port_aliases(images):
    hd, _, cd = images
    p = ports_of(f"4,ahci-hd,{hd},ro,nodelete")
    assert list(p) == [0]
    assert (p[0].type, p[0].path, p[0].ro, p[0].nodelete) == ("hd", str(hd), True, True)
    assert ports_of(f"5,ahci-cd,{cd}")[0].type == "cd"
    assert ports_of(f"4,ahci-hd,path={hd}")[0].path == str(hd)


def test_ports_through_the_configuration_tree(images):
    hd, _, _ = images
    p = ports_of(f"4,ahci,hd:{hd}", f"pci.0.4.0.port.3.type=hd", f"pci.0.4.0.port.3.path={hd}",
                 "pci.0.4.0.port.3.ser=XYZ")
    assert sorted(p) == [0, 3] and p[3].ser == "XYZ"


def test_a_full_controller_has_32_ports(images):
    hd, _, _ = images
    m = build_machine("4,ahci," + ",".join(f"hd:{hd},ro" for _ in range(32)))
    drv = AhciDriver(m, 4)
    assert drv.read("pi") == 0xFFFFFFFF and drv.read("cap") & 0x1F == 31
    assert drv.port(31).read("ssts") == 0x133 and drv.port(31).read("sig") == 0x101
    m.close()


@pytest.mark.parametrize("conf, message", [
    ("ahci", "ahci needs a port"),
    ("ahci,ro,hd:{hd}", "'ro' before any port"),
    ("ahci,{hd}", "before any port"),
    ("ahci,hd:", "'hd:' needs a path"),
    ("ahci,hd:{hd},bogus=1", "unexpected option 'bogus=1'"),
    ("ahci,hd:{hd},sectorsize=abc", "sectorsize: 'abc' is not logical"),
    ("ahci,hd:{hd},sectorsize=1000", "bad logical sector size 1000"),
    ("ahci,cd:{cd},sectorsize=512", "a CD-ROM has 2048-byte sectors"),
    ("ahci,hd:{hd},nmrr=7", "nmrr=7"),
    ("ahci,hd:{hd},nmrr=fast", "nmrr: not an integer"),
    ("ahci,hd:{hd},ro=maybe", "ro: not a boolean"),
    ("ahci,hd:{hd},model=" + "M" * 41, "at most 40"),
    ("ahci,hd:{hd},ser=" + "S" * 21, "at most 20"),
    ("ahci,hd:/nonexistent/disk.img", "/nonexistent/disk.img: no such file"),
    ("ahci," + ",".join(["hd:{hd}"] * 33), "at most 32 ports"),
    ("ahci-hd", "needs a path, e.g. -s 4,ahci-hd,disk.img"),
    ("ahci-hd,{hd},{hd}", "unexpected option"),
    ("ahci-cd,{hd},ro", None),       # fine: ro is implied but allowed
])
def test_bad_command_lines_are_one_line_config_errors(images, conf, message):
    hd, _, cd = images
    arg = "4," + conf.format(hd=hd, cd=cd)
    if message is None:
        build_machine(arg).close()
        return
    with pytest.raises(ConfigError) as e:
        m = build_machine(arg)
        m.close()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_port_in_the_configuration_tree(images):
    hd, _, _ = images
    with pytest.raises(ConfigError, match="ports are numbered 0-31"):
        ports_of(f"4,ahci,hd:{hd}", f"pci.0.4.0.port.40.path={hd}")
    with pytest.raises(ConfigError, match="unknown option 'colour'"):
        ports_of(f"4,ahci,hd:{hd}", "pci.0.4.0.port.0.colour=red")
    with pytest.raises(ConfigError, match="port options go in port.N.ro"):
        ports_of(f"4,ahci,hd:{hd}", "pci.0.4.0.ro=on")


def test_failed_port_closes_the_ones_already_open(images, monkeypatch):
    hd, _, _ = images
    closed = []
    from hvframe.block import backend
    real_close = backend.BlockBackend.close
    monkeypatch.setattr(backend.BlockBackend, "close",
                        lambda self: (closed.append(self.path), real_close(self))[1])
    with pytest.raises(ConfigError):
        build_machine(f"4,ahci,hd:{hd},hd:/nonexistent.img")
    assert str(hd) in closed


def test_closing_the_machine_closes_the_images(images):
    hd, _, cd = images
    m = build_machine(f"4,ahci,hd:{hd},cd:{cd}")
    hba = next(d for d in m.devices if isinstance(d, AhciHba))
    backends = [p.device.backend for p in hba.ports]
    m.close()
    assert all(b.closed for b in backends)


def test_hvframe_run_reports_a_bad_ahci_line_in_one_line():
    p = run_hvframe(["run", "-s", "0,hostbridge", "-s", "4,ahci,hd:/nonexistent/disk.img"],
                    input="")
    assert p.returncode == 4
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "/nonexistent/disk.img: no such file" in lines[0]
    p = run_hvframe(["run", "-s", "4,ahci,ro"], input="")
    assert p.returncode == 4 and len(p.stderr.strip().splitlines()) == 1
    assert "before any port" in p.stderr


# What a run with an AHCI line does before the guest starts, minus KVM: the plugin's modules
# imported after the core modules they build on (whose own imports are theirs), and a
# command line with a disk and a CD-ROM turned into the controller's options.
_RUN_PATH_PROBE = r"""
import sys
import hvframe.block.backend, hvframe.config, hvframe.core_native, hvframe.device
import hvframe.dispatch, hvframe.hookspecs, hvframe.memory, hvframe.packed, hvframe.pci.device
import hvframe.pci.msi, hvframe.plugins, hvframe.runner, hvframe.snapshot.pci
import hvframe.snapshot.state
before = set(sys.modules)
from hvframe.config import Config
from hvframe.plugins import Registry
from hvframe.runner import add_slot
reg, cfg = Registry(), Config()
add_slot(cfg, reg, f"4,ahci,hd:{sys.argv[1]},cd:{sys.argv[2]}")
group = cfg.group("pci.0.4.0")
ports = reg.require(group["device"], "pci", "probe").validate(group).ports
assert [p.type for p in ports.values()] == ["hd", "cd"], ports
from hvframe_ahci import ata, atapi, hba, plugin, regs
print(" ".join(sorted(set(sys.modules) - before)))
"""


def test_the_plugin_brings_no_construct_dataclasses_or_typing_into_a_run(images, tmp_path):
    """construct (the layouts come compiled from their cache; checkpoint records are made
    when a checkpoint asks), the dataclass machinery (the options are plain DeviceOptions
    subclasses) and typing (names for type checkers only) each cost a run milliseconds."""
    import os
    import subprocess
    import sys
    hd, _, cd = images
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    for _ in range(2):      # the first fills the layout cache (through construct)
        r = subprocess.run([sys.executable, "-c", _RUN_PATH_PROBE, str(hd), str(cd)], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    added = set(r.stdout.split())
    assert "hvframe_ahci.plugin" in added
    assert sorted(m for m in added
                  if m.split(".")[0] in ("construct", "dataclasses", "typing")) == []
