"""PCI passthrough to a device in another process: `hvframe serve-device` runs virtio-blk as a
vfio-user server, a synthetic machine's `passthru` function (vfio-user=) is driven through
the same dispatch core a vCPU uses (config through 0xcf8/0xcfc, BARs as MMIO), and the
requests are served out of process against the image."""
import os
import signal
import struct
import subprocess
import sys
import time
import types

import pytest

from hvframe.errors import ConfigError
from hvframe.pci.bus import add_pci_devices
from hvframe.plugins import Registry
from hvframe.synthetic import SyntheticMachine
from hvframe.virtio.harness import VirtioPciDriver

SLOT = 2
SECTORS = 2048
T_IN, T_OUT = 0, 1


def make_disk(path):
    path.write_bytes(bytes((i * 7 + i // 512) & 0xFF for i in range(SECTORS * 512)))
    return path


def start_server(disk, sock, conf=""):
    proc = subprocess.Popen([sys.executable, "-m", "hvframe", "serve-device", "-s",
                             f"virtio-blk,{disk}{conf}", "--socket", str(sock)],
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()          # "hvframe serve-device: ... on PATH" once listening
    assert "on " + str(sock) in line, line
    return proc


class Driver(VirtioPciDriver):
    """The harness's virtio driver against a function it cannot look into: completions are
    seen on the used ring, interrupts in machine.msis."""

    def _hook_interrupts(self):
        pass

    def wait_used(self, q, count, timeout=10.0):
        dq, done, end = self.queues[q], [], time.monotonic() + timeout
        while len(done) < count:
            done += dq.reap()
            if time.monotonic() > end:
                raise TimeoutError(f"{len(done)} of {count} requests completed")
            time.sleep(0.001)
        return done


class Rig:
    def __init__(self, tmp_path, conf="", irqfd_eventfds=False):
        self.disk = make_disk(tmp_path / "disk.img")
        self.sock = tmp_path / "vblk.sock"
        self.server = start_server(self.disk, self.sock, conf)
        self.m = SyntheticMachine(64 << 20, shared_memory=True, irqfd_eventfds=irqfd_eventfds)
        add_pci_devices(self.m, Registry(platform=False),
                        {"0": {str(SLOT): {"0": {"device": "passthru",
                                                 "vfio-user": str(self.sock)}}}},
                        direct_boot=False)
        self.m.start_devices()
        self.fn = self.m.pci.lookup(0, SLOT, 0)
        self.init_driver()

    def init_driver(self):
        self.drv = Driver(self.m, SLOT)
        self.drv.fn = types.SimpleNamespace(device=types.SimpleNamespace(num_queues=1))
        self.drv.initialize(0)
        self.mem = self.m.memory
        self.buf = self.drv.data_base

    def request(self, rtype, sector, data=b"", read_len=0, timeout=10.0):
        mem, base = self.mem, self.buf
        mem.write(base, struct.pack("<IIQ", rtype, 0, sector))
        bufs = [(base, 16, False)]
        if data:
            mem.write(base + 0x1000, data)
            bufs.append((base + 0x1000, len(data), False))
        if read_len:
            bufs.append((base + 0x1000, read_len, True))
        mem.write(base + 0x800, b"\xee")
        bufs.append((base + 0x800, 1, True))
        self.drv.submit(0, bufs)
        self.drv.kick(0)
        self.drv.wait_used(0, 1, timeout)
        self.last = mem.read(base + 0x1000, read_len) if read_len else b""
        return mem.read(base + 0x800, 1)[0]

    def close(self):
        self.m.close()
        if self.server.poll() is None:
            self.server.terminate()
        self.server.wait(10)
        self.server.stderr.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def test_identity_and_bars_come_from_the_device(rig):
    fn = rig.fn
    assert (fn.config["vendor_id"], fn.config["device_id"]) == (0x1AF4, 0x1001)
    assert [(b.index, b.kind, b.size) for b in fn.all_bars()] == \
        [(0, "io", 128), (1, "mmio32", 4096), (4, "mmio32", 16384)]
    assert fn.msix is not None and fn.msix.vectors == 2
    # The virtio capabilities were found by the guest-side driver through our copy.
    assert set(rig.drv.regions) >= {1, 2, 3, 4}


def test_read_and_write_are_served_out_of_process(rig):
    original = rig.disk.read_bytes()
    assert rig.request(T_IN, 3, read_len=512) == 0
    assert rig.last == original[3 * 512:4 * 512]
    payload = bytes(range(256)) * 2
    assert rig.request(T_OUT, 5, data=payload) == 0
    assert rig.disk.read_bytes()[5 * 512:6 * 512] == payload
    assert rig.request(T_IN, SECTORS, read_len=512) == 1         # past the end: IOERR


def test_doorbell_fd_at_names_the_eventfd_a_kick_rings(rig):
    # The server's doorbell for queue 0, at its place in the BAR: writing it (what KVM's
    # ioeventfd does for the guest's kick) gets the request served, no socket message.
    fd = rig.fn.doorbell_fd_at("mmio", rig.drv.notify_address(0), 2, 0)
    assert fd in rig.fn.doorbell_fds()
    assert rig.fn.doorbell_fd_at("mmio", rig.drv.notify_address(0) + 4, 2, 0) == -1
    assert rig.fn.doorbell_fd_at("pio", rig.drv.notify_address(0), 2, 0) == -1
    assert rig.fn.doorbell_fd_at("mmio", rig.drv.notify_address(0), 4, 0) == -1   # size
    # The BAR moved: the doorbell follows it.
    bar = next(b for b in rig.fn.all_bars()
               if b.mapped_at is not None
               and b.mapped_at <= rig.drv.notify_address(0) < b.mapped_at + b.size)
    old = bar.mapped_at
    reg = 0x10 + 4 * bar.index
    rig.drv.cfg_write(reg, 4, old + 0x100000)
    moved = rig.drv.notify_address(0) + 0x100000
    assert rig.fn.doorbell_fd_at("mmio", rig.drv.notify_address(0), 2, 0) == -1
    assert rig.fn.doorbell_fd_at("mmio", moved, 2, 0) == fd
    rig.drv.cfg_write(reg, 4, old)
    mem, base = rig.mem, rig.buf
    mem.write(base, struct.pack("<IIQ", T_IN, 0, 0))
    mem.write(base + 0x800, b"\xee")
    rig.drv.submit(0, [(base, 16, False), (base + 0x1000, 512, True), (base + 0x800, 1, True)])
    os.eventfd_write(fd, 1)
    rig.drv.wait_used(0, 1, 10)
    assert mem.read(base + 0x800, 1) == b"\0"
    assert mem.read(base + 0x1000, 512) == rig.disk.read_bytes()[:512]


def test_completions_interrupt_through_the_guest_msix_table(rig):
    rig.m.msis.clear()
    rig.request(T_IN, 0, read_len=512)
    deadline = time.monotonic() + 5
    while not rig.m.msis and time.monotonic() < deadline:
        time.sleep(0.01)
    # The harness programs vector v with data 0x40 + v; queue 0 uses vector 1.
    assert (0xFEE00000, 0x41) in rig.m.msis


def test_masked_vector_goes_pending_and_is_sent_on_unmask(rig):
    table = rig.drv.bar(1)
    rig.m.mmio_write(table + 16 + 12, 4, 1)             # mask vector 1
    rig.m.msis.clear()
    rig.request(T_IN, 0, read_len=512)
    time.sleep(0.2)
    assert (0xFEE00000, 0x41) not in rig.m.msis
    assert rig.fn.msix.is_pending(1)
    rig.m.mmio_write(table + 16 + 12, 4, 0)
    assert (0xFEE00000, 0x41) in rig.m.msis


# -- the guest's irqfd handed to the server while the vector's gate is open ---------------------
# With irqfd_eventfds the synthetic machine's irqfds behave as under KVM: writing the eventfd
# is the interrupt. The harness gives queue 0 vector 1 (data 0x41).

@pytest.fixture
def irqfd_rig(tmp_path):
    r = Rig(tmp_path, irqfd_eventfds=True)
    # What the server was handed, and the guest's view of vector 1 at that moment.
    r.handed = []
    backend, fn = r.fn.backend, r.fn
    real = backend.set_irq_eventfd

    def recording(index, vector, fd):
        x = fn.msix
        r.handed.append((vector, fd, x.vector_masked(vector), x.function_masked, x.enabled,
                         x.message(vector)))
        real(index, vector, fd)
    backend.set_irq_eventfd = recording
    yield r
    r.close()


def drain(fd):
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def read_raising(r, irq, sector):
    """One read that must complete with the guest's irqfd raised; how many MSI-X signals
    came through the client's relay thread meanwhile."""
    before = r.fn._relay.msix_relayed
    assert r.request(T_IN, sector, read_len=512) == 0
    assert wait_for(lambda: drain(irq.fd) == 1)
    return r.fn._relay.msix_relayed - before


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def test_open_vector_gets_the_guest_irqfd_and_completions_bypass_the_relay(irqfd_rig):
    r = irqfd_rig
    irq = r.fn.msix.irqfd(1)
    assert r.fn.msix.gate(1).open and r.fn._msix_irqfds[1] == irq.fd
    drain(irq.fd)
    for sector in range(4):
        # Every completion raised the guest's irqfd, none came through the relay thread.
        assert read_raising(r, irq, sector) == 0


def test_masked_vector_falls_back_to_the_relay_and_the_pending_bit(irqfd_rig):
    r = irqfd_rig
    table = r.drv.bar(1)
    irq = r.fn.msix.irqfd(1)
    relay_fd = r.fn._relay.msix_fds[1]
    drain(irq.fd)
    r.handed.clear()
    r.m.mmio_write(table + 16 + 12, 4, 1)             # mask vector 1
    # The relay went back to the server before the mask took effect.
    assert r.handed == [(1, relay_fd, False, False, True, (0xFEE00000, 0x41))]
    relayed = r.fn._relay.msix_relayed
    assert r.request(T_IN, 0, read_len=512) == 0
    assert wait_for(lambda: r.fn.msix.is_pending(1))
    assert r.fn._relay.msix_relayed == relayed + 1
    assert drain(irq.fd) == 0                          # nothing reached the guest
    r.m.mmio_write(table + 16 + 12, 4, 0)             # unmask: delivered once
    assert not r.fn.msix.is_pending(1)
    assert r.handed[-1] == (1, irq.fd, False, False, True, (0xFEE00000, 0x41))
    time.sleep(0.1)
    assert drain(irq.fd) == 1
    # And the irqfd is the server's again: only the masked completion came by the relay.
    assert read_raising(r, irq, 1) == 0
    assert r.fn._relay.msix_relayed == relayed + 1


def test_refused_hand_over_puts_every_vector_back_on_its_relay_for_good(irqfd_rig, caplog):
    """A device that refuses a one-vector change may still signal the irqfd of a vector the
    guest is masking: the whole index goes back to the relays at once, and the function
    hands out no irqfd again (one warning, however often the guest masks)."""
    from errno import EINVAL
    from hvframe_passthru import protocol
    r = irqfd_rig
    table = r.drv.bar(1)
    irq = r.fn.msix.irqfd(1)
    relay = r.fn._relay.msix_fds
    backend = r.fn.backend
    whole, real_whole = [], backend.set_irq_eventfds

    def refuse(index, vector, fd):
        raise protocol.RemoteError(protocol.DEVICE_SET_IRQS, EINVAL)

    def record_whole(index, fds):
        whole.append(list(fds))
        real_whole(index, fds)
    backend.set_irq_eventfd, backend.set_irq_eventfds = refuse, record_whole
    drain(irq.fd)
    r.m.mmio_write(table + 16 + 12, 4, 1)             # mask vector 1: the change is refused
    assert whole == [list(relay)]                      # every vector on its relay, at once
    assert r.request(T_IN, 0, read_len=512) == 0
    assert wait_for(lambda: r.fn.msix.is_pending(1))  # masked: pending, not delivered
    assert drain(irq.fd) == 0
    r.m.mmio_write(table + 16 + 12, 4, 0)             # unmask: delivered once, by us
    time.sleep(0.1)
    assert drain(irq.fd) == 1
    assert read_raising(r, irq, 1) == 1                # the relay carries it from now on
    for _ in range(3):
        r.m.mmio_write(table + 16 + 12, 4, 1)
        r.m.mmio_write(table + 16 + 12, 4, 0)
    assert whole == [list(relay)]
    assert sum("eventfd refused" in rec.getMessage() for rec in caplog.records) == 1


def test_rewriting_the_same_msix_control_leaves_the_server_alone(irqfd_rig):
    r = irqfd_rig
    cap = r.drv.msix_cap
    ctl = r.drv.cfg_read(cap + 2, 2)
    r.handed.clear()
    r.drv.cfg_write(cap + 2, 2, ctl)                  # same enable and mask bits
    r.drv.cfg_write(cap, 4, r.drv.cfg_read(cap, 4))   # the whole dword, as read
    assert r.handed == []
    r.drv.cfg_write(cap + 2, 2, ctl | 0x4000)          # a real change still falls back
    assert len(r.handed) == 2


def test_function_mask_and_disable_fall_back_before_they_take_effect(irqfd_rig):
    r = irqfd_rig
    cap = r.drv.msix_cap
    irq = r.fn.msix.irqfd(1)
    relay = r.fn._relay.msix_fds
    ctl = r.drv.cfg_read(cap + 2, 2)
    drain(irq.fd)
    r.handed.clear()
    r.drv.cfg_write(cap + 2, 2, ctl | 0x4000)          # function mask
    # Both open vectors got their relay while the function was still unmasked.
    assert sorted(h[:2] for h in r.handed) == [(0, relay[0]), (1, relay[1])]
    assert all(h[3] is False for h in r.handed)
    assert r.request(T_IN, 0, read_len=512) == 0
    assert wait_for(lambda: r.fn.msix.is_pending(1))
    assert drain(irq.fd) == 0
    r.drv.cfg_write(cap + 2, 2, ctl)                  # unmask: the pending one, once
    assert not r.fn.msix.is_pending(1)
    time.sleep(0.1)
    assert drain(irq.fd) == 1
    assert r.fn._msix_irqfds[1] == irq.fd
    r.handed.clear()
    r.drv.cfg_write(cap + 2, 2, ctl & ~0x8000)        # MSI-X off
    assert (1, relay[1], False, False, True, (0xFEE00000, 0x41)) in r.handed
    assert r.fn._msix_irqfds == [None, None]
    r.drv.cfg_write(cap + 2, 2, ctl)                  # and on again: the irqfd is back
    assert r.fn._msix_irqfds[1] == irq.fd
    assert read_raising(r, irq, 1) == 0


def test_message_change_falls_back_then_hands_the_rerouted_irqfd(irqfd_rig):
    r = irqfd_rig
    table = r.drv.bar(1)
    irq = r.fn.msix.irqfd(1)
    r.handed.clear()
    r.m.mmio_write(table + 16 + 8, 4, 0x52)           # new data, vector left unmasked
    relay_fd = r.fn._relay.msix_fds[1]
    # Relay first, under the old message; the irqfd again once routed to the new one.
    assert r.handed == [(1, relay_fd, False, False, True, (0xFEE00000, 0x41)),
                        (1, irq.fd, False, False, True, (0xFEE00000, 0x52))]
    assert irq.message == (0xFEE00000, 0x52)
    drain(irq.fd)
    assert r.request(T_IN, 2, read_len=512) == 0
    assert wait_for(lambda: drain(irq.fd) == 1)


def test_bar_writes_stay_ours_and_the_command_mask_applies(rig):
    fn, drv = rig.fn, rig.drv
    bar4 = drv.bar(4)
    drv.cfg_write(0x20, 4, 0xFFFFFFFF)                  # size BAR4 as firmware does
    assert drv.cfg_read(0x20) & 0xFFFFFFF0 == (~(16384 - 1)) & 0xFFFFFFF0
    drv.cfg_write(0x20, 4, bar4)
    # The server's own view of its command register: decode bits kept, bus master passed.
    cmd = int.from_bytes(fn.backend.region_read(7, 4, 2), "little")
    assert cmd & 0x4 and cmd & 0x3
    drv.cfg_write(0x04, 2, drv.cfg_read(0x04, 2) & ~0x4)
    cmd = int.from_bytes(fn.backend.region_read(7, 4, 2), "little")
    assert not cmd & 0x4 and cmd & 0x2
    assert rig.request(T_IN, 0, read_len=512) == 0           # device still reachable


def test_server_killed_fails_requests_with_ioerr_then_recovers(rig):
    assert rig.request(T_OUT, 7, data=b"\x11" * 512) == 0     # acknowledged before the kill
    rig.server.send_signal(signal.SIGKILL)
    rig.server.wait(10)
    # In flight or posted later: completed by the client with the device's own error status.
    assert rig.request(T_IN, 1, read_len=512) == 1
    assert rig.request(T_OUT, 2, data=b"\x22" * 512) == 1
    assert rig.drv.status() & 0x40                          # DEVICE_NEEDS_RESET
    assert rig.disk.read_bytes()[7 * 512:8 * 512] == b"\x11" * 512
    # A restarted server: the driver resets the device and it serves again.
    rig.server.stderr.close()
    rig.server = start_server(rig.disk, rig.sock)
    deadline = time.monotonic() + 10
    while rig.fn.lost and not rig.fn._reconnected and time.monotonic() < deadline:
        time.sleep(0.05)
    rig.init_driver()
    assert not rig.fn.lost
    assert rig.request(T_OUT, 2, data=b"\x33" * 512) == 0
    assert rig.disk.read_bytes()[2 * 512:3 * 512] == b"\x33" * 512


def test_restarted_server_gets_the_guest_irqfd_again(irqfd_rig):
    r = irqfd_rig
    irq = r.fn.msix.irqfd(1)
    r.server.send_signal(signal.SIGKILL)
    r.server.wait(10)
    assert r.request(T_IN, 1, read_len=512) == 1          # failed by the client
    r.server.stderr.close()
    r.server = start_server(r.disk, r.sock)
    assert wait_for(lambda: r.fn._reconnected or not r.fn.lost, 10)
    r.init_driver()
    assert not r.fn.lost and r.fn._msix_irqfds[1] == irq.fd
    drain(irq.fd)
    assert read_raising(r, irq, 3) == 0


def test_hung_server_holds_the_msix_lock_only_for_the_set_irqs_deadline(irqfd_rig):
    """A guest masking a vector while the server hangs (stopped, its socket open): the
    SET_IRQS round trip under the MSI-X lock gives up after the backend's irq_deadline (not
    the 5 s of other commands), the lock is free again, the device is lost; once the server
    runs again it is reconnected and completions reach the guest's irqfd again."""
    r = irqfd_rig
    r.fn.backend.irq_deadline = 0.3
    table = r.drv.bar(1)
    irq = r.fn.msix.irqfd(1)
    r.server.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        r.m.mmio_write(table + 16 + 12, 4, 1)             # mask vector 1
        assert time.monotonic() - start < 2
        assert r.fn.msix.lock.acquire(timeout=1)
        r.fn.msix.lock.release()
        assert wait_for(lambda: r.fn.lost)
    finally:
        r.server.send_signal(signal.SIGCONT)
    assert wait_for(lambda: r.fn._reconnected or not r.fn.lost, 15)
    r.init_driver()
    assert not r.fn.lost and r.fn._msix_irqfds[1] == irq.fd
    drain(irq.fd)
    assert read_raising(r, irq, 3) == 0


def test_reads_of_a_lost_device_are_all_ones_and_never_raise(rig):
    rig.server.send_signal(signal.SIGKILL)
    rig.server.wait(10)
    isr_etc = rig.drv.bar(0)
    assert rig.m.io_read(isr_etc, 4) == 0xFFFFFFFF
    rig.m.io_write(isr_etc + 4, 4, 0)                       # dropped, no exception
    assert rig.fn.lost


def test_missing_server_is_one_line_config_error(tmp_path):
    m = SyntheticMachine(16 << 20, shared_memory=True)
    try:
        with pytest.raises(ConfigError, match="vfio-user=.*No such file"):
            add_pci_devices(m, Registry(platform=False),
                            {"0": {"3": {"0": {"device": "passthru",
                                               "vfio-user": str(tmp_path / "none")}}}})
    finally:
        m.close()


def test_private_guest_ram_is_refused(tmp_path):
    disk = make_disk(tmp_path / "d.img")
    sock = tmp_path / "s.sock"
    server = start_server(disk, sock)
    m = SyntheticMachine(16 << 20)
    try:
        add_pci_devices(m, Registry(platform=False),
                        {"0": {"3": {"0": {"device": "passthru", "vfio-user": str(sock)}}}})
        with pytest.raises(ConfigError, match="not shared memory"):
            m.start_devices()
    finally:
        m.close()
        server.terminate()
        server.wait(10)
        server.stderr.close()


@pytest.mark.parametrize("args, message", [
    (["-s", "3,passthru,0/25/0"], "no /dev/vfio/vfio"),
    (["-s", "3,passthru,sysfsdev=/sys/bus/pci/devices/0000:00:19.0"], "no /dev/vfio/vfio"),
    (["-s", "3,passthru,nonsense"], "is not a host device"),
    (["-s", "3,passthru"], "exactly one of"),
])
def test_kernel_vfio_refused_in_one_line(args, message):
    if os.path.exists("/dev/vfio/vfio") and "vfio" in message:
        pytest.skip("this host has /dev/vfio: the refusal is not what happens here")
    p = subprocess.run([sys.executable, "-m", "hvframe", "run", *args], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 4
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_serve_device_bad_options_exit_4(tmp_path):
    for args, message in ((["-s", "virtio-blk"], "socket"),
                          (["-s", "nosuchdev", "--socket", str(tmp_path / "s")], "nosuchdev"),
                          (["-s", "virtio-blk,/nonexistent", "--socket", str(tmp_path / "s")],
                           "nonexistent")):
        p = subprocess.run([sys.executable, "-m", "hvframe", "serve-device", *args],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 4, (args, p.stderr)
        assert message in p.stderr and "Traceback" not in p.stderr, p.stderr
