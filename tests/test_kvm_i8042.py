"""A real guest on /dev/kvm floods the i8042 with commands and never reads the answers
(tests/guests/i8042_flood.c). The machine runs in this process, so the test sees what the
VMM holds: the controller keeps at most its modelled bytes and the process does not grow
with the number of commands. The guest then finds the controller still working."""
import re

import pytest

from conftest import requires_kvm, rss_kib
from hvframe.lpc import i8042

pytestmark = [requires_kvm, pytest.mark.kvm]

COUNT = 200_000
# The answers the old unbounded queue kept for COUNT rounds (1.5 bytes a round on average)
# took about 20 MiB here; a bounded controller adds nothing that grows with COUNT.
RSS_GROWTH_LIMIT_KIB = 6 * 1024


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    from hvframe.guests.build import build_guest
    return build_guest(["tests/guests/i8042_flood.c"],
                       tmp_path_factory.mktemp("i8042") / "i8042_flood.elf")


def run_flood(guest, tmp_path, count):
    from hvframe.cli import config_from_args, make_parser
    from hvframe.plugins import Registry
    from hvframe.runner import build_machine
    out = tmp_path / "com1.txt"
    reg = Registry()
    args = make_parser().parse_args(["run", "-m", "64M", "-l", f"com1,file={out}",
                                     "--kernel", guest, "--cmdline", f"count={count}"])
    m, _ = build_machine(config_from_args(args, reg), reg)
    try:
        ctl = next(d for d in m.devices if isinstance(d, i8042.I8042))
        m.start_devices()
        before = rss_kib()
        code = m.run(timeout=300)
        after = rss_kib()
        held, peak = ctl.held, ctl.held_peak
    finally:
        m.close()
    return code, m.exit_reason, out.read_text(), before, after, held, peak


def test_command_flood_without_reads_keeps_the_vmm_bounded(guest, tmp_path):
    code, reason, console, before, after, held, peak = run_flood(guest, tmp_path, COUNT)
    assert code == 1, (reason, console)
    assert f"i8042 flood sent {COUNT}" in console
    assert "i8042 flood done" in console, console
    # never more than the output register and the keyboard's buffer, and in fact no more
    # than the register plus one identify answer
    assert peak <= i8042.CAPACITY and peak <= 4, peak
    assert held == 0                          # the guest drained it
    assert after - before < RSS_GROWTH_LIMIT_KIB, (before, after)
    drained = int(re.search(r"i8042 drained (\d+) bytes", console).group(1))
    assert 1 <= drained <= 4, console
    # the controller and keyboard still answer after the flood
    assert "i8042 selftest 55 kbdreset fa aa" in console, console
