"""The threading and locking model (hvframe.concurrency): the checker itself, the device
thread helper, and the virtio-pci scenarios a hostile guest used to hang the VMM with: a
register write from a vCPU against a worker that is busy serving (or failing) a batch."""
import random
import threading
import time

import pytest

from hvframe import concurrency
from hvframe.pci.bus import attach, ensure_pci_bus
from hvframe.synthetic import SyntheticMachine
from hvframe.virtio.device import (STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
                                   STATUS_FEATURES_OK, STATUS_NEEDS_RESET, VirtioDevice)
from hvframe.virtio.harness import VirtioPciDriver
from hvframe.virtio.pci import (COMMON_OFF, ISR_OFF, MODERN_BAR, VirtioPciCfgCap,
                                VirtioPciCommonCfg, VirtioPciFunction)
from hvframe.layout import offset_of

DEADLINE = 10.0
OUTSIDE_RAM = 0x7F00_0000_0000
SLOT = 3


def finishes(fn, deadline=DEADLINE) -> bool:
    """Run fn on a thread; True if it returned within the deadline (a hang is a failure,
    not a stuck test run)."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(deadline)
    return not t.is_alive()


# -- the checker ----------------------------------------------------------------------------

def test_checker_is_on_for_the_test_suite():
    assert concurrency.CHECKING
    assert isinstance(concurrency.lock(concurrency.DEVICE, "x"), concurrency.CheckedLock)


def test_rank_inversion_is_reported():
    dev = concurrency.lock(concurrency.DEVICE, "dev")
    queue = concurrency.lock(concurrency.QUEUE, "queue")
    with dev:
        with queue:
            pass
    found = concurrency.take_violations()
    assert len(found) == 1 and "acquires queue (QUEUE) while holding dev (DEVICE)" in found[0]


def test_two_locks_of_one_rank_are_an_inversion_but_reentry_is_not():
    a = concurrency.lock(concurrency.DEVICE, "a", reentrant=True)
    b = concurrency.lock(concurrency.DEVICE, "b")
    with a:
        with a:
            pass
        with b:
            pass
    found = concurrency.take_violations()
    assert len(found) == 1 and "acquires b" in found[0]


def test_order_as_written_is_clean_and_trylock_is_not_checked():
    q = concurrency.lock(concurrency.QUEUE, "q")
    dev = concurrency.lock(concurrency.DEVICE, "dev")
    leaf = concurrency.lock(concurrency.LEAF, "leaf")
    with q, dev, leaf:
        assert concurrency.held_locks() == ["q", "dev", "leaf"]
    with dev:
        assert q.acquire(blocking=False)
        q.release()
    assert concurrency.take_violations() == []
    assert concurrency.held_locks() == []


def test_waiting_while_holding_a_lock_is_reported():
    dev = concurrency.lock(concurrency.DEVICE, "dev")
    concurrency.may_block("a full queue")
    assert concurrency.take_violations() == []
    with dev:
        concurrency.may_block("a full queue")
    found = concurrency.take_violations()
    assert len(found) == 1 and "waits for a full queue while holding dev" in found[0]


def test_condition_wait_releases_a_reentrant_checked_lock():
    lk = concurrency.lock(concurrency.DEVICE, "dev", reentrant=True)
    cond = concurrency.condition(lk)
    flag = []

    def setter():
        with lk:                 # would block forever if wait() kept the lock
            flag.append(1)
            cond.notify_all()
    with lk, lk:
        threading.Thread(target=setter).start()
        assert cond.wait_for(lambda: flag, timeout=DEADLINE)
        assert concurrency.held_locks() == ["dev", "dev"]
    assert concurrency.take_violations() == []


def test_a_plain_lock_released_by_another_thread_leaves_no_stale_entry():
    lk = concurrency.lock(concurrency.LEAF, "handed over")
    lk.acquire()
    t = threading.Thread(target=lk.release)
    t.start()
    t.join()
    assert concurrency.held_locks() == []
    with concurrency.lock(concurrency.DEVICE, "after"):   # no false "holding" report
        pass
    assert concurrency.take_violations() == []


def test_deferred_work_runs_after_the_outermost_scope():
    order = []
    with concurrency.deferring():
        with concurrency.deferring():
            concurrency.defer(lambda: order.append("deferred"))
            order.append("inner")
        order.append("outer")
    concurrency.defer(lambda: order.append("now"))
    assert order == ["inner", "outer", "deferred", "now"]


# -- device threads -------------------------------------------------------------------------

def test_device_thread_reports_its_exception_to_the_owner(caplog):
    errors = []

    def body(thread):
        raise RuntimeError("device model bug")
    t = concurrency.DeviceThread("dev-worker", body, on_error=errors.append).start()
    assert t.stop()
    assert isinstance(t.error, RuntimeError) and errors == [t.error]
    assert "dev-worker: thread failed" in caplog.text


def test_device_thread_stops_pauses_and_resumes():
    wake = threading.Event()
    rounds = []

    def body(thread):
        while not thread.stopping:
            wake.wait(0.05)
            wake.clear()
            thread.checkpoint()
            rounds.append(1)
    t = concurrency.DeviceThread("pausable", body, wake=wake.set).start()
    assert t.pause()
    n = len(rounds)
    time.sleep(0.2)
    assert len(rounds) == n          # parked
    t.resume()
    deadline = time.monotonic() + DEADLINE
    while len(rounds) == n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(rounds) > n
    assert t.stop() and not t.is_alive()
    assert t not in concurrency.live_threads()


def test_a_thread_that_ignores_stop_is_reported_not_waited_for(caplog):
    release = threading.Event()
    t = concurrency.DeviceThread("stuck", lambda th: release.wait(DEADLINE)).start()
    assert not t.stop(deadline=0.2)
    assert "stuck: thread did not stop" in caplog.text
    release.set()
    assert t.stop()


# -- virtio-pci against a busy worker ---------------------------------------------------------

class SlowDevice(VirtioDevice):
    """A virtio device whose requests block until the test lets them go: the worker sits in
    handle_chain holding its queue while the test writes registers from another thread."""

    name = "slow"
    device_type = 9
    num_queues = 1
    queue_max_size = 16

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.served = 0

    def handle_chain(self, queue, chain):
        self.entered.set()
        self.release.wait(DEADLINE)
        self.served += 1
        return 0


class SlowRig:
    def __init__(self, *, legacy=False, msix=True):
        self.m = SyntheticMachine(16 << 20)
        self.dev = SlowDevice()
        self.fn = VirtioPciFunction(self.dev)
        attach(self.m, self.fn, {"pci.address": (0, SLOT, 0)})
        self.m.add_device(self.fn)
        ensure_pci_bus(self.m).assign_bars()
        self.drv = VirtioPciDriver(self.m, SLOT, legacy=legacy, msix=msix)
        self.drv.initialize(0)
        self.buf = self.drv.data_base

    def post(self, *, then_bad=False):
        """One request the device will block in; with then_bad, a chain after it that points
        outside guest RAM (the worker meets it once the first is released)."""
        self.drv.submit(0, [(self.buf, 64, False)])
        if then_bad:
            self.drv.submit(0, [(OUTSIDE_RAM, 64, False)])
        self.drv.kick(0)
        assert self.dev.entered.wait(DEADLINE), "the worker never took the request"

    def window(self, bar_offset, length):
        """Point the VIRTIO_PCI_CAP_PCI_CFG window at BAR4 + bar_offset."""
        cap = self.fn._pci_cfg_cap
        self.drv.cfg_write(cap + offset_of(VirtioPciCfgCap, "bar"), 1, MODERN_BAR)
        self.drv.cfg_write(cap + offset_of(VirtioPciCfgCap, "offset"), 4, bar_offset)
        self.drv.cfg_write(cap + offset_of(VirtioPciCfgCap, "length"), 4, length)
        return cap + offset_of(VirtioPciCfgCap, "pci_cfg_data")

    def close(self):
        self.dev.release.set()
        assert finishes(self.m.close), "machine close hung"


def test_legacy_queue_disable_while_the_worker_fails_its_batch():
    """A batch whose last chain points outside RAM, then queue PFN 0 while the worker still
    serves it: the write returns, the device says NEEDS_RESET, and the machine closes."""
    r = SlowRig(legacy=True)
    try:
        r.post(then_bad=True)

        def disable():
            r.drv.legacy_write("queue_select", 2, 0)
            r.drv.legacy_write("queue_pfn", 4, 0)
        t = threading.Thread(target=disable, daemon=True)
        t.start()
        time.sleep(0.2)                   # the vCPU now waits for the busy queue
        r.dev.release.set()
        t.join(DEADLINE)
        assert not t.is_alive(), "the queue PFN write never returned"
        assert r.drv.legacy_read("queue_pfn", 4) == 0
        assert r.dev.served == 1
        # Whether the worker met the bad chain before it let go (NEEDS_RESET) or not, the
        # driver can take the device back and use it.
        assert finishes(lambda: r.drv.initialize(0))
        assert not r.drv.status() & STATUS_NEEDS_RESET
        r.drv.submit(0, [(r.buf, 64, False)])
        r.drv.kick(0)
        assert r.drv.wait_used(0, 1)
        assert r.dev.served == 2
    finally:
        r.close()


def test_reset_through_the_pci_cfg_window_while_the_worker_raises_intx():
    """Device status 0 written through the configuration window while the worker completes
    a request with INTx: the write returns, configuration space keeps answering, and the
    device is reset."""
    r = SlowRig(msix=False)
    try:
        r.post()
        data = r.window(COMMON_OFF + offset_of(VirtioPciCommonCfg, "device_status"), 1)
        t = threading.Thread(target=lambda: r.drv.cfg_write(data, 1, 0), daemon=True)
        t.start()
        time.sleep(0.2)
        r.dev.release.set()
        t.join(DEADLINE)
        assert not t.is_alive(), "the reset through the window never returned"
        assert finishes(lambda: r.drv.cfg_read(0, 4)), "config space hangs"
        assert r.dev.served == 1
        assert r.drv.status() == 0
        assert r.fn.intx_level == 0           # the reset deasserted the pin
    finally:
        r.close()


def test_isr_reads_through_the_window_race_intx_from_the_worker():
    """ISR reads through the configuration window (bus lock, then ISR) while the worker
    raises INTx (ISR, then the pin): many rounds, no hang and no lock-order inversion."""
    r = SlowRig(msix=False)
    r.dev.release.set()                       # requests complete at once
    try:
        data = r.window(ISR_OFF, 1)
        stop = threading.Event()
        seen = []

        def reader():
            while not stop.is_set():
                seen.append(r.drv.cfg_read(data, 1))
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        for _ in range(200):
            r.drv.submit(0, [(r.buf, 64, False)])
            r.drv.kick(0)
            r.drv.wait_used(0, 1)
        stop.set()
        t.join(DEADLINE)
        assert not t.is_alive()
        assert r.dev.served == 200
        assert any(v & 1 for v in seen) or r.drv.read_isr() & 1
    finally:
        r.close()


@pytest.mark.parametrize("legacy", [False, True])
def test_two_vcpus_write_registers_against_a_busy_worker(legacy):
    """Two threads play vCPUs writing random transport registers (status, queue enable and
    addresses, vectors, select) while the worker serves requests; then the driver resets and
    brings the device up again and it still works. Nothing hangs, nothing escapes."""
    r = SlowRig(legacy=legacy)
    r.dev.release.set()
    rng = random.Random(7)
    common = {n: offset_of(VirtioPciCommonCfg, n) for n in
              ("device_status", "queue_select", "queue_enable", "queue_size",
               "queue_msix_vector", "queue_desc", "config_msix_vector")}
    try:
        def vcpu(seed):
            rnd = random.Random(seed)
            for _ in range(300):
                value = rnd.choice([0, 1, 0xFF, STATUS_ACKNOWLEDGE | STATUS_DRIVER, 0x40,
                                    rnd.randrange(1 << 16)])
                if legacy:
                    reg = rnd.choice(["device_status", "queue_pfn", "queue_select",
                                      "guest_features", "queue_notify"])
                    size = {"queue_pfn": 4, "guest_features": 4, "device_status": 1}.get(reg, 2)
                    r.drv.legacy_write(reg, size, value)
                else:
                    name = rnd.choice(list(common))
                    size = 1 if name == "device_status" else 2
                    r.drv.common_write(name, size, value)
                r.drv.read_isr()
        vcpus = [threading.Thread(target=vcpu, args=(s,), daemon=True) for s in (1, 2)]
        for t in vcpus:
            t.start()
        dq = r.drv.queues[0]
        for _ in range(100):
            dq.reap()
            if dq.free:                  # a device the vCPUs broke returns nothing
                r.drv.submit(0, [(r.buf, 64, False)])
            r.drv.kick(0)
            time.sleep(rng.random() / 1000)
        for t in vcpus:
            t.join(DEADLINE * 3)
            assert not t.is_alive(), "a register write hung"
        # The driver takes the device back and it serves again.
        assert finishes(lambda: r.drv.initialize(0))
        r.dev.entered.clear()
        r.drv.submit(0, [(r.buf, 64, False)])
        r.drv.kick(0)
        assert r.drv.wait_used(0, 1)
    finally:
        r.close()


def test_a_reset_is_not_starved_by_a_driver_that_keeps_posting():
    """vCPU1 keeps the queue full while vCPU0 resets the device: the worker lets go of the
    queue between chains for the reset, which completes."""
    r = SlowRig()
    r.dev.release.set()
    stop = threading.Event()
    try:
        dq = r.drv.queues[0]

        def flood():
            while not stop.is_set():
                dq.reap()
                if dq.free and r.fn.live:
                    r.drv.submit(0, [(r.buf, 64, False)])
                    r.drv.kick(0)
        t = threading.Thread(target=flood, daemon=True)
        t.start()
        while r.dev.served < 50:
            time.sleep(0.001)
        assert finishes(lambda: r.drv.set_status(0)), "the reset never completed"
        assert r.drv.status() == 0
        stop.set()
        t.join(DEADLINE)
    finally:
        stop.set()
        r.close()


def test_driver_ok_cleared_without_a_reset_does_not_activate_the_device_again():
    """Only a reset clears status bits (virtio 1.2, 2.1.2). A driver that writes the status
    without DRIVER_OK and then with it, while a worker serves, must not run activate() anew
    under that worker; the queue carries on."""
    r = SlowRig()
    try:
        activations = []
        first = r.dev.activate
        r.dev.activate = lambda features: (activations.append(features), first(features))
        r.post()
        ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        r.drv.set_status(ok)
        assert r.drv.status() & STATUS_DRIVER_OK
        r.drv.set_status(ok | STATUS_DRIVER_OK)
        assert activations == []
        r.dev.release.set()
        assert r.drv.wait_used(0, 1)
        r.drv.submit(0, [(r.buf, 64, False)])
        r.drv.kick(0)
        assert r.drv.wait_used(0, 1)
    finally:
        r.close()


def test_two_vcpus_reset_at_once_against_a_busy_worker():
    r = SlowRig()
    try:
        r.post()
        resets = [threading.Thread(target=r.drv.set_status, args=(0,), daemon=True)
                  for _ in range(2)]
        for t in resets:
            t.start()
        time.sleep(0.1)
        r.dev.release.set()
        for t in resets:
            t.join(DEADLINE)
            assert not t.is_alive(), "a reset hung"
        assert r.drv.status() == 0
        assert all(not q.enabled and q.vq is None for q in r.fn.queues)
        assert finishes(lambda: r.drv.initialize(0))
        r.drv.submit(0, [(r.buf, 64, False)])
        r.drv.kick(0)
        assert r.drv.wait_used(0, 1)
    finally:
        r.close()


def test_machine_close_returns_while_a_request_never_does(caplog):
    """A backend request that hangs (a dead network disk) does not hang Machine.close():
    the worker and its queue are reported and left after their deadlines."""
    r = SlowRig()
    hang = threading.Event()
    r.dev.handle_chain = lambda queue, chain: (r.dev.entered.set(), hang.wait(60), 0)[-1]
    try:
        r.post()
        assert finishes(r.m.close, deadline=3 * concurrency.JOIN_DEADLINE), "close hung"
        assert "did not stop" in caplog.text and "still busy" in caplog.text
    finally:
        hang.set()


def test_delayed_interrupts_a_guest_asks_for_are_bounded():
    """pci-testdev's RAISE_LATER starts a timer thread per request: a guest asking for
    thousands gets MAX_PENDING waiting at once, the rest counted as dropped."""
    from hvframe.pci import testdev
    from hvframe.testing import rig
    m = SyntheticMachine(16 << 20)
    try:
        dev, = rig(m, "-s 5,pci-testdev", direct_boot=False)
        before = threading.active_count()
        bar0 = dev.bar(0)
        dev.config_write(4, 2, 0x2)                   # memory decoding on
        base = bar0.mapped_at
        assert base is not None
        for _ in range(3000):
            m.mmio_write(base + testdev.REG_RAISE_LATER, 4, 60_000 << 16)   # in a minute
        assert threading.active_count() - before <= testdev.MAX_PENDING
        assert dev.dropped_later == 3000 - testdev.MAX_PENDING
    finally:
        m.close()
