"""virtio-blk through its queues against the raw backend, in the same run.

    python -m pytest benchmarks/test_virtio_blk_bench.py

Each case runs the same I/O pattern twice on the same image: once as raw preadv/pwritev calls
from a C loop (the backend alone, the ceiling: rawloop.BlockLoop), once as virtio-blk
requests a driver puts on the queue (hvframe.virtio.harness layout, descriptors prepared once
as a guest driver's would be) and the device's worker thread serves, completions signalled
by MSI-X.

What is timed for hvframe, per queue-depth batch: copying the batch's request headers into
guest RAM, writing the avail ring entries and publishing avail.idx, the kick, and waiting for
the completion interrupt until used.idx covers the batch. The header bytes are packed before
the clock starts, as the raw loop's offsets are computed before it starts: packing them is
guest-driver CPU work (on a vCPU, not in the VMM).

The driver behaves as Linux's virtio-blk driver on KVM does, and its side of the round is C
(rawloop.Driver.batches, as test_virtio_net_datapath.py's driver):
- it negotiates EVENT_IDX and kicks only when the device asks for a kick
  (virtqueue_kick_prepare: avail_event, left behind while the worker is serving or polling);
  the kick is a write of the queue's doorbell eventfd, what KVM's ioeventfd does with the
  guest's notify write (no Python handler, no GIL);
- it asks for one interrupt, at the batch's last request (used_event), and waits for it the
  way a halted vCPU does under KVM: the queue's MSI-X vector is an irqfd (the synthetic
  machine leaves its eventfd to the caller, as KVM would consume it), polled first with
  KVM's adaptive halt polling, which gives way to another task wanting the CPU.
Until 2026-12-04 these steps were Python: the kick went through the synthetic machine's
dispatch to the doorbell's handler (the GIL and a Python handler a guest's kick never
reaches), the wait spun a fixed 200 us without giving way to the device's worker when both
ran on one CPU, and each batch's copies and calls took 2-4 us while the worker polled for
the next. The raw side was a Python loop of os.preadv/os.pwritev, whose call adds 0.2-0.3 us
to each request (1.21x the C loop's time for 4 KiB reads): it is still timed, as
fraction_of_python_loop, the figure the targets and the README's figures before that day
were taken against.

extra_info records both rates and hvframe's fraction of the raw rate (best round against best
round, and the median of each round's ratio to the raw round just before it; for comparison
only, of a raw loop that reuses one buffer, and of the Python loop); the targets of the
virtio-blk issue are asserted: at least 0.7 for 4 KiB random reads at queue depth 32, 0.9 for
128 KiB sequential.
"""
import os
import random
import statistics
import struct
import time

import pytest

import rawloop
from hvframe.testing import SyntheticMachine, rig
from hvframe.testing.virtio import VirtioPciDriver
from hvframe.virtio.device import F_RING_EVENT_IDX
from hvframe.virtio.virtqueue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from hvframe_virtio_blk.virtio_blk import F_FLUSH, T_IN, T_OUT, bit

IMAGE = 256 << 20
CASES = {
    # name: (request bytes, queue depth, write?, random?, target fraction)
    "4k-randread-qd32": (4096, 32, False, True, 0.7),
    "128k-seqread-qd8": (128 << 10, 8, False, False, 0.9),
    "128k-seqwrite-qd8": (128 << 10, 8, True, False, 0.9),
}
BATCHES = 256         # queue-depth batches per round
ROUNDS = 20           # best of, for raw and hvframe alike (a round is 10-30 ms)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("vblk-bench") / "disk.img"
    with open(path, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(IMAGE >> 20):
            f.write(chunk)
        # On disk before anything is timed: the kernel's writeback of 256 MiB would otherwise
        # run beside the first case, on one of this host's two CPUs, which the device (its
        # worker and the driver) needs both of and the raw loop one.
        f.flush()
        os.fsync(f.fileno())
    # Cached for every round, on both sides (rawloop.PageCacheLock says why).
    yield from rawloop.locked_image(path)


def offsets_for(size, depth, rand):
    rng = random.Random(1)
    n = BATCHES * depth
    if rand:
        return [rng.randrange(IMAGE // size) * size for _ in range(n)]
    return [(i * size) % IMAGE for i in range(n)]


class Rig:
    def __init__(self, image, size, depth):
        self.m = SyntheticMachine(256 << 20, irqfd_eventfds=True, ioeventfds=True)
        rig(self.m, f"-s 2,virtio-blk,{image},queue-size=256", direct_boot=False)
        drv = VirtioPciDriver(self.m, 2)
        drv.initialize(bit(F_FLUSH) | bit(F_RING_EVENT_IDX))
        # The queue's MSI-X vector is an irqfd; its eventfd is the completion interrupt.
        self._setup_rings(drv, size, depth, drv.doorbell_fd(0),
                          drv.fn.msix.irqfd(drv.fn.queues[0].msix_vector).fd)

    def _setup_rings(self, drv, size, depth, doorbell_fd, irq_fd):
        """The descriptors of every slot, fixed for the run, and the driver's side of a batch
        in C (test_passthru_bench.py's rig shares this)."""
        self.drv = drv
        self.q = drv.queues[0]
        self.depth, self.size = depth, size
        mem, q = self.m.memory, self.q
        # Slot i: descriptors 3i (header), 3i+1 (data), 3i+2 (status), fixed for the run.
        self.headers = drv.data_base
        self.data = self.headers + 0x10000
        self.status = self.headers + 0x8000
        for i in range(depth):
            d = 3 * i
            desc = (struct.pack("<QIHH", self.headers + 16 * i, 16, VIRTQ_DESC_F_NEXT, d + 1)
                    + struct.pack("<QIHH", self.data + size * i, size, VIRTQ_DESC_F_NEXT, d + 2)
                    + struct.pack("<QIHH", self.status + i, 1, VIRTQ_DESC_F_WRITE, 0))
            mem.write(q.desc + 16 * d, desc)
        # Data in the buffers, as the raw loop's (rawloop.BlockLoop says why): RAM never
        # written reads as the zero page, which no guest's write comes from.
        mem.write(self.data, os.urandom(size * depth))
        self.mem = mem
        self.hdr_view = mem.view(self.headers, 16 * depth)
        # avail.idx is stored by the driver in C, in one 16-bit store: struct.pack_into
        # would clear it first, and a device reading in between takes the 0 for a full queue
        # once its index is within a queue of the wrap (tests/test_virtqueue.py).
        self.driver = rawloop.Driver(mem, q, doorbell_fd, irq_fd, timeout_ms=10_000)
        # The avail entries of a batch are always heads 0, 3, 6, ...; the ring size is a
        # multiple of the depth, so a batch never wraps inside the ring.
        assert q.size % depth == 0
        self.ring_entries = struct.pack(f"<{depth}H", *range(0, 3 * depth, 3))

    def set_direction(self, write):
        # Data descriptors are device-writable for reads, device-readable for writes.
        flags = VIRTQ_DESC_F_NEXT | (0 if write else VIRTQ_DESC_F_WRITE)
        for i in range(self.depth):
            self.mem.write(self.q.desc + 16 * (3 * i + 1) + 12, struct.pack("<H", flags))

    def headers_for(self, rtype, offsets):
        """The request headers for `offsets`, in order, packed (before timing): any number of
        whole batches, as batches() takes them."""
        return b"".join(struct.pack("<IIQ", rtype, 0, off // 512) for off in offsets)

    def batches(self, headers):
        """Queue-depth batches, one per 16 * depth bytes of headers, in C as a guest driver's
        are: each its headers and avail entries, avail.idx, the kick if asked for, and the
        wait until used.idx covers it (an error after a 10 s halt)."""
        q = self.q
        self.driver.batches(self.hdr_view, headers, self.ring_entries, self.depth)
        q.avail_idx = q.last_used = (q.avail_idx + len(headers) // 16) & 0xFFFF

    def close(self):
        self.driver.close()
        self.hdr_view.release()
        self.m.close()


def run_raw(image, write, loop):
    """The backend alone, from C (rawloop.BlockLoop): one preadv/pwritev per request, in
    order, each into (or from) the buffer of its queue slot, as the device's requests use
    `depth` guest buffers (or one buffer, for comparison)."""
    fd = os.open(image, os.O_RDWR)
    try:
        t = time.perf_counter()
        loop.run(fd, write)
        return time.perf_counter() - t
    finally:
        os.close(fd)


def run_python_loop(image, size, depth, write, offsets):
    """The same calls from a Python loop (the raw side before 2026-12-04)."""
    fd = os.open(image, os.O_RDWR)
    bufs = [memoryview(bytearray(os.urandom(size))) for _ in range(depth)]
    op = os.pwritev if write else os.preadv
    try:
        t = time.perf_counter()
        for i, off in enumerate(offsets):
            op(fd, [bufs[i % depth]], off)
        return time.perf_counter() - t
    finally:
        os.close(fd)


@pytest.mark.parametrize("case", list(CASES))
def test_virtio_blk_vs_raw(benchmark, image, case):
    rawloop.loops()                 # skips here (before a machine is made) if it cannot build
    size, depth, write, rand, target = CASES[case]
    offsets = offsets_for(size, depth, rand)
    rig = Rig(image, size, depth)
    try:
        rig.set_direction(write)
        rtype = T_OUT if write else T_IN
        headers = rig.headers_for(rtype, offsets)

        def one_round():
            rig.batches(headers)

        raw_times, raw1_times, py_times = [], [], []
        loop, loop1 = rawloop.BlockLoop(offsets, size, depth), rawloop.BlockLoop(offsets, size, 1)

        def raw_rounds():
            # Before each hvframe round (untimed by the benchmark), so that both see the
            # host in the same state; the reference (raw) right before it. raw1, reported
            # and not asserted, reuses one buffer for every request: it stays in cache,
            # which no queue of `depth` requests can do.
            py_times.append(run_python_loop(image, size, depth, write, offsets))
            raw1_times.append(run_raw(image, write, loop1))
            raw_times.append(run_raw(image, write, loop))

        one_round()                                   # warm the page cache and the rings
        benchmark.pedantic(one_round, setup=raw_rounds, rounds=ROUNDS, iterations=1)
        hv = benchmark.stats.stats.min
        raw, raw1, py = min(raw_times), min(raw1_times), min(py_times)
        n = len(offsets)
        fraction = raw / hv
        # Each round beside the raw round just before it (its setup): the host's noise, which
        # moves either side by 10-20% from one run to the next here, mostly cancels in a pair.
        pairs = statistics.median(r / d for r, d in zip(raw_times, benchmark.stats.stats.data))
        benchmark.extra_info.update({
            "requests_per_round": n,
            "raw_iops": round(n / raw), "hvframe_iops": round(n / hv),
            "raw_MBps": round(n * size / raw / 1e6, 1),
            "hvframe_MBps": round(n * size / hv / 1e6, 1),
            "fraction_of_raw": round(fraction, 3), "target": target,
            "fraction_of_raw_pair_median": round(pairs, 3),
            "fraction_of_raw_one_buffer": round(raw1 / hv, 3),
            "python_loop_iops": round(n / py), "fraction_of_python_loop": round(py / hv, 3)})
        print(f"\n{case}: raw {n / raw:.0f} req/s, hvframe {n / hv:.0f} req/s, "
              f"fraction {fraction:.3f} (target {target}; pairs' median {pairs:.3f}; "
              f"against one raw buffer "
              f"{raw1 / hv:.3f}; of the Python loop's {n / py:.0f} req/s {py / hv:.3f})")
        assert fraction >= target, f"{case}: {fraction:.3f} of raw, target {target}"
    finally:
        rig.close()
