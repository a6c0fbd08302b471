"""Bad command lines: one clear line naming the problem, bhyve's error status 4, no traceback."""
import pytest

from conftest import run_hvframe


@pytest.mark.parametrize("args, message", [
    (["run", "-l", "com9,stdio"], "unknown LPC device 'com9'; installed: com1, com2, com3, com4, fwcfg"),
    (["run", "-s", "2,no-such-device"], "unknown PCI device 'no-such-device'"),
    (["run", "-s", "x,com1"], "bad PCI slot 'x'"),
    (["run", "-s", "32,com1"], "out of range"),
    (["run", "-s", "3:9,com1"], "out of range"),
    (["run", "-s", "4"], "missing device name"),
    (["run", "-s", "2,com1"], "(com1 is a lpc device)"),
    (["run", "-s", "0,hostbridge", "-s", "0:0,hostbridge"], "PCI slot 0:0:0 is already used by hostbridge"),
    (["run", "-s", "0,hostbridge,devid=pci"], "devid: not an integer"),
    (["run", "-l", "fwcfg,bochs"], "flavor: 'bochs' is not one of qemu"),
    (["run", "-m", "lots"], "-m lots: not a size"),
    (["run", "-m", "0"], "memory must be at least 1M"),
    (["run", "-c", "0"], "-c 0: cpus must be a positive number"),
    (["run", "-c", "100000"], "at most"),
    (["run", "--kernel", "/nonexistent/vmlinux"], "--kernel /nonexistent/vmlinux: no such file"),
    (["run", "-l", "com1,stdio", "-l", "com1,null"], "com1 is already configured"),
    (["run", "-l", "com1,bogus=1"], "unknown backend"),
    (["run", "-o", "nosuch.key=1"], "unknown setting 'nosuch.key'"),
    (["run", "-o", "cpu.policy=fast"], "cpu.policy=fast: use one of auto, host, emulator-safe"),
    (["run", "-o", "memory"], "use -o path=value"),
    (["run", "--initrd", "/etc/hostname"], "--initrd needs --kernel"),
    (["run", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_command_line_gives_one_line_and_status_4(args, message):
    p = run_hvframe(args, input="")
    assert p.returncode == 4
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("hvframe: ")
    assert message in lines[0]
    assert "Traceback" not in p.stderr


def test_kernel_that_is_not_a_kernel(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 4096)
    p = run_hvframe(["run", "--kernel", str(junk)])
    assert p.returncode == 4
    assert "neither a PVH ELF" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_devices_lists_each_device_with_its_kind_and_package():
    """From the entry-point metadata alone (no plugin imported: test_plugin_packages.py)."""
    p = run_hvframe(["devices"])
    assert p.returncode == 0
    assert "com1  [lpc]  -- hvframe-uart" in p.stdout
    assert "virtio-blk  [pci]  -- hvframe-virtio-blk" in p.stdout
    assert "acpi-pm  [platform]" in p.stdout


@pytest.mark.parametrize("args", [["devices", "-v"], ["devices", "com1", "acpi-pm"]])
def test_devices_verbose_or_named_gives_summaries_and_options(args):
    p = run_hvframe(args)
    assert p.returncode == 0, p.stderr
    assert "com1  [lpc]  16550A UART" in p.stdout and "hvframe-uart" in p.stdout
    assert "backend=<str>" in p.stdout
    assert "acpi-pm  [platform]" in p.stdout


def test_devices_of_an_unknown_name_is_one_line():
    p = run_hvframe(["devices", "com9"])
    assert p.returncode == 4
    assert p.stderr.startswith("hvframe: devices: unknown device 'com9'; installed: ")
    assert len(p.stderr.strip().splitlines()) == 1
