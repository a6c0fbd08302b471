"""An AHCI port stopped and started again while its NCQ requests are still with the block
backend, from inside a real PVH guest (tests/guests/ahci_restart.c): rounds of 32 NCQ reads
cut short by PxCMD.ST off/on without waiting for PxCMD.CR, then 32 NCQ writes of 'A' cut
short the same way and one NCQ write of 'B' to the first one's blocks. Nothing may hang, the
'B' write must win and the image must not grow.

With a disk in the page cache the requests are usually done before the stop arrives, so the
second test slows every block request down (as plugins/ahci/tests/test_ahci_stop_start.py's SlowDisk
does) and checks that the port really drained at every restart."""
import threading
import time

import pytest

from conftest import requires_kvm, run_hvframe

pytestmark = [requires_kvm, pytest.mark.kvm]

SECTORS = 4096
FILL = b"\x11"
WRITE_LBA, WRITE_SLOTS = 100, 32
DEADLINE = 120.0                # the guest needs about a second
DELAY = 0.01                    # the slow disk's time per request
OK = "AHCI-RESTART OK"


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    from hvframe.guests.build import build_guest
    return build_guest(["tests/guests/ahci_restart.c"],
                       tmp_path_factory.mktemp("ahci_restart") / "ahci_restart.elf")


def make_disk(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(FILL * (SECTORS * 512))
    return disk


def check_image(disk):
    image = disk.read_bytes()
    assert len(image) == SECTORS * 512, "the image changed size"
    at = WRITE_LBA * 512
    assert image[at:at + 4096] == b"B" * 4096, "a stale 'A' write overwrote the acknowledged 'B'"
    for slot in range(1, WRITE_SLOTS):    # cut short by the stop: written whole, or not at all
        data = image[at + slot * 4096:at + (slot + 1) * 4096]
        assert data in (b"A" * 4096, FILL * 4096), slot
    end = at + WRITE_SLOTS * 4096
    assert image[:at] == FILL * at and image[end:] == FILL * (len(image) - end), \
        "something outside the written blocks changed"


def test_guest_restarts_port_with_requests_in_flight(guest, tmp_path):
    """`hvframe run` as a user runs it: the guest says OK and powers off (exit 1)."""
    disk = make_disk(tmp_path)
    t0 = time.monotonic()
    p = run_hvframe(["run", "-m", "64M", "-s", "0,hostbridge", "-s", f"3,ahci,hd:{disk}",
                     "-l", "com1,stdio", "--timeout", str(DEADLINE), "--kernel", guest],
                    input="", timeout=DEADLINE + 30)
    took = time.monotonic() - t0
    assert OK in p.stdout and "FAIL" not in p.stdout, (p.stdout, p.stderr)
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)      # power off
    check_image(disk)
    assert took < DEADLINE


def test_guest_restarts_port_while_a_slow_disk_drains(guest, tmp_path):
    """Every block request takes DELAY, and one that was stopped while with the backend
    takes 3 * DELAY (a disk may answer in any order): at each of the 7 restarts the port
    still has requests with the backend, so it drains; what the guest issues meanwhile (the
    'B' write among them) waits in PxCI, so the stale 'A' write cannot land after it."""
    from hvframe.cli import config_from_args, make_parser
    from hvframe.plugins import Registry
    from hvframe.runner import build_machine
    from hvframe_ahci.hba import AhciHba

    disk = make_disk(tmp_path)
    console = tmp_path / "com1.txt"
    reg = Registry()
    args = make_parser().parse_args([
        "run", "-m", "64M", "-s", "0,hostbridge", "-s", f"3,ahci,hd:{disk}",
        "-l", f"com1,file={console}", "--kernel", guest])
    m, _ = build_machine(config_from_args(args, reg), reg)
    try:
        m.start_devices()
        port = next(d for d in m.devices if isinstance(d, AhciHba)).ports[0]
        stops, held = [], []            # (appended under the HBA lock)

        def slow(fn):
            stopped_before = len(stops)

            def call(*a, **kw):
                time.sleep(DELAY)
                if len(stops) != stopped_before:
                    time.sleep(2 * DELAY)
                return fn(*a, **kw)
            return call

        port.device.cached_reads = False    # a slow disk has nothing in a page cache
        queue = port.device.queue       # both the native and the Python path submit here
        real_submit, real_submit_many = queue.submit, queue.submit_many
        queue.submit = lambda fn, *a, callback: real_submit(slow(fn), *a, callback=callback)
        queue.submit_many = lambda reqs: real_submit_many(
            [(slow(fn), a, callback) for fn, a, callback in reqs])
        real_stop, real_start = port._stop, port._start_issued

        def stop():
            real_stop()
            stops.append(port.draining)

        def start_issued(bits):         # slots new to PxCI, taken from the exits' hand-off
            if port.draining and bits:
                held.append(bits)
            real_start(bits)
        port._stop, port._start_issued = stop, start_issued

        result = {}
        runner = threading.Thread(target=lambda: result.update(code=m.run(timeout=DEADLINE)),
                                  name="test-runner", daemon=True)
        runner.start()
        runner.join(DEADLINE + 10)
        assert not runner.is_alive(), "the machine did not stop (a vCPU hangs)"
    finally:
        closer = threading.Thread(target=m.close, daemon=True)
        closer.start()
        closer.join(30)
        assert not closer.is_alive(), "machine close hung"
    out = console.read_text()
    assert OK in out and "FAIL" not in out, (out, m.exit_reason)
    assert result["code"] == 1, (m.exit_reason, out)
    assert stops == [True] * 7, f"the port did not drain at every restart: {stops}"
    assert 1 in held, f"the 'B' write was not issued during a drain: {held}"
    check_image(disk)
