"""Malformed command lists, tables and register writes from a hostile or buggy guest: every
one is answered with an ATA/AHCI error (or completes), the VMM survives, and a rejected
write leaves the image unchanged."""
import logging
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hvframe.dispatch
from hvframe_ahci import ata, atapi, regs
from hvframe_ahci.testdriver import AhciDriver, build_machine, h2d

SLOT = 6
RAM = 64 << 20
BUF = 0x1000000
SECTORS = 128
WRITES = {ata.WRITE_DMA, ata.WRITE_DMA_EXT, ata.WRITE_DMA_FUA_EXT, ata.WRITE_SECTORS,
          ata.WRITE_SECTORS_EXT, ata.WRITE_FPDMA_QUEUED, ata.DATA_SET_MANAGEMENT}
ATA_OPS = sorted(WRITES | {ata.READ_DMA, ata.READ_DMA_EXT, ata.READ_SECTORS,
                           ata.READ_SECTORS_EXT, ata.READ_FPDMA_QUEUED, ata.READ_VERIFY_EXT,
                           ata.FLUSH_CACHE_EXT, ata.IDENTIFY_DEVICE, ata.SET_FEATURES,
                           ata.CHECK_POWER_MODE, atapi.ATA_PACKET, atapi.ATA_IDENTIFY_PACKET})
SCSI_OPS = [atapi.TEST_UNIT_READY, atapi.REQUEST_SENSE, atapi.INQUIRY, atapi.START_STOP_UNIT,
            atapi.PREVENT_ALLOW, atapi.READ_CAPACITY, atapi.READ_10, atapi.READ_12,
            atapi.READ_TOC, atapi.GET_CONFIGURATION, atapi.GET_EVENT_STATUS,
            atapi.MODE_SENSE_10]

def mostly(sane, wild, n=4):
    """Usually a sane value (so the command gets as far as moving data), sometimes wild."""
    return st.one_of(*([sane] * n), wild)


addresses = st.one_of(
    st.integers(BUF, BUF + 0x100000),                   # ordinary RAM
    st.integers(BUF, BUF + 0x100000),
    st.integers(RAM - 0x2000, RAM + 0x2000),            # across the end of RAM
    st.integers(0xC0000000, 0xFFFFFFFF),                # the PCI hole, the ABAR itself
    st.integers(1 << 32, (1 << 64) - 1),                # 64-bit, far outside
)
prds = st.lists(st.tuples(addresses, mostly(st.integers(1, 4096), st.integers(1, 1 << 22), 2),
                          st.booleans()), max_size=6)
commands = st.fixed_dictionaries({
    "port": st.sampled_from([0, 0, 0, 1]),
    "slot": st.integers(0, 31),
    "op": mostly(st.sampled_from(ATA_OPS), st.integers(0, 255)),
    "lba": mostly(st.integers(0, SECTORS + 2), st.integers(0, (1 << 48) - 1)),
    "count": mostly(st.integers(1, 8), st.integers(0, 0xFFFF)),
    "tag_ok": mostly(st.just(True), st.just(False)),
    "features": mostly(st.integers(0, 8), st.integers(0, 0xFFFF)),
    "fis_type": mostly(st.just(0x27), st.integers(0, 255)),
    "is_command": mostly(st.just(True), st.just(False)),
    "control": st.integers(0, 255),
    "cfl": mostly(st.just(5), st.integers(0, 31)),
    "prds": prds,
    "prdtl": mostly(st.none(), st.integers(0, 0xFFFF)),
    "table": mostly(st.none(), addresses),
    "write": st.booleans(),
    "ncq": st.booleans(),
    "twice": st.booleans(),
    "scsi": mostly(st.sampled_from(SCSI_OPS), st.integers(0, 255)),
    "cdb": st.binary(min_size=11, max_size=11),
})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("ahci-fuzz")
    hd, cd = d / "disk.img", d / "cd.iso"
    hd.write_bytes(os.urandom(SECTORS * 512))
    cd.write_bytes(os.urandom(32 * 2048))
    return hd, cd


@pytest.fixture(scope="module")
def machine(images):
    hd, cd = images
    m = build_machine(f"{SLOT},ahci,hd:{hd},cd:{cd}", memory=RAM)
    drv = AhciDriver(m, SLOT)
    yield m, drv
    m.close()


def sanity_read(m, drv, images):
    """The port still works: a plain read returns the image's bytes."""
    hd, _ = images
    p = drv.port(0)
    p.recover()
    p.start()
    is_ = p.run(0, h2d(ata.READ_DMA_EXT, lba=1, count=2), [(BUF, 1024)])
    assert not is_ & regs.IS_FATAL
    assert m.memory.read(BUF, 1024) == hd.read_bytes()[512:1536]


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(c=commands)
def test_malformed_commands_get_errors_and_the_vmm_survives(machine, images, c, caplog,
                                                            capsys):
    m, drv = machine
    hd, _ = images
    hvframe.dispatch._reported.clear()
    caplog.set_level(logging.ERROR, logger="hvframe_ahci")
    caplog.clear()
    before = hd.read_bytes()
    p = drv.port(c["port"])
    p.start()
    slot = c["slot"]
    count, features = c["count"], c["features"]
    if c["op"] in (ata.READ_FPDMA_QUEUED, ata.WRITE_FPDMA_QUEUED) and c["tag_ok"]:
        count, features = slot << 3, c["count"]          # the tag, and the sector count
    fis = h2d(c["op"], lba=c["lba"], count=count, features=features,
              control=c["control"], is_command=c["is_command"])
    fis = bytes([c["fis_type"]]) + fis[1:]
    acmd = bytes([c["scsi"]]) + c["cdb"]
    p.prepare(slot, fis, c["prds"], write=c["write"], atapi=c["port"] == 1, acmd=acmd,
              cfl=c["cfl"], prdtl=c["prdtl"], table=c["table"])
    if c["ncq"] or (c["tag_ok"] and c["op"] in (ata.READ_FPDMA_QUEUED, ata.WRITE_FPDMA_QUEUED)):
        p.write("sact", 1 << slot)
    p.write("ci", 1 << slot)
    if c["twice"]:
        p.write("ci", 1 << slot)
    # It must end one way or the other: PxCI clears (accepted or done) or the port stops
    # with an error, and nothing stays with the backend.
    p.wait(1 << slot, sact=False)
    hba = next(d for d in m.devices if hasattr(d, "wait_idle"))
    assert hba.wait_idle(10)
    is_ = p.read("is")
    failed = bool(is_ & regs.IS_FATAL)
    if failed:
        assert p.read("ci") & (1 << slot) or p.read("sact") & (1 << slot)
    after = hd.read_bytes()
    if after != before:
        assert c["port"] == 0 and not failed and c["op"] in WRITES
        hd.write_bytes(before)                   # keep the next example's image known
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert "hvframe: device" not in capsys.readouterr().err
    p.recover()
    sanity_read(m, drv, images)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=st.lists(st.tuples(st.integers(0, 0x1FFF), st.sampled_from([1, 2, 4, 8]),
                                 st.integers(0, (1 << 64) - 1)), max_size=40))
def test_random_register_writes_never_break_the_hba(machine, images, writes, capsys):
    m, drv = machine
    hvframe.dispatch._reported.clear()
    for off, size, value in writes:
        m.mmio_write(drv.abar + off, size, value & ((1 << (8 * size)) - 1))
        m.mmio_read(drv.abar + off, size)
    hba = next(d for d in m.devices if hasattr(d, "wait_idle"))
    assert hba.wait_idle(10)
    drv.write("ghc", regs.GHC_HR)                # a driver's way back: HBA reset
    assert drv.read("ghc") == regs.GHC_AE
    drv.port(0).start()
    sanity_read(m, drv, images)
    assert "hvframe: device" not in capsys.readouterr().err
