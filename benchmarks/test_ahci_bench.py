"""AHCI through the dispatch core with synthetic requests, against the raw backend doing the
same I/O (os.preadv/os.pwritev on the same file, same offsets, same sizes) in the same run.

    python -m pytest benchmarks/test_ahci_bench.py

Each round issues 32 NCQ commands with one PxSACT and one PxCI write (two MMIO exits), waits
for the HBA to go idle (as a guest waits for its interrupt), then reads PxSACT. extra_info
carries `raw_s` (the same round straight on the file, best of several) and `fraction`
(raw time / device time: the share of the raw backend's throughput the device delivers).
"""
import os
import random
import time

import pytest

import rawloop

from hvframe_ahci import ata, regs
from hvframe_ahci.hba import AhciHba
from hvframe_ahci.testdriver import AhciDriver, build_machine, h2d

IMAGE = 64 << 20
DEPTH = 32
BUF = 0x1000000
PAGE = 4096


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("ahci-bench") / "disk.img"
    with open(path, "wb") as f:
        for _ in range(IMAGE // (1 << 20)):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())        # no writeback beside the timed rounds (as virtio-blk's)
    # Cached for every round, on both sides (rawloop.PageCacheLock says why).
    yield from rawloop.locked_image(path)


def ahci(image):
    m = build_machine(f"4,ahci,hd:{image}", memory=256 << 20)
    drv = AhciDriver(m, 4)
    p = drv.port(0)
    p.start(ie=regs.IS_SDBS | regs.IS_DHRS)
    drv.write("ghc", regs.GHC_AE | regs.GHC_IE)
    hba = next(d for d in m.devices if isinstance(d, AhciHba))
    return m, p, hba


def prepare_round(p, op, requests, write):
    """requests: (lba, bytes) per slot; data buffers are 4 KiB PRDs, as a paging OS has them."""
    for slot, (lba, length) in enumerate(requests):
        base = BUF + slot * (256 << 10)
        prds = [(base + i, PAGE) for i in range(0, length, PAGE)]
        p.prepare(slot, h2d(op, lba=lba, count=slot << 3, features=length // 512), prds,
                  write=write)


def device_round(p, hba):
    p.write("sact", 0xFFFFFFFF)
    p.write("ci", 0xFFFFFFFF)
    hba.wait_idle(30)
    assert p.read("sact") == 0


def raw_round(fd, requests, write, bufs):
    for (lba, length), buf in zip(requests, bufs):
        if write:
            os.pwritev(fd, [buf[:length]], lba * 512)
        else:
            os.preadv(fd, [buf[:length]], lba * 512)


def best_of(fn, rounds=30):
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def compare(benchmark, image, requests, write):
    m, p, hba = ahci(image)
    op = ata.WRITE_FPDMA_QUEUED if write else ata.READ_FPDMA_QUEUED
    prepare_round(p, op, requests, write)
    fd = os.open(image, os.O_RDWR)
    bufs = [bytearray(os.urandom(256 << 10)) for _ in requests]
    try:
        device_round(p, hba)                            # warm the page cache and the threads
        raw = best_of(lambda: raw_round(fd, requests, write, bufs))
        benchmark(device_round, p, hba)
        dev = benchmark.stats.stats.min
        total = sum(n for _, n in requests)
        benchmark.extra_info.update(raw_s=raw, fraction=round(raw / dev, 3),
                                    device_MBps=round(total / dev / 1e6, 1),
                                    raw_MBps=round(total / raw / 1e6, 1),
                                    commands_per_round=len(requests))
        print(f"\n{benchmark.name}: device {dev * 1e6:.0f} us/round, raw {raw * 1e6:.0f} "
              f"us/round, fraction {raw / dev:.3f}")
    finally:
        os.close(fd)
        m.close()


def test_ncq_random_4k_reads_qd32(benchmark, image):
    rng = random.Random(1)
    requests = [(rng.randrange(IMAGE // PAGE) * (PAGE // 512), PAGE) for _ in range(DEPTH)]
    compare(benchmark, image, requests, write=False)


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
def test_sequential_128k(benchmark, image, write):
    size = 128 << 10
    requests = [(i * size // 512, size) for i in range(DEPTH)]
    compare(benchmark, image, requests, write)


# -- one ABAR exit: served natively (abar.c, no GIL) against the same HBA all in Python --------

EXITS = 20000
_P = regs.PORT_BASE


def _abar_exits():
    """What an NCQ driver's interrupt handler and issue path do, per command: read HBA IS,
    read PxIS, clear it, clear HBA IS, read PxSACT and PxCI, write PxSACT (ST is set, so the
    bit stays set: no command is issued)."""
    from hvframe_ahci.testdriver import ABAR
    po = regs.PORT_OFFSETS
    return [(ABAR + regs.GHC_OFFSETS["is"], 4, 0, False), (ABAR + _P + po["is"], 4, 0, False),
            (ABAR + _P + po["is"], 4, regs.IS_SDBS, True), (ABAR + regs.GHC_OFFSETS["is"], 4, 1, True),
            (ABAR + _P + po["sact"], 4, 0, False), (ABAR + _P + po["ci"], 4, 0, False),
            (ABAR + _P + po["sact"], 4, 1 << 31, True)]


def test_abar_exit_native_vs_python(benchmark, image):
    m, p, hba = ahci(image)
    try:
        pattern = _abar_exits()
        batch = m.prepare_exits(pattern * (EXITS // len(pattern)), mmio=True)
        best = {}

        def one_round():
            for native in (True, False):          # in turn: a busy host slows both alike
                hba.native = native
                t = time.perf_counter()
                batch.run_only()
                dt = time.perf_counter() - t
                best[native] = min(best.get(native, dt), dt)
        served, passed = hba.native_counts
        benchmark.pedantic(one_round, rounds=10, iterations=1)
        hba.native = True
        n = batch.n
        us = {k: v / n * 1e6 for k, v in best.items()}
        benchmark.extra_info.update(native_us_per_exit=round(us[True], 3),
                                    python_us_per_exit=round(us[False], 3),
                                    python_over_native=round(us[False] / us[True], 2))
        print(f"\nABAR exit: native {us[True]:.3f} us, Python {us[False]:.3f} us "
              f"({us[False] / us[True]:.1f}x)")
        # Native rounds passed nothing to Python; Python rounds passed everything.
        assert hba.native_counts[0] - served == 10 * n
        assert hba.native_counts[1] - passed == 10 * n
    finally:
        m.close()
