"""`hvframe ctl` against a running guest: registers in bhyvectl's layout, exit counts per
vCPU and device, pause and resume, destroy; and its one-line refusals."""
import os
import re
import subprocess
import time

import pytest

from conftest import hvframe_cmd, requires_kvm
from control_helpers import VmProcess


@pytest.fixture
def vm(tmp_path, guest_dir):
    v = VmProcess(tmp_path, ["-c", "2", "-m", "64M", "--kernel", guest_dir["acpi_power_button"],
                             "--cmdline", "spin=20000"])
    v.wait_for("tick 1")
    yield v
    v.kill()


@requires_kvm
@pytest.mark.kvm
def test_get_all_prints_every_vcpus_registers_in_bhyvectls_layout(vm):
    p = vm.ctl("--get-all")
    assert p.returncode == 0, p.stderr
    for cpu in (0, 1):
        assert re.search(rf"^rip\[{cpu}\]\t\t0x[0-9a-f]{{16}}$", p.stdout, re.M), p.stdout
        assert re.search(rf"^cs desc\[{cpu}\]\t0x[0-9a-f]{{16}}/0x[0-9a-f]{{8}}/0x[0-9a-f]{{8}}$",
                         p.stdout, re.M)
        assert re.search(rf"^cr0\[{cpu}\]\t\t0x", p.stdout, re.M)
    # vCPU 0 runs the guest in protected mode at 1 MiB, from a code segment of its GDT.
    cr0 = int(re.search(r"^cr0\[0\]\t\t(0x[0-9a-f]+)", p.stdout, re.M).group(1), 16)
    rip = int(re.search(r"^rip\[0\]\t\t(0x[0-9a-f]+)", p.stdout, re.M).group(1), 16)
    assert cr0 & 1 and 0x100000 <= rip < 0x200000
    cs = int(re.search(r"^cs\[0\]\t\t(0x[0-9a-f]{4})$", p.stdout, re.M).group(1), 16)
    assert cs and not cs & 3
    only = vm.ctl("--get-all", "--cpu", "1")
    assert "rip[1]" in only.stdout and "rip[0]" not in only.stdout
    assert vm.proc.poll() is None
    assert (vm.ctl("--get-stats").returncode == 0)      # and the guest still runs
    before = vm.ticks()
    vm.wait_for(f"tick {before + 1}")


@requires_kvm
@pytest.mark.kvm
def test_get_stats_counts_exits_per_vcpu_and_per_device(vm):
    p = vm.ctl("--get-stats")
    assert p.returncode == 0, p.stderr
    assert "vcpu0 stats:" in p.stdout and "vcpu1 stats:" in p.stdout
    io = int(re.search(r"^number of port I/O exits\s+\t(\d+)", p.stdout, re.M).group(1))
    assert io > 10          # the console's LSR polls and THR writes
    rows = dict(re.findall(r"^(com1 \(io 0x3f8\+0x8\))\s*\t(\d+)$", p.stdout, re.M))
    assert int(rows["com1 (io 0x3f8+0x8)"]) > 10, p.stdout
    vm.wait_for(f"tick {vm.ticks() + 1}")
    again = vm.ctl("--get-stats").stdout
    later = int(re.search(r"^com1 \(io 0x3f8\+0x8\)\s*\t(\d+)$", again, re.M).group(1))
    assert later > int(rows["com1 (io 0x3f8+0x8)"])


@requires_kvm
@pytest.mark.kvm
def test_pause_resume_and_destroy(vm):
    assert vm.ctl("--pause").returncode == 0
    before = vm.ticks()
    time.sleep(1.0)
    assert vm.ticks() - before <= 1
    assert vm.ctl("--resume").returncode == 0
    vm.wait_for(f"tick {vm.ticks() + 2}")
    p = vm.ctl("--destroy")
    assert p.returncode == 0, p.stderr
    code, err = vm.finish()
    assert code == 1 and "stopped by QMP quit" in err


def test_ctl_refusals_are_one_line(tmp_path):
    env = dict(os.environ, HVFRAME_RUN_DIR=str(tmp_path))

    def ctl(*args):
        return subprocess.run(hvframe_cmd() + ["ctl", *args], env=env, capture_output=True,
                              text=True, timeout=60)
    p = ctl("--vm", "nosuch", "--get-all")
    assert p.returncode == 4 and "no VM named 'nosuch' is running" in p.stderr
    for flag in ("--suspend", "--checkpoint"):
        p = ctl("--vm", "x", flag, str(tmp_path / "ckpt"))
        assert p.returncode == 4 and "no VM named 'x' is running" in p.stderr
        assert p.stderr.count("\n") == 1
    p = ctl("--vm", "x")
    assert p.returncode == 4 and "nothing to do" in p.stderr
    p = ctl("--get-all")
    assert p.returncode == 4 and "--vm" in p.stderr
