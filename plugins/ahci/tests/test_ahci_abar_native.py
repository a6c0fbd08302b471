"""AHCI's ABAR served natively (hvframe_ahci/abar.c): the hot registers are answered
without the GIL, C and Python agree on every register, and a guest's write-1-to-clear racing
a completion on another thread loses nothing. All through the dispatch core with synthetic
exits, as a vCPU's exits go."""
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from hvframe_ahci import regs
from hvframe_ahci.ata import IDENTIFY_DEVICE, READ_DMA_EXT, READ_FPDMA_QUEUED, WRITE_FPDMA_QUEUED
from hvframe_ahci.hba import F_IS, F_SACT, AhciHba
from hvframe_ahci.testdriver import ABAR, AhciDriver, build_machine, h2d

SLOT = 4
BUF = 0x800000
PORT0 = regs.PORT_BASE
HOT_READS = ([regs.GHC_OFFSETS[n] for n in ("cap", "ghc", "is", "pi", "vs")]
             + [PORT0 + regs.PORT_OFFSETS[n]
                for n in ("is", "ie", "cmd", "tfd", "ssts", "serr", "sact", "ci")])


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 << 20))
    return path


def hba_of(m) -> AhciHba:
    return next(d for d in m.devices if isinstance(d, AhciHba))


@contextlib.contextmanager
def started_port(disk, **start):
    """A machine with an AHCI disk on `disk`, port 0 started (PortDriver.start(**start)):
    (machine, driver, port driver, HBA); the machine is closed afterwards."""
    m = build_machine(f"{SLOT},ahci,hd:{disk}")
    try:
        drv = AhciDriver(m, SLOT)
        p = drv.port(0)
        p.start(**start)
        yield m, drv, p, hba_of(m)
    finally:
        m.close()


def msi_cap(drv) -> int:
    cap = drv.config_read(0x34, 1)
    while drv.config_read(cap, 1) != 0x05:
        cap = drv.config_read(cap + 1, 1)
    return cap


def enable_msi(drv) -> None:
    cap = msi_cap(drv)
    drv.config_write(cap + 4, 0xFEE00000)
    drv.config_write(cap + 12, 0x41, 2)
    drv.config_write(cap + 2, 1, 2)


# -- (a) the hot path takes no GIL ---------------------------------------------------------------

# Run in a child: its main thread holds the GIL throughout a ctypes.PyDLL call (PyDLL keeps
# the GIL held) into the exit core's hv_bus_dispatch. An access that needs Python would wait
# for the GIL this thread holds: the child hangs and the test fails on its timeout.
_CHILD = textwrap.dedent("""
    import ctypes, json, os, sys
    from hvframe.core_native import ffi, lib, _hvcore
    from hvframe_ahci import regs
    from hvframe_ahci.ata import IDENTIFY_DEVICE, READ_FPDMA_QUEUED, WRITE_FPDMA_QUEUED
    from hvframe_ahci.hba import AhciHba
    from hvframe_ahci.testdriver import ABAR, AhciDriver, build_machine, h2d

    disk, mode = sys.argv[1], sys.argv[2]
    m = build_machine(f"4,ahci,hd:{disk}", irqfd_eventfds=True)
    drv = AhciDriver(m, 4)
    cap = drv.config_read(0x34, 1)
    while drv.config_read(cap, 1) != 0x05:
        cap = drv.config_read(cap + 1, 1)
    drv.config_write(cap + 4, 0xFEE00000)
    drv.config_write(cap + 12, 0x41, 2)
    drv.config_write(cap + 2, 1, 2)                     # MSI on: the gate opens
    hba = next(d for d in m.devices if isinstance(d, AhciHba))
    p = drv.port(0)
    p.start(ie=regs.IS_DHRS | regs.IS_SDBS)
    drv.write("ghc", regs.GHC_AE | regs.GHC_IE)
    p.run(0, h2d(IDENTIFY_DEVICE), [(0x800000, 512)])   # PxIS.DHRS and HBA IS set, one MSI
    assert hba.wait_idle(5)                             # PxCI clears before the MSI is sent
    efd = hba.msi._irqfd.fd
    assert os.eventfd_read(efd) == 1 and hba.msi.gate().open
    # Slot 1 a read the page cache holds (the disk was just written): served in the exit.
    # Slot 2 a write: never in the exit, so its worker takes it.
    p.prepare(1, h2d(READ_FPDMA_QUEUED, lba=8, count=1 << 3, features=8), [(0x810000, 4096)])
    p.prepare(2, h2d(WRITE_FPDMA_QUEUED, lba=16, count=2 << 3, features=8), [(0x820000, 4096)],
              write=True)

    core = ctypes.PyDLL(_hvcore.__file__)
    raw = core.hv_bus_dispatch
    raw.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint64,
                    ctypes.c_int]
    raw.restype = ctypes.c_uint64
    calls = [0]

    def dispatch(*a):
        calls[0] += 1 + (a[2] == 8)                     # an 8-byte access is two dwords
        return raw(*a)
    bus = int(ffi.cast("uintptr_t", m.mmio.c_bus))
    port = ABAR + regs.PORT_BASE
    P = regs.PORT_OFFSETS
    served0, passed0 = hba.native_counts
    out = {}
    if mode == "python":                                # the control: PxSIG is Python's
        out["sig"] = dispatch(bus, port + P["sig"], 4, 0, 0)
    else:
        for name, off in [(n, regs.GHC_OFFSETS[n]) for n in ("cap", "ghc", "is", "pi", "vs")] \\
                + [("p" + n, regs.PORT_BASE + P[n])
                   for n in ("is", "ie", "cmd", "tfd", "ssts", "serr", "sact", "ci")]:
            out[name] = [dispatch(bus, ABAR + off, 4, 0, 0), dispatch(bus, ABAR + off + 1, 2, 0, 0)]
            if name in ("pis", "pserr", "psact"):        # two hot dwords (PxTFD+8 is PxSIG...)
                out[name].append(dispatch(bus, ABAR + off, 8, 0, 0))
        dispatch(bus, ABAR + regs.GHC_OFFSETS["is"], 4, 1, 1)   # PxIS still set: a new MSI
        out["msi_after_hba_w1c"] = os.eventfd_read(efd)
        dispatch(bus, port + P["is"], 1, regs.IS_DHRS | regs.IS_PSS, 1)   # byte-wide W1C
        dispatch(bus, ABAR + regs.GHC_OFFSETS["is"], 4, 1, 1)
        out["is_after"] = [dispatch(bus, port + P["is"], 4, 0, 0),
                           dispatch(bus, ABAR + regs.GHC_OFFSETS["is"], 4, 0, 0)]
        dispatch(bus, port + P["sact"], 4, 1 << 1, 1)
        dispatch(bus, port + P["ci"], 4, 1 << 1, 1)              # read, completed at once
        out["inline"] = [dispatch(bus, port + P["sact"], 4, 0, 0),
                         dispatch(bus, port + P["ci"], 4, 0, 0),
                         dispatch(bus, port + P["is"], 4, 0, 0)]
        out["msi_after_inline"] = os.eventfd_read(efd)
        out["inline_data"] = m.memory.read(0x810000, 4096) == open(disk, "rb").read()[4096:8192]
        dispatch(bus, port + P["is"], 4, regs.IS_SDBS, 1)
        dispatch(bus, ABAR + regs.GHC_OFFSETS["is"], 4, 1, 1)
        dispatch(bus, port + P["sact"], 4, 1 << 2, 1)
        dispatch(bus, port + P["ci"], 4, 1 << 2, 1)              # the worker is woken
        out["issued"] = [dispatch(bus, port + P["sact"], 4, 0, 0),
                         dispatch(bus, port + P["ci"], 4, 0, 0)]
    served1, passed1 = hba.native_counts
    out["served"], out["passed"], out["calls"] = served1 - served0, passed1 - passed0, calls[0]
    if mode != "python":
        assert hba.wait_idle(10)                            # now the worker gets the GIL
        out["done"] = [p.read("sact"), p.read("ci"), p.read("is")]
    print(json.dumps(out))
    m.close()
""")


def _run_child(disk, mode, timeout):
    return subprocess.run([sys.executable, "-c", _CHILD, str(disk), mode], capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "HVFRAME_LOCK_CHECK": "0"})


def test_hot_register_exits_complete_while_another_thread_holds_the_gil(disk):
    try:
        r = _run_child(disk, "native", 60)
    except subprocess.TimeoutExpired:
        pytest.fail("a hot ABAR access waited for the GIL")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["passed"] == 0 and out["served"] == out["calls"]
    assert out["pi"][0] == 1 and out["vs"][0] == regs.AHCI_VERSION
    assert out["ghc"][0] == regs.GHC_AE | regs.GHC_IE
    assert out["is"][0] == 1 and out["pis"][0] & regs.IS_DHRS
    assert out["pis"][1] == (out["pis"][0] >> 8) & 0xFFFF              # bytes of the dword
    assert out["pis"][2] == out["pis"][0] | out["pie"][0] << 32          # two dwords
    assert out["pssts"][0] == regs.SSTS_UP and out["pcmd"][0] & regs.CMD_ST
    assert out["msi_after_hba_w1c"] == 1          # fired natively through the irqfd gate
    assert out["is_after"] == [0, 0]
    # A read the page cache holds is done when the PxCI write returns: SDBS and an MSI.
    assert out["inline"] == [0, 0, regs.IS_SDBS] and out["msi_after_inline"] == 1
    assert out["inline_data"]
    assert out["issued"] == [1 << 2, 1 << 2]      # visible at once, before the worker ran
    assert out["done"][0] == 0 and out["done"][1] == 0 and out["done"][2] & regs.IS_SDBS


def test_the_gil_check_catches_a_python_served_exit(disk):
    """The harness above can fail: PxSIG is served by Python, and holding the GIL hangs it."""
    with pytest.raises(subprocess.TimeoutExpired):
        _run_child(disk, "python", 8)


def test_hot_path_counts_no_python_calls(disk):
    with started_port(disk, ie=regs.IS_DHRS) as (m, drv, p, hba):
        served, passed = hba.native_counts
        for off in HOT_READS:
            for size, delta in ((1, 0), (1, 3), (2, 1), (4, 0), (4, 2)):
                m.mmio_read(ABAR + off + delta, size)
            if off + 4 in HOT_READS:
                m.mmio_read(ABAR + off, 8)                          # two dwords, both hot
        p.write("is", 0xFFFFFFFF)
        drv.write("is", 0xFFFFFFFF)
        p.write("sact", 0)
        m.mmio_write(ABAR + PORT0 + regs.PORT_OFFSETS["ci"] + 2, 4, 1)   # crosses: ignored
        assert hba.native_counts[1] == passed
        pairs = sum(off + 4 in HOT_READS for off in HOT_READS)
        assert hba.native_counts[0] - served == len(HOT_READS) * 5 + 2 * pairs + 4
        p.read("sig")                                               # rare: Python's
        assert hba.native_counts[1] == passed + 1


# -- (b) C and Python agree -------------------------------------------------------------------

_OFFSETS = HOT_READS + [PORT0 + regs.PORT_OFFSETS[n] for n in ("clb", "fb", "sig", "sctl")] \
    + [0x2C, PORT0 + 0x1C, PORT0 + 0x70, PORT0 + regs.PORT_STRIDE + 0x10]
_access = st.tuples(
    st.sampled_from(_OFFSETS), st.integers(0, 3), st.sampled_from([1, 2, 4, 8]),
    st.booleans(), st.integers(0, (1 << 64) - 1))
_hot_write = st.tuples(
    st.sampled_from(["is", "hba_is", "sact", "ci", "ie", "ghc"]),
    st.integers(0, 0xFFFFFFFF) | st.sampled_from([1, 3, 0xFF, regs.IS_DHRS, regs.IS_SDBS]))


class _Rig:
    """Two HBAs fed the same accesses: one served natively, one wholly by Python."""

    def __init__(self, disk, mode):
        self.sides = []
        self.fired = [0, 0]          # MSIs through the irqfd (mode "msi-irqfd"), per side
        msi = mode != "intx"
        for native in (True, False):
            # Both read the image: a shared lock. With irqfd_eventfds, MSIs are eventfd
            # writes, which native W1C exits make themselves through the vector's gate.
            m = build_machine(f"{SLOT},ahci,hd:{disk},ro",
                              irqfd_eventfds=mode == "msi-irqfd")
            drv = AhciDriver(m, SLOT)
            if msi:
                enable_msi(drv)
            hba = hba_of(m)
            hba.native = native
            p = drv.port(0)
            p.start(ie=regs.IS_DHRS | regs.IS_SDBS)
            # Slots 0-3: NCQ reads; 4: IDENTIFY; 5: a FIS the device refuses (an error).
            for s in range(4):
                p.prepare(s, h2d(READ_FPDMA_QUEUED, lba=8 * s, count=s << 3, features=8),
                          [(BUF + 0x1000 * s, 4096)])
            p.prepare(4, h2d(IDENTIFY_DEVICE), [(BUF + 0x8000, 512)])
            p.prepare(5, h2d(0xFE))
            line = drv.config_read(0x3C, 1)
            self.sides.append((m, drv, p, hba, line))

    def close(self):
        for m, *_ in self.sides:
            m.close()

    def state(self, side):
        m, drv, p, hba, line = side
        assert hba.wait_idle(10)
        i = self.sides.index(side)
        irq = hba.msi._irqfd
        if m.irqfd_eventfds and irq is not None and irq.fd >= 0:
            try:
                self.fired[i] += os.eventfd_read(irq.fd)
            except BlockingIOError:
                pass
        regs_ = {off: m.mmio_read(ABAR + off, 4) for off in _OFFSETS}
        return regs_, len(m.msis), self.fired[i], m.irq_levels.get(line, 0)


# Sequences the interrupt logic turns on, besides the random ones: a handler clearing HBA IS
# while PxIS is still set (a new MSI), clearing PxIS then HBA IS (the level drops), an NCQ
# completion, a failing command.
_IE, _ALL = regs.GHC_IE, 0xFFFFFFFF
_EXAMPLES = [
    [("ghc", _IE), ("ci", 1 << 4), ("hba_is", 1), ("hba_is", 1), ("is", _ALL), ("hba_is", 1)],
    [("ghc", _IE), ("sact", 1), ("ci", 1), ("hba_is", 1), ("is", regs.IS_SDBS), ("hba_is", 1),
     ("sact", 2), ("ci", 2), ("is", _ALL), ("hba_is", _ALL)],
    [("ghc", _IE), ("ci", 1 << 4), ("is", _ALL), ("ci", 1 << 4), ("ghc", 0), ("hba_is", 1),
     ("ghc", _IE), ("is", _ALL), ("hba_is", _ALL)],
    [("ghc", _IE), ("ie", _ALL), ("ci", 1 << 5), ("is", regs.IS_DHRS), ("hba_is", 1),
     ("is", _ALL), ("hba_is", 1)],
    # Found by hypothesis: PxFB pointed outside RAM while two NCQ reads complete. Posting
    # their SDB FIS fails and halts the port; the slots were once counted back twice, and
    # the port never went idle again.
    [(PORT0 + regs.PORT_OFFSETS["fb"] + 3, 0, 1, True, 0xFF), ("sact", 3), ("ci", 3)],
]


def _with_examples(test):
    for ex in reversed(_EXAMPLES):
        test = example(steps=ex)(test)
    return test


@pytest.mark.parametrize("mode", ["intx", "msi", "msi-irqfd"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.one_of(_access, _hot_write), min_size=1, max_size=25))
@_with_examples
def test_native_and_python_registers_agree(disk, mode, steps):
    rig = _Rig(disk, mode)
    try:
        for step in steps:
            outs = []
            for side in rig.sides:
                m, drv, p, hba, line = side
                if len(step) == 5:
                    off, delta, size, write, value = step
                    if write and off == regs.GHC_OFFSETS["ghc"]:
                        value &= ~regs.GHC_HR          # a reset is tested elsewhere
                    if write:
                        m.mmio_write(ABAR + off + delta, size, value & ((1 << 8 * size) - 1))
                        outs.append(None)
                    else:
                        outs.append(m.mmio_read(ABAR + off + delta, size))
                else:
                    reg, value = step
                    if reg == "hba_is":
                        drv.write("is", value)
                    elif reg == "ghc":
                        drv.write("ghc", (value & regs.GHC_IE) | regs.GHC_AE)
                    elif reg == "ci":
                        p.write("ci", value & 0x3F)
                    else:
                        p.write(reg, value)
                    outs.append(None)
                hba.wait_idle(10)
            assert outs[0] == outs[1], step
            assert rig.state(rig.sides[0]) == rig.state(rig.sides[1]), step
        # And on the native side, every native answer is what Python would answer now.
        m, drv, p, hba, line = rig.sides[0]
        with hba.lock:
            for off in HOT_READS:
                assert m.mmio_read(ABAR + off, 4) == hba._read32(off), hex(off)
    finally:
        rig.close()


# -- (c) a guest's W1C racing a completion loses nothing --------------------------------------

def test_w1c_and_sact_writes_racing_completions_lose_nothing(disk):
    """Ping-pong between a vCPU thread (native exits, no GIL) and a completion thread (the
    HBA lock held, as completions are), each event counted: the completion sets PxIS.SDBS and
    waits for the guest's W1C; the guest sets a PxSACT bit and waits for the completion to
    clear it. Meanwhile each side also changes bits of the same registers that are its own
    (the completion toggles PxIS.DPS and PxSACT bit 31; the guest W1Cs HBA IS and writes
    PxSACT with no bit set). A read-modify-write that is not one step with the other side's loses an
    event (a wait times out) or brings one back (a count comes out too high)."""
    with started_port(disk, ie=regs.IS_SDBS) as (m, drv, p, hba):
        drv.write("ghc", regs.GHC_AE | regs.GHC_IE)
        port = hba.ports[0]
        rounds, deadline = 1000, time.monotonic() + 60
        seen = {"sdbs": 0, "cleared": 0}
        done = threading.Event()
        is_addr = ABAR + PORT0 + regs.PORT_OFFSETS["is"]
        sact_addr = ABAR + PORT0 + regs.PORT_OFFSETS["sact"]
        slot = 1 << 3

        def vcpu():
            pending = False
            while not done.is_set() and time.monotonic() < deadline:
                if m.mmio_read(is_addr, 4) & regs.IS_SDBS:
                    m.mmio_write(is_addr, 4, regs.IS_SDBS)          # the guest's W1C
                    seen["sdbs"] += 1
                m.mmio_write(ABAR + regs.GHC_OFFSETS["is"], 4, 1)
                sact = m.mmio_read(sact_addr, 4)
                if pending and not sact & slot:
                    pending = False
                    seen["cleared"] += 1
                if not pending:
                    m.mmio_write(sact_addr, 4, slot)                 # a new command
                    pending = True
                else:
                    m.mmio_write(sact_addr, 4, 0)                    # sets nothing

        t = threading.Thread(target=vcpu)
        t.start()
        try:
            sent = cleared = 0
            while (sent < rounds or cleared < rounds) and time.monotonic() < deadline:
                with hba.lock:
                    port._set(F_IS, regs.IS_DPS)
                    port._set(F_SACT, 1 << 31)
                    if sent < rounds and not port.is_ & regs.IS_SDBS and seen["sdbs"] == sent:
                        port._set(F_IS, regs.IS_SDBS)               # a completion's event
                        sent += 1
                    if cleared < rounds and port.sact & slot and seen["cleared"] == cleared:
                        port._clear(F_SACT, slot)                   # a command done
                        cleared += 1
                    port._clear(F_IS, regs.IS_DPS)
                    port._clear(F_SACT, 1 << 31)
                    hba.update_irq()
            while time.monotonic() < deadline and (seen["sdbs"] < sent
                                                   or seen["cleared"] < cleared):
                time.sleep(0.001)
        finally:
            done.set()
            t.join(30)
        assert (sent, cleared) == (rounds, rounds), "an event was lost (a wait timed out)"
        assert seen == {"sdbs": rounds, "cleared": rounds}


@pytest.mark.parametrize("write", [False, True], ids=["reads-in-the-exit", "writes-on-the-worker"])
def test_two_vcpus_issuing_on_one_port_start_every_slot_once(disk, write):
    """Two threads write PxSACT/PxCI for disjoint NCQ slots at the same time; every command
    is started once and completes: reads the page cache holds in the exits themselves,
    writes by the port's worker."""
    with started_port(disk) as (m, drv, p, hba):
        op = WRITE_FPDMA_QUEUED if write else READ_FPDMA_QUEUED
        for s in range(32):
            p.prepare(s, h2d(op, lba=8 * s, count=s << 3, features=8),
                      [(BUF + 0x1000 * s, 4096)], write=write)
        started = []
        port = hba.ports[0]
        real = port._start_issued
        port._start_issued = lambda bits: (started.append(bits), real(bits))

        def vcpu(parity):
            for s in range(parity, 32, 2):
                p.write("sact", 1 << s)
                p.write("ci", 1 << s)
        threads = [threading.Thread(target=vcpu, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert p.wait(0xFFFFFFFF) & regs.IS_SDBS
        assert hba.wait_idle(10)
        assert p.read("sact") == 0 and p.read("ci") == 0
        seen = 0
        for bits in started:
            assert not seen & bits, "a slot was started twice"
            seen |= bits
        assert bin(seen).count("1") + port.inline_slots == 32
        assert port.inline_slots == 0 if write else port.inline_slots > 0
        assert not p.read("is") & regs.IS_FATAL


def test_reads_in_the_exit_while_another_vcpu_stops_and_starts_the_port(disk):
    """One vCPU issues NCQ reads (served in its exits), another stops and starts the port
    and clears PxIS through Python, which withdraws and offers again the serving in the
    exit each time. Nothing hangs or fails, no slot stays issued, and once the port runs
    undisturbed reads are served in the exit again, with the disk's data."""
    with started_port(disk, ie=regs.IS_SDBS) as (m, drv, p, hba):
        port = hba.ports[0]
        for s in range(32):
            p.prepare(s, h2d(READ_FPDMA_QUEUED, lba=8 * s, count=s << 3, features=8),
                      [(BUF + 0x1000 * s, 4096)])
        cmd = p.read("cmd")
        stop = threading.Event()
        errors = []

        def issuer():
            try:
                s = 0
                while not stop.is_set():
                    p.write("sact", 1 << s)
                    p.write("ci", 1 << s)
                    s = (s + 1) % 32
            except BaseException as e:      # noqa: BLE001 -- reported below
                errors.append(e)

        t = threading.Thread(target=issuer)
        t.start()
        try:
            for _ in range(200):
                p.write("cmd", cmd & ~regs.CMD_ST)      # forgets what was issued
                p.write("is", 0xFFFFFFFF)
                p.write("cmd", cmd)
        finally:
            stop.set()
            t.join(30)
        assert not t.is_alive() and not errors
        # (A PxCI write that lands between a stop and the next PxSACT write names a slot
        # without its SActive bit: an error the guest made, answered with TFES.)
        assert hba.wait_idle(10)
        before = port.inline_slots
        p.write("cmd", cmd & ~regs.CMD_ST)
        p.write("is", 0xFFFFFFFF)
        p.write("cmd", cmd)
        m.memory.write(BUF, bytes(0x20000))
        p.write("sact", 0xFFFFFFFF)
        p.write("ci", 0xFFFFFFFF)
        assert p.read("ci") == 0 and p.read("sact") == 0          # done in the exit
        assert port.inline_slots == before + 32
        assert p.read("is") == regs.IS_SDBS
        image = disk.read_bytes()
        for s in range(32):
            assert m.memory.read(BUF + 0x1000 * s, 4096) == image[8 * s * 512:][:4096], s


def test_a_port_without_a_worker_issues_through_python(disk):
    """With its worker gone (closed, or failed), PxCI writes go to Python and still work."""
    from hvframe_ahci.hba import lib
    with started_port(disk) as (m, drv, p, hba):
        for port, thread in hba._workers:
            thread.stop()
            lib.ahci_port_worker_close(hba._regs, port.index)
        passed = hba.native_counts[1]
        is_ = p.run(0, h2d(READ_DMA_EXT, lba=0, count=1), [(BUF, 512)])
        assert is_ & regs.IS_DHRS and p.read("ci") == 0
        assert hba.native_counts[1] > passed


def test_an_interrupt_owed_by_the_exit_is_in_the_checkpoint(disk):
    """INTx: a read served in the exit leaves its interrupt to the port's worker. A
    checkpoint taken before the worker got to it still carries the line raised, and the
    restored HBA drives it."""
    from hvframe.snapshot.state import decode_into, encode
    line = f"{SLOT},ahci,hd:{disk}"
    m = build_machine(line)
    try:
        drv = AhciDriver(m, SLOT)
        drv.write("ghc", regs.GHC_AE | regs.GHC_IE)            # no MSI: INTx
        p = drv.port(0)
        p.start(ie=regs.IS_SDBS)
        hba = hba_of(m)
        p.prepare(1, h2d(READ_FPDMA_QUEUED, lba=8, count=1 << 3, features=8), [(BUF, 4096)])
        with hba.lock:                                       # the worker is kept out
            p.write("sact", 2)
            p.write("ci", 2)
            assert hba.ports[0].inline_slots == 1 and hba._regs.port[0].irq_owed
            assert not hba.intx_level                        # not yet: owed
            hba.quiesce()
            record = encode(hba)
            assert hba.intx_level                            # delivered by the quiesce
            ram = m.memory.read(0, m.memory.size)
        hba.unquiesce()
        assert hba.wait_idle(5)
    finally:
        m.close()
    m2 = build_machine(line)
    try:
        m2.memory.write(0, ram)
        h2 = hba_of(m2)
        decode_into(h2, record, "ahci")
        assert h2.intx_level and h2.is_ == 1
        assert AhciDriver(m2, SLOT).port(0).read("is") == regs.IS_SDBS
    finally:
        m2.close()


def test_nothing_is_offered_to_the_exits_once_the_hba_closes(disk):
    """A completion arriving while the HBA closes does not offer the exits the port again,
    so the guest RAM export goes with the offer and RAM is unmapped at close."""
    with started_port(disk) as (m, drv, p, hba):
        port = hba.ports[0]
        assert port._inline_ram is not None                  # offered: the port is idle
        with hba.lock:                                       # close()'s first step ...
            hba.closing = True
            hba._withdraw_inline()
        assert port._r.efd >= 0                              # ... the worker not yet stopped
        with hba.lock:
            port.offer_inline()                              # as a late completion would
        assert port._inline_ram is None
    assert m.memory.unmapped


def test_a_write_does_not_keep_reads_out_of_the_exit(disk):
    """An NCQ write goes to the disk's workers, as always; it is not taken for a read the
    page cache lacked, so the cached reads that follow are still served in the exit."""
    with started_port(disk) as (m, drv, p, hba):
        port = hba.ports[0]
        p.prepare(2, h2d(WRITE_FPDMA_QUEUED, lba=16, count=2 << 3, features=8), [(BUF, 4096)],
                  write=True)
        p.write("sact", 1 << 2)
        p.write("ci", 1 << 2)
        assert hba.wait_idle(10) and port.inline_slots == 0
        for n in range(4):
            p.prepare(1, h2d(READ_FPDMA_QUEUED, lba=8 * n, count=1 << 3, features=8),
                      [(BUF + 0x1000 * (n + 1), 4096)])
            p.write("sact", 1 << 1)
            p.write("ci", 1 << 1)
            assert p.read("ci") == 0 and p.read("sact") == 0    # done in the exit
        assert port.inline_slots == 4
