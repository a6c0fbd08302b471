"""Where a VMM's exits to user space spend their time, counted the same way for hvframe and QEMU.

    python benchmarks/exit_times.py virtio-blk      # SeaBIOS to the boot sector, both VMMs
    python benchmarks/exit_times.py ahci 3          # three runs of each, taking turns

`perf record` (root, or a permissive perf_event_paranoid; Debian linux-perf) traces the vCPU
thread's KVM_RUN ioctls and KVM's port and MMIO tracepoints while the command runs to its end.
Each exit's cost is the time from KVM_RUN returning to the next KVM_RUN: everything the VMM does
for that exit (its handler, locks, the GIL, being scheduled out), nothing of KVM's. Exits are
grouped by what the guest accessed (a port write is traced before its exit, a read after it);
a VMM's other ioctls on the vCPU thread fall under "other". Stalls over 1 ms (the vCPU thread
preempted, a lock held elsewhere) are summed apart: on a busy host they move from run to run.
"""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict

import qemu as q

KVM_RUN = 0xAE80
STALL = 1e-3
_EVENT = re.compile(r"\s*(\d+)\s+([\d.]+):\s+(\S+):\s*(.*)")
_PIO = re.compile(r"pio_(read|write) at (0x[0-9a-f]+)")
_MMIO = re.compile(r"mmio (read|write) len \d+ gpa (0x[0-9a-f]+)")


def trace(cmd: list[str]) -> list[tuple[int, float, str, str]]:
    """(tid, seconds, event, details) of the run of cmd, which must end by itself."""
    with tempfile.TemporaryDirectory(prefix="hvframe-exits-") as d:
        data = os.path.join(d, "perf.data")
        subprocess.run(["perf", "record", "-q", "-o", data,
                        "-e", "syscalls:sys_enter_ioctl", "--filter", f"cmd == {KVM_RUN:#x}",
                        "-e", "syscalls:sys_exit_ioctl", "-e", "kvm:kvm_pio", "-e", "kvm:kvm_mmio",
                        "-e", "kvm:kvm_userspace_exit", "--", *cmd],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env=q.hvframe_env(), check=False, timeout=600)
        text = subprocess.run(["perf", "script", "-i", data, "-F", "tid,time,event,trace"],
                              capture_output=True, text=True, check=True).stdout
    return [(int(m[1]), float(m[2]), m[3], m[4])
            for m in map(_EVENT.match, text.splitlines()) if m]


def _access(details: str) -> str | None:
    m = _PIO.search(details)
    if m:
        return f"port {m[1]} {m[2]}"
    m = _MMIO.search(details)
    return f"MMIO {m[1]} {m[2][:-3]}xxx" if m else None     # per 4 KiB page


def exit_times(cmd: list[str]) -> dict[str, list[float]]:
    """Seconds in user space per exit of the vCPU thread (the one with the most exits),
    grouped by the access that caused it."""
    events = trace(cmd)
    vcpu = Counter(e[0] for e in events if e[2] == "kvm:kvm_userspace_exit").most_common(1)[0][0]
    mine = [e for e in events if e[0] == vcpu]
    out: dict[str, list[float]] = defaultdict(list)
    in_run = False      # sys_exit_ioctl is not filtered: only the one that ends a KVM_RUN counts
    for i, (_, ts, kind, _) in enumerate(mine):
        if kind == "syscalls:sys_enter_ioctl":
            in_run = True
        if kind != "syscalls:sys_exit_ioctl" or not in_run:
            continue
        in_run = False
        j = next((k for k in range(i + 1, len(mine)) if mine[k][2] == "syscalls:sys_enter_ioctl"),
                 None)
        if j is None:
            continue
        key = None
        for k in (i - 1, i - 2):          # a write: traced inside KVM_RUN, before the exit
            if k >= 0 and mine[k][2] in ("kvm:kvm_pio", "kvm:kvm_mmio") and "write" in mine[k][3]:
                key = _access(mine[k][3])
                break
        if key is None and j + 1 < len(mine) and "read" in mine[j + 1][3]:
            key = _access(mine[j + 1][3])          # a read: traced once KVM_RUN is entered again
        out[key or "other"].append(mine[j][1] - ts)
    return out


def report(name: str, runs: list[dict[str, list[float]]], top: int = 12) -> None:
    totals = [sum(map(sum, r.values())) for r in runs]
    stalls = [sum(g for v in r.values() for g in v if g >= STALL) for r in runs]
    print(f"{name}: {len(runs)} run(s); exits {[sum(map(len, r.values())) for r in runs]}; "
          f"in user space {[round(t * 1e3, 1) for t in totals]} ms, of which stalls over 1 ms "
          f"{[round(s * 1e3, 1) for s in stalls]} ms")
    r = runs[min(range(len(runs)), key=totals.__getitem__)]     # the quietest run
    for key, gaps in sorted(r.items(), key=lambda kv: -sum(g for g in kv[1] if g < STALL))[:top]:
        quiet = [g for g in gaps if g < STALL]
        print(f"  {key:28} {len(gaps):6} exits {sum(quiet) * 1e3:7.2f} ms "
              f"median {statistics.median(quiet) * 1e6 if quiet else 0:6.1f} us")


def main(argv: list[str]) -> None:
    bus = argv[0] if argv else "virtio-blk"
    rounds = int(argv[1]) if len(argv) > 1 else 1
    with tempfile.TemporaryDirectory(prefix="hvframe-exits-") as d:
        disk, sercon = q.boot_disk(d), q.sercon_file(d)
        # QEMU powers off through PIIX4 PM at the end of the boot sector, as hvframe does.
        cmds = {"hvframe": q.hvframe_seabios(disk, bus, "/dev/null"),
                "qemu": q.qemu_seabios(disk, bus, sercon, "/dev/null")}
        runs = q.alternate({k: (lambda c=c: exit_times(c)) for k, c in cmds.items()}, rounds)
    for name, rs in runs.items():
        report(f"{name}, SeaBIOS to the {bus} boot sector and power-off", rs)


if __name__ == "__main__":
    main(sys.argv[1:])
