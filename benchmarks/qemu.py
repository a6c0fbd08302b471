"""hvframe and QEMU side by side (benchmarks/test_vs_qemu.py): the guests, the two command lines
for each, and whole-process timing.

Both VMMs run the same guest binary on the same host: the PVH test guests of tests/guests
(hvframe `--kernel`, QEMU `-kernel` on `-M microvm`), Debian's SeaBIOS with a boot-sector disk
from tests/diskimages.py, and the Linux test kernel of scripts/build-test-kernel.sh. QEMU is
Debian's `qemu-system-x86` package with KVM (flags from the platform notes: `-cpu
host,-arch-capabilities`, or `kvm64,vendor=GenuineIntel` for Linux). The PVH guests power off
by writing port 0x404 (hvframe's ACPI PM1a_CNT); QEMU gets an `isa-debug-exit` device there, so
it exits as soon as the guest is done, as hvframe does. The boot sector powers off through
0x604 under QEMU+SeaBIOS (PIIX4 PM) and Linux reboots on panic (`-no-reboot` ends QEMU).

    python benchmarks/qemu.py              # print every command pair the benchmark runs

Where hvframe's time goes (used for the README's notes): startup_parts(kernel) times the
phases of one `hvframe run`; print_exit_profile(args) runs `hvframe run ARGS` with every
Python device handler counted and timed, and prints the exits by kind.

A run is timed from just before the VMM process is started: to a marker on its serial
output (`run_until`, then the process group is killed) or to its exit.
"""
from __future__ import annotations

import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
if str(TESTS) not in sys.path:          # diskimages.py and linux_kernel.py are shared with tests/
    sys.path.insert(0, str(TESTS))

QEMU = shutil.which("qemu-system-x86_64")
QEMU_MISSING = None if QEMU else ("qemu-system-x86_64 is not installed "
                                  "(Debian: apt-get install qemu-system-x86)")
SEABIOS = "/usr/share/seabios/bios.bin"
MEMORY = "128M"
PVH_MEMORY = "32M"
# No default devices, no display; PVH guests run on -M microvm with the power-off port they use.
# The PIT drops ticks a guest could not take under both (hvframe always does: hvframe.kvm).
QEMU_COMMON = ["-accel", "kvm", "-nodefaults", "-no-user-config", "-display", "none",
               "-global", "kvm-pit.lost_tick_policy=discard"]
QEMU_CPU = ["-cpu", "host,-arch-capabilities"]
QEMU_LINUX_CPU = ["-cpu", "kvm64,vendor=GenuineIntel"]
QEMU_POWEROFF = ["-device", "isa-debug-exit,iobase=0x404,iosize=2"]
# SeaBIOS mirrors its console on COM1 only when fw_cfg says so: hvframe's LPC bridge always
# does; QEMU is given the same file, so both guests print the same text.
SERCON = ("etc/sercon-port", (0x3F8).to_bytes(2, "little"))
ROOT_MOUNTED = b"VFS: Mounted root (ext2 filesystem)"
BOOT_MARKER = "HVF-BENCH-BOOT"


def hvframe_exe() -> list[str]:
    """`hvframe` as a user starts it (the console script), else `python -m hvframe`."""
    exe = shutil.which("hvframe")
    return [exe] if exe else [sys.executable, "-m", "hvframe"]


def hvframe_env() -> dict[str, str]:
    """The environment for hvframe's processes: compiled bytecode cached, as an installed
    package has it. A PYTHONDONTWRITEBYTECODE=1 environment (this one has it) makes every start
    compile hvframe's sources again (about 0.4 s); the cache goes outside the source tree."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("PYTHONPYCACHEPREFIX", str(Path.home() / ".cache" / "hvframe" / "pycache"))
    return env


def guest(name: str) -> str:
    from hvframe.guests.build import cached_guest
    return cached_guest(name)


# ---- command lines ----------------------------------------------------------------------
# serial: "stdio" (the run is read through a pipe) or a file path.

def _hv_serial(serial: str) -> list[str]:
    return ["-l", "com1,stdio" if serial == "stdio" else f"com1,file={serial}"]


def _qemu_serial(serial: str) -> list[str]:
    return ["-serial", "stdio" if serial == "stdio" else f"file:{serial}"]


def hvframe_pvh(kernel: str, cmdline: str = "", serial: str = "stdio") -> list[str]:
    args = ["-a", cmdline] if cmdline else []
    return [*hvframe_exe(), "run", "-m", PVH_MEMORY, *_hv_serial(serial), "--kernel", kernel, *args]


def qemu_pvh(kernel: str, cmdline: str = "", serial: str = "stdio",
             extra: Sequence[str] = ()) -> list[str]:
    args = ["-append", cmdline] if cmdline else []
    return [QEMU or "qemu-system-x86_64", "-M", "microvm", *QEMU_COMMON, *QEMU_CPU,
            "-m", PVH_MEMORY, *_qemu_serial(serial), "-kernel", kernel, *args,
            *QEMU_POWEROFF, *extra]


def hvframe_seabios(disk: str, bus: str, serial: str = "stdio") -> list[str]:
    dev = {"virtio-blk": f"2,virtio-blk,{disk}", "ahci": f"4,ahci,hd:{disk}"}[bus]
    return [*hvframe_exe(), "run", "-m", MEMORY, "-s", "0,hostbridge", "-s", "31,lpc",
            "-s", dev, *_hv_serial(serial), "-l", f"bootrom,{SEABIOS}"]


def qemu_seabios(disk: str, bus: str, sercon_file: str, serial: str = "stdio") -> list[str]:
    dev = {"virtio-blk": ["-device", "virtio-blk-pci,drive=d0,addr=2"],
           "ahci": ["-device", "ahci,id=sata,addr=4", "-device", "ide-hd,drive=d0,bus=sata.0"]}[bus]
    return [QEMU or "qemu-system-x86_64", "-M", "pc", *QEMU_COMMON, *QEMU_CPU, "-m", MEMORY,
            "-bios", SEABIOS, "-fw_cfg", f"name={SERCON[0]},file={sercon_file}",
            "-drive", f"file={disk},format=raw,if=none,id=d0", *dev, *_qemu_serial(serial)]


def linux_cmdline() -> str:
    """The test kernel's command line (tests/linux_kernel.py) with its root on virtio-blk.
    lapic=notscdeadline: under hvframe (which offers the TSC-deadline timer in CPUID) the
    kernel otherwise stalls for good after "vgaarb: loaded", where it switches its clocksource
    (seen 2026-12-01); QEMU's kvm64 CPU has no TSC-deadline timer, so it changes nothing there."""
    from linux_kernel import CMDLINE
    return CMDLINE + " acpi=off root=/dev/vda rw lapic=notscdeadline"


def hvframe_linux(kernel: str, image: str, serial: str = "stdio") -> list[str]:
    return [*hvframe_exe(), "run", "-m", MEMORY, "-s", "0,hostbridge", "-s", f"2,virtio-blk,{image}",
            *_hv_serial(serial), "--kernel", kernel, "-a", linux_cmdline()]


def qemu_linux(kernel: str, image: str, serial: str = "stdio") -> list[str]:
    return [QEMU or "qemu-system-x86_64", "-M", "pc", *QEMU_COMMON, *QEMU_LINUX_CPU, "-m", MEMORY,
            "-drive", f"file={image},format=raw,if=none,id=d0",
            "-device", "virtio-blk-pci,drive=d0,addr=2", *_qemu_serial(serial),
            "-kernel", kernel, "-append", linux_cmdline(), "-no-reboot"]


# ---- disks --------------------------------------------------------------------------------

def boot_disk(directory: str) -> str:
    """A raw disk whose MBR prints BOOT_MARKER on COM1 and powers off."""
    from diskimages import make_mbr_disk
    return make_mbr_disk(os.path.join(directory, "boot.img"), BOOT_MARKER)


def sercon_file(directory: str) -> str:
    path = os.path.join(directory, "sercon-port")
    with open(path, "wb") as f:
        f.write(SERCON[1])
    return path


def mke2fs() -> Optional[str]:
    return shutil.which("mke2fs") or shutil.which("mke2fs", path="/usr/sbin:/sbin")


def ext2_image(path: str, size: int = 24 << 20) -> str:
    """A fresh, empty ext2 file system (made again before each boot: a boot mounts it)."""
    with open(path, "wb") as f:
        f.truncate(0)
        f.truncate(size)
    subprocess.run([mke2fs(), "-q", "-F", "-t", "ext2", "-L", "hvroot", path], check=True)
    return path


# ---- timing -------------------------------------------------------------------------------

@dataclass
class Run:
    seconds: float              # to the marker, or to the exit when there is no marker
    returncode: Optional[int]   # None: killed at the marker
    output: bytes
    cpu: float                  # user + system seconds of the process (all its threads)


def _reap(p: subprocess.Popen) -> float:
    """Wait for p; its user + system seconds (a figure a busy machine moves less than wall
    time: time spent waiting for a processor is not in it)."""
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return ru.ru_utime + ru.ru_stime


def run_until(cmd: Sequence[str], marker: Optional[bytes] = None, *, first_byte: bool = False,
              timeout: float = 120.0) -> Run:
    """Start `cmd` (serial console on its stdout) and time it from just before the start to
    `marker` on stdout (or its first byte, with first_byte), then kill its process group;
    with neither, to its exit. Raises if the marker never comes. Both VMMs get hvframe_env()
    (QEMU does not read it)."""
    stderr = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    p = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=stderr, start_new_session=True, env=hvframe_env())
    out = bytearray()
    seen = None
    fd = p.stdout.fileno()
    try:
        deadline = t0 + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"no {marker or 'end'!r} within {timeout} s: {shlex.join(cmd)}")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            now = time.perf_counter()
            if not chunk:
                break
            start = max(0, len(out) - len(marker or b"")) if marker else 0
            out += chunk
            if first_byte or (marker and marker in out[start:]):
                seen = now - t0
                break
        if seen is None and (marker or first_byte):
            stderr.seek(0)
            raise RuntimeError(f"{shlex.join(cmd)} ended without {marker!r}: "
                               f"{out[-2000:]!r} {stderr.read()[-2000:]!r}")
        if seen is not None:
            os.killpg(p.pid, signal.SIGKILL)
            return Run(seen, None, bytes(out), _reap(p))
        cpu = _reap(p)          # stdout is at its end: the process has exited or is exiting
        return Run(time.perf_counter() - t0, p.returncode, bytes(out), cpu)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        p.stdout.close()
        stderr.close()


def alternate(runs: dict, rounds: int) -> dict[object, list]:
    """Call each measurement in turn, `rounds` times, every other round in reverse order
    (A B, B A, A B, ...): a drift in the machine's speed during the call reaches both sides
    alike, and neither side always runs first (after the other has warmed or loaded the
    machine). Returns every figure of each, in round order."""
    out: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds):
        for k in turn_order(list(runs), r):
            out[k].append(runs[k]())
    return out


def turn_order(sides: list, round_no: int) -> list:
    """The order of the sides in round `round_no`: as given in even rounds, reversed in odd."""
    return sides if round_no % 2 == 0 else sides[::-1]


# ---- guest work, counted by KVM -------------------------------------------------------------
# On hosts where KVM runs guest kernel code in its instruction emulator (the nested kvm_pvm hosts
# of the platform notes; SeaBIOS is nearly all such code) a boot's time is, to within a few
# percent, the number of instructions emulated times a cost per instruction that is KVM's and the
# same under both VMMs. The count does not move with the host's load, where a timed pair of
# runs moves by 30% either way, so it says whether the VMM made the guest do more work.
PERF = shutil.which("perf")
EMULATED, TO_USER = "kvm:kvm_emulate_insn", "kvm:kvm_userspace_exit"


@dataclass
class GuestWork:
    emulated: int       # guest instructions KVM's instruction emulator executed
    exits: int          # exits to the VMM's user space (port I/O, MMIO, ...)


def guest_work(cmd: Sequence[str], timeout: float = 300.0) -> "GuestWork | str":
    """Run `cmd` to its exit under `perf stat`, counting KVM's tracepoints for the emulated
    instructions and the exits to user space of all its threads. The command must end by
    itself; the tracepoints slow it, so it is not timed. Returns the reason instead where it
    cannot be counted here (no perf; tracepoints not readable: perf needs root, or a permissive
    perf_event_paranoid, and tracefs; the command did not end within `timeout`)."""
    if PERF is None:
        return "perf is not installed (Debian: apt-get install linux-perf)"
    with tempfile.NamedTemporaryFile("r", suffix=".perf") as out:
        p = subprocess.Popen([PERF, "stat", "-x", ",", "-o", out.name, "-e", EMULATED, "-e", TO_USER,
                              "--", *cmd], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=hvframe_env(), start_new_session=True)
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)        # perf and the VMM under it
            p.communicate()
            return f"{shlex.join(cmd)} did not end within {timeout:.0f} s"
        counts = {}
        for line in out.read().splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2] in (EMULATED, TO_USER):
                counts[fields[2]] = fields[0]
    if not all(v.isdigit() for v in counts.values()) or len(counts) != 2:
        return (f"perf stat could not count {EMULATED} and {TO_USER} here "
                f"(exit {p.returncode}: {err.decode(errors='replace').strip()[-300:]!r})")
    return GuestWork(int(counts[EMULATED]), int(counts[TO_USER]))


STARTUP_PARTS = r"""
import json, sys, time
t = {"interpreter": time.perf_counter()}
import hvframe.cli as cli
t["import hvframe.cli"] = time.perf_counter()
args = cli.make_parser("run").parse_args(sys.argv[1:])
from hvframe.kvm import VmSetup
setup = VmSetup(cli._memory_size_hint(args))     # as `hvframe run`: the VM made meanwhile
from hvframe.plugins import Registry
registry = Registry()
t["plugin registry"] = time.perf_counter()
cfg = cli.config_from_args(args, registry)
t["configuration (loads the device plugins named)"] = time.perf_counter()
from hvframe import runner
m, _ = runner.build_machine(cfg, registry, vm_setup=setup)
t["build machine (takes the VM and RAM made ahead; devices, ACPI/MP tables, kernel, vCPUs)"] = time.perf_counter()
m.start_devices()
t["start devices"] = time.perf_counter()
m.run()
t["guest runs to power-off"] = time.perf_counter()
m.close()
t["close"] = time.perf_counter()
print(json.dumps(t))
"""


def startup_parts(kernel: str) -> dict[str, float]:
    """Where `hvframe run --kernel` spends its start-up: seconds per phase, in order, the first
    ("interpreter") being the Python interpreter's own start to the first line of the script,
    measured from just before the process is started. Same environment as the benchmark."""
    import json
    args = ["run", "-m", PVH_MEMORY, "-l", "com1,null", "--kernel", kernel]
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", STARTUP_PARTS, *args], capture_output=True,
                       text=True, env=hvframe_env(), check=True)
    stamps = json.loads(r.stdout.strip().splitlines()[-1])
    # perf_counter has no fixed origin across processes: only differences inside the child
    # are meaningful; the interpreter's start is the rest of the child's wall time.
    wall = time.time() - t0
    names = list(stamps)
    inside = {b: stamps[b] - stamps[a] for a, b in zip(names, names[1:])}
    return {"interpreter start and exit": wall - sum(inside.values()), **inside}


EXIT_PROFILE = r"""
import json, sys, time
from collections import defaultdict
from hvframe import dispatch
calls = defaultdict(lambda: [0, 0.0])


class Counted:
    # Counts a Python device handler's calls and the time spent in them.
    def __init__(self, handler, name):
        self.h, self.c = handler, calls[name]

    def read(self, offset, size):
        t = time.perf_counter()
        try:
            return self.h.read(offset, size)
        finally:
            self.c[0] += 1
            self.c[1] += time.perf_counter() - t

    def write(self, offset, size, value):
        t = time.perf_counter()
        try:
            self.h.write(offset, size, value)
        finally:
            self.c[0] += 1
            self.c[1] += time.perf_counter() - t


add = dispatch._add_handler
dispatch._add_handler = lambda handler, name: add(Counted(handler, name), name)
import hvframe.cli as cli
from hvframe import runner
from hvframe.plugins import Registry
args = cli.make_parser().parse_args(sys.argv[1:])
registry = Registry()
m, _ = runner.build_machine(cli.config_from_args(args, registry), registry)
try:
    m.start_devices()
    t0 = time.perf_counter()
    m.run(timeout=args.timeout)
    run = time.perf_counter() - t0
    exits = {k: sum(getattr(v.c, "exits_" + k) for v in m.vcpus) for k in ("io", "mmio", "other")}
    exits["unclaimed"] = m.pio.unclaimed + m.mmio.unclaimed
finally:
    m.close()
print(json.dumps({"run_s": run, "exits": exits, "python_handlers": dict(calls)}))
"""


def exit_profile(hvframe_args: Sequence[str]) -> dict:
    """Run `hvframe run ARGS` in a child with every Python device handler wrapped: the guest's
    run time, its exits by kind, and per device the Python handler calls and seconds in them
    (the wrapper adds its own few tenths of a microsecond to each call)."""
    import json
    r = subprocess.run([sys.executable, "-c", EXIT_PROFILE, *hvframe_args], capture_output=True,
                       text=True, env=hvframe_env(), check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def print_exit_profile(hvframe_args: Sequence[str]) -> None:
    p = exit_profile(hvframe_args)
    e = p["exits"]
    total = e["io"] + e["mmio"] + e["other"]
    print(f"guest run {p['run_s']:.3f} s; exits: {e['io']} port, {e['mmio']} MMIO, {e['other']} other "
          f"({p['run_s'] / max(total, 1) * 1e6:.2f} us per exit), {e['unclaimed']} unclaimed")
    for name, (n, secs) in sorted(p["python_handlers"].items(), key=lambda kv: -kv[1][1]):
        if not n:
            continue
        print(f"  {name:32} {n:9} Python calls {secs:8.3f} s  {secs / max(n, 1) * 1e6:7.2f} us/call")


def commands(tmp: str) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (hvframe command, QEMU command) for every process-level comparison."""
    from linux_kernel import built_kernel
    disk, sercon = boot_disk(tmp), sercon_file(tmp)
    console = guest("console")
    out = {
        "start-up (hello guest)": (hvframe_pvh(guest("hello")), qemu_pvh(guest("hello"))),
        "console 100000 bytes": (hvframe_pvh(console, "count=100000", "/dev/null"),
                                 qemu_pvh(console, "count=100000", "/dev/null")),
        "console 0 bytes": (hvframe_pvh(console, "count=0", "/dev/null"),
                            qemu_pvh(console, "count=0", "/dev/null")),
        "port exits 200000": (hvframe_pvh(guest("portloop"), "count=200000"),
                              qemu_pvh(guest("portloop"), "count=200000")),
        "port exits 0": (hvframe_pvh(guest("portloop"), "count=0"),
                         qemu_pvh(guest("portloop"), "count=0")),
    }
    for bus in ("virtio-blk", "ahci"):
        out[f"SeaBIOS to {bus} boot sector"] = (hvframe_seabios(disk, bus), qemu_seabios(disk, bus, sercon))
    kernel = built_kernel()
    if kernel:
        image = ext2_image(os.path.join(tmp, "root.img"))
        out["Linux to virtio-blk ext2 root (boots on to its panic)"] = (
            hvframe_linux(kernel, image), qemu_linux(kernel, image))
    return out


if __name__ == "__main__":
    d = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="hvframe-vs-qemu-")
    os.makedirs(d, exist_ok=True)
    env = hvframe_env()
    print(f"# environment: env -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX={env['PYTHONPYCACHEPREFIX']}\n")
    for name, (a, b) in commands(d).items():
        print(f"# {name}\n{shlex.join(a)}\n{shlex.join(b)}\n")
