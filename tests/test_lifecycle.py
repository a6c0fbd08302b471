"""A running VM's life: name and run directory, SIGTERM as the ACPI power button, the
terminal given back after every signal (under a pseudo-terminal), the console escape,
VMM-side failures in one line, broken plugins, and bhyve(8)'s example command lines."""
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time

import pytest

from conftest import hvframe_cmd, requires_kvm, run_hvframe
from control_helpers import VmProcess


@requires_kvm
@pytest.mark.kvm
def test_sigterm_presses_the_power_button_and_the_guest_powers_off(tmp_path, guest_dir):
    vm = VmProcess(tmp_path, ["-m", "64M", "--kernel", guest_dir["acpi_power_button"],
                              "--cmdline", "spin=20000"])
    try:
        vm.wait_for("power button armed (PM1_CNT 0x1)")    # SCI_EN reads 1: ACPI mode
        pid = int((vm.run_dir / "vmtest" / "pid").read_text())
        assert pid == vm.proc.pid                           # the pidfile names the process
        vm.proc.send_signal(signal.SIGTERM)
        code, err = vm.finish()
    finally:
        vm.kill()
    assert code == 1, err
    assert "power button pressed (PM1_STS now 0x0)" in vm.console_text()
    assert "guest powered off (ACPI S5)" in err
    assert not (vm.run_dir / "vmtest").exists()


@requires_kvm
@pytest.mark.kvm
def test_a_guest_that_ignores_the_button_is_stopped_after_the_grace_time_or_a_second_sigterm(
        tmp_path, guest_dir):
    vm = VmProcess(tmp_path, ["-m", "64M", "--kernel", guest_dir["echo"], "--grace", "1"])
    vm.wait_for("echo ready")
    t0 = time.monotonic()
    vm.proc.send_signal(signal.SIGTERM)
    code, err = vm.finish()
    assert code == 4 and "did not power off within 1 s of SIGTERM" in err, err
    assert time.monotonic() - t0 < 20
    vm = VmProcess(tmp_path, ["-m", "64M", "--kernel", guest_dir["echo"]], name="twice")
    vm.wait_for("echo ready")
    vm.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    vm.proc.send_signal(signal.SIGTERM)
    code, err = vm.finish()
    assert code == 4 and "stopped by a second SIGTERM" in err, err


@requires_kvm
@pytest.mark.kvm
def test_the_same_name_twice_is_refused_in_one_line(tmp_path, guest_dir):
    vm = VmProcess(tmp_path, ["-m", "64M", "--kernel", guest_dir["echo"]])
    try:
        vm.wait_for("echo ready")
        p = subprocess.run(hvframe_cmd() + ["run", "-m", "64M", "--kernel", guest_dir["echo"],
                                            "vmtest"], env=vm.env, capture_output=True,
                           text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert p.returncode == 4
        assert p.stderr.strip().count("\n") == 0
        assert f"VM 'vmtest' is already running (pid {vm.proc.pid}" in p.stderr
    finally:
        vm.kill()


# -- the terminal, under a pseudo-terminal ------------------------------------------------------

def _spawn_on_pty(args, env):
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(hvframe_cmd() + args, stdin=slave, stdout=slave, stderr=slave,
                            env=env, start_new_session=True)
    return proc, master, slave, before


def _read_until(master, text: bytes, timeout=60.0) -> bytes:
    buf = b""
    end = time.monotonic() + timeout
    while text not in buf:
        left = end - time.monotonic()
        assert left > 0, f"{text!r} not seen: {buf[-300:]!r}"
        r, _, _ = select.select([master], [], [], min(left, 0.5))
        if r:
            try:
                buf += os.read(master, 4096)
            except OSError:
                break
    return buf


def _drain(master, proc, timeout=30.0) -> bytes:
    buf = b""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r, _, _ = select.select([master], [], [], 0.2)
        if r:
            try:
                data = os.read(master, 4096)
            except OSError:
                data = b""
            if data:
                buf += data
                continue
        if proc.poll() is not None:
            break
    return buf


@requires_kvm
@pytest.mark.kvm
@pytest.mark.parametrize("signals,status", [
    ((signal.SIGTERM, signal.SIGTERM), 4),
    ((signal.SIGHUP, signal.SIGHUP), 4),
    ((signal.SIGINT,), 4),
], ids=["SIGTERM", "SIGHUP", "SIGINT"])
def test_the_terminal_is_restored_after_each_signal(signals, status, tmp_path, guest_dir):
    env = dict(os.environ, HVFRAME_RUN_DIR=str(tmp_path / "run"))
    proc, master, slave, before = _spawn_on_pty(
        ["run", "-m", "64M", "-l", "com1,stdio", "--kernel", guest_dir["echo"], "pty"], env)
    try:
        _read_until(master, b"echo ready")
        assert termios.tcgetattr(slave) != before        # raw while the guest runs
        for sig in signals:
            proc.send_signal(sig)
            time.sleep(0.3)
        out = _drain(master, proc)
        assert proc.wait(30) == status, out
        assert termios.tcgetattr(slave) == before, out
        assert b"Traceback" not in out and b"lock order violation" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)


@requires_kvm
@pytest.mark.kvm
def test_console_escape_sends_a_literal_ctrl_a_and_quits(tmp_path, guest_dir):
    env = dict(os.environ, HVFRAME_RUN_DIR=str(tmp_path / "run"))
    proc, master, slave, before = _spawn_on_pty(
        ["run", "-v", "-m", "64M", "-l", "com1,stdio", "--kernel", guest_dir["echo"], "esc"], env)
    try:
        _read_until(master, b"echo ready")
        os.write(master, b"ab\x01\x01cd")           # Ctrl-A Ctrl-A: one Ctrl-A to the guest
        _read_until(master, b"ab\x01cd")
        os.write(master, b"\x01h")                  # help, from hvframe, not the guest
        _read_until(master, b"C-a x")
        os.write(master, b"\x01x")                  # quit
        out = _drain(master, proc)
        assert proc.wait(30) == 1, out
        assert b"quit from the console (Ctrl-A x)" in out
        assert termios.tcgetattr(slave) == before
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)


def test_console_escape_filter_keeps_state_across_reads():
    from hvframe_uart.backends import ConsoleEscape
    said = []
    esc = ConsoleEscape(lambda: None, said.append)
    assert esc.filter(b"a\x01") == (b"a", False)
    assert esc.filter(b"\x01b") == (b"\x01b", False)
    assert esc.filter(b"\x01zq") == (b"q", False)          # unknown escape: dropped
    assert esc.filter(b"\x01") == (b"", False)
    assert esc.filter(b"hx") == (b"x", False) and said
    assert esc.filter(b"12\x01x34") == (b"12", True)


# -- failures of the VMM side: one line, exit 4 ----------------------------------------------

@requires_kvm
@pytest.mark.kvm
@pytest.mark.parametrize("args,text", [
    (["-m", "100000G"], "cannot reserve"),
    (["-c", "255"], "-c 255: at most 254 vCPUs"),
    (["-G", "1234"], "GDB server is not supported"),
    (["-r", "ckpt"], "ckpt: No such file or directory"),
    (["--incoming", "udp:1"], "--incoming udp:1: use unix:PATH or tcp:HOST:PORT"),
    (["--qmp", "tcp:1234"], "use --qmp unix:PATH"),
    (["bad/name"], "VM name 'bad/name'"),
])
def test_vmm_side_failures_are_one_line_and_exit_4(args, text, tmp_path):
    p = subprocess.run(hvframe_cmd() + ["run"] + args, capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL,
                       env=dict(os.environ, HVFRAME_RUN_DIR=str(tmp_path)))
    assert p.returncode == 4, p.stderr
    assert text in p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr


def _broken_plugin(tmp_path, kind="lpc"):
    """A third-party plugin whose module raises on import, installed as metadata on a path."""
    site = tmp_path / "site"
    dist = site / "broken_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[hvframe.devices]\nbroken = broken_plugin_mod:{kind}\n")
    (site / "broken_plugin_mod.py").write_text("raise RuntimeError('this plugin is broken')\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(site)] + sys.path))


def test_a_broken_plugin_is_reported_and_skipped_by_devices(tmp_path):
    env = _broken_plugin(tmp_path)
    p = subprocess.run(hvframe_cmd() + ["devices", "-v"], capture_output=True, text=True,
                       timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    assert "com1  [lpc]" in p.stdout and "virtio-blk" in p.stdout
    assert "skipped: plugin broken_plugin_mod (broken-plugin 1.0) cannot be loaded: " \
           "RuntimeError: this plugin is broken" in p.stderr
    p = subprocess.run(hvframe_cmd() + ["run", "-l", "broken"], capture_output=True,
                       text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert p.returncode == 4
    assert p.stderr.count("\n") == 1 and "this plugin is broken" in p.stderr


# -- bhyve(8)'s examples -------------------------------------------------------------------------

@requires_kvm
@pytest.mark.kvm
def test_bhyve_example_with_virtio_blk_runs_unchanged_and_says_what_it_ignored(tmp_path):
    image = tmp_path / "image"
    image.write_bytes(b"\0" * (1 << 20))
    # bhyve(8) EXAMPLES: two vCPUs, hostbridge, LPC, virtio-blk, com1 on stdio, -H -P, 1G,
    # named vm1 (no boot ROM or kernel given: hvframe boots its demo guest).
    p = run_hvframe(["run", "-c", "2", "-s", "0,hostbridge", "-s", "1,lpc",
                     "-s", f"2,virtio-blk,{image}", "-l", "com1,stdio", "-H", "-P", "-m", "1G",
                     "-v", "vm1"], input="")
    assert p.returncode == 1, p.stderr
    assert "CPUs: 2 online" in p.stdout
    assert "-H (yield the vCPU thread on HLT): KVM's in-kernel HLT does; accepted" in p.stderr
    assert "-P (exit on PAUSE): accepted and ignored" in p.stderr
    assert "VM vm1: run directory" in p.stderr


def test_bhyve_config_dump_prints_the_configuration_and_exits(tmp_path):
    image = tmp_path / "vm0.img"
    image.write_bytes(b"\0" * (1 << 20))
    p = run_hvframe(["run", "-c", "2", "-m", "256", "-H", "-P", "-s", "0:0,hostbridge",
                     "-s", f"2:0,ahci-hd,{image}", "-s", "31,lpc", "-l", "com1,stdio",
                     "-o", "config.dump=1", "vm0"])
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "name=vm0"
    assert "cpus=2" in lines and "memory.size=256" in lines
    assert "pci.0.0.0.device=hostbridge" in lines and "lpc.com1.backend=stdio" in lines


def test_bhyve_uuid_option_and_vm_name_reach_the_configuration_tree():
    # bhyve's -U and its config variables `uuid` and `name` (bhyve_config(5)).
    u = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
    p = run_hvframe(["run", "-U", u, "-o", "config.dump=1", "vm7"])
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == "name=vm7" and f"uuid={u}" in p.stdout.splitlines()
    p = run_hvframe(["run", "-o", "name=vm8", "-o", "config.dump=1"])
    assert p.returncode == 0 and p.stdout.splitlines()[0] == "name=vm8", p.stderr
    assert p.stdout.count("name=") == 1


@pytest.mark.parametrize("args", [["-U", "not-a-uuid"], ["-U", "6ba7b810-9dad-11d1-80b4"],
                                  ["-o", "uuid=12345"], ["-o", "uuid.x=1"],
                                  ["-U", "{6ba7b810-9dad-11d1-80b4-00c04fd430c8}"],
                                  ["-U", "6ba7b8109dad11d180b400c04fd430c8"],
                                  ["-o", "config.dump=1", "-U", "nope"]])
def test_a_bad_system_uuid_is_one_line_and_exit_4(args):
    p = run_hvframe(["run", *args, "vm9"], input="")
    assert p.returncode == 4, (p.stdout, p.stderr)
    assert p.stderr.count("\n") == 1, p.stderr
    assert "not a UUID" in p.stderr or "single value" in p.stderr, p.stderr


def test_the_system_uuid_is_the_one_given_else_stable_per_vm_name():
    import uuid
    from hvframe.config import Config
    from hvframe.runner import system_uuid

    def of(**items):
        cfg = Config()
        for k, v in items.items():
            cfg.set(k, v)
        return system_uuid(cfg)
    assert of(name="web1") == of(name="web1")             # the same VM keeps its UUID
    assert len({of(name="web1"), of(name="web2"), of()}) == 3   # two VMs on one host differ
    given = "6BA7B810-9DAD-11D1-80B4-00C04FD430C8"
    assert of(name="web1", uuid=given) == uuid.UUID(given)


def test_a_restored_or_migrated_vm_keeps_the_uuid_its_guest_booted_with():
    from hvframe.config import Config
    from hvframe.runner import adopt_snapshot_uuid, system_uuid
    source = Config()
    source.set("name", "vm1")
    booted = str(system_uuid(source))
    target = Config()
    target.set("name", "vm1b")                  # the receiver's name differs on one host
    assert str(system_uuid(target)) != booted
    adopt_snapshot_uuid(target, {"config": {"name": "vm1", "uuid": booted}})
    assert str(system_uuid(target)) == booted
    for meta in ({}, {"config": "x"}, {"config": {"uuid": "garbage"}}):   # older or odd files
        odd = Config()
        adopt_snapshot_uuid(odd, meta)
        assert not odd.has("uuid")
