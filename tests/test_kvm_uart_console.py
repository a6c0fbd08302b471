"""A real guest's polled console (tests/guests/console.c: poll LSR until THRE, write THR, as
Linux's printk console does) through COM1 served natively: every byte arrives, in order; its
THR writes are buffered by KVM (coalesced) and cost no exit of their own."""
import threading
import time
from contextlib import contextmanager

import pytest

from conftest import requires_kvm, run_hvframe
from hvframe.machine import Machine
from hvframe_uart.console_bench import (console_machine, expected_payload, hvframe_console,
                                        payload_of)

pytestmark = [requires_kvm, pytest.mark.kvm]
COUNT = 100000


def coalescing_here() -> bool:
    m = Machine(16 << 20, 1)
    try:
        return m.vm.has_coalesced_pio
    finally:
        m.close()


def test_100000_bytes_polled_through_the_native_lsr_and_thr(guest_dir):
    r = hvframe_console(guest_dir["console"], COUNT, native=True)
    assert r.exit_code == 1
    assert payload_of(r.output, COUNT) == expected_payload(COUNT)
    assert r.output.endswith(b"\r\nconsole done count=%d\r\n" % COUNT)
    # Each byte is at least one LSR read and one THR write, all answered natively; Python
    # saw only the runtime's set-up writes (and a THR write when the ring had no room).
    assert r.native_served >= 2 * COUNT
    assert r.python_calls < 100


def test_buffered_thr_writes_halve_the_exits_and_change_no_byte(guest_dir):
    if not coalescing_here():
        pytest.skip("this host's KVM has no KVM_CAP_COALESCED_PIO: every THR write exits")
    n = 20000
    buffered = hvframe_console(guest_dir["console"], n, native=True, coalesce=True)
    exiting = hvframe_console(guest_dir["console"], n, native=True, coalesce=False)
    assert buffered.output == exiting.output
    assert payload_of(buffered.output, n) == expected_payload(n)
    assert exiting.port_exits >= 2 * n          # LSR poll and THR write, each an exit
    assert buffered.port_exits < 1.1 * n        # only the polls leave KVM


@contextmanager
def halted_console(guest: str, path, n: int, before_run=None):
    """COM1 (native, THR coalesced) on a file, the console guest printing n bytes and then
    halting for good; yields the machine once the "console done" line is in the file (the
    test fails if it is not within a minute), then stops and closes it. before_run(m) is
    called after the machine is built, before its vCPU starts."""
    with console_machine(guest, str(path), f"count={n} halt=1") as (m, uart):
        if before_run is not None:
            before_run(m)
        uart.start()
        runner = threading.Thread(target=m.run, kwargs={"timeout": 120}, daemon=True)
        runner.start()
        done = b"\r\nconsole done count=%d\r\n" % n
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not path.read_bytes().endswith(done):
            time.sleep(0.05)
        out = path.read_bytes()
        assert out.endswith(done), out[-80:]
        yield m
        m.request_exit(2, "test over")
        runner.join(10)


def test_the_last_bytes_of_a_guest_that_halts_for_good_still_arrive(guest_dir, tmp_path):
    """After its last THR write the guest halts with interrupts off: no exit will ever hand
    the buffered writes on, so the machine's drain thread must."""
    n = 3000
    path = tmp_path / "com1.out"
    with halted_console(guest_dir["console"], path, n) as m:
        assert not m.exited                      # it is halted, not gone
        assert payload_of(path.read_bytes(), n) == expected_payload(n)


def test_polled_console_on_stdout_through_the_command_line(guest_dir):
    n = 5000
    p = run_hvframe(["run", "-m", "64M", "-l", "com1,stdio", "--kernel", guest_dir["console"],
                     "-a", f"count={n}"], input=b"")
    assert p.returncode == 1, p.stderr
    assert payload_of(p.stdout, n) == expected_payload(n)


def test_an_idle_guest_does_not_keep_the_drain_thread_busy(guest_dir, tmp_path):
    """A guest that printed and then sits halted (an idle VM with a plain console, the common
    case) made the drain thread wake every 2 ms for ever: 500 wake-ups and about 2.5% of a
    core a second for nothing. Once nothing has been buffered for a while it wakes rarely,
    and the last bytes still arrive."""
    wakeups = []

    def count_drains(m):
        drain = m.drain_coalesced
        m.drain_coalesced = lambda: (wakeups.append(threading.current_thread().name), drain())[1]

    with halted_console(guest_dir["console"], tmp_path / "com1.out", 300, count_drains):
        time.sleep(1.0)                              # idle since
        before = wakeups.count("coalesced-drain")
        time.sleep(1.0)
        idle = wakeups.count("coalesced-drain") - before
        assert 0 < idle <= 100, idle                 # not 500
