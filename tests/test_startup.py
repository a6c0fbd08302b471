"""Start-up that pays only for what the command line asks for: a plain `hvframe run` of the
demo guest loads no module it does not use, and the VM made ahead on a thread
(hvframe.kvm.VmSetup) is taken by the machine or given back. No timing here: the figures
are benchmarks/test_startup.py's and benchmarks/test_vs_qemu.py's."""
import os
import subprocess
import sys

import pytest

from conftest import requires_kvm

# Modules a demo run has no use for, each of which cost its start-up milliseconds: the
# dataclass machinery (every device's options are plain DeviceOptions subclasses, the run's
# records collections.namedtuple classes or plain ones), construct (layouts come compiled from
# their cache, see test_packed.py), json (QMP decodes and encodes only once a client talks),
# pluggy and the inspect it imports (the plugins named are plain hvframe.hookspecs.hookimpl
# functions, called as they are; test_plugin_packages.py), typing (annotations' names are
# imported for type checkers only, and an options field's plain annotation, int or
# bool | None, is read without it: hvframe.device._plain_hint), uuid (only firmware's SMBIOS
# tables carry the system UUID), and the command line's other commands' modules.
NOT_IMPORTED = ("dataclasses", "construct", "json", "pluggy", "inspect", "hvframe.bench",
                "hvframe.pci.bus", "hvframe.guests.build", "hvframe.snapshot.checkpoint",
                "hvframe_virtio_blk", "typing", "uuid", "ctypes")

# A PC with disks, as SeaBIOS boots one (benchmarks/qemu.py:hvframe_seabios), less the
# firmware: the demo guest runs on it. Its device plugins, the PCI layer and the virtio
# transport need none of the modules above either (the PCI test device's module only when
# one is configured). Nor ctypes: the block backend's fallocate(2) is the core's.
PC_NOT_IMPORTED = ("dataclasses", "construct", "json", "pluggy", "inspect", "typing",
                   "hvframe.bench", "hvframe.guests.build", "hvframe.snapshot.checkpoint",
                   "hvframe.pci.testdev", "ctypes")

PROBE = r"""
import sys
from hvframe.cli import main
rc = main(["run", "-m", "32M", "-l", "com1,null", *sys.argv[1:]])
print(rc)
print(" ".join(sorted(sys.modules)))
"""


def _demo_run(tmp_path, *args):
    env = dict(os.environ, HVFRAME_RUN_DIR=str(tmp_path / "run"), XDG_CACHE_HOME=str(tmp_path))
    # A user's plain run: the lock-order checker (on for the test suite) brings its own.
    env.pop("HVFRAME_LOCK_CHECK", None)
    out = None
    for _ in range(2):      # the first fills the layout cache (through construct)
        r = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        out = r.stdout.split("\n")
    return int(out[0]), set(out[1].split())


@requires_kvm
def test_a_demo_run_imports_only_what_it_uses(tmp_path):
    rc, modules = _demo_run(tmp_path)
    assert rc == 1                                  # the demo guest powered off
    assert "hvframe_uart" in modules                # COM1's plugin, named on the command line
    assert sorted(m for m in modules if m.split(".")[0] in NOT_IMPORTED or m in NOT_IMPORTED) == []


@requires_kvm
def test_a_pc_with_virtio_and_ahci_disks_imports_only_what_it_uses(tmp_path):
    """The disk controllers' layouts come compiled and their checkpoint records are declared
    when a checkpoint asks (the AHCI plugin's own imports: test_ahci_plugin.py)."""
    disks = tmp_path / "vd.img", tmp_path / "sd.img"
    for disk in disks:
        disk.write_bytes(bytes(1 << 20))
    rc, modules = _demo_run(tmp_path, "-s", "0,hostbridge", "-s", "31,lpc",
                            "-s", f"2,virtio-blk,{disks[0]}", "-s", f"4,ahci,hd:{disks[1]}")
    assert rc == 1                                  # the demo guest powered off
    assert {"hvframe_virtio_blk.virtio_blk", "hvframe_ahci.hba", "hvframe.virtio.pci",
            "hvframe.lpc.bridge"} <= modules
    assert sorted(m for m in modules
                  if m.split(".")[0] in PC_NOT_IMPORTED or m in PC_NOT_IMPORTED) == []


@requires_kvm
def test_the_vm_made_ahead_is_taken_once_or_given_back():
    from hvframe.kvm import KvmError, VmSetup
    from hvframe.machine import Machine

    def fds():
        return set(os.listdir("/proc/self/fd"))

    before = fds()
    unused = VmSetup()
    unused.close()              # joined, its VM and /dev/kvm closed
    unused.close()
    assert fds() == before

    unused = VmSetup(16 << 20)                      # with its RAM
    unused.close()
    assert fds() == before

    # RAM made ahead for the machine's size, for another size, or none: each machine has
    # RAM of its own size in its VM's memory slots, and runs.
    for ahead in (16 << 20, 32 << 20, None):
        setup = VmSetup(ahead)
        m = Machine(16 << 20, vm_setup=setup)
        try:
            with pytest.raises(KvmError, match="taken already"):
                setup.take()
            setup.close()                           # taken: closing it leaves the VM alone
            assert m.memory.size == 16 << 20 and m.vm.memory is m.memory
            assert m.vm.fd in {int(f) for f in fds()}
            # Real mode at 0x1000: mov al, [0x2000]; out 0xe0, al; hlt
            m.memory.write(0x1000, bytes.fromhex("a00020e6e0f4"))
            m.memory.write(0x2000, b"\x5a")
            seen = []

            class Probe:
                def read(self, offset, size):
                    return 0

                def write(self, offset, size, value):
                    seen.append(value)
                    m.request_exit(1, "probe written")
            m.pio.register(0xE0, 1, Probe(), name="probe")
            m.create_vcpus()
            regs = m.vcpus[0].get_regs()
            sregs = m.vcpus[0].get_sregs()
            sregs.cs.base, sregs.cs.selector, regs.rip = 0, 0, 0x1000
            m.vcpus[0].set_sregs(sregs)
            m.vcpus[0].set_regs(regs)
            assert m.run(timeout=10) == 1 and seen == [0x5A]     # it ran from that RAM
        finally:
            m.close()
        assert fds() == before


@requires_kvm
def test_a_vm_that_could_not_be_made_ahead_fails_the_machine_with_its_reason(monkeypatch):
    from hvframe import kvm
    from hvframe.errors import HvError
    from hvframe.machine import Machine

    class NoKvm:
        def __init__(self):
            raise kvm.KvmError("/dev/kvm is not accessible (need rw permission)")
    monkeypatch.setattr(kvm, "Kvm", NoKvm)
    setup = kvm.VmSetup()
    with pytest.raises(HvError, match="not accessible"):
        Machine(16 << 20, vm_setup=setup)
    setup.close()


@requires_kvm
def test_a_take_that_gives_up_waiting_leaves_the_vm_to_close(monkeypatch):
    """take() that times out (or is interrupted) waiting for the set-up thread has not taken
    anything: close() waits again and gives back the VM, /dev/kvm and the RAM the thread
    went on to make."""
    import threading
    from hvframe import concurrency, kvm

    before = set(os.listdir("/proc/self/fd"))
    release = threading.Event()
    real_run = kvm.VmSetup._run

    def slow_run(self):
        release.wait(10)
        real_run(self)
    monkeypatch.setattr(kvm.VmSetup, "_run", slow_run)
    monkeypatch.setattr(concurrency, "JOIN_DEADLINE", 0.1)
    setup = kvm.VmSetup(16 << 20)
    with pytest.raises(kvm.KvmError, match="took more than"):
        setup.take(16 << 20)
    release.set()
    monkeypatch.setattr(concurrency, "JOIN_DEADLINE", 10.0)
    setup.close()
    for t in threading.enumerate():
        if t.name == "kvm-vm-setup":
            t.join(10)          # whatever it made is open by now, unless close() gave it back
    assert set(os.listdir("/proc/self/fd")) == before
