"""The native dispatch core, driven with synthetic exits (no KVM)."""
import pytest

from hvframe.core_native import lib
from hvframe.errors import ConfigError
from hvframe.synthetic import SyntheticMachine


class Recorder:
    def __init__(self, value=0x12345678):
        self.value = value
        self.log = []

    def read(self, offset, size):
        self.log.append(("r", offset, size))
        return self.value

    def write(self, offset, size, value):
        self.log.append(("w", offset, size, value))


def test_routes_by_range_with_offset_and_size():
    m = SyntheticMachine()
    a, b = Recorder(0xAA), Recorder(0xBB)
    m.pio.register(0x3F8, 8, a, name="a")
    m.pio.register(0x2F8, 8, b, name="b")
    assert m.io_read(0x3FD, 1) == 0xAA
    m.io_write(0x2F9, 2, 0x1234)
    assert a.log == [("r", 5, 1)]
    assert b.log == [("w", 1, 2, 0x1234)]


def test_unclaimed_reads_are_all_ones_of_the_access_size_and_writes_vanish():
    m = SyntheticMachine()
    assert m.io_read(0x100, 1) == 0xFF
    assert m.io_read(0x100, 2) == 0xFFFF
    assert m.io_read(0x100, 4) == 0xFFFFFFFF
    assert m.mmio_read(0xFEB00000, 8) == 0xFFFFFFFFFFFFFFFF
    m.io_write(0x100, 1, 5)
    assert m.pio.unclaimed == 4


def test_read_values_are_masked_to_the_access_size():
    m = SyntheticMachine()
    m.pio.register(0x60, 4, Recorder(0xDEADBEEF))
    assert m.io_read(0x60, 1) == 0xEF
    assert m.io_read(0x60, 2) == 0xBEEF


def test_writes_are_masked_to_the_access_size():
    m = SyntheticMachine()
    r = Recorder()
    m.mmio.register(0xC0000000, 0x1000, r)
    m.mmio_write(0xC0000010, 1, 0x1FF)
    assert r.log == [("w", 0x10, 1, 0xFF)]


@pytest.mark.parametrize("base, length", [(0x3F8, 8), (0x3F0, 9), (0x3FF, 1), (0x300, 0x200)])
def test_overlapping_ranges_are_rejected_with_both_names(base, length):
    m = SyntheticMachine()
    m.pio.register(0x3F8, 8, Recorder(), name="com1")
    with pytest.raises(ConfigError, match="overlaps com1"):
        m.pio.register(base, length, Recorder(), name="other")


def test_adjacent_ranges_are_fine_and_many_ranges_stay_sorted():
    m = SyntheticMachine()
    recs = []
    for i in range(200):  # registered out of order
        base = ((i * 37) % 200) * 4
        r = Recorder(base)
        recs.append(r)
        m.pio.register(base, 4, r, name=f"r{base}")
    for base in range(0, 800, 4):
        assert m.io_read(base + 3, 2) == base


def test_handler_exception_is_contained_and_answered_as_unclaimed(capsys, handler_failures):
    class Broken:
        def read(self, offset, size):
            raise RuntimeError("device bug")

        def write(self, offset, size, value):
            raise ValueError("device bug")

    m = SyntheticMachine()
    m.pio.register(0x500, 4, Broken(), name="broken")
    assert m.io_read(0x500, 2) == 0xFFFF
    m.io_write(0x500, 1, 1)
    assert m.io_read(0x501, 1) == 0xFF
    err = capsys.readouterr().err
    assert "device broken failed on read" in err and "device broken failed on write" in err
    assert err.count("failed on read") == 1  # reported once, not per access
    # ... while a test sees every one (the pytest plugin fails a test that did not ask)
    assert [(f.device, f.is_write, type(f.exc)) for f in handler_failures.take()] == [
        ("broken", False, RuntimeError), ("broken", True, ValueError),
        ("broken", False, RuntimeError)]


def test_a_raising_handler_fails_the_test(pytester):
    """Without the handler_failures fixture, an exception in a handler fails the test even
    though the access itself was answered (all ones) and the test's own asserts pass."""
    pytester.makepyfile("""
        from hvframe.testing import SyntheticMachine

        class Broken:
            def read(self, offset, size):
                raise KeyError("register table bug")

            def write(self, offset, size, value):
                pass

        def test_reads_look_fine():
            m = SyntheticMachine()
            try:
                m.pio.register(0x500, 4, Broken(), name="broken")
                assert m.io_read(0x500, 1) == 0xFF
            finally:
                m.close()
    """)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*device broken raised on read at offset 0x0: KeyError*"])


def test_bad_return_value_is_contained(handler_failures):
    class ReturnsNone:
        def read(self, offset, size):
            return None

        def write(self, offset, size, value):
            pass

    m = SyntheticMachine()
    m.pio.register(0x510, 2, ReturnsNone(), name="none")
    assert m.io_read(0x510, 1) == 0xFF
    assert [type(f.exc) for f in handler_failures.take()] == [TypeError]


def test_unregister_and_move():
    m = SyntheticMachine()
    r = Recorder(7)
    m.mmio.register(0xC0000000, 0x100, r, name="bar")
    m.mmio.move(0xC0000000, 0xD0000000)
    assert m.mmio_read(0xC0000000, 4) == 0xFFFFFFFF
    assert m.mmio_read(0xD0000004, 4) == 7
    m.mmio.unregister(0xD0000000)
    assert m.mmio_read(0xD0000004, 4) == 0xFFFFFFFF
    # the space is free again
    m.mmio.register(0xD0000000, 0x100, Recorder(9))
    assert m.mmio_read(0xD0000000, 1) == 9


def test_move_onto_another_range_fails_and_leaves_it_where_it_was():
    m = SyntheticMachine()
    m.mmio.register(0xC0000000, 0x100, Recorder(1), name="a")
    m.mmio.register(0xC0001000, 0x100, Recorder(2), name="b")
    with pytest.raises(ConfigError):
        m.mmio.move(0xC0000000, 0xC0001000)
    assert m.mmio_read(0xC0000000, 1) == 1 and m.mmio_read(0xC0001000, 1) == 2


def test_handler_may_remap_its_own_range_during_an_access():
    """A BAR write moves the device that is being written: must not deadlock."""
    m = SyntheticMachine()

    class Movable:
        base = 0xC0000000

        def read(self, offset, size):
            return self.base >> 24

        def write(self, offset, size, value):
            m.mmio.move(self.base, value)
            self.base = value

    m.mmio.register(0xC0000000, 0x10, Movable())
    m.mmio_write(0xC0000000, 4, 0xD0000000)
    assert m.mmio_read(0xD0000000, 1) == 0xD0


def test_native_handler_and_batched_exits():
    m = SyntheticMachine()
    m.pio.register_native(0x80, 1, lib.hv_native_sink, name="post")
    r = Recorder(0x42)
    m.pio.register(0xE0, 1, r)
    out = m.exit_batch([(0x80, 1, 1, True), (0x80, 1, 0, False), (0xE0, 1, 3, True),
                        (0xE0, 1, 0, False), (0xE1, 1, 0, False)])
    assert out[1] == 0 and out[3] == 0x42 and out[4] == 0xFF
    assert r.log == [("w", 0, 1, 3), ("r", 0, 1)]


def test_shared_irq_line_is_the_or_of_its_sources():
    m = SyntheticMachine()
    com1, com3 = m.irq_source(4), m.irq_source(4)
    com1(1)
    com3(1)
    com1(0)
    assert m.irq_levels[4] == 1
    com3(0)
    assert m.irq_levels[4] == 0


def test_a_device_owned_line_is_ored_with_other_sources():
    """The i8042's IRQ 12 and a PCI PIRQ routed to 12 must not undo each other."""
    m = SyntheticMachine()
    pirq = m.irq_source(12)
    m.irq(12, 1)
    pirq(1)
    m.irq(12, 0)
    assert m.irq_levels[12] == 1
    pirq(0)
    assert m.irq_levels[12] == 0
    m.irq(12, 1)
    assert m.irq_levels[12] == 1
