"""virtio-rng driven as a guest driver would (hvframe.testing's VirtioPciDriver: PCI config
through 0xcf8/0xcfc, rings in guest RAM, kicks through the notify region), built from `-s`
the way `hvframe run` builds it. Fixtures (device_rig, virtio_driver) come from hvframe's
pytest plugin."""
import threading
import time

import pytest

from hvframe.errors import ConfigError
from hvframe_virtio_rng.virtio_rng import MAX_REQUEST, Budget

SLOT = 3


@pytest.fixture
def bring_up(device_rig, virtio_driver):
    """bring_up(conf="") -> (machine, driver): virtio-rng at SLOT, DRIVER_OK."""
    def make(conf=""):
        m, _ = device_rig(f"-s {SLOT},virtio-rng{',' + conf if conf else ''}")
        drv = virtio_driver(m, SLOT)
        drv.initialize(0)
        return m, drv
    return make


def request(drv, *buffers):
    """One chain of (length, device-writable) buffers; returns (written, [bytes...])."""
    base, bufs = drv.data_base, []
    for i, (length, writable) in enumerate(buffers):
        bufs.append((base + i * 0x20000, length, writable))
        drv.mem.write(base + i * 0x20000, bytes(length))
    drv.submit(0, bufs)
    drv.kick(0)
    (_, written), = drv.wait_used(0, 1)
    return written, [drv.mem.read(a, n) for a, n, _ in bufs]


def test_identifies_as_virtio_rng(bring_up):
    _, drv = bring_up()
    assert drv.cfg_read(0) == 0x1005 << 16 | 0x1AF4      # transitional virtio-rng


def test_requests_get_fresh_entropy(bring_up):
    _, drv = bring_up()
    seen = []
    for _ in range(4):
        written, (data,) = request(drv, (64, True))
        assert written == 64
        assert len(set(data)) > 8           # not a constant fill
        seen.append(data)
    assert len(set(seen)) == 4              # and not the same bytes twice


def test_fills_several_buffers_in_order_and_skips_readable_ones(bring_up):
    _, drv = bring_up()
    written, (a, b) = request(drv, (16, True), (48, True))
    assert written == 64 and a != bytes(16) and b[-8:] != bytes(8)
    written, (only_readable,) = request(drv, (32, False))
    assert written == 0 and only_readable == bytes(32)   # nothing written into it


def test_a_huge_buffer_gets_at_most_max_request(bring_up):
    _, drv = bring_up()
    written, (data,) = request(drv, (MAX_REQUEST + 4096, True))
    assert written == MAX_REQUEST
    assert data[MAX_REQUEST:] == bytes(4096)


def test_rate_limit_holds_requests_until_the_next_period(bring_up):
    machine, drv = bring_up("max-bytes=100,period=1500")
    budget = machine.pci.lookup(0, SLOT, 0).device.budget
    assert request(drv, (64, True))[0] == 64
    assert request(drv, (64, True))[0] == 36     # what is left of this period's 100
    period_end = budget.window_end
    drv.submit(0, [(drv.data_base, 64, True)])
    drv.kick(0)
    time.sleep(0.05)
    assert drv.queues[0].reap() == []            # held on the ring, not answered empty
    (_, written), = drv.wait_used(0, 1, timeout=5)
    assert written == 64
    assert time.monotonic() >= period_end        # in the next period


def test_kick_returns_at_once_while_the_budget_is_spent(bring_up):
    _, drv = bring_up("max-bytes=8,period=2000")
    assert request(drv, (64, True))[0] == 8
    drv.submit(0, [(drv.data_base, 64, True)])
    t0 = time.monotonic()
    drv.kick(0)                                  # a vCPU's notify: the worker decides
    assert time.monotonic() - t0 < 0.5


def test_budget_windows():
    now = [0.0]
    b = Budget(100, 1.0, clock=lambda: now[0])
    assert b.take(64) == 64 and b.take(64) == 36 and b.take(1) == 0
    assert b.wait() == pytest.approx(1.0)
    now[0] = 1.0
    assert b.wait() == 0 and b.take(200) == 100
    assert Budget(0, 1.0).take(1 << 20) == 1 << 20          # no limit


@pytest.mark.parametrize("conf, words", [("period=0", "period=0 must be 1-"),
                                         ("max-bytes=lots", "max-bytes: not a size"),
                                         ("speed=9", "unexpected option 'speed=9'")])
def test_bad_options_are_one_config_error(device_rig, conf, words):
    with pytest.raises(ConfigError, match=words):
        device_rig(f"-s {SLOT},virtio-rng,{conf}")


def test_reset_while_a_request_is_held_and_close_stop_the_refill_thread(bring_up):
    machine, drv = bring_up("max-bytes=8,period=60000")
    assert request(drv, (64, True))[0] == 8
    drv.submit(0, [(drv.data_base, 64, True)])
    drv.kick(0)                                  # held for a minute
    t0 = time.monotonic()
    drv.set_status(0)                            # the driver resets the device meanwhile
    assert drv.status() == 0 and time.monotonic() - t0 < 2
    assert any(t.name == "virtio-rng-refill" for t in threading.enumerate())
    machine.close()
    assert not any(t.name == "virtio-rng-refill" for t in threading.enumerate())


def test_checkpoint_carries_the_spent_budget_to_a_new_machine(bring_up, device_rig,
                                                              virtio_driver):
    """A driver that spent most of its budget, checkpointed: in a machine built from the same
    line and given the record and RAM, it gets only what was left of the period, on the
    same rings; a record of another version is refused in one line."""
    from hvframe.snapshot.state import decode_into, encode
    conf = "max-bytes=100,period=60000"
    ma, drv = bring_up(conf)
    assert request(drv, (64, True))[0] == 64
    fa = ma.pci.lookup(0, SLOT, 0)
    fa.quiesce()
    record = encode(fa)
    ram = ma.memory.read(0, ma.memory.size)
    fa.unquiesce()

    mb, (fb,) = device_rig(f"-s {SLOT},virtio-rng,{conf}", direct_boot=False)
    mb.memory.write(0, ram)
    decode_into(fb, record, "virtio-rng")
    assert fb.device.bytes_served == 64 and fb.device.budget.remaining == 36
    b = virtio_driver(mb, SLOT)
    b.queues = drv.queues
    for q in b.queues:
        q.mem = mb.memory
    b.data_base = drv.data_base
    written, (data,) = request(b, (64, True))
    assert written == 36 and data[:36] != bytes(36) and data[36:] == bytes(28)

    with pytest.raises(ConfigError, match="state version 3") as e:
        decode_into(fb.device, b"\x03\x00" + encode(fa.device)[2:], "virtio-rng")
    assert "\n" not in str(e.value)
