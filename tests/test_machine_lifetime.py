"""Machines built and closed one after another in one process give everything back: guest
RAM (its mapping, not only its pages), file descriptors (disk images, eventfds, sockets, KVM's
VM and vCPU files) and threads (vCPUs, device workers, backend readers).

Guest RAM is recognised in /proc/self/smaps by the VmFlag "dc" (MADV_DONTFORK, which
GuestMemory asks for and nothing else in this process does) and by the addresses each
machine's RAM had."""
import os
import socket
import threading
import time

import pytest

from conftest import requires_kvm, rss_kib
from hvframe.core_native import ffi
from hvframe.memory import GuestMemoryError
from hvframe.synthetic import SyntheticMachine

MiB = 1 << 20
RAM = 64 * MiB
THREAD_DEADLINE = 5.0


# -- what the process holds ------------------------------------------------------------------

def guest_ram_kib() -> int:
    total = size = 0
    with open("/proc/self/smaps") as f:
        for line in f:
            if line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("VmFlags:") and "dc" in line.split()[1:]:
                total += size
    return total


def mappings() -> list[tuple[int, int, str]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi, parts[5].strip() if len(parts) > 5 else ""))
    return out


def open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:          # the directory's own fd, closed meanwhile
            pass
    return fds


def ram_range(m) -> tuple[int, int]:
    addr = int(ffi.cast("uintptr_t", ffi.from_buffer(m.memory.buffer)))   # export dropped at once
    return addr, addr + m.memory.size


class Snapshot:
    """fds, threads and guest RAM now; check() waits briefly for threads, then compares."""

    def __init__(self):
        self.fds = open_fds()
        self.threads = set(threading.enumerate())
        self.ram_kib = guest_ram_kib()

    def leaked_threads(self) -> list[str]:
        end = time.monotonic() + THREAD_DEADLINE
        while True:
            extra = [t for t in threading.enumerate() if t not in self.threads and t.is_alive()]
            if not extra or time.monotonic() > end:
                return sorted(t.name for t in extra)
            time.sleep(0.02)

    def check(self, ranges=()):
        leaked = self.leaked_threads()
        assert not leaked, f"threads still running after close(): {leaked}"
        now = open_fds()
        extra = {fd: target for fd, target in now.items() if self.fds.get(fd) != target}
        assert len(now) == len(self.fds) and not extra, f"fds left open: {extra}"
        assert guest_ram_kib() == self.ram_kib, "guest RAM still mapped"
        maps = mappings()
        for lo, hi in ranges:
            kept = [(a, b, what) for a, b, what in maps if a <= lo and hi <= b]
            assert not kept, f"guest RAM {lo:#x}-{hi:#x} still mapped: {kept}"
        kvm = [what for _, _, what in maps if what.startswith("anon_inode:kvm")]
        assert not kvm, f"KVM mappings left: {kvm}"


# -- synthetic machines -----------------------------------------------------------------------

def build_synthetic(tmp_path, i):
    """A synthetic machine as `hvframe run` builds it: platform devices (RTC with its timer,
    i8042, ...), virtio-blk, AHCI and a PCI UART, their threads started."""
    from hvframe.cli import config_from_args, make_parser
    from hvframe.plugins import Registry
    from hvframe.runner import build_machine
    disk = tmp_path / f"v{i}.img"
    hd = tmp_path / f"a{i}.img"
    for p in (disk, hd):
        if not p.exists():
            p.write_bytes(bytes(MiB))
    reg = Registry()
    args = make_parser().parse_args([
        "run", "-m", f"{RAM // MiB}M", "-s", "0,hostbridge", "-s", f"2,virtio-blk,{disk}",
        "-s", f"3,ahci,hd:{hd}", "-s", "4,uart,null", "-l", "com1,null"])
    m, _ = build_machine(config_from_args(args, reg), reg, backend="synthetic")
    m.start_devices()
    return m


def test_twenty_synthetic_machines_give_back_ram_fds_and_threads(tmp_path):
    build_synthetic(tmp_path, 0).close()      # imports, plugin discovery, caches: once
    before = Snapshot()
    rss0 = rss_kib()
    ranges = []
    for i in range(20):
        m = build_synthetic(tmp_path, i)
        m.memory.fill(0, 16 * MiB, 0xA5)      # RAM the guest used: 16 MiB resident each
        ranges.append(ram_range(m))
        assert guest_ram_kib() >= before.ram_kib + RAM // 1024
        m.close()
        assert m.memory.unmapped
    # 20 x 16 MiB were touched; kept mappings would hold 320 MiB
    assert rss_kib() - rss0 < 64 * 1024, (rss0, rss_kib())
    before.check(ranges)


def test_plain_machines_ten_times():
    before = Snapshot()
    ranges = []
    for _ in range(10):
        m = SyntheticMachine(RAM)
        ranges.append(ram_range(m))
        m.close()
    before.check(ranges)


def test_close_is_idempotent_and_ram_is_refused_afterwards():
    from hvframe.lpc import i8042, rtc
    m = SyntheticMachine(RAM)
    i8042.I8042(m)
    clock = m.add_device(rtc.Rtc(m))
    clock.start()
    ev = m.add_ioeventfd("pio", 0x500, 2)
    irq = m.add_msi_irqfd(0xFEE00000, 0x30)
    m.close()
    m.close()
    assert ev.fd == -1 and irq.fd == -1
    with pytest.raises(GuestMemoryError, match="closed"):
        m.memory.read(0x1000, 4)
    with pytest.raises(ValueError):
        ffi.from_buffer(m.memory.buffer)   # native fast paths see it closed, as before
    assert m.io_read(0x64, 1) == 0xFF         # the i8042 is gone from the bus
    assert m.pio.ranges() == [] and m.mmio.ranges() == []


def test_ram_still_viewed_by_someone_is_released_and_unmapped_when_they_let_go():
    before = Snapshot()
    m = SyntheticMachine(RAM)
    m.memory.fill(0, 8 * MiB, 0x5A)
    lo, hi = ram_range(m)
    held = m.memory.view(0x1000, 16)          # a device that forgot to release its view
    m.close()
    assert not m.memory.unmapped
    assert bytes(held) == bytes(16)           # pages given back: a straggler reads zeros
    held.release()
    del held
    before.check([(lo, hi)])


# -- KVM machines -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guests(tmp_path_factory):
    from hvframe.guests.build import build_guest
    out = tmp_path_factory.mktemp("lifetime")
    return {name: build_guest([f"tests/guests/{name}.c"], out / f"{name}.elf")
            for name in ("virtio_blk", "ahci", "echo")}


def build_kvm(tmp_path, kernel, console, *extra):
    from hvframe.cli import config_from_args, make_parser
    from hvframe.plugins import Registry
    from hvframe.runner import build_machine
    disk, hd = tmp_path / "vblk.img", tmp_path / "ahci.img"
    for p in (disk, hd):
        if not p.exists():
            p.write_bytes(bytes((i * 13 + 1) & 0xFF for i in range(MiB)))
    reg = Registry()
    args = make_parser().parse_args([
        "run", "-m", f"{RAM // MiB}M", "-s", "0,hostbridge", "-s", f"2,virtio-blk,{disk}",
        "-s", f"3,ahci,hd:{hd}", "-s", "4,uart,null", "-l", f"com1,{console}", *extra,
        "--kernel", kernel])
    m, _ = build_machine(config_from_args(args, reg), reg)
    m.start_devices()
    return m


@requires_kvm
@pytest.mark.kvm
def test_kvm_machines_with_disks_and_uarts_give_everything_back(guests, tmp_path):
    build_kvm(tmp_path, guests["echo"], "null").close()      # warm-up: imports, caches
    before = Snapshot()
    ranges = []
    for name, marker in (("virtio_blk", "vblk done"), ("ahci", "ahci done")):
        out = tmp_path / f"{name}.txt"
        m = build_kvm(tmp_path, guests[name], f"file={out}")
        ranges.append(ram_range(m))
        code = m.run(timeout=120)
        assert code == 1, (m.exit_reason, out.read_text())
        m.close()
        assert marker in out.read_text()
        assert m.memory.unmapped
    # Never run: vCPUs made, devices started, closed.
    m = build_kvm(tmp_path, guests["echo"], "null", "-c", "2")
    ranges.append(ram_range(m))
    m.close()
    before.check(ranges)


@requires_kvm
@pytest.mark.kvm
def test_kvm_machine_closed_while_its_guest_runs(guests, tmp_path):
    """close() from another thread while two vCPUs poll a UART on a socket with a client
    attached: the vCPU threads are stopped and joined, the socket threads too."""
    build_kvm(tmp_path, guests["echo"], "null").close()
    before = Snapshot()
    path = str(tmp_path / "com1.sock")
    m = build_kvm(tmp_path, guests["echo"], f"unix={path}", "-c", "2")
    lo_hi = ram_range(m)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    result = {}
    runner = threading.Thread(target=lambda: result.update(code=m.run()), name="test-runner")
    runner.start()
    try:
        # The guest echoes what it reads: an echo proves it runs and the client is served
        # (its "echo ready" may go out before the backend has accepted the client).
        client.sendall(b"ping")
        got = b""
        client.settimeout(60)
        while b"ping" not in got:
            chunk = client.recv(4096)
            assert chunk, got
            got += chunk
        assert runner.is_alive()
        m.close()
        runner.join(THREAD_DEADLINE)
        assert not runner.is_alive()
        assert result["code"] == 4 and "closed" in m.exit_reason
    finally:
        client.close()
        m.close()
    before.check([lo_hi])

