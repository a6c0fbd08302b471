"""hvframe's start-up on its own: what a command costs before the guest runs.

- `hvframe devices`, whole process (the listing comes from entry-point metadata; no plugin
  is imported);
- `hvframe run` of the embedded demo guest, process start to the guest's first console byte
  (COM1 on a pipe), and the same with a virtio-blk disk named (its plugin imported);
- the interpreter alone (`python -c pass`), the floor under all of these;
- where the demo run's time goes before the guest starts, phase by phase, in one process
  (printed, and kept in extra_info).

The side-by-side figure against QEMU microvm is in test_vs_qemu.py.

    python -m pytest benchmarks/test_startup.py
"""
import os
import subprocess
import sys
import time

import pytest

import qemu as q
from conftest import requires_kvm

ROUNDS = 15


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def record(benchmark, times, what):
    benchmark.extra_info.update({"what": what, "median_s": median(times), "min_s": min(times),
                                 "all_s": times})
    print(f"\n{what}: median {median(times) * 1000:.0f} ms, min {min(times) * 1000:.0f} ms")


def whole_process(cmd):
    t0 = time.perf_counter()
    subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def test_interpreter_floor(benchmark):
    times = []
    benchmark.pedantic(lambda: times.append(whole_process([sys.executable, "-c", "pass"])),
                       rounds=ROUNDS, iterations=1)
    record(benchmark, times, "python -c pass")


def test_devices_listing(benchmark):
    times = []
    benchmark.pedantic(lambda: times.append(whole_process([*q.hvframe_exe(), "devices"])),
                       rounds=ROUNDS, iterations=1)
    record(benchmark, times, "hvframe devices")


@requires_kvm
def test_demo_guest_first_console_byte(benchmark):
    cmd = [*q.hvframe_exe(), "run"]
    times = []
    benchmark.pedantic(lambda: times.append(q.run_until(cmd, first_byte=True).seconds),
                       rounds=ROUNDS, iterations=1)
    record(benchmark, times, "hvframe run (demo guest), start to first console byte")


@requires_kvm
def test_demo_guest_with_a_disk_first_console_byte(benchmark, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    cmd = [*q.hvframe_exe(), "run", "-s", "3,virtio-blk," + str(disk)]
    times = []
    benchmark.pedantic(lambda: times.append(q.run_until(cmd, first_byte=True).seconds),
                       rounds=ROUNDS, iterations=1)
    record(benchmark, times, "hvframe run -s 3,virtio-blk (demo guest), to first console byte")


PHASES = r"""
import os, tempfile, time
t0 = time.perf_counter(); marks = []
def mark(what): marks.append((what, time.perf_counter()))
os.environ["HVFRAME_RUN_DIR"] = tempfile.mkdtemp(prefix="hvframe-phases-")
from hvframe import cli; mark("import hvframe.cli (argparse)")
args = cli.make_parser("run").parse_args(["run", "-l", "com1,null"]); mark("command line parsed")
from hvframe.kvm import VmSetup
setup = VmSetup(cli._memory_size_hint(args)); mark("VM set-up thread started (native core)")
from hvframe.plugins import Registry
registry = Registry(); mark("Registry(): metadata, platform plugins (pluggy)")
cfg = cli.config_from_args(args, registry); mark("configuration: COM1's plugin")
from hvframe.control.lifecycle import Lifecycle
from hvframe.control.monitor import monitor_commands, qmp_version
from hvframe.control.qmp import QmpServer
from hvframe.control.rundir import RunDir
from hvframe import runner; mark("import control plane, machine, runner")
lc = Lifecycle(cfg, registry, name=f"phases-{os.getpid()}")
rundir = RunDir(lc.name)
qmp = QmpServer(monitor_commands(lc), qmp_version(), name="qmp")
qmp.listen(rundir.socket); qmp.start(); mark("run directory, QMP server listening")
p = runner.plan(cfg)
cfg.set("lpc.com1.device", "com1"); cfg.set("lpc.com1.backend", "null")
from hvframe.machine import Machine
m = Machine(p.memory_size, p.cpus, cpu_policy=p.cpu_policy, vm_setup=setup)
mark("Machine(): takes the VM and RAM made ahead")
runner.add_devices(m, cfg, registry); mark("devices (platform, COM1)")
from hvframe.acpi.build import install_direct_boot_tables
tables = install_direct_boot_tables(m); mark("ACPI and MP tables (import, build)")
from hvframe.loader import load_kernel
boot = load_kernel(m.memory, runner.demo_guest_path(), cmdline="", initrd_path=None,
                   e820=tables["e820"], rsdp_paddr=tables["rsdp"]); mark("kernel loaded (import, load)")
m.create_vcpus(); m.boot_direct(boot); m.start_devices(); mark("vCPUs made, devices started")
m.close(); qmp.stop(); rundir.close()
prev = t0
for what, t in marks:
    print(f"{(t - prev) * 1000:.2f}\t{what}"); prev = t
"""


@requires_kvm
def test_where_the_demo_start_up_goes(benchmark):
    """Phase by phase in one fresh process each round, in `hvframe run`'s order (the
    interpreter's own start is not in it: see test_interpreter_floor; nor is the time from
    the vCPU's start to the guest's first byte); medians and minimums printed."""
    rounds = []

    def once():
        out = subprocess.run([sys.executable, "-c", PHASES], capture_output=True, text=True,
                             check=True, cwd=os.path.dirname(__file__),
                             env=q.hvframe_env()).stdout
        rounds.append([line.split("\t") for line in out.strip().splitlines()])
    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    phases = {}
    for r in rounds:
        for ms, what in r:
            phases.setdefault(what, []).append(float(ms))
    benchmark.extra_info["phases_ms"] = {w: median(v) for w, v in phases.items()}
    benchmark.extra_info["phases_min_ms"] = {w: min(v) for w, v in phases.items()}
    print("\n   median      min")
    for what, v in phases.items():
        print(f"  {median(v):7.1f}  {min(v):7.1f} ms  {what}")
    print(f"  {sum(median(v) for v in phases.values()):7.1f}  "
          f"{sum(min(v) for v in phases.values()):7.1f} ms  total")
