"""A port stopped and started again while its requests are still with the backend: PxCMD.ST
cleared and set without waiting for PxCMD.CR, as a hostile or careless driver does. The port
drains (CR stays set, new commands wait) so nothing hangs, no stale request runs after a
newer one, and the image never grows. Both the native NCQ path and the Python path."""
import os
import threading
import time

import pytest

from hvframe_ahci import ata, regs
from hvframe_ahci.hba import AhciHba, AhciPort
from hvframe_ahci.testdriver import AhciDriver, build_machine, h2d

SLOT = 4
BUF = 0x1000000
SECTORS = 2048
MEM = 64 << 20
DEADLINE = 20.0
CMD_CR = 1 << 15


def ncq(p, slot, lba, nsect, buf, *, write=False):
    op = ata.WRITE_FPDMA_QUEUED if write else ata.READ_FPDMA_QUEUED
    p.prepare(slot, h2d(op, lba=lba, count=slot << 3, features=nsect), [(buf, nsect * 512)],
              write=write)


def issue(p, slots):
    p.write("sact", slots)
    p.write("ci", slots)


def accepted(p, slots, deadline=5.0):
    """Poll until the device has taken the NCQ slots (their PxCI bits clear): the PxCI write
    only hands them to the port's worker, and a stop before they start forgets them."""
    end = time.monotonic() + deadline
    while p.read("ci") & slots:
        assert time.monotonic() < end, "the port never started the commands"
        time.sleep(0.0005)


class SlowDisk:
    """An AHCI disk whose requests are held at a gate (up to a few seconds), so requests
    issued before a stop are still with the backend when the port is started again.
    `held(request)` says which requests wait at the gate (default: all)."""

    def __init__(self, tmp_path, native, held=lambda data: True):
        self.path = tmp_path / "disk.img"
        self.path.write_bytes(bytes(SECTORS * 512))
        self.size = os.path.getsize(self.path)
        self.gate = threading.Event()
        self.m = build_machine(f"{SLOT},ahci-hd,{self.path}", memory=MEM)
        self.drv = AhciDriver(self.m, SLOT)
        self.p = self.drv.port(0)
        self.p.start()
        self.hba = next(d for d in self.m.devices if isinstance(d, AhciHba))
        port = self.hba.ports[0]
        gate = self.gate
        if not native:
            port.device.native_setup = lambda nat: False
        else:
            real = AhciPort._native_transfer

            def gated_native(nat, mask, ram):
                if held(("native", mask)):
                    gate.wait(DEADLINE)
                return real(nat, mask, ram)
            port._native_transfer = gated_native
        backend = port.device.backend
        for name in ("read", "write"):
            real_io = getattr(backend, name)

            def gated(offset, bufs, *args, _real=real_io, **kw):
                if held(("python", bytes(bufs[0][:1]))):
                    gate.wait(DEADLINE)
                return _real(offset, bufs, *args, **kw)
            setattr(backend, name, gated)

    def open_gate_after(self, seconds):
        threading.Timer(seconds, self.gate.set).start()

    def close(self):
        self.gate.set()
        done = threading.Thread(target=self.m.close, daemon=True)
        done.start()
        done.join(DEADLINE)
        assert not done.is_alive(), "machine close hung"


def vcpu(fn):
    """Run fn as a vCPU would, with a deadline: a hang fails the test instead of the run."""
    errors = []

    def body():
        try:
            fn()
        except BaseException as e:       # noqa: BLE001 - re-raised below
            errors.append(e)
    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(DEADLINE)
    assert not t.is_alive(), "the vCPU hung"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_rounds_of_32_reads_with_the_port_restarted_in_between(tmp_path, native):
    """Each command its own PxCI write, so that without the drain the block queue would fill
    with stale requests and a vCPU wait on it while holding the HBA lock."""
    d = SlowDisk(tmp_path, native)
    try:
        d.open_gate_after(1.0)

        def rounds():
            for r in range(6):     # more stale requests than the block queue holds
                for slot in range(32):
                    ncq(d.p, slot, (slot * 8 + r) % (SECTORS - 8), 8, BUF + slot * 0x1000)
                    issue(d.p, 1 << slot)
                d.p.write("cmd", d.p.read("cmd") & ~regs.CMD_ST)    # no wait for CR
                d.p.write("cmd", d.p.read("cmd") | regs.CMD_ST)
        vcpu(rounds)
        vcpu(lambda: d.p.wait(0xFFFFFFFF))
        assert d.hba.wait_idle(DEADLINE)
        # The last round was issued while the port drained: it ran, and completed.
        assert d.p.read("ci") == 0 and d.p.read("sact") == 0
        assert not d.p.read("is") & regs.IS_FATAL
        assert os.path.getsize(d.path) == d.size
    finally:
        d.close()


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_a_stale_write_never_lands_after_an_acknowledged_one(tmp_path, native):
    """32 writes of A are issued and the port is stopped at once; after the restart one
    write of B to the same blocks completes. The image holds B: the drain kept the stale A
    writes from running after it."""
    # The A writes wait at the gate, B does not: without the drain B would complete first.
    d = SlowDisk(tmp_path, native,
                 held=lambda req: req != ("native", 1 << 5) and req != ("python", b"B"))
    lba = 100
    try:
        d.open_gate_after(1.0)
        d.m.memory.write(BUF, b"A" * 4096)
        d.m.memory.write(BUF + 0x100000, b"B" * 4096)

        def restart_and_write_b():
            for slot in range(32):
                ncq(d.p, slot, lba, 8, BUF, write=True)
            issue(d.p, 0xFFFFFFFF)
            accepted(d.p, 0xFFFFFFFF)
            d.p.write("cmd", d.p.read("cmd") & ~regs.CMD_ST)
            assert d.p.read("cmd") & CMD_CR       # still draining: CR says so
            d.p.write("cmd", d.p.read("cmd") | regs.CMD_ST)
            ncq(d.p, 5, lba, 8, BUF + 0x100000, write=True)
            issue(d.p, 1 << 5)
        vcpu(restart_and_write_b)
        vcpu(lambda: d.p.wait(1 << 5))
        assert not d.p.read("is") & regs.IS_FATAL
        assert d.hba.wait_idle(DEADLINE)
        with open(d.path, "rb") as f:
            f.seek(lba * 512)
            assert f.read(4096) == b"B" * 4096
        assert os.path.getsize(d.path) == d.size
    finally:
        d.close()


def test_hba_reset_while_requests_run_drains_too(tmp_path):
    d = SlowDisk(tmp_path, True)
    try:
        d.open_gate_after(0.5)

        def reset_mid_batch():
            for slot in range(32):
                ncq(d.p, slot, slot * 8, 8, BUF + slot * 0x1000)
            issue(d.p, 0xFFFFFFFF)
            d.drv.write("ghc", regs.GHC_HR)
            assert d.p.read("ci") == 0 and d.p.read("sact") == 0
        vcpu(reset_mid_batch)
        assert d.hba.wait_idle(DEADLINE)
        assert not d.hba.ports[0].draining
        # The port comes back as after power-on and works.
        d.p.start()
        ncq(d.p, 0, 0, 1, BUF)
        issue(d.p, 1)
        vcpu(lambda: d.p.wait(1))
        assert not d.p.read("is") & regs.IS_FATAL
    finally:
        d.close()


def test_a_failed_write_through_flush_is_kept_when_the_port_was_stopped(tmp_path):
    """A natively served FUA write whose fdatasync fails completes after the guest stopped
    the port: nobody is told about that command, but the lost write-back is kept, so the
    next FLUSH CACHE fails (the kernel reports it only once). /dev/null takes the write and
    refuses the fdatasync."""
    d = SlowDisk(tmp_path, True)
    be = d.hba.ports[0].device.backend
    devnull = os.open("/dev/null", os.O_RDWR)
    real_fd = be.fd
    try:
        def fua_write_then_stop():
            be.fd = devnull                   # what the native path is set up with
            try:
                d.p.prepare(0, h2d(ata.WRITE_FPDMA_QUEUED, lba=8, count=0, features=1,
                                   device=0x40 | ata.FUA_BIT), [(BUF, 512)], write=True)
                issue(d.p, 1)
                accepted(d.p, 1)              # set up (by the port's worker) with it
            finally:
                be.fd = real_fd
            d.p.write("cmd", d.p.read("cmd") & ~regs.CMD_ST)
        vcpu(fua_write_then_stop)
        d.gate.set()
        assert d.hba.wait_idle(DEADLINE)
        assert be.failed
        d.p.write("cmd", d.p.read("cmd") | regs.CMD_ST)
        vcpu(lambda: d.p.issue(1, h2d(ata.FLUSH_CACHE_EXT)))
        assert vcpu_result(lambda: d.p.wait(1 << 1)) & regs.IS_TFES
    finally:
        os.close(devnull)
        d.close()


def vcpu_result(fn):
    out = []
    vcpu(lambda: out.append(fn()))
    return out[0]
