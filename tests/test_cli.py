"""Bad command lines: one clear line naming the problem, bhyve's error status 4, no traceback;
and how the program exits."""
import fcntl
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import hvframe_cmd, run_hvframe


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
    (["run", "--bogus"], "unrecognized arguments: --bogus (see `hvframe run --help`)"),
    (["run", "-s"], "expected one argument (see `hvframe run --help`)"),
    (["bogus"], "invalid choice: 'bogus'"),
])
def test_bad_command_line_gives_one_line_and_status_4(args, message):
    p = run_hvframe(args, input="")
    assert p.returncode == 4
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("hvframe: ")
    assert message in lines[0]
    assert "Traceback" not in p.stderr


def test_the_help_a_bad_command_line_points_at_exists():
    bad = run_hvframe(["run", "--bogus"], input="").stderr
    hint = bad[bad.index("(see `") + 6:bad.index(" --help`)")].split()
    assert hint == ["hvframe", "run"]
    assert run_hvframe([*hint[1:], "--help"], input="").returncode == 0


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


# ---- the program's exit ---------------------------------------------------------------------

@pytest.mark.parametrize("buffered", [False, True])
def test_a_reader_that_went_away_ends_the_listing_quietly(buffered):
    """`hvframe devices | head -1`: the pipe's reader is gone before the listing is written
    (unbuffered, the write fails in the listing; buffered, at the exit's flush)."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    os.close(r)                     # every write now fails with EPIPE
    try:
        p = subprocess.run(hvframe_cmd() + ["devices", "-v"], stdout=w, stderr=subprocess.PIPE,
                           text=True, timeout=120,
                           env=_unbuffered_removed() if buffered else None)
    finally:
        os.close(w)
    assert p.returncode in ((0, 1) if buffered else (1,))
    assert p.stderr == "", p.stderr


def _program(tmp_path, body):
    """Run `body`, then hvframe's program entry with `devices com1`, in a fresh interpreter."""
    script = textwrap.dedent(body) + textwrap.dedent("""
        import sys
        from hvframe.cli import entry
        sys.argv = ["hvframe", "devices", "com1"]
        entry()
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)


def test_the_program_runs_atexit_functions_and_keeps_its_status(tmp_path):
    p = _program(tmp_path, """
        import atexit
        atexit.register(lambda: print("atexit function ran"))
    """)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("com1") and p.stdout.endswith("atexit function ran\n"), p.stdout


def test_the_program_waits_for_a_thread_still_running(tmp_path):
    # The short exit skips the interpreter's teardown; with a thread alive it must not.
    p = _program(tmp_path, """
        import threading, time
        def finish_late():
            time.sleep(0.5)
            open("finished", "w").close()
        threading.Thread(target=finish_late).start()
    """)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "finished").exists()


def _unbuffered_removed():
    # Buffered as a user's terminal session has it: the write fails at the exit's flush.
    return {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def test_output_lost_to_a_full_disk_is_an_error_not_a_success():
    with open("/dev/full", "w") as full:
        p = subprocess.run(hvframe_cmd() + ["devices", "com1"], stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=120,
                           env=_unbuffered_removed())
    assert p.returncode == 4
    assert p.stderr == "hvframe: stdout: No space left on device\n", p.stderr


def test_a_closed_stdout_is_no_error():
    """`hvframe devices com1 >&-`: nothing to print to, nothing to report."""
    p = subprocess.run(hvframe_cmd() + ["devices", "com1"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, timeout=120,
                       env=_unbuffered_removed(), preexec_fn=lambda: os.close(1))
    assert p.returncode == 0 and p.stderr == "", p.stderr
