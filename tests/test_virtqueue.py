"""The split virtqueue (hvframe.virtio.virtqueue), driven by a pure-Python fake driver."""
import struct

import pytest
from construct import Int16ul
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvframe.memory import GuestMemory
from hvframe.virtio import Chain, VirtQueue, VirtqueueError
from hvframe.virtio import virtqueue as vq

NEXT, WRITE, INDIRECT = vq.VIRTQ_DESC_F_NEXT, vq.VIRTQ_DESC_F_WRITE, vq.VIRTQ_DESC_F_INDIRECT

MEM = 1 << 20
DESC, AVAIL, USED = 0x1000, 0x3000, 0x4000
DATA = 0x10000


@pytest.fixture
def mem():
    m = GuestMemory(MEM)
    yield m


class Driver:
    """Plays the guest driver: writes descriptors and the available ring, reads the used ring.

    It builds everything through the construct declarations, so the queue's struct fast
    path is checked against them on every test.
    """

    def __init__(self, mem, size=8, *, event_idx=False, start_idx=0, **kw):
        self.mem, self.size, self.event_idx = mem, size, event_idx
        mem.fill(DESC, vq.desc_table_size(size))
        mem.fill(AVAIL, vq.avail_ring_size(size))
        mem.fill(USED, vq.used_ring_size(size))
        self.avail_idx = start_idx
        self.set_avail_idx(start_idx)
        self.q = VirtQueue(mem, size, DESC, AVAIL, USED, event_idx=event_idx,
                           last_avail_idx=start_idx, used_idx=start_idx, **kw)
        self.next_desc = 0
        self.data = DATA

    # raw writers
    def write_desc(self, i, addr, length, flags=0, nxt=0, table=DESC):
        self.mem.write(table + 16 * i, vq.VirtqDesc.build(dict(addr=addr, len=length, flags=flags, next=nxt)))

    def set_avail_idx(self, idx):
        self.mem.write(AVAIL + vq.AVAIL_IDX_OFF, Int16ul.build(idx & 0xFFFF))

    def set_avail_flags(self, flags):
        self.mem.write(AVAIL + vq.AVAIL_FLAGS_OFF, Int16ul.build(flags))

    def set_used_event(self, v):
        self.mem.write(AVAIL + vq.AVAIL_RING_OFF + 2 * self.size, Int16ul.build(v & 0xFFFF))

    def publish(self, head):
        self.mem.write(AVAIL + vq.AVAIL_RING_OFF + 2 * (self.avail_idx % self.size), Int16ul.build(head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def alloc(self, payload_or_len):
        if isinstance(payload_or_len, int):
            n, payload = payload_or_len, b"\xEE" * payload_or_len
        else:
            n, payload = len(payload_or_len), payload_or_len
        addr = self.data
        self.mem.write(addr, payload)
        self.data += (n + 15) & ~15
        return addr, n

    def add(self, readable=(), writable=(), *, indirect=False):
        """Make a chain of buffers available; returns (head, [(addr, len), ...])."""
        bufs = [self.alloc(b) + (0,) for b in readable] + [self.alloc(w) + (WRITE,) for w in writable]
        if indirect:
            table = self.data
            self.data += 16 * len(bufs)
            for i, (a, n, f) in enumerate(bufs):
                self.write_desc(i, a, n, f | (NEXT if i + 1 < len(bufs) else 0), i + 1, table=table)
            head = self.take()
            self.write_desc(head, table, 16 * len(bufs), INDIRECT)
        else:
            idxs = [self.take() for _ in bufs]
            head = idxs[0]
            for k, (a, n, f) in enumerate(bufs):
                last = k + 1 == len(bufs)
                self.write_desc(idxs[k], a, n, f | (0 if last else NEXT), 0 if last else idxs[k + 1])
        self.publish(head)
        return head, [(a, n) for a, n, _ in bufs]

    def take(self):
        i = self.next_desc
        self.next_desc = (self.next_desc + 1) % self.size
        return i

    def used(self):
        ring = vq.virtq_used(self.size).parse(self.mem.read(USED, vq.used_ring_size(self.size)))
        return ring


# -- layouts --------------------------------------------------------------------------------

def test_fast_path_matches_construct_layouts():
    assert vq.VirtqDesc.sizeof() == vq._DESC.size == 16
    assert vq.VirtqUsedElem.sizeof() == vq._USED_ELEM.size == 8
    d = dict(addr=0x1122334455667788, len=0x99AABBCC, flags=0xDDEE, next=0xF00F)
    raw = vq.VirtqDesc.build(d)
    assert vq._DESC.unpack(raw) == tuple(d.values())
    assert vq._DESC.pack(*d.values()) == raw
    e = dict(id=0x12345678, len=0x9ABCDEF0)
    assert vq._USED_ELEM.pack(*e.values()) == vq.VirtqUsedElem.build(e)
    for size in (1, 2, 256, 32768):
        a, u = vq.virtq_avail(size), vq.virtq_used(size)
        assert a.sizeof() == vq.avail_ring_size(size) == 6 + 2 * size
        assert u.sizeof() == vq.used_ring_size(size) == 6 + 8 * size
        assert vq.virtq_avail(size, False).sizeof() == vq.avail_ring_size(size, False)
        assert vq.virtq_used(size, False).sizeof() == vq.used_ring_size(size, False)
        ab = a.build(dict(flags=0x0102, idx=0x0304, ring=[0x0506] * size, used_event=0x0708))
        assert ab[vq.AVAIL_FLAGS_OFF:][:2] == b"\x02\x01" and ab[vq.AVAIL_IDX_OFF:][:2] == b"\x04\x03"
        assert ab[vq.AVAIL_RING_OFF:][:2] == b"\x06\x05" and ab[-2:] == b"\x08\x07"
        ub = u.build(dict(flags=1, idx=2, ring=[dict(id=3, len=4)] * size, avail_event=5))
        assert ub[vq.USED_FLAGS_OFF] == 1 and ub[vq.USED_IDX_OFF] == 2 and ub[vq.USED_RING_OFF] == 3


# -- normal operation -----------------------------------------------------------------------

def test_empty_queue_pops_none(mem):
    d = Driver(mem)
    assert d.q.pop() is None
    assert not d.q.has_available()


def test_simple_chain_gather_scatter_and_used_ring(mem):
    d = Driver(mem)
    head, bufs = d.add([b"hello ", b"world"], [4, 8])
    assert d.q.num_available() == 1
    c = d.q.pop()
    assert isinstance(c, Chain) and c.head == head
    assert c.read_len() == 11 and c.write_len() == 12
    assert c.gather() == b"hello world" and c.gather(7) == b"hello w" and c.gather(0) == b""
    assert [b[:2] for b in c.buffers] == bufs
    assert [b[2] for b in c.buffers] == [False, False, True, True]
    assert c.scatter(b"0123456789") == 10
    assert mem.read(bufs[2][0], 4) == b"0123"
    assert mem.read(bufs[3][0], 8) == b"456789\xEE\xEE"
    assert c.scatter(b"x" * 100) == 12
    assert d.q.pop() is None
    d.q.push(c.head, 10)
    used = d.used()
    assert used.idx == 1 and used.ring[0].id == head and used.ring[0].len == 10


def test_several_chains_in_order(mem):
    d = Driver(mem, size=8)
    heads = [d.add([b"a%d" % i], [2])[0] for i in range(3)]
    chains = [d.q.pop() for _ in range(3)]
    assert [c.head for c in chains] == heads
    assert [c.gather() for c in chains] == [b"a0", b"a1", b"a2"]
    assert d.q.pop() is None
    for c in reversed(chains):      # completion out of order
        d.q.push(c.head, 1)
    used = d.used()
    assert used.idx == 3 and [e.id for e in used.ring[:3]] == heads[::-1]


def test_indirect_chain(mem):
    d = Driver(mem)
    head, bufs = d.add([b"abc", b"def"], [16], indirect=True)
    c = d.q.pop()
    assert c.head == head and c.gather() == b"abcdef" and c.write_len() == 16
    assert [b[:2] for b in c.buffers] == bufs


def test_direct_chain_ending_in_indirect_table(mem):
    d = Driver(mem)
    a, n = d.alloc(b"head")
    b, m = d.alloc(32)
    table = d.data
    d.data += 16
    d.write_desc(0, b, m, WRITE, table=table)
    d.write_desc(0, a, n, NEXT, 1)
    d.write_desc(1, table, 16, INDIRECT | WRITE)   # WRITE is ignored on an indirect descriptor
    d.publish(0)
    c = d.q.pop()
    assert c.gather() == b"head" and c.write_len() == 32


def test_zero_length_buffer_is_accepted(mem):
    d = Driver(mem)
    d.add([b""], [0])
    c = d.q.pop()
    assert c.read_len() == 0 and c.write_len() == 0 and c.scatter(b"x") == 0


def test_index_wraparound_past_65535(mem):
    d = Driver(mem, size=4, start_idx=65533)
    for i in range(10):
        head, _ = d.add([b"r%d" % i], [4])
        c = d.q.pop()
        assert c.head == head and c.gather() == b"r%d" % i
        d.q.push(c.head, i)
        used = d.used()
        assert used.idx == (65533 + i + 1) & 0xFFFF
        assert used.ring[(65533 + i) % 4].id == head and used.ring[(65533 + i) % 4].len == i
    assert d.q.last_avail_idx == d.q.used_idx == (65533 + 10) & 0xFFFF
    # a full ring's worth available across the wrap
    heads = [d.add([b"x"])[0] for _ in range(4)]
    assert d.q.num_available() == 4
    assert [d.q.pop().head for _ in range(4)] == heads


def test_natural_wraparound(mem):
    d = Driver(mem, size=2)
    d.write_desc(0, DATA, 1)
    d.write_desc(1, DATA, 1)
    for i in range(65536 + 3):
        d.publish(i & 1)
        c = d.q.pop()
        d.q.push(c.head, 1)
    assert d.q.last_avail_idx == 3 and d.used().idx == 3


# -- notifications --------------------------------------------------------------------------

def test_vring_need_event():
    need = vq.vring_need_event
    assert need(0, 1, 0)
    assert not need(1, 1, 0)           # driver wants an interrupt once entry 1 is used
    assert need(1, 2, 0) and need(1, 2, 1)
    assert not need(5, 4, 0)
    assert need(65535, 0, 65534)       # wrap: event 65535 in [65534, 0)
    assert need(65535, 2, 65530)
    assert not need(3, 2, 65530)
    assert not need(65533, 0, 65534)   # event already passed before old


def test_no_interrupt_flag(mem):
    d = Driver(mem)
    assert not d.q.needs_notification()        # nothing pushed
    d.add([b"a"])
    d.q.push(d.q.pop().head, 0)
    assert d.q.needs_notification()
    assert not d.q.needs_notification()        # nothing new since
    d.set_avail_flags(vq.VRING_AVAIL_F_NO_INTERRUPT)
    d.add([b"b"])
    d.q.push(d.q.pop().head, 0)
    assert not d.q.needs_notification()


@pytest.mark.parametrize("start", [0, 65530])
def test_event_idx_notifications(mem, start):
    d = Driver(mem, size=8, event_idx=True, start_idx=start)
    d.set_avail_flags(vq.VRING_AVAIL_F_NO_INTERRUPT)   # ignored with EVENT_IDX
    d.set_used_event(start + 2)      # interrupt when used entry start+2 is written
    pushed = start
    decisions = []
    for batch in (1, 1, 1, 3, 2):
        for _ in range(batch):
            d.add([b"x"])
        for _ in range(batch):
            d.q.push(d.q.pop().head, 0)
            pushed += 1
        decisions.append(d.q.needs_notification())
    # the interrupt comes with the batch that makes used.idx pass start+2 (entry start+2 used)
    assert decisions == [False, False, True, False, False]
    d.set_used_event(pushed + 1)      # in the next batch of two
    for _ in range(2):
        d.add([b"x"])
        d.q.push(d.q.pop().head, 0)
    assert d.q.needs_notification()


def test_device_notification_suppression_flags(mem):
    d = Driver(mem)
    flags = lambda: d.used().flags
    d.q.disable_notifications()
    assert flags() == vq.VRING_USED_F_NO_NOTIFY
    assert d.q.enable_notifications() is False
    assert flags() == 0
    d.q.disable_notifications()
    d.add([b"x"])
    assert d.q.enable_notifications() is True      # arrived while disabled: keep going
    assert d.q.pop() is not None


def test_device_notification_suppression_event_idx(mem):
    d = Driver(mem, event_idx=True, start_idx=65535)
    avail_event = lambda: d.used().avail_event
    d.add([b"x"])
    d.add([b"y"])
    d.q.pop()
    assert avail_event() == 0            # wrapped: next wanted entry
    d.q.disable_notifications()
    d.q.pop()
    assert avail_event() == 0            # frozen while disabled
    assert d.q.enable_notifications() is False
    assert avail_event() == 1
    d.add([b"z"])
    assert d.q.has_available()


# -- malformed queues -----------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 3, 6, 65536, 32769, -8])
def test_bad_queue_size(mem, size):
    with pytest.raises(VirtqueueError):
        VirtQueue(mem, size, DESC, AVAIL, USED)


@pytest.mark.parametrize("desc,avail,used", [
    (DESC + 8, AVAIL, USED), (DESC, AVAIL + 1, USED), (DESC, AVAIL, USED + 2),
    (MEM - 16, AVAIL, USED), (DESC, MEM - 4, USED), (DESC, AVAIL, MEM - 8),
    (1 << 40, AVAIL, USED), (-16, AVAIL, USED)])
def test_bad_ring_addresses(mem, desc, avail, used):
    with pytest.raises(VirtqueueError):
        VirtQueue(mem, 8, desc, avail, used)


def test_event_fields_need_room_only_with_event_idx(mem):
    VirtQueue(mem, 8, DESC, MEM - 20, USED)
    with pytest.raises(VirtqueueError):
        VirtQueue(mem, 8, DESC, MEM - 20, USED, event_idx=True)


def _bad(d, msg=None):
    with pytest.raises(VirtqueueError, match=msg):
        d.q.pop()
    with pytest.raises(VirtqueueError, match=msg):   # state unchanged: the same error again
        d.q.pop()


def test_head_out_of_range(mem):
    d = Driver(mem)
    d.publish(8)
    _bad(d, "head")


def test_next_out_of_range(mem):
    d = Driver(mem)
    d.write_desc(0, DATA, 1, NEXT, 8)
    d.publish(0)
    _bad(d, "next")


@pytest.mark.parametrize("cycle", [[0], [0, 1], [0, 5, 3]])
def test_looping_chain(mem, cycle):
    d = Driver(mem)
    for k, i in enumerate(cycle):
        d.write_desc(i, DATA, 1, NEXT, cycle[(k + 1) % len(cycle)])
    d.publish(cycle[0])
    _bad(d, "loop")


def test_looping_indirect_chain(mem):
    d = Driver(mem)
    table = 0x8000
    d.write_desc(0, DATA, 1, NEXT, 1, table=table)
    d.write_desc(1, DATA, 1, NEXT, 0, table=table)
    d.write_desc(0, table, 32, INDIRECT)
    d.publish(0)
    _bad(d, "loop")


def test_max_chain(mem):
    d = Driver(mem, max_chain=2)
    d.add([b"a", b"b", b"c"])
    _bad(d, "more than 2")


@pytest.mark.parametrize("length", [0, 8, 24, 17])
def test_indirect_bad_length(mem, length):
    d = Driver(mem)
    d.write_desc(0, 0x8000, length, INDIRECT)
    d.publish(0)
    _bad(d, "indirect table length")


def test_indirect_table_outside_ram(mem):
    d = Driver(mem)
    d.write_desc(0, MEM - 16, 32, INDIRECT)
    d.publish(0)
    _bad(d, "outside RAM")


def test_indirect_in_indirect(mem):
    d = Driver(mem)
    inner, outer = 0x9000, 0x8000
    d.write_desc(0, DATA, 1, 0, table=inner)
    d.write_desc(0, inner, 16, INDIRECT, table=outer)
    d.write_desc(0, outer, 16, INDIRECT)
    d.publish(0)
    _bad(d, "inside an indirect")


def test_indirect_with_next(mem):
    d = Driver(mem)
    d.write_desc(0, DATA, 1, 0, table=0x8000)
    d.write_desc(0, 0x8000, 16, INDIRECT | NEXT, 1)
    d.write_desc(1, DATA, 1)
    d.publish(0)
    _bad(d, "INDIRECT and NEXT")


def test_indirect_not_negotiated(mem):
    d = Driver(mem, indirect=False)
    d.add([b"a"], indirect=True)
    _bad(d, "not negotiated")


def test_readable_after_writable(mem):
    d = Driver(mem)
    d.write_desc(0, DATA, 4, WRITE | NEXT, 1)
    d.write_desc(1, DATA, 4, 0)
    d.publish(0)
    _bad(d, "readable descriptor after a writable")


def test_readable_after_writable_across_indirect(mem):
    d = Driver(mem)
    d.write_desc(0, DATA, 4, 0, table=0x8000)
    d.write_desc(0, DATA, 4, WRITE | NEXT, 1)
    d.write_desc(1, 0x8000, 16, INDIRECT)
    d.publish(0)
    _bad(d, "readable descriptor after a writable")


@pytest.mark.parametrize("addr,length", [(MEM - 4, 8), (MEM, 1), (1 << 63, 16), (0, MEM + 1),
                                         ((1 << 64) - 1, 0xFFFFFFFF)])
def test_buffer_outside_ram(mem, addr, length):
    d = Driver(mem)
    d.write_desc(0, addr, length, WRITE)
    d.publish(0)
    _bad(d, "outside RAM")


def test_total_length_overflow(mem):
    d = Driver(mem, size=8)
    # 8 descriptors of 768 KiB each, all aliasing the same RAM: 6 MiB < 4 GiB, fine ...
    table = 0x8000
    n = 8
    for i in range(n):
        d.write_desc(i, 0, 0xC0000, WRITE | (NEXT if i + 1 < n else 0), i + 1, table=table)
    d.write_desc(0, table, 16 * n, INDIRECT)
    d.publish(0)
    assert d.q.pop().write_len() == 8 * 0xC0000
    # ... but 6000 of them overflow the 32-bit used length
    n = 6000
    table = 0x20000
    for i in range(n):
        d.write_desc(i, 0, 0xC0000, WRITE | (NEXT if i + 1 < n else 0), i + 1, table=table)
    d.write_desc(1, table, 16 * n, INDIRECT)
    d.publish(1)
    _bad(d, "overflows")


@pytest.mark.parametrize("ahead", [9, 100, 65535])
def test_avail_index_a_whole_queue_ahead(mem, ahead):
    d = Driver(mem, size=8)
    for i in range(8):
        d.write_desc(i, DATA, 1)
    d.set_avail_idx(ahead)
    with pytest.raises(VirtqueueError, match="ahead"):
        d.q.pop()
    with pytest.raises(VirtqueueError, match="ahead"):
        d.q.has_available()
    d.set_avail_idx(8)
    assert d.q.num_available() == 8          # exactly a full ring is fine
    for i in range(8):
        d.q.pop()
    assert d.q.pop() is None
    d.set_avail_idx(8 + ahead)               # measured from the last consumed index
    _bad(d, "ahead")


def test_push_rejects_device_bugs(mem):
    d = Driver(mem)
    with pytest.raises(ValueError):
        d.q.push(8, 0)
    with pytest.raises(ValueError):
        d.q.push(0, 1 << 32)


# -- fuzzing --------------------------------------------------------------------------------

FUZZ_MEM = 1 << 16


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size_log=st.integers(0, 4), event_idx=st.booleans(), data=st.data())
def test_fuzz_pop_only_raises_virtqueue_error(size_log, event_idx, data):
    size = 1 << size_log
    m = GuestMemory(FUZZ_MEM)
    try:
        desc, avail, used = 0x100, 0x300, 0x400
        # Descriptor fields drawn to hit interesting values often: small addresses inside
        # RAM (including the rings and an indirect-table area), edges, and garbage.
        def mostly(likely, anything):      # mostly plausible values, sometimes garbage
            return st.integers(0, 9).flatmap(lambda k: anything if k == 5 else likely)
        addr = mostly(st.integers(0x2000, 0x2800) | st.sampled_from([0x800, 0x900]),
                      st.integers(0, FUZZ_MEM) | st.just(FUZZ_MEM - 16) | st.integers(0, (1 << 64) - 1))
        length = mostly(st.integers(0, 64) | st.sampled_from([16, 32, 48]), st.integers(0, 0xFFFFFFFF))
        flags = mostly(st.integers(0, 7), st.integers(0, 0xFFFF))
        nxt = mostly(st.integers(0, max(size, 8) - 1), st.integers(0, 0xFFFF))
        descs = st.tuples(addr, length, flags, nxt)
        for base, n in ((desc, size), (0x800, 8), (0x900, 4)):
            for i, dd in enumerate(data.draw(st.lists(descs, min_size=n, max_size=n))):
                m.write(base + 16 * i, struct.pack("<QIHH", *dd))
        ring = data.draw(st.lists(mostly(st.integers(0, size - 1), st.integers(0, 0xFFFF)),
                                  min_size=size, max_size=size))
        m.write(avail, struct.pack(f"<HH{size}HH", data.draw(st.integers(0, 0xFFFF)),
                                   data.draw(mostly(st.integers(0, size), st.integers(0, 0xFFFF))),
                                   *ring, data.draw(st.integers(0, 0xFFFF))))
        m.write(0x2000, bytes(range(256)) * 8)      # recognisable payload area
        before = m.read(0, FUZZ_MEM)
        q = VirtQueue(m, size, desc, avail, used, event_idx=event_idx,
                      max_chain=data.draw(st.none() | st.integers(1, 40)))
        used_ring = range(used, used + vq.used_ring_size(size, event_idx))
        for _ in range(size + 1):
            try:
                c = q.pop()
            except VirtqueueError:
                break
            # pop() itself writes nothing except (with EVENT_IDX) avail_event
            after = m.read(0, FUZZ_MEM)
            changed = [i for i in range(FUZZ_MEM) if before[i] != after[i]] if after != before else []
            assert all(i in used_ring for i in changed)
            if c is None:
                break
            assert 0 <= c.head < size
            assert c.read_len() <= 0xFFFFFFFF and c.write_len() <= 0xFFFFFFFF
            wrote = [(a, n) for a, n, w in c.buffers if w]
            # buffers are in RAM and writable ones come last
            assert all(0 <= a and a + n <= FUZZ_MEM for a, n, _ in c.buffers)
            assert [w for *_, w in c.buffers] == sorted(w for *_, w in c.buffers)
            # scattering touches only the declared writable buffers, pushing only the used ring
            fill = bytes([0xA5]) * min(c.write_len(), 4096)
            pre = m.read(0, FUZZ_MEM)
            c.scatter(fill)
            q.push(c.head, len(fill))
            post = m.read(0, FUZZ_MEM)
            if post != pre:
                allowed = set(used_ring)
                for a, n in wrote:
                    allowed.update(range(a, a + n))
                assert all(i in allowed for i in range(FUZZ_MEM) if pre[i] != post[i])
            before = m.read(0, FUZZ_MEM)
    finally:
        q = c = None
        try:
            m.close()
        except BufferError:
            pass


# -- ring indices are published with one store -------------------------------------------------
# The other side reads avail.idx / used.idx / used.flags / avail_event while they are written.
# struct.pack_into clears the field before storing the value (a reader in between sees 0),
# and a two-byte memoryview copy is a memcpy whose stores are the C library's to choose. A device whose last index
# is within a queue of the 16-bit wrap takes avail.idx = 0 for a full queue and serves stale
# entries (the out-of-process benchmark's "available index 65312 is more than the queue size
# (256) ahead of the last consumed index 0"). Which is which is counted here by the CPU: a
# hardware write watchpoint (perf_event_open, PERF_TYPE_BREAKPOINT) on the field.

class WriteWatch:
    """Counts this thread's CPU stores to [addr, addr+length) (a hardware watchpoint)."""

    _ENABLE, _DISABLE, _RESET = 0x2400, 0x2401, 0x2403

    def __init__(self, addr: int, length: int = 2):
        import ctypes
        import os
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        attr = bytearray(128)
        # type BREAKPOINT, size VER5, disabled | exclude_kernel | exclude_hv, bp_type W
        struct.pack_into("<IIQQQQQIIQQ", attr, 0, 5, 112, 0, 0, 0, 0,
                         (1 << 0) | (1 << 5) | (1 << 6), 0, 2, addr, length)
        fd = libc.syscall(298, (ctypes.c_char * len(attr)).from_buffer(attr), 0, -1, -1, 0)
        if fd < 0:
            err = ctypes.get_errno()
            pytest.skip(f"no hardware write watchpoint here (perf_event_open: "
                        f"{os.strerror(err)}): the store count cannot be taken")
        self.fd = fd

    def count(self, fn) -> int:
        import fcntl
        import os
        fcntl.ioctl(self.fd, self._RESET, 0)
        fcntl.ioctl(self.fd, self._ENABLE, 0)
        try:
            fn()
        finally:
            fcntl.ioctl(self.fd, self._DISABLE, 0)
        return struct.unpack("<Q", os.read(self.fd, 8))[0]

    def close(self):
        import os
        os.close(self.fd)


def _host_address(mem, gpa: int) -> int:
    from hvframe.core_native import api_ffi as ffi
    with ffi.from_buffer(mem.buffer) as p:
        return int(ffi.cast("uintptr_t", p)) + mem.host_offset(gpa, 1)


def _stores(mem, gpa: int, fn) -> int:
    w = WriteWatch(_host_address(mem, gpa))
    try:
        return w.count(fn)
    finally:
        w.close()


def test_watchpoint_sees_the_two_stores_of_struct_pack_into(mem):
    """The counter itself: pack_into's clear-then-store is more than one store (what the
    fixes below avoid), an item of an "H" view is one."""
    view = mem.view(AVAIL, 4)
    try:
        assert _stores(mem, AVAIL + 2, lambda: struct.pack_into("<H", view, 2, 7)) >= 2
        with view.cast("H") as h:
            assert _stores(mem, AVAIL + 2, lambda: h.__setitem__(1, 8)) == 1
    finally:
        view.release()


@pytest.mark.parametrize("event_idx", [False, True])
def test_device_publishes_used_idx_flags_and_avail_event_in_one_store_each(mem, event_idx):
    d = Driver(mem, event_idx=event_idx, start_idx=65534)
    q = d.q
    d.write_desc(0, DATA, 64, WRITE)
    d.publish(0)
    chain = q.pop()
    assert _stores(mem, USED + vq.USED_IDX_OFF, lambda: q.push(chain.head, 64)) == 1
    assert d.used().idx == 65535
    if event_idx:
        avail_event = USED + vq.USED_RING_OFF + 8 * d.size
        d.publish(0)
        assert _stores(mem, avail_event, q.pop) == 1
        assert _stores(mem, avail_event, q.enable_notifications) == 1
        assert struct.unpack("<H", mem.read(avail_event, 2))[0] == 0     # wrapped
    else:
        flags = USED + vq.USED_FLAGS_OFF
        assert _stores(mem, flags, q.disable_notifications) == 1
        assert mem.read(flags, 2) == struct.pack("<H", vq.VRING_USED_F_NO_NOTIFY)
        assert _stores(mem, flags, q.enable_notifications) == 1
        assert mem.read(flags, 2) == b"\0\0"


def test_test_driver_publishes_avail_idx_and_used_event_in_one_store(mem):
    """hvframe.testing.virtio's driver (and the benchmarks built on its layout) publish
    avail.idx in one store: a torn or zeroed index is the device's to misread."""
    from hvframe.testing.virtio import DriverQueue
    dq = DriverQueue(mem, 0, 8, DESC, event_idx=True)
    dq.add([(DATA, 64, True)])
    assert _stores(mem, dq.avail + 2, dq.publish) == 1
    assert struct.unpack("<H", mem.read(dq.avail + 2, 2))[0] == 1
    assert _stores(mem, dq.avail + 4 + 2 * dq.size, dq.reap) == 1
