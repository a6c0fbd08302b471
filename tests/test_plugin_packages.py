"""Device plugins are separate packages: uninstalling one removes its devices."""
import os
import subprocess
import sys
import types

import pytest

from conftest import REPO, run_hvframe


def pip(*args):
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                          capture_output=True, text=True, timeout=300)


def installed(dist):
    return pip("show", dist).returncode == 0


@pytest.mark.skipif(not installed("hvframe-uart"), reason="hvframe-uart is not installed in this environment")
def test_uninstalling_the_uart_package_removes_its_devices():
    try:
        assert pip("uninstall", "-y", "hvframe-uart").returncode == 0
        p = run_hvframe(["devices"])
        assert p.returncode == 0
        assert "com1" not in p.stdout and "hvframe-uart" not in p.stdout
        assert "acpi-pm" in p.stdout  # the rest is still there
        p = run_hvframe(["run", "-l", "com1,stdio"], input="")
        assert p.returncode == 4
        assert len(p.stderr.strip().splitlines()) == 1
        assert p.stderr.startswith("hvframe: -l com1,stdio: unknown LPC device 'com1'; installed: ")
        assert "com2" not in p.stderr
    finally:
        r = pip("install", "--no-deps", "--no-build-isolation", "-e", os.path.join(REPO, "plugins", "uart"))
        assert r.returncode == 0, r.stderr
    p = run_hvframe(["devices"])
    assert "com1  [lpc]" in p.stdout and "hvframe-uart" in p.stdout


# ---- discovery from metadata: a plugin is imported when one of its devices is named ----------

import json  # noqa: E402
import textwrap  # noqa: E402

from conftest import hvframe_cmd, requires_kvm  # noqa: E402

DISK_PLUGINS = ("hvframe_virtio_blk", "hvframe_ahci")
# Reports the modules a command line imported: hvframe's main, then sys.modules to a file.
_PROBE = textwrap.dedent("""
    import json, sys
    from hvframe.cli import main
    out, args = sys.argv[1], sys.argv[2:]
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    with open(out, "w") as f:
        json.dump({"rc": rc, "modules": sorted(sys.modules)}, f)
    sys.exit(rc)
""")


def probe(tmp_path, args, env=None):
    """Run `hvframe ARGS` in a fresh interpreter (outside the repository, so that only the
    installed metadata is seen); returns (CompletedProcess, set of imported module names)."""
    out = tmp_path / "modules.json"
    p = subprocess.run([sys.executable, "-c", _PROBE, str(out), *args], cwd=tmp_path,
                       input="", capture_output=True, text=True, timeout=120,
                       env={**os.environ, **(env or {})})
    assert "Traceback" not in p.stderr, p.stderr
    report = json.loads(out.read_text())
    assert report["rc"] == p.returncode
    return p, set(report["modules"])


def imported(modules, package):
    return any(m == package or m.startswith(package + ".") for m in modules)


def test_devices_listing_imports_no_plugin(tmp_path):
    p, modules = probe(tmp_path, ["devices"])
    assert p.returncode == 0, p.stderr
    assert "virtio-blk  [pci]" in p.stdout and "ahci-hd  [pci]" in p.stdout
    for package in (*DISK_PLUGINS, "hvframe_uart", "hvframe.platform", "hvframe.lpc",
                    "hvframe.pci", "pluggy", "construct", "cffi"):
        assert not imported(modules, package), package


def test_naming_a_device_imports_its_plugin_and_no_other(tmp_path):
    p, modules = probe(tmp_path, ["devices", "virtio-blk"])
    assert p.returncode == 0, p.stderr
    assert "hvframe_virtio_blk.plugin" in modules
    assert not imported(modules, "hvframe_ahci") and not imported(modules, "hvframe_uart")
    # The same through `run`: the plugin is imported to read the -s options (the bad one
    # stops the run before any machine is made).
    p, modules = probe(tmp_path, ["run", "-s", "3,ahci-hd,disk.img,bogus=1"])
    assert p.returncode == 4 and "unexpected option 'bogus=1'" in p.stderr
    assert "hvframe_ahci.plugin" in modules and not imported(modules, "hvframe_virtio_blk")


def test_run_without_disks_imports_no_disk_plugin(tmp_path):
    """A machine stopped by a bad value after its devices were looked up (no KVM needed)."""
    p, modules = probe(tmp_path, ["run", "-l", "com1,null", "-s", "0,hostbridge",
                                  "--kernel", str(tmp_path / "missing.elf")])
    assert p.returncode == 4 and "no such file" in p.stderr
    assert "hvframe_uart.plugin" in modules and "hvframe.pci.plugin" in modules
    for package in DISK_PLUGINS:
        assert not imported(modules, package), package


@requires_kvm
def test_demo_guest_run_imports_no_disk_plugin(tmp_path):
    p, modules = probe(tmp_path, ["run"])
    assert p.returncode == 1, p.stderr          # the demo guest powers off
    assert "hvframe demo guest" in p.stdout
    for package in (*DISK_PLUGINS, "hvframe.pci.bus", "hvframe.guests", "cffi"):
        assert not imported(modules, package), package
    # Start-up pays only for what a run uses: `hvframe bench`'s scratch files and the QMP
    # server's error log are imported where they are needed, not by every run.
    for module in ("tempfile", "logging"):
        assert module not in modules, module


# ---- third-party plugins, good and bad: one line and exit status 4 for the bad -----------------

def fake_distribution(root, name, entry_points, modules=None):
    """An installed distribution (dist-info with entry_points.txt) and its plugin modules, in a
    directory that goes on PYTHONPATH."""
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[hvframe.devices]\n{lines}")
    for modname, source in (modules or {}).items():
        (root / f"{modname}.py").write_text(textwrap.dedent(source))
    return {"PYTHONPATH": str(root)}


PLUGIN_SOURCE = """
    from hvframe.device import DeviceType
    from hvframe.hookspecs import hookimpl

    @hookimpl
    def hvframe_device_types():
        return [DeviceType({name!r}, "pci", lambda machine, options: None,
                           summary="a third-party test device")]
"""


def one_line_error(p, *parts):
    assert p.returncode == 4, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvframe: "), p.stderr
    for part in parts:
        assert part in lines[0], lines[0]


def test_a_missing_plugin_module_is_one_line_when_named(tmp_path):
    env = fake_distribution(tmp_path / "site", "ghost-plugin", {"ghost-dev": "ghost_missing:pci"})
    p, modules = probe(tmp_path, ["devices"], env)
    assert p.returncode == 0 and "ghost-dev  [pci]  -- ghost-plugin 1.0" in p.stdout
    p, _ = probe(tmp_path, ["run", "-s", "3,ghost-dev"], env)
    one_line_error(p, "plugin ghost_missing (ghost-plugin 1.0) cannot be loaded",
                   "ModuleNotFoundError")


def test_metadata_and_hooks_that_disagree_are_one_line(tmp_path):
    env = fake_distribution(tmp_path / "site", "liar-plugin",
                            {"liar-dev": "liar_plugin:pci", "liar-lpc": "liar_plugin:lpc"},
                            {"liar_plugin": PLUGIN_SOURCE.format(name="liar-dev")})
    p, _ = probe(tmp_path, ["run", "-s", "3,liar-dev"], env)
    one_line_error(p, "plugin liar_plugin (liar-plugin 1.0): metadata and hooks disagree",
                   "liar-lpc")
    env = fake_distribution(tmp_path / "site2", "kind-plugin", {"kind-dev": "kind_plugin:lpc"},
                            {"kind_plugin": PLUGIN_SOURCE.format(name="kind-dev")})
    p, _ = probe(tmp_path, ["run", "-l", "kind-dev"], env)
    one_line_error(p, "kind-dev is pci, not lpc")


def test_a_plugin_whose_hook_fails_is_one_line(tmp_path):
    env = fake_distribution(tmp_path / "site", "broken-plugin", {"broken-dev": "broken_plugin:pci"},
                            {"broken_plugin": """
                                from hvframe.hookspecs import hookimpl

                                @hookimpl
                                def hvframe_device_types():
                                    raise RuntimeError("no devices today")
                             """})
    p, _ = probe(tmp_path, ["devices", "broken-dev"], env)
    one_line_error(p, "broken_plugin", "RuntimeError: no devices today")


def test_old_style_entry_point_is_imported_eagerly(tmp_path):
    """An entry point whose name is not a device name (and whose value is a bare module) is
    imported as before, and its devices are all there."""
    env = fake_distribution(tmp_path / "site", "oldie-plugin", {"oldie": "oldie_plugin"},
                            {"oldie_plugin": PLUGIN_SOURCE.format(name="oldie-dev")})
    p, modules = probe(tmp_path, ["devices"], env)
    assert p.returncode == 0, p.stderr
    assert "oldie_plugin" in modules
    assert "oldie-dev  [pci]  -- oldie-plugin 1.0" in p.stdout and "oldie  [" not in p.stdout
    p, _ = probe(tmp_path, ["run", "-s", "3,oldie-dev,bogus"], env)
    one_line_error(p, "oldie-dev: unexpected option 'bogus'")
    # An old-style plugin that cannot be imported: `hvframe devices` reports it and lists
    # the rest (issue 13); a run, which would need it, stops in one line.
    env = fake_distribution(tmp_path / "site2", "gone-plugin", {"gone": "gone_missing"})
    p, _ = probe(tmp_path, ["devices"], env)
    assert p.returncode == 0 and "com1  [lpc]" in p.stdout, p.stderr
    assert "skipped: plugin gone_missing (gone-plugin 1.0) cannot be loaded" in p.stderr
    p, _ = probe(tmp_path, ["run", "-s", "3,oldie-dev"], env)
    one_line_error(p, "plugin gone_missing (gone-plugin 1.0) cannot be loaded")


def test_every_entry_point_of_this_tree_matches_its_hook():
    """Each installed package's metadata names exactly its devices (else Registry raises)."""
    from hvframe.plugins import Registry, read_entry_points
    # Not the checkout itself: a stale hvframe.egg-info left there by an old build would
    # shadow the installed metadata.
    path = [p for p in sys.path if os.path.abspath(p or ".") != REPO]
    entries = [e for e in read_entry_points(path=path)
               if e.package.split()[0].startswith("hvframe")]
    assert all(e.kind is not None for e in entries), "old-style entry points left in this tree"
    registry = Registry(entries=entries)
    registry.load_all()
    assert {n for t in registry.types for n in t.names} == {e.name for e in entries}


# ---- hvframe's hookimpl: plain functions on the run path, pluggy plugins for everything else ----

REGISTRY_PROBE = r"""
import sys
from hvframe.plugins import Registry
registry = Registry()
com1 = registry.require("com1", "lpc", "-l com1")
print("pluggy before the manager:", "pluggy" in sys.modules)
pm = registry.pm                    # made on first use, with the plugins already loaded
print("registered:", pm.get_plugin("hvframe_uart.plugin") is not None)
names = sorted(t.name for types in pm.hook.hvframe_device_types() for t in types)
print("com1 through pluggy:", "com1" in names, "rtc through pluggy:", "rtc" in names)
print("same type:", registry.require("com1", "lpc", "-l com1") is com1)
"""


def test_plugins_loaded_without_pluggy_are_pluggy_plugins_once_a_manager_is_made(tmp_path):
    p = subprocess.run([sys.executable, "-c", REGISTRY_PROBE], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        "pluggy before the manager: False",
        "registered: True",
        "com1 through pluggy: True rtc through pluggy: True",
        "same type: True"]


@pytest.mark.parametrize("marker", [
    # pluggy's own marker: the plugin goes through a PluginManager, as any pluggy plugin
    "pluggy.HookimplMarker('hvframe')",
    # hvframe's, with an option only pluggy honours: the same
    "__import__('hvframe.hookspecs').hookspecs.hookimpl(tryfirst=True)",
], ids=["pluggy's marker", "hookimpl with pluggy options"])
def test_a_hook_that_needs_pluggy_goes_through_it(tmp_path, marker):
    env = fake_distribution(tmp_path / "site", "pm-plugin", {"pm-dev": "pm_plugin:pci"},
                            {"pm_plugin": f"""
                                import pluggy
                                from hvframe.device import DeviceType

                                @{marker}
                                def hvframe_device_types():
                                    return [DeviceType("pm-dev", "pci", lambda machine, options: None,
                                                       summary="found through pluggy")]
                             """})
    p, modules = probe(tmp_path, ["devices", "pm-dev"], env)
    assert p.returncode == 0, p.stderr
    assert "pm-dev  [pci]  found through pluggy  -- pm-plugin 1.0" in p.stdout
    assert "pluggy" in modules


def test_a_bad_hookimpl_option_is_one_line(tmp_path):
    env = fake_distribution(tmp_path / "site", "opt-plugin", {"opt-dev": "opt_plugin:pci"},
                            {"opt_plugin": PLUGIN_SOURCE.format(name="opt-dev").replace(
                                "@hookimpl", "@hookimpl(firstly=True)")})
    p, _ = probe(tmp_path, ["devices", "opt-dev"], env)
    one_line_error(p, "plugin opt_plugin (opt-plugin 1.0) cannot be loaded", "TypeError",
                   "firstly")


def test_a_function_marked_after_the_manager_is_made_is_seen_by_it():
    from hvframe import hookspecs
    from hvframe.plugins import new_plugin_manager
    pm = new_plugin_manager()
    module = types.ModuleType("late_plugin")

    def hvframe_device_types():
        return ["late"]
    hvframe_device_types.__module__ = "late_plugin"
    module.hvframe_device_types = hookspecs.hookimpl(hvframe_device_types)
    pm.register(module)
    assert pm.hook.hvframe_device_types() == [["late"]]


PLAIN_PROBLEMS = """
from hvframe.device import DeviceType
from hvframe.hookspecs import hookimpl

class Old:                          # an object plugin kept beside the module's hook
    @hookimpl
    def hvframe_device_types(self):
        return []

def _factory():
    @hookimpl
    def hvframe_device_types():     # marked, but not the module's: never called
        return [DeviceType("hidden-dev", "pci", lambda machine, options: None)]
    return hvframe_device_types

_factory()

@hookimpl
def hvframe_device_types():
    return [DeviceType("plain-dev", "pci", lambda machine, options: None)]
"""


def test_only_the_modules_own_hook_is_called_and_a_reload_leaves_no_double(tmp_path,
                                                                           monkeypatch):
    import importlib
    from hvframe.plugins import Entry, Registry
    (tmp_path / "plain_problems.py").write_text(PLAIN_PROBLEMS)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("plain_problems")
    importlib.reload(module)
    try:
        registry = Registry(entries=[Entry("plain-dev", "plain_problems", None, "pci", "pkg 1")])
        assert registry.require("plain-dev", "pci", "-s 3").name == "plain-dev"
        assert registry.get("hidden-dev") is None
    finally:
        sys.modules.pop("plain_problems", None)
