"""AHCI's native NCQ path (plugins/ahci/hvframe_ahci/ncq.c, its own native module).

Each scenario runs twice from the same image and guest memory: with the native path, and
with it refused (the Python path alone). Both runs must leave the same image, the same data
buffers and received FISes in guest RAM, and the same port and HBA registers; the native
path must have served what it can take, and declined everything else whole. The one
difference allowed is the SActive field of the last Set Device Bits FIS: the native path
completes a batch with one FIS carrying all its slots, Python one FIS per command.
"""
import os
import struct

import pytest
from hvframe.testing.helpers import assert_c_struct_matches
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hvframe_ahci._native import ffi as ahci_ffi, lib
from hvframe_ahci import ata, regs
from hvframe_ahci.hba import F_SACT, AhciHba, AhciPort
from hvframe_ahci.testdriver import AhciDriver, build_machine, h2d

SLOT = 4
BUF = 0x1000000
SECTORS = 2048
MEM = 64 << 20


def image_bytes(sectors=SECTORS):
    return bytes((i * 7 + i // 512) & 0xFF for i in range(sectors * 512))


def run(tmp_path, scenario, native, *, conf="", sectors=SECTORS, truncate=None, jobs=None):
    path = tmp_path / f"disk-{native}.img"
    path.write_bytes(image_bytes(sectors))
    m = build_machine(f"{SLOT},ahci-hd,{path}{conf}", memory=MEM)
    try:
        drv = AhciDriver(m, SLOT)
        p = drv.port(0)
        p.start(ie=regs.IS_SDBS | regs.IS_DHRS | regs.IS_TFES)
        drv.write("ghc", regs.GHC_AE | regs.GHC_IE)
        hba = next(d for d in m.devices if isinstance(d, AhciHba))
        port = hba.ports[0]
        if truncate is not None:
            os.ftruncate(port.device.backend.fd, truncate)
        if jobs is not None:        # requests of one PxCI write go out in this many jobs
            port.device.workers = jobs
        if not native:
            port.device.native_setup = lambda nat: False
            with hba.lock:
                port.offer_inline()     # (withdrawn now: it was offered when the port started)
        scenario(m, p)
        assert hba.wait_idle(10)
        state = {name: p.read(name) for name in ("is", "sact", "ci", "tfd", "serr", "cmd")}
        state["hba_is"] = drv.read("is")
        ram = m.memory.read(BUF, 0x400000) + p.rfis()
        sdb = p.sdbfis()
    finally:
        m.close()
    return dict(state=state, ram=ram, image=path.read_bytes(), sdb=sdb,
                served=port.native_slots + port.inline_slots,
                cached=port.native_cached + port.inline_slots, inline=port.inline_slots)


def both(tmp_path, scenario, **kw):
    a = run(tmp_path, scenario, True, **kw)
    b = run(tmp_path, scenario, False, **kw)
    assert b["served"] == 0 and b["inline"] == 0
    assert a["state"] == b["state"]
    assert a["image"] == b["image"]
    assert a["sdb"][:4] == b["sdb"][:4]
    done_a, done_b = (struct.unpack_from("<I", r["sdb"], 4)[0] for r in (a, b))
    assert bool(done_a) == bool(done_b) if a["served"] else done_a == done_b
    if a["ram"] != b["ram"]:
        diff = next(i for i in range(len(a["ram"])) if a["ram"][i] != b["ram"][i])
        pytest.fail(f"guest RAM differs at offset {diff:#x}")
    return a


def ncq(p, slot, lba, nsect, prds, *, write=False, tag=None, fua=False):
    op = ata.WRITE_FPDMA_QUEUED if write else ata.READ_FPDMA_QUEUED
    fis = h2d(op, lba=lba, count=(slot if tag is None else tag) << 3, features=nsect,
              device=0x40 | (ata.FUA_BIT if fua else 0))
    p.prepare(slot, fis, prds, write=write)


def issue(p, slots):
    p.write("sact", slots)
    p.write("ci", slots)


def test_c_layouts_match_construct_declarations():
    assert_c_struct_matches("struct ahci_cmd_header", regs.COMMAND_HEADER, ahci_ffi)
    assert_c_struct_matches("struct ahci_prd", regs.PRD_ENTRY, ahci_ffi)
    assert_c_struct_matches("struct ahci_h2d", regs.H2D_FIS, ahci_ffi)
    assert_c_struct_matches("struct ahci_sdb_fis", regs.SDB_FIS, ahci_ffi)
    assert (lib.AHCI_FIS_SDB, lib.AHCI_FIS_I, lib.AHCI_RX_SDBFIS, lib.AHCI_ST_OK) == \
        (regs.FIS_SDB, regs.FIS_I, regs.RX["sdbfis"], regs.ST_OK)
    assert lib.AHCI_CMD_HEADER_SIZE == regs.CMD_HEADER_SIZE
    assert lib.AHCI_CMD_TABLE_PRDT == regs.CMD_TABLE_PRDT
    assert lib.AHCI_FIS_H2D == regs.FIS_H2D
    assert lib.AHCI_H2D_COMMAND == regs.H2D_COMMAND
    assert lib.AHCI_CFL_MASK == regs.HDR_CFL_MASK
    assert lib.AHCI_PRD_DBC_MASK == regs.PRD_DBC_MASK
    assert lib.AHCI_PRD_IOC == regs.PRD_IOC
    assert (lib.AHCI_READ_FPDMA, lib.AHCI_WRITE_FPDMA) == \
        (ata.READ_FPDMA_QUEUED, ata.WRITE_FPDMA_QUEUED)
    assert lib.AHCI_FUA == ata.FUA_BIT


def test_32_slots_of_reads_and_writes_match_python(tmp_path):
    def scenario(m, p):
        for slot in range(32):
            buf = BUF + slot * 0x20000
            lba = (slot * 37) % (SECTORS - 16)
            if slot % 3 == 0:
                m.memory.write(buf, bytes([slot + 1]) * 4096)
                ncq(p, slot, lba, 8, [(buf, 4096)], write=True, fua=slot % 2 == 0)
            elif slot % 3 == 1:       # 4 KiB pages, two of them contiguous, one IOC
                prds = [(buf, 1024), (buf + 1024, 1024), (buf + 0x8000, 2048, True)]
                ncq(p, slot, lba, 8, prds)
            else:                     # more PRD bytes than the transfer
                ncq(p, slot, lba, 2, [(buf + 3, 512), (buf + 0x4000, 4096)])
        issue(p, 0xFFFFFFFF)
    r = both(tmp_path, scenario)
    assert r["served"] == 32
    assert r["state"]["sact"] == 0 and r["state"]["ci"] == 0
    assert r["state"]["is"] & regs.IS_SDBS and r["state"]["is"] & regs.IS_DPS
    assert not r["state"]["is"] & regs.IS_FATAL


def test_cached_reads_complete_in_the_exit_and_the_rest_on_workers(tmp_path):
    """Reads the page cache lacks go to the disk's workers; reads it has are moved by the
    port's worker itself, and, once the exit has stopped skipping its offers after meeting
    the cold ones, in the PxCI write's exit. All give the Python path's results."""
    from hvframe_ahci.hba import INLINE_COLD_SKIPS
    rounds = INLINE_COLD_SKIPS + 2

    def scenario(m, p):
        port = next(d for d in m.devices if isinstance(d, AhciHba)).ports[0]
        fd = port.device.backend.fd
        os.fsync(fd)                                    # clean pages can be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        # No readahead: a first-round miss would otherwise bring the other slots' pages
        # in (hosts read ahead up to megabytes) while the exit is still trying them, so how
        # many of the first round came from the cache would depend on the disk's speed.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for slot in range(8):                           # first round: from the disk
            ncq(p, slot, 64 * slot, 8, [(BUF + 0x1000 * slot, 4096)])
        issue(p, 0xFF)
        assert port.hba.wait_idle(10)
        for slot in range(8):                           # again: from the page cache
            ncq(p, slot, 64 * slot, 8, [(BUF + 0x10000 + 0x1000 * slot, 4096)])
        issue(p, 0xFF)
        assert port.hba.wait_idle(10)
        for n in range(rounds):                         # one read at a time, cached
            ncq(p, 9, 64 * (n % 8), 8, [(BUF + 0x20000 + 0x1000 * n, 4096)])
            issue(p, 1 << 9)
            assert port.hba.wait_idle(10)
    r = both(tmp_path, scenario)
    assert r["served"] == 16 + rounds
    assert r["cached"] >= 8 + rounds    # the second round at least; not the dropped first
    assert 1 <= r["inline"] < rounds    # the last ones, after the skipped offers
    assert r["state"]["sact"] == 0 and not r["state"]["is"] & regs.IS_FATAL
    assert r["ram"][0x10000:0x18000] == r["ram"][0:0x8000]


def test_a_comreset_ends_the_skips_after_cold_reads(tmp_path):
    """After reads the page cache lacked, the exit skips its offers for a while; a COMRESET
    (the driver starting over) ends that at once: the next cached reads are all served in
    the PxCI write's exit."""
    from hvframe_ahci.hba import INLINE_COLD_SKIPS
    rounds = INLINE_COLD_SKIPS
    skipping = []                   # the skips left when the COMRESET came, in each run

    def scenario(m, p):
        port = next(d for d in m.devices if isinstance(d, AhciHba)).ports[0]
        fd = port.device.backend.fd
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)      # as the test above says why
        for slot in range(8):                           # from the disk: the skips begin
            ncq(p, slot, 64 * slot, 8, [(BUF + 0x1000 * slot, 4096)])
        issue(p, 0xFF)
        assert port.hba.wait_idle(10)
        skipping.append(port._cold_skips)
        p.stop()
        p.write("sctl", 1)                              # COMRESET, then the link up
        p.write("sctl", 0)
        p.start(ie=regs.IS_SDBS | regs.IS_DHRS | regs.IS_TFES)
        for n in range(rounds):                         # one read at a time, cached
            ncq(p, 9, 64 * (n % 8), 8, [(BUF + 0x20000 + 0x1000 * n, 4096)])
            issue(p, 1 << 9)
            assert port.hba.wait_idle(10)
    r = both(tmp_path, scenario)
    assert skipping[0] > 0          # the native run met the cold reads (both() runs it first)
    assert r["inline"] == rounds
    assert r["state"]["sact"] == 0 and not r["state"]["is"] & regs.IS_FATAL


def test_batches_one_after_another(tmp_path):
    def scenario(m, p):
        for round_ in range(3):
            for slot in range(8):
                ncq(p, slot, 8 * slot + round_, 1, [(BUF + 0x1000 * (8 * round_ + slot), 512)])
            issue(p, 0xFF)
            p.wait(0xFF)
    r = both(tmp_path, scenario)
    assert r["served"] == 24


@pytest.mark.parametrize("case", [
    "non-queued-in-the-same-write", "wrong-tag", "past-the-end", "prd-outside-ram",
    "prds-too-short", "cfl-too-small", "table-outside-ram",
])
def test_declined_writes_are_answered_by_python(tmp_path, case):
    def scenario(m, p):
        ncq(p, 0, 0, 1, [(BUF, 512)])
        ncq(p, 1, 8, 1, [(BUF + 0x1000, 512)])
        if case == "non-queued-in-the-same-write":
            p.prepare(2, h2d(ata.READ_DMA_EXT, lba=3, count=1), [(BUF + 0x2000, 512)])
            p.write("sact", 0b011)
            p.write("ci", 0b111)
            return
        if case == "wrong-tag":
            ncq(p, 2, 3, 1, [(BUF + 0x2000, 512)], tag=5)
        elif case == "past-the-end":
            ncq(p, 2, SECTORS - 1, 2, [(BUF + 0x2000, 1024)])
        elif case == "prd-outside-ram":
            ncq(p, 2, 3, 1, [(MEM + 0x1000, 512)])
        elif case == "prds-too-short":
            ncq(p, 2, 3, 2, [(BUF + 0x2000, 512)])
        elif case == "cfl-too-small":
            p.prepare(2, h2d(ata.READ_FPDMA_QUEUED, lba=3, count=2 << 3, features=1),
                      [(BUF + 0x2000, 512)], cfl=2)
        elif case == "table-outside-ram":
            p.prepare(2, h2d(ata.READ_FPDMA_QUEUED, lba=3, count=2 << 3, features=1),
                      [(BUF + 0x2000, 512)], table=MEM - 0x40)
        issue(p, 0b111)
    r = both(tmp_path, scenario)
    assert r["served"] == 0
    assert r["state"]["is"] & regs.IS_FATAL


def test_read_only_write_is_declined(tmp_path):
    def scenario(m, p):
        ncq(p, 0, 0, 1, [(BUF, 512)])
        ncq(p, 1, 8, 1, [(BUF + 0x1000, 512)], write=True)
        issue(p, 0b11)
    r = both(tmp_path, scenario, conf=",ro")
    assert r["served"] == 0 and r["state"]["tfd"] >> 8 == regs.ERR_ABRT


def test_io_error_in_a_batch(tmp_path):
    # The backend believes in more sectors than the file holds: the read past the end of
    # the file fails in preadv, the other completes. One job, so that both paths run the
    # two in slot order (in parallel jobs the failure may halt the port before slot 0's
    # completion, which is then dropped: right, but not the same from run to run).
    def scenario(m, p):
        ncq(p, 0, 0, 1, [(BUF, 512)])
        ncq(p, 1, SECTORS - 2, 2, [(BUF + 0x1000, 1024)])
        issue(p, 0b11)
    r = both(tmp_path, scenario, truncate=(SECTORS - 1) * 512, jobs=1)
    assert r["served"] == 2
    st = r["state"]
    assert st["is"] & regs.IS_TFES and st["tfd"] >> 8 == regs.ERR_UNC
    assert st["sact"] == 0b10                 # the failed slot stays active


def test_a_slot_still_in_flight_is_not_prepared_again(tmp_path):
    # Issued again while the first one runs, the slot goes the Python way (which accepts a
    # second command with the same tag): the native slot state is never overwritten.
    path = tmp_path / "disk.img"
    path.write_bytes(image_bytes())
    m = build_machine(f"{SLOT},ahci-hd,{path}", memory=MEM)
    try:
        drv = AhciDriver(m, SLOT)
        p = drv.port(0)
        p.start()
        hba = next(d for d in m.devices if isinstance(d, AhciHba))
        port = hba.ports[0]
        with hba.lock:                         # hold completions back
            # (a write: a read the page cache has would complete during the issue itself)
            ncq(p, 0, 0, 1, [(BUF, 512)], write=True)
            port._set(F_SACT, 1)
            port._issue(1)
            assert port.ncq_active == 1
            assert not port._issue_native(1)
        assert hba.wait_idle(10)
    finally:
        m.close()


# -- random batches: the native path and Python agree ---------------------------------------

# Sane values keep each slot to its own 64 sectors and its own 128 KiB of RAM, so that the
# outcome does not depend on the order concurrent requests run in; wild ones are outside.
_wild_addr = st.one_of(st.integers(MEM, MEM + 0x800), st.integers(1 << 32, (1 << 64) - 1))
_sane = st.sampled_from([True] * 9 + [False])          # each field sane 9 times in 10


@st.composite
def _command(draw):
    return {
        "lba": draw(st.integers(0, 40)) if draw(_sane) else draw(st.integers(SECTORS, 1 << 48)),
        "nsect": draw(st.integers(1, 16)) if draw(_sane) else draw(st.integers(0, 0xFFFF)),
        "write": draw(st.booleans()),
        "fua": draw(st.booleans()),
        "tag_ok": draw(_sane),
        # None: pages that cover the transfer exactly
        "prds": None if draw(_sane) else draw(st.lists(
            st.tuples(st.one_of(st.integers(0, 0x18000), _wild_addr), st.integers(1, 8192),
                      st.booleans()), max_size=5)),
    }


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.dictionaries(st.integers(0, 31), _command(), min_size=1, max_size=6))
def test_random_ncq_batches_match_python(tmp_path, batch):
    def scenario(m, p):
        for slot, c in batch.items():
            lba = slot * 64 + c["lba"] if c["lba"] < SECTORS else c["lba"]
            if c["prds"] is None:
                length = min(c["nsect"] * 512, 0x10000)
                prds = [(BUF + slot * 0x20000 + off, min(4096, length - off), off == 0)
                        for off in range(0, length, 4096)]
            else:
                prds = [(BUF + slot * 0x20000 + a if a < MEM else a, n, ioc)
                        for a, n, ioc in c["prds"]]
            if c["write"]:
                for addr, n, _ in prds:
                    if m.memory.contains(addr, n):
                        m.memory.write(addr, bytes([slot + 1]) * n)
            ncq(p, slot, lba, c["nsect"], prds, write=c["write"],
                tag=None if c["tag_ok"] else (slot + 1) % 32, fua=c["fua"])
        issue(p, sum(1 << s for s in batch))
    r = both(tmp_path, scenario)
    event("served natively" if r["served"] else "declined")
