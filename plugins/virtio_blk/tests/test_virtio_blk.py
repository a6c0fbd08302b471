"""virtio-blk over the virtio-pci transport, driven through the dispatch core by the Python
driver in hvframe.virtio.harness (config space through 0xcf8/0xcfc, BAR accesses as MMIO and
port exits, rings in guest RAM). Requests are served by the device's worker threads."""
import struct
import time

import pytest

from hvframe.device import DeviceType
from hvframe.errors import ConfigError
from hvframe.pci.bus import INTX_GSI_BASE
from hvframe import testing
from hvframe.testing import SyntheticMachine
from hvframe.virtio.device import (F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1,
                                   ISR_CONFIG, ISR_QUEUE, STATUS_ACKNOWLEDGE, STATUS_DRIVER,
                                   STATUS_FEATURES_OK, STATUS_NEEDS_RESET, bit)
from hvframe.testing.virtio import VirtioPciDriver
from hvframe.virtio.pci import (CFG_COMMON, CFG_DEVICE, CFG_ISR, CFG_NOTIFY, MODERN_BAR,
                                NOTIFY_OFF)
from hvframe_virtio_blk.plugin import virtio_blk_device_types
from hvframe_virtio_blk.virtio_blk import (F_BLK_SIZE, F_DISCARD, F_FLUSH, F_MQ, F_RO,
                                           F_SEG_MAX, F_TOPOLOGY, F_WRITE_ZEROES, S_IOERR,
                                           S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN,
                                           T_OUT, T_WRITE_ZEROES, VirtioBlkConfig)
from hvframe.layout import fields_of

SLOT = 2
DISK_SECTORS = 2048
ALL = (bit(F_SEG_MAX) | bit(F_BLK_SIZE) | bit(F_FLUSH) | bit(F_TOPOLOGY) | bit(F_DISCARD)
       | bit(F_WRITE_ZEROES) | bit(F_RO) | bit(F_MQ) | bit(F_RING_INDIRECT_DESC))


def blk_type() -> DeviceType:
    return virtio_blk_device_types()[0]


def make_disk(tmp_path, sectors=DISK_SECTORS, name="disk.img"):
    path = tmp_path / name
    data = bytes((i * 7 + i // 512) & 0xFF for i in range(sectors * 512))
    path.write_bytes(data)
    return path


class Rig:
    """A synthetic machine with one virtio-blk at slot 2 and a driver bound to it."""

    def __init__(self, tmp_path, conf="", *, legacy=False, msix=True, sectors=DISK_SECTORS,
                 features=ALL, irqfd_eventfds=False, start=False, bind=True):
        self.path = make_disk(tmp_path, sectors)
        self.m = SyntheticMachine(64 << 20, irqfd_eventfds=irqfd_eventfds)
        # Built as `hvframe run` builds it; the driver turns decoding on, as a guest's would.
        self.fn, = testing.rig(self.m, f"-s {SLOT},virtio-blk,{self.path}{',' + conf if conf else ''}",
                       direct_boot=False)
        if start:                       # as `hvframe run` does before the first vCPU runs
            self.m.start_devices()
        self.mem = self.m.memory
        if bind:
            self.bind(legacy=legacy, msix=msix, features=features)

    def bind(self, *, legacy=False, msix=True, features=ALL):
        """The driver finds the function and sets it up, to DRIVER_OK."""
        self.drv = VirtioPciDriver(self.m, SLOT, legacy=legacy, msix=msix)
        self.features = self.drv.initialize(features)
        self.buf = self.drv.data_base

    def close(self):
        self.m.close()

    # -- requests --------------------------------------------------------------------------
    def request(self, rtype, sector, *, data=b"", read_len=0, split=1, q=0, indirect=False):
        """One request; returns (status, written). data: OUT payload; read_len: IN size."""
        mem, base = self.mem, self.buf + 0x10000 * q
        mem.write(base, struct.pack("<IIQ", rtype, 0, sector))
        bufs = [(base, 16, False)]
        pos = base + 0x1000
        payload = data or bytes(read_len)
        if payload:
            mem.write(pos, data if data else bytes(read_len))
            step = -(-len(payload) // split)
            for off in range(0, len(payload), step):
                bufs.append((pos + off, min(step, len(payload) - off), not data))
        status_at = base + 0x800
        mem.write(status_at, b"\xee")
        bufs.append((status_at, 1, True))
        self.drv.submit(q, bufs, indirect_at=base + 0x900 if indirect else None)
        self.drv.kick(q)
        (head, written), = self.drv.wait_used(q, 1)
        self.last_read = mem.read(pos, read_len) if read_len else b""
        return mem.read(status_at, 1)[0], written

    def image(self):
        return self.path.read_bytes()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def wait_status(drv, flag, timeout=5.0):
    """The worker thread sets NEEDS_RESET asynchronously: poll the status register."""
    deadline = time.monotonic() + timeout
    while not drv.status() & flag:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def cfg_field(rig, name):
    offset, size = fields_of(VirtioBlkConfig)[name]
    return rig.drv.config_read(offset, size)


# -- identity and negotiation ---------------------------------------------------------------

def test_transitional_identity_and_capabilities(rig):
    d = rig.drv
    assert d.cfg_read(0) == 0x1001_1AF4
    assert d.cfg_read(0x2C) == 0x0002_1AF4           # subsystem: virtio device type 2
    assert d.cfg_read(0x08) >> 8 == 0x010000
    assert d.cfg_read(0x3D, 1) == 1                   # INTA
    bar4 = d.bar(MODERN_BAR)
    assert d.regions == {CFG_COMMON: bar4, CFG_ISR: bar4 + 0x1000, CFG_DEVICE: bar4 + 0x2000,
                         CFG_NOTIFY: bar4 + NOTIFY_OFF}
    assert d.bar(0) >= 0xC000                         # the legacy I/O BAR


def test_offered_features(tmp_path):
    r = Rig(tmp_path)
    try:
        offered = r.drv.device_features()
        for f in (F_VERSION_1, F_FLUSH, F_BLK_SIZE, F_SEG_MAX, F_TOPOLOGY, F_DISCARD,
                  F_WRITE_ZEROES, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC):
            assert offered & bit(f), f
        assert not offered & bit(F_RO) and not offered & bit(F_MQ)
    finally:
        r.close()


def test_read_only_disk_offers_ro_and_no_discard(tmp_path):
    r = Rig(tmp_path, "ro")
    try:
        offered = r.drv.device_features()
        assert offered & bit(F_RO)
        assert not offered & (bit(F_DISCARD) | bit(F_WRITE_ZEROES))
    finally:
        r.close()


def test_features_ok_refused_for_unoffered_or_legacy_only_features(rig):
    d = rig.drv
    for wanted in (bit(F_VERSION_1) | bit(40), bit(F_FLUSH)):   # bit 40 unoffered; no VERSION_1
        d.set_status(0)
        d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        for sel in (0, 1):
            d.common_write("driver_feature_select", 4, sel)
            d.common_write("driver_feature", 4, (wanted >> (32 * sel)) & 0xFFFFFFFF)
        d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        assert not d.status() & STATUS_FEATURES_OK


def test_config_space(tmp_path):
    r = Rig(tmp_path, "sectorsize=512/4096,num-queues=2")
    try:
        assert cfg_field(r, "capacity") == DISK_SECTORS
        assert cfg_field(r, "blk_size") == 512
        assert cfg_field(r, "physical_block_exp") == 3
        assert cfg_field(r, "num_queues") == 2
        assert cfg_field(r, "seg_max") == 254
        assert r.drv.common_read("num_queues", 2) == 2
    finally:
        r.close()


# -- data path ------------------------------------------------------------------------------

@pytest.mark.parametrize("legacy", [False, True], ids=["modern", "legacy"])
def test_write_then_read_back(tmp_path, legacy):
    r = Rig(tmp_path, legacy=legacy)
    try:
        data = bytes(range(256)) * 8          # 4 sectors
        status, written = r.request(T_OUT, 10, data=data, split=3)
        assert (status, written) == (S_OK, 1)
        assert r.image()[10 * 512:14 * 512] == data      # on the backend when acknowledged
        status, written = r.request(T_IN, 10, read_len=len(data), split=2)
        assert status == S_OK and written == len(data) + 1
        assert r.last_read == data
        assert r.drv.irq_count >= 2
    finally:
        r.close()


def test_read_returns_image_contents(rig):
    status, _ = rig.request(T_IN, 100, read_len=1024)
    assert status == S_OK
    assert rig.last_read == rig.image()[100 * 512:102 * 512]


def test_indirect_descriptors(rig):
    data = b"\x5a" * 512
    assert rig.request(T_OUT, 3, data=data, split=2, indirect=True)[0] == S_OK
    assert rig.image()[3 * 512:4 * 512] == data


def test_flush_and_get_id(tmp_path):
    r = Rig(tmp_path, "ser=HVF-SERIAL-1")
    try:
        assert r.request(T_FLUSH, 0) == (S_OK, 1)
        status, written = r.request(T_GET_ID, 0, read_len=20)
        assert status == S_OK and written == 21
        assert r.last_read.rstrip(b"\0") == b"HVF-SERIAL-1"
    finally:
        r.close()


def test_read_only_write_fails_and_image_unchanged(tmp_path):
    r = Rig(tmp_path, "ro")
    try:
        before = r.image()
        assert r.request(T_OUT, 0, data=b"\x01" * 512)[0] == S_IOERR
        assert r.request(T_WRITE_ZEROES, 0, data=struct.pack("<QII", 0, 8, 0))[0] == S_IOERR
        assert r.image() == before
        assert r.request(T_IN, 0, read_len=512)[0] == S_OK
    finally:
        r.close()


@pytest.mark.parametrize("sector, length", [(DISK_SECTORS, 512), (DISK_SECTORS - 1, 1024),
                                            (0, 100), (2 ** 63, 512)])
def test_bad_ranges_get_ioerr(rig, sector, length):
    before = rig.image()
    assert rig.request(T_OUT, sector, data=b"\x77" * length)[0] == S_IOERR
    assert rig.request(T_IN, sector, read_len=length)[0] == S_IOERR
    assert rig.image() == before


def test_unknown_request_type_is_unsupported(rig):
    assert rig.request(99, 0)[0] == S_UNSUPP


def test_discard_and_write_zeroes(rig):
    seg = struct.pack("<QII", 8, 16, 0)
    assert rig.request(T_DISCARD, 0, data=seg)[0] == S_OK
    assert rig.image()[8 * 512:24 * 512] == bytes(16 * 512)
    seg = struct.pack("<QII", 40, 4, 1)          # unmap allowed
    assert rig.request(T_WRITE_ZEROES, 0, data=seg)[0] == S_OK
    assert rig.image()[40 * 512:44 * 512] == bytes(4 * 512)
    assert rig.image()[44 * 512:45 * 512] != bytes(512)
    before = rig.image()
    bad = [struct.pack("<QII", DISK_SECTORS - 1, 2, 0),        # past the end
           struct.pack("<QII", 0, 1, 1)]                       # unmap flag on a discard
    assert rig.request(T_DISCARD, 0, data=bad[0])[0] == S_IOERR
    assert rig.request(T_DISCARD, 0, data=bad[1])[0] == S_UNSUPP
    assert rig.request(T_DISCARD, 0, data=b"\0" * 15)[0] == S_UNSUPP   # not whole segments
    assert rig.image() == before


def test_nodelete_refuses_discard(tmp_path):
    r = Rig(tmp_path, "nodelete")
    try:
        assert not r.features & bit(F_DISCARD)
        before = r.image()
        assert r.request(T_DISCARD, 0, data=struct.pack("<QII", 0, 8, 0))[0] == S_UNSUPP
        assert r.image() == before
    finally:
        r.close()


def test_multiple_queues(tmp_path):
    r = Rig(tmp_path, "num-queues=2")
    try:
        assert r.features & bit(F_MQ)
        assert r.request(T_OUT, 1, data=b"\x11" * 512, q=0)[0] == S_OK
        assert r.request(T_OUT, 2, data=b"\x22" * 512, q=1)[0] == S_OK
        img = r.image()
        assert img[512:1024] == b"\x11" * 512 and img[1024:1536] == b"\x22" * 512
    finally:
        r.close()


def test_many_requests_in_one_kick_event_idx(tmp_path):
    r = Rig(tmp_path, features=ALL | bit(F_RING_EVENT_IDX))
    try:
        assert r.features & bit(F_RING_EVENT_IDX)
        d, mem = r.drv, r.mem
        for i in range(32):                               # queue depth 32, one kick
            base = r.buf + 0x1000 * i
            mem.write(base, struct.pack("<IIQ", T_OUT, 0, 200 + i))
            mem.write(base + 16, bytes([i]) * 512)
            d.submit(0, [(base, 16, False), (base + 16, 512, False), (base + 600, 1, True)],
                     publish=False)
        d.queues[0].publish()
        d.kick(0)
        assert len(d.wait_used(0, 32)) == 32
        img = r.image()
        for i in range(32):
            assert img[(200 + i) * 512:(201 + i) * 512] == bytes([i]) * 512
            assert mem.read(r.buf + 0x1000 * i + 600, 1) == bytes([S_OK])
    finally:
        r.close()


# -- interrupts, reset, errors --------------------------------------------------------------

def test_intx_fallback_and_isr(tmp_path):
    r = Rig(tmp_path, msix=False)
    try:
        gsi = INTX_GSI_BASE + (SLOT + 1 - 1) % 4
        assert r.request(T_FLUSH, 0)[0] == S_OK
        assert r.m.irq_levels.get(gsi) == 1
        assert r.drv.read_isr() == ISR_QUEUE
        assert r.m.irq_levels.get(gsi) == 0                  # reading the ISR deasserts
        assert r.drv.read_isr() == 0
    finally:
        r.close()


def test_msix_vector_per_queue(rig):
    before = len(rig.m.msis)
    rig.request(T_FLUSH, 0)
    assert rig.m.msis[before:] == [(0xFEE00000, 0x41)]        # queue 0 -> vector 1


def test_completions_interrupt_through_the_irqfd_without_python(tmp_path):
    # As under KVM: the queue worker's native cycle writes the vector's irqfd itself.
    r = Rig(tmp_path, irqfd_eventfds=True)
    try:
        calls = []
        deliver = r.fn.interrupt_queue
        r.fn.interrupt_queue = lambda q: (calls.append(q.index), deliver(q))
        for i in range(4):
            assert r.request(T_OUT, i, data=bytes([i + 1]) * 512) == (S_OK, 1)
            assert r.request(T_IN, i, read_len=512) == (S_OK, 513)
            assert r.last_read == bytes([i + 1]) * 512
        assert calls == [] and r.m.msis == []
        # masked, the vector's interrupt comes back to Python and waits in the PBA
        msix = r.fn.msix
        vector = r.fn.queues[0].msix_vector
        r.m.mmio_write(r.drv.bar(1) + 16 * vector + 12, 4, 1)
        assert msix.gate(vector).open == 0
        r.mem.write(r.buf, struct.pack("<IIQ", T_IN, 0, 0))
        r.drv.submit(0, [(r.buf, 16, False), (r.buf + 0x800, 1, True)])
        r.drv.kick(0)
        deadline = time.monotonic() + 5
        while not msix.is_pending(vector):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert calls == [0]
        r.m.mmio_write(r.drv.bar(1) + 16 * vector + 12, 4, 0)      # unmask: delivered
        assert [n for _, n in r.drv.wait_used(0, 1)] == [1]
        assert not msix.is_pending(vector) and msix.gate(vector).open == 1
    finally:
        r.close()


def test_broken_chain_sets_needs_reset_and_reset_recovers(rig, caplog):
    d, mem = rig.drv, rig.mem
    q = d.queues[0]
    # Two descriptors pointing at each other: a loop.
    mem.write(q.desc, struct.pack("<QIHH", rig.buf, 16, 1, 1) + struct.pack("<QIHH", rig.buf, 16, 1, 0))
    mem.write(q.avail + 4 + 2 * (q.avail_idx % q.size), struct.pack("<H", 0))
    q.avail_idx += 1
    q.publish()
    msis = len(rig.m.msis)
    d.kick(0)
    assert wait_status(d, STATUS_NEEDS_RESET)
    assert (0xFEE00000, 0x40) in rig.m.msis[msis:]            # the configuration vector
    # said by the device's own logger, named after it
    assert any(r.name == f"hvframe.device.virtio-blk 0:{SLOT}:0" and "needs reset" in r.getMessage()
               for r in caplog.records), [(r.name, r.getMessage()) for r in caplog.records]
    d.set_status(0)
    assert d.status() == 0
    d.initialize(ALL)
    assert rig.request(T_OUT, 5, data=b"\x42" * 512)[0] == S_OK


def test_avail_index_a_whole_queue_ahead_needs_reset(rig):
    d = rig.drv
    q = d.queues[0]
    rig.mem.write(q.avail + 2, struct.pack("<H", q.size + 1))
    d.kick(0)
    assert wait_status(d, STATUS_NEEDS_RESET)


def test_ring_outside_ram_needs_reset(rig):
    d = rig.drv
    d.set_status(0)
    d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    for sel in (0, 1):
        d.common_write("driver_feature_select", 4, sel)
        d.common_write("driver_feature", 4, (bit(F_VERSION_1) >> (32 * sel)) & 0xFFFFFFFF)
    d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    d.common_write("queue_select", 2, 0)
    d.common_write("queue_desc", 4, 0xF0000000)             # not RAM
    d.common_write("queue_enable", 2, 1)
    d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | 4)
    assert d.status() & STATUS_NEEDS_RESET


@pytest.mark.parametrize("irqfd_eventfds", [True, False])
def test_reset_is_not_held_up_by_a_polling_worker(tmp_path, monkeypatch, irqfd_eventfds):
    # After a batch the worker polls the ring holding the queue (also when its interrupt
    # went through Python); a reset must not wait for the poll to run out: the native
    # cycle yields to it.
    from hvframe.virtio import native
    monkeypatch.setattr(native, "POLL_NS", 20_000_000_000)
    r = Rig(tmp_path, irqfd_eventfds=irqfd_eventfds)
    try:
        assert r.request(T_IN, 0, read_len=512) == (S_OK, 513)
        q = r.fn.queues[0]
        deadline = time.monotonic() + 5
        while not q.lock.locked():             # the worker is back to polling
            assert time.monotonic() < deadline
            time.sleep(0.001)
        t0 = time.monotonic()
        r.drv.set_status(0)
        assert r.drv.status() == 0
        assert time.monotonic() - t0 < 5
        assert r.fn.queues[0].vq is None
    finally:
        r.close()


def test_reset_clears_queue_registers(rig):
    d = rig.drv
    d.set_status(0)
    d.common_write("queue_select", 2, 0)
    assert d.common_read("queue_enable", 2) == 0
    assert d.common_read("queue_desc", 4) == 0
    assert d.common_read("queue_msix_vector", 2) == 0xFFFF
    assert d.common_read("queue_size", 2) == 256


def test_capacity_change_is_reported(rig):
    d = rig.drv
    gen = d.common_read("config_generation", 1)
    msis = len(rig.m.msis)
    with open(rig.path, "ab") as f:
        f.write(bytes(512 * 16))
    assert rig.fn.device.check_capacity()
    assert cfg_field(rig, "capacity") == DISK_SECTORS + 16
    assert d.common_read("config_generation", 1) != gen
    assert (0xFEE00000, 0x40) in rig.m.msis[msis:]


def test_doorbells_follow_a_moved_bar(rig):
    fn = rig.fn
    old = fn.bar(MODERN_BAR).mapped_at
    modern, legacy = fn._doorbells[0]
    assert modern.addr == old + NOTIFY_OFF
    assert legacy.addr == fn.bar(0).mapped_at + 16
    new = old + 0x100000
    rig.drv.cfg_write(0x10 + 4 * MODERN_BAR, 4, new)
    assert fn.bar(MODERN_BAR).mapped_at == new
    assert modern.addr == new + NOTIFY_OFF
    cmd = rig.drv.cfg_read(4, 2)
    rig.drv.cfg_write(4, 2, cmd & ~2)                         # memory decode off
    assert modern.addr is None
    rig.drv.cfg_write(4, 2, cmd)
    assert modern.addr == new + NOTIFY_OFF
    rig.drv._find_regions()
    assert rig.request(T_FLUSH, 0)[0] == S_OK                  # kicks at the new address


def test_pci_cfg_capability_window(rig):
    """VIRTIO_PCI_CAP_PCI_CFG: BAR4 registers reached through config space only."""
    d = rig.drv
    ptr, cap = d.cfg_read(0x34, 1), None
    while ptr:
        if d.cfg_read(ptr, 1) == 0x09 and d.cfg_read(ptr + 3, 1) == 5:
            cap = ptr
        ptr = d.cfg_read(ptr + 1, 1)
    assert cap is not None
    d.cfg_write(cap + 4, 1, MODERN_BAR)
    d.cfg_write(cap + 8, 4, 0x2000)          # device config: capacity
    d.cfg_write(cap + 12, 4, 4)
    assert d.cfg_read(cap + 16) == DISK_SECTORS
    # A byte window read by a byte access of pci_cfg_data; config registers elsewhere are
    # plain config space, whatever the window says.
    d.cfg_write(cap + 12, 4, 1)
    d.cfg_write(cap + 8, 4, 0x2001)
    assert d.cfg_read(cap + 16, 1) == (DISK_SECTORS >> 8) & 0xFF
    assert d.cfg_read(0, 2) == 0x1AF4 and d.cfg_read(cap + 8) == 0x2001


# -- command line ---------------------------------------------------------------------------

@pytest.mark.parametrize("conf, message", [
    ("{path},num-queues=0", "num-queues=0"),
    ("{path},queue-size=100", "queue-size=100"),
    ("{path},sectorsize=1000", "sector size"),
    ("{path}.missing", "no such file"),
    ("{path},ser=" + "x" * 21, "serial"),
    ("{path},aio=native", "aio"),
])
def test_bad_options(tmp_path, conf, message):
    path = make_disk(tmp_path)
    m = SyntheticMachine(16 << 20)
    try:
        with pytest.raises(ConfigError, match=message):
            testing.rig(m, f"-s {SLOT},virtio-blk,{conf.format(path=path)}")
    finally:
        m.close()


@pytest.mark.parametrize("conf, message", [
    ("{tmp}/nope.img", "nope.img"),
    ("{disk},aio=uring", "aio"),
])
def test_runner_rejects_bad_disk_in_one_line(tmp_path, conf, message):
    from hvframe.testing.helpers import run_hvframe
    disk = make_disk(tmp_path)
    p = run_hvframe(["run", "-s", "2,virtio-blk," + conf.format(tmp=tmp_path, disk=disk)])
    assert p.returncode == 4
    assert p.stderr.strip().count("\n") == 0 and message in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("aio", ["io_uring", "threads"])
def test_aio_option_reaches_the_device_and_reads_work(tmp_path, aio):
    r = Rig(tmp_path, f"aio={aio}", start=True)
    try:
        assert r.fn.device.aio == aio
        status, written = r.request(T_IN, 3, read_len=2048, split=2)
        assert (status, written) == (S_OK, 2049)
        assert r.last_read == r.image()[3 * 512:3 * 512 + 2048]
    finally:
        r.close()


# -- the capacity watcher (a DeviceThread the device owns) ------------------------------------

def watcher_threads():
    from hvframe import concurrency
    return [t for t in concurrency.live_threads() if t.name == "virtio-blk-resize"]


def test_capacity_watcher_notices_a_grown_image_and_stops_with_the_machine(tmp_path):
    before = set(watcher_threads())
    r = Rig(tmp_path)
    try:
        mine = [t for t in watcher_threads() if t not in before]
        assert len(mine) == 1                              # started when the driver was ready
        with open(r.path, "ab") as f:
            f.write(bytes(512 * 8))
        deadline = time.monotonic() + 5
        while cfg_field(r, "capacity") != DISK_SECTORS + 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cfg_field(r, "capacity") == DISK_SECTORS + 8   # nobody called check_capacity
    finally:
        started = time.monotonic()
        r.close()
    assert time.monotonic() - started < 2.0               # not a whole poll period per thread
    assert not mine[0].is_alive()
    assert mine[0] not in watcher_threads()


def test_a_started_machine_starts_the_device_threads_before_the_driver_is_ready(tmp_path):
    """`hvframe run` starts the devices before the guest runs: the queue's worker and the
    capacity watcher are there before the driver's DRIVER_OK, which then starts no thread
    (the vCPU would wait for it), and the disk serves requests and reports a resize."""
    from hvframe import concurrency
    before = set(concurrency.live_threads())
    r = Rig(tmp_path, start=True, bind=False)
    try:
        threads = {t for t in concurrency.live_threads() if t not in before}
        assert sorted(t.name for t in threads) == ["virtio-blk-q0", "virtio-blk-resize"]
        r.bind()
        assert {t for t in concurrency.live_threads() if t not in before} == threads
        assert r.request(T_OUT, 3, data=b"\x5a" * 512) == (S_OK, 1)
        assert r.request(T_IN, 3, read_len=512) == (S_OK, 513) and r.last_read == b"\x5a" * 512
        with open(r.path, "ab") as f:
            f.write(bytes(512 * 8))
        deadline = time.monotonic() + 5
        while cfg_field(r, "capacity") != DISK_SECTORS + 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cfg_field(r, "capacity") == DISK_SECTORS + 8
    finally:
        r.close()
    assert not [t for t in concurrency.live_threads() if t not in before]


def test_capacity_watcher_that_dies_is_reported_and_close_still_returns(tmp_path, caplog,
                                                                       monkeypatch):
    r = Rig(tmp_path)
    dev = r.fn.device
    watcher = dev._watcher
    assert watcher is not None and watcher.is_alive()

    class Fatal(BaseException):
        pass

    def broken_check():
        raise Fatal("watcher bug")

    monkeypatch.setattr(dev, "check_capacity", broken_check)
    dev._watch_wake.set()                                  # check now, not in a second
    deadline = time.monotonic() + 5
    while watcher.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not watcher.is_alive() and isinstance(watcher.error, Fatal)
    assert "no longer reported" in caplog.text
    assert r.request(T_FLUSH, 0)[0] == S_OK                # the disk itself keeps working
    started = time.monotonic()
    r.close()
    assert time.monotonic() - started < 2.0
    assert watcher not in watcher_threads()


def test_a_run_with_virtio_blk_does_not_import_the_bench_tool(tmp_path):
    """Start-up pays for what the command line asks for: the device's `hvframe bench`
    scenarios are declared by a function, so building the device leaves hvframe.bench out."""
    import subprocess
    import sys
    path = make_disk(tmp_path)
    code = ("import sys\n"
            "from hvframe.synthetic import SyntheticMachine\n"
            "from hvframe.testing import rig\n"
            "m = SyntheticMachine(16 << 20)\n"
            f"dev, = rig(m, '-s {SLOT},virtio-blk,{path}')\n"
            "m.close()\n"
            "print('hvframe.bench' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "False"


def test_a_bar_mapped_where_another_just_left_gets_the_doorbells(tmp_path):
    """Two virtio-blk functions. The guest puts the first's BAR where the second's is (it
    stays unmapped: they would overlap), then moves the second's away: in that one refresh
    the first maps where the second was. Every doorbell leaves its old place before any
    takes its new one: KVM refuses a doorbell bound where another still is (EEXIST, which the
    synthetic machine refuses too), and the old one would take the first's kicks. Each
    device's doorbell is the one rung at its new place."""
    m = SyntheticMachine(64 << 20)             # kicks reach the bus; doorbells are still bound
    a_path, b_path = make_disk(tmp_path, name="a.img"), make_disk(tmp_path, name="b.img")
    first, second = testing.rig(m, "-s", f"2,virtio-blk,{a_path}", "-s", f"3,virtio-blk,{b_path}",
                                direct_boot=False)
    try:
        da, db = VirtioPciDriver(m, 2), VirtioPciDriver(m, 3)
        for d in (da, db):
            d.initialize(ALL)
        at = second.bar(MODERN_BAR).mapped_at
        da.cfg_write(0x10 + 4 * MODERN_BAR, 4, at)                # onto the second's: waits
        assert first.bar(MODERN_BAR).mapped_at is None
        assert first._doorbells[0][0].addr is None
        away = at + 0x1000000
        db.cfg_write(0x10 + 4 * MODERN_BAR, 4, away)              # the second moves away
        assert first.bar(MODERN_BAR).mapped_at == at
        assert second.bar(MODERN_BAR).mapped_at == away
        assert first._doorbells[0][0].addr == at + NOTIFY_OFF
        assert second._doorbells[0][0].addr == away + NOTIFY_OFF
        # A kick of queue 0 at each new place rings that device's doorbell (as KVM matches).
        assert m.ioeventfd_for("mmio", at + NOTIFY_OFF, 2, 0) == first._doorbells[0][0].fd
        assert m.ioeventfd_for("mmio", away + NOTIFY_OFF, 2, 0) == second._doorbells[0][0].fd
    finally:
        m.close()
