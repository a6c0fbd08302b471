"""virtio-blk and AHCI served out of process (`hvframe serve-device`) to real guests on /dev/kvm
through `-s N,passthru,vfio-user=PATH`: the guest drivers of tests/guests see the same
device as in process, the data is in the image, and a server killed with SIGKILL during
I/O makes requests fail with VIRTIO_BLK_S_IOERR while the VMM carries on, until a restarted
server serves the guest again."""
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import hvframe_cmd, requires_kvm
from test_kvm_virtio_blk import SECTORS, WRITTEN, field, make_image, pattern

pytestmark = [requires_kvm, pytest.mark.kvm]


def start_server(disk, sock, conf=""):
    proc = subprocess.Popen([sys.executable, "-m", "hvframe", "serve-device", "-s",
                             f"virtio-blk,{disk}{conf}", "--socket", str(sock)],
                            stderr=subprocess.PIPE, text=True)
    assert "on " + str(sock) in proc.stderr.readline()
    return proc


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
    proc.wait(10)
    proc.stderr.close()


@pytest.fixture(scope="module")
def guests(tmp_path_factory):
    from hvframe.guests.build import build_guest
    d = tmp_path_factory.mktemp("pt")
    return {name: build_guest([f"tests/guests/{name}.c"], d / f"{name}.elf")
            for name in ("virtio_blk", "vblk_failover")}


def test_guest_uses_a_virtio_blk_served_out_of_process(guests, tmp_path):
    disk = make_image(tmp_path / "disk.img")
    original = disk.read_bytes()
    sock = tmp_path / "vblk.sock"
    server = start_server(disk, sock, ",ser=HVF-OOP-1")
    try:
        p = subprocess.run(hvframe_cmd() + ["run", "-m", "64M", "-s", "0,hostbridge", "-s",
                                            f"2,passthru,vfio-user={sock}", "-l", "com1,stdio",
                                            "--kernel", guests["virtio_blk"]],
                           input="", capture_output=True, text=True, timeout=180)
    finally:
        stop(server)
    out = p.stdout
    assert p.returncode == 1 and "vblk done" in out, (out, p.stderr)
    assert field(out, "capacity") == str(SECTORS)
    assert "vblk readback ok" in out
    assert field(out, "id") == 'status 0 "HVF-OOP-1"'
    assert field(out, "oob") == "status 1"
    assert int(field(out, "irqs").split()[0]) >= 1          # MSI-X from the other process
    image = disk.read_bytes()
    for s in WRITTEN:
        assert image[s * 512:(s + 1) * 512] == pattern(s), s
    assert image[9 * 512:] == original[9 * 512:]


def run_killing_the_server(start, disk, sock, slot: int, guest: str) -> tuple[str, str]:
    """Run `guest` against a device served by start(disk, sock) at `slot`, SIGKILL the
    server once the guest says its writes are under way, check the VMM survives, start a new
    server; returns the guest's console and stderr once it powered off. The guest writes
    until 200 more went through after the one that recovered from its first outage (or a cap
    it never reaches here): a fixed number of writes was done before a fixed wait ended on a
    fast host."""
    server = start(disk, sock)
    vmm = subprocess.Popen(hvframe_cmd() + ["run", "-m", "64M", "-s", "0,hostbridge", "-s",
                                            f"{slot},passthru,vfio-user={sock}", "-l", "com1,stdio",
                                            "--kernel", guest, "-a", "count=100000000 after=200"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, errors="replace")
    out, err, writing = [], [], threading.Event()

    def collect(stream, lines, flag=None):
        try:
            for line in stream:
                lines.append(line)
                if flag is not None and line.endswith(" writing\n"):
                    flag.set()
        finally:
            if flag is not None:
                flag.set()          # the console ended: no need to wait any longer

    readers = [threading.Thread(target=collect, args=(vmm.stdout, out, writing), daemon=True),
               threading.Thread(target=collect, args=(vmm.stderr, err), daemon=True)]
    for r in readers:
        r.start()
    try:
        writing.wait(60)
        assert any(line.endswith(" writing\n") for line in out), ("".join(out), "".join(err))
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        server.stderr.close()
        time.sleep(1.5)
        assert vmm.poll() is None, ("".join(out), "".join(err))   # the VMM survives its device
        server = start(disk, sock)
        vmm.wait(timeout=240)
    finally:
        if vmm.poll() is None:
            vmm.kill()
            vmm.wait()
        stop(server)
        for r in readers:
            r.join(10)
        vmm.stdout.close()
        vmm.stderr.close()
    out, err = "".join(out), "".join(err)
    assert vmm.returncode == 1, (out, err)
    return out, err


def test_server_killed_during_io_then_restarted(guests, tmp_path):
    disk = make_image(tmp_path / "disk.img")
    sock = tmp_path / "vblk.sock"
    out, err = run_killing_the_server(start_server, disk, sock, 2, guests["vblk_failover"])
    assert re.search(r"^vblk ioerr \d+ status 1$", out, re.M), (out, err)
    assert re.search(r"^vblk recovered \d+$", out, re.M), (out, err)
    m = re.search(r"^vblk summary ok (\d+) errors (\d+) recovered (\d+)$", out, re.M)
    assert m and int(m.group(1)) > 200 and int(m.group(2)) > 0 and int(m.group(3)) >= 1, out
    image = disk.read_bytes()
    for s in WRITTEN:                          # every sector was written and acknowledged
        assert image[s * 512:(s + 1) * 512] == pattern(s), s


def ahci_pattern(lba: int) -> bytes:
    return bytes((lba * 31 + j * 7 + 0x5A) & 0xFF for j in range(512))


def start_ahci_server(disk, sock, conf=""):
    proc = subprocess.Popen([sys.executable, "-m", "hvframe", "serve-device", "-s",
                             f"ahci,hd:{disk}{conf}", "--socket", str(sock)],
                            stderr=subprocess.PIPE, text=True)
    assert "on " + str(sock) in proc.stderr.readline()
    return proc


@pytest.fixture(scope="module")
def ahci_guests(tmp_path_factory):
    from hvframe.guests.build import build_guest
    d = tmp_path_factory.mktemp("pt-ahci")
    return {name: build_guest([f"tests/guests/{name}.c"], d / f"{name}.elf")
            for name in ("ahci", "ahci_failover")}


def ahci_field(out, name):
    m = re.search(rf"^ahci {name} (.*)$", out, re.M)
    assert m, (name, out)
    return m.group(1)


def test_guest_uses_an_ahci_served_out_of_process(ahci_guests, tmp_path):
    disk = tmp_path / "disk.img"
    original = (bytes(range(256)) * 2).ljust(2048 * 512, b"\x11")
    disk.write_bytes(original)
    sock = tmp_path / "ahci.sock"
    server = start_ahci_server(disk, sock, ",ser=HVF-OOP-AHCI")
    try:
        p = subprocess.run(hvframe_cmd() + ["run", "-m", "64M", "-s", "0,hostbridge", "-s",
                                            f"3,passthru,vfio-user={sock}", "-l", "com1,stdio",
                                            "--kernel", ahci_guests["ahci"]],
                           input="", capture_output=True, text=True, timeout=180)
    finally:
        stop(server)
    out = p.stdout
    assert p.returncode == 1 and "ahci done" in out, (out, p.stderr)
    assert "8086:2922" in ahci_field(out, "pci")
    assert ahci_field(out, "serial") == '"HVF-OOP-AHCI"'
    assert ahci_field(out, "read0").endswith("sum c03fbf00 first 00010203")
    assert "ahci readback ok" in out
    assert ahci_field(out, "ncq read").endswith("ok")
    assert ahci_field(out, "oob").endswith("err 1 tfes 1")     # the device's own error
    assert ahci_field(out, "reread").endswith("ok")
    assert int(ahci_field(out, "irqs").split()[0]) >= 1         # MSI from the other process
    image = disk.read_bytes()
    for lba in list(range(1, 9)) + list(range(32, 40)):
        assert image[lba * 512:(lba + 1) * 512] == ahci_pattern(lba), lba
    assert image[:512] == original[:512] and image[72 * 512:] == original[72 * 512:]


def test_ahci_server_killed_during_io_then_restarted(ahci_guests, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(2048 * 512))
    sock = tmp_path / "ahci.sock"
    out, err = run_killing_the_server(start_ahci_server, disk, sock, 3,
                                      ahci_guests["ahci_failover"])
    # The failed command ended as a task file error: ERR with ABRT in PxTFD, TFES in PxIS.
    assert re.search(r"^ahci ioerr \d+ tfd 441 is 4\w{7}$", out, re.M), (out, err)
    assert re.search(r"^ahci recovered \d+$", out, re.M), (out, err)
    m = re.search(r"^ahci summary ok (\d+) errors (\d+) recovered (\d+)$", out, re.M)
    assert m and int(m.group(1)) > 200 and int(m.group(2)) > 0 and int(m.group(3)) >= 1, out
    image = disk.read_bytes()
    for s in range(1, 9):                      # every sector was written and acknowledged
        assert image[s * 512:(s + 1) * 512] == ahci_pattern(s), s
