"""A real guest's polled console (tests/guests/console.c: poll LSR until THRE, write THR, as
Linux's printk console does) through COM1 served natively: every byte arrives, in order."""
import pytest

from conftest import requires_kvm, run_hvframe
from hvframe_uart.console_bench import expected_payload, hvframe_console, payload_of

pytestmark = [requires_kvm, pytest.mark.kvm]
COUNT = 100000


def test_100000_bytes_polled_through_the_native_lsr_and_thr(guest_dir):
    r = hvframe_console(guest_dir["console"], COUNT, native=True)
    assert r.exit_code == 1
    assert payload_of(r.output, COUNT) == expected_payload(COUNT)
    assert r.output.endswith(b"\r\nconsole done count=%d\r\n" % COUNT)
    # Each byte is at least one LSR read and one THR write, all answered natively; Python
    # saw only the runtime's set-up writes (and a THR write when the ring had no room).
    assert r.native_served >= 2 * COUNT
    assert r.python_calls < 100


def test_polled_console_on_stdout_through_the_command_line(guest_dir):
    n = 5000
    p = run_hvframe(["run", "-m", "64M", "-l", "com1,stdio", "--kernel", guest_dir["console"],
                     "-a", f"count={n}"], input=b"")
    assert p.returncode == 1, p.stderr
    assert payload_of(p.stdout, n) == expected_payload(n)
