"""The bus's access-size rules (hvframe.dispatch.Access): a handler sees only the accesses it
declared, whatever size and alignment the guest uses. Driven with synthetic exits through
the same C dispatch a vCPU uses."""
import pytest
from construct import Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct
from hypothesis import given, settings, strategies as st

from hvframe.dispatch import Access, Field, Partial
from hvframe.errors import ConfigError
from hvframe.synthetic import SyntheticMachine


class Storage:
    """Plain registers: bytes, read and written whole units at a time, every call logged."""

    def __init__(self, size, sizes=(1, 2, 4, 8), aligned=False):
        self.mem = bytearray(size)
        self.sizes, self.aligned = sizes, aligned
        self.log = []
        self.bad = []   # calls that broke the declared rules

    def _check(self, offset, size):
        if size not in self.sizes or (self.aligned and offset % size):
            self.bad.append((offset, size))

    def read(self, offset, size):
        self._check(offset, size)
        self.log.append(("r", offset, size))
        return int.from_bytes(self.mem[offset:offset + size], "little")

    def write(self, offset, size, value):
        self._check(offset, size)
        self.log.append(("w", offset, size, value))
        self.mem[offset:offset + size] = value.to_bytes(size, "little")


def machine_with(handler, length, access):
    m = SyntheticMachine()
    m.mmio.register(0x1000, length, handler, name="dev", access=access)
    return m


def test_dword_only_registers_see_two_dwords_for_a_qword_and_a_dword_for_a_byte():
    dev = Storage(16, sizes=(4,), aligned=True)
    m = machine_with(dev, 16, Access(sizes=(4,), aligned=True, partial=Partial.MERGE))
    m.mmio_write(0x1000, 8, 0x1122334455667788)
    assert dev.log == [("w", 0, 4, 0x55667788), ("w", 4, 4, 0x11223344)]
    dev.log.clear()
    assert m.mmio_read(0x1005, 1) == 0x33          # widened to the dword, byte extracted
    assert dev.log == [("r", 4, 4)]
    dev.log.clear()
    m.mmio_write(0x1006, 2, 0xBEEF)                 # merged into the dword around it
    assert dev.log == [("r", 4, 4), ("w", 4, 4, 0xBEEF3344)]
    assert m.mmio_read(0x1002, 4) == 0x33445566     # unaligned: two dwords, bytes joined
    assert dev.bad == []


def test_partial_writes_zero_fill_for_write_one_to_clear_and_drop_when_declared():
    dev = Storage(4, sizes=(4,))
    m = machine_with(dev, 4, Access(sizes=(4,), aligned=True, partial=Partial.ZERO))
    m.mmio_write(0x1001, 1, 0x80)
    assert dev.log == [("w", 0, 4, 0x8000)]         # no read: a W1C register sees one lane
    dev2 = Storage(4, sizes=(4,))
    m2 = machine_with(dev2, 4, Access(sizes=(4,), aligned=True, partial=Partial.DROP))
    m2.mmio_write(0x1001, 1, 0x80)
    assert dev2.log == []
    assert m2.mmio.ranges()[0].c_access.dropped == 1


def test_bytes_past_the_end_of_the_range_read_as_ones_and_are_not_written():
    dev = Storage(4, sizes=(1, 2, 4), aligned=True)
    m = machine_with(dev, 4, Access(sizes=(1, 2, 4), aligned=True))
    dev.mem[:] = b"\x01\x02\x03\x04"
    assert m.mmio_read(0x1002, 4) == 0xFFFF0403
    m.mmio_write(0x1003, 2, 0xAAAA)
    assert dev.mem == bytearray(b"\x01\x02\x03\xAA")
    assert dev.bad == []


def test_declared_accesses_pass_straight_through():
    dev = Storage(8)
    m = machine_with(dev, 8, Access(sizes=(1, 2, 4), aligned=True))
    m.mmio_write(0x1004, 4, 0xCAFEF00D)
    assert dev.log == [("w", 4, 4, 0xCAFEF00D)]
    assert m.mmio.ranges()[0].c_access.adapted == 0


COMMON = Struct("feature" / Int32ul, "select" / Int16ul, "status" / Int8ul, "gen" / Int8ul,
                Padding(4), "addr" / Int64ul, "w1c" / Int32ul)


def test_fields_from_a_construct_struct_each_seen_whole():
    dev = Storage(28)
    acc = Access.of_struct(COMMON, overrides={"w1c": Partial.ZERO})
    m = machine_with(dev, 28, acc)
    m.mmio_write(0x1006, 2, 0x0201)                 # status and gen: two byte fields
    assert dev.log == [("w", 6, 1, 0x01), ("w", 7, 1, 0x02)]
    dev.log.clear()
    m.mmio_write(0x100C, 4, 0x89ABCDEF)             # low half of the 64-bit field: merged
    assert dev.log == [("r", 12, 8), ("w", 12, 8, 0x89ABCDEF)]
    dev.log.clear()
    m.mmio_write(0x1015, 1, 0x01)                   # one lane of the W1C field: zero-filled
    assert dev.log == [("w", 20, 4, 0x100)]
    dev.log.clear()
    m.mmio_write(0x1008, 4, 0xFFFFFFFF)             # padding: nothing there
    assert dev.log == []
    assert m.mmio_read(0x1006, 4) == 0x0201 | (dev.mem[8] << 16)


def test_bad_rules_are_refused():
    with pytest.raises(ValueError):
        Access(sizes=(3,))
    with pytest.raises(ValueError):
        Access(fields=(Field(4, 4), Field(0, 4)))
    with pytest.raises(ValueError):
        Access.of_struct(COMMON, overrides={"nope": Partial.ZERO})
    m = SyntheticMachine()
    with pytest.raises(ConfigError):
        m.mmio.register(0x1000, 8, Storage(8), access=Access(fields=(Field(4, 8),)))
    with pytest.raises(ConfigError):
        m.mmio.register(0x1000, 12, Storage(12), access=Access(sizes=(8,)))


def test_rules_follow_a_range_that_moves():
    dev = Storage(8, sizes=(4,), aligned=True)
    m = machine_with(dev, 8, Access(sizes=(4,), aligned=True, partial=Partial.MERGE))
    m.mmio.move(0x1000, 0x2000)
    m.mmio_read(0x2001, 2)
    assert dev.log == [("r", 0, 4)] and dev.bad == []


access_rules = st.one_of(
    st.builds(lambda sizes, aligned: Access(sizes=tuple(sorted(sizes)), aligned=aligned,
                                            partial=Partial.MERGE),
              st.sets(st.sampled_from([1, 2, 4, 8]), min_size=1), st.booleans()),
    st.just(Access.of_struct(COMMON)))
guest_ops = st.lists(st.tuples(st.booleans(), st.integers(0, 31), st.sampled_from([1, 2, 4, 8]),
                               st.integers(0, 2**64 - 1)), max_size=30)


@settings(max_examples=300, deadline=None)
@given(access_rules, guest_ops)
def test_merged_registers_behave_like_memory_whatever_the_guest_does(access, ops):
    """Plain storage behind any rules with merged partial writes is indistinguishable from
    byte-addressable memory (fields: except the gaps between them), and the handler only
    ever sees the accesses it declared."""
    length = 32
    sizes = access.sizes if not access.fields else (1, 2, 4, 8)
    dev = Storage(length, sizes=sizes, aligned=access.aligned)
    m = machine_with(dev, length, access)
    covered = bytearray(length) if access.fields else bytearray(b"\1" * length)
    for f in access.fields:
        covered[f.offset:f.offset + f.size] = b"\1" * f.size
    model = bytearray(length)
    for is_write, off, size, value in ops:
        if is_write:
            m.mmio_write(0x1000 + off, size, value)
            for i in range(size):
                if off + i < length and covered[off + i]:
                    model[off + i] = (value >> (8 * i)) & 0xFF
        else:
            got = m.mmio_read(0x1000 + off, size)
            want = bytes(model[off + i] if off + i < length and covered[off + i] else
                         (0xFF if off + i >= length else 0) for i in range(size))
            assert got == int.from_bytes(want, "little"), (off, size)
    assert dev.bad == []
    if access.fields:
        for kind, off, size, *rest in dev.log:
            assert any(f.offset == off and f.size == size for f in access.fields)


@pytest.mark.parametrize("native", [True, False])
def test_a_word_written_to_the_16550_reaches_two_registers(native):
    """A 16-bit OUT to COM1's THR is two byte cycles: THR gets the low byte and IER the high
    one, natively served or not."""
    from hvframe.testing import rig
    m = SyntheticMachine()
    uart, = rig(m, f"-l com1,null,native={'on' if native else 'off'}")
    m.io_write(0x3F8, 2, 0x0541)          # 'A' to THR, 0x05 to IER
    assert m.io_read(0x3F9, 1) == 0x05
    assert m.io_read(0x3F8, 2) & 0xFF00 == 0x0500   # RBR (empty) and IER back
    m.close()
