"""virtio-blk served out of process (`hvframe serve-device`, reached through
`-s N,passthru,vfio-user=PATH`) against the same device in process, same image, same run.

    python -m pytest benchmarks/test_passthru_bench.py

The driver and what is timed are test_virtio_blk_bench.py's (one queue-depth batch: headers,
avail entries, the kick when the device asks for one, the wait for the completion interrupt
until used.idx covers the batch). In process the kick reaches the device's worker through
its ioeventfd and the completion comes back on the queue's MSI-X irqfd. Out of process the
kick is the server's ioeventfd too (handed over with DEVICE_GET_REGION_IO_FDS and bound by
the client as KVM would bind it), the data moves in guest RAM shared by memfd, and the
completion is the server's worker writing the guest's irqfd itself (handed over per MSI-X
vector with DEVICE_SET_IRQS while the vector's gate is open; a masked vector goes back to
the client's relay). The relay's count is recorded: no completion of a timed round goes
through it. No request goes through the vfio-user socket.

The two sides run alternately, one round each, so that both see the host in the same state
(these hosts are shared and their load moves); each side is the best of ROUNDS. The server
reads a copy of the image (each device holds its image locked), written the same way as the
image (see image_copy); both are read once before timing, so both are in the page cache.
extra_info records both rates and the fraction; the aim of the passthru issue is 0.9.
"""
import subprocess
import sys
import time
import types

import pytest

import rawloop
from hvframe.pci.bus import add_pci_devices
from hvframe.plugins import Registry
from hvframe.synthetic import SyntheticMachine
from hvframe.virtio.device import F_RING_EVENT_IDX
from hvframe.virtio.harness import VirtioPciDriver
from hvframe_virtio_blk.virtio_blk import F_FLUSH, T_IN, bit
from test_virtio_blk_bench import ROUNDS, Rig, image, offsets_for  # noqa: F401 (fixture)

CASES = {
    # name: (request bytes, queue depth, random?)
    "4k-randread-qd32": (4096, 32, True),
    "128k-seqread-qd8": (128 << 10, 8, False),
}
AIM = 0.9
SLOT = 2


class _Driver(VirtioPciDriver):
    def _hook_interrupts(self):
        pass                         # completions are seen on the irqfd and the used ring


class OutOfProcessRig(Rig):
    """The bench rig with the device behind `hvframe serve-device`."""

    def __init__(self, image, size, depth, sock):
        self.server = subprocess.Popen(
            [sys.executable, "-m", "hvframe", "serve-device", "-s",
             f"virtio-blk,{image},queue-size=256", "--socket", str(sock)],
            stderr=subprocess.PIPE, text=True)
        line = self.server.stderr.readline()
        assert "on " + str(sock) in line, line
        self.m = SyntheticMachine(256 << 20, irqfd_eventfds=True, shared_memory=True,
                                  ioeventfds=True)
        add_pci_devices(self.m, Registry(platform=False),
                        {"0": {str(SLOT): {"0": {"device": "passthru",
                                                 "vfio-user": str(sock)}}}},
                        direct_boot=False)
        self.m.start_devices()
        fn = self.m.pci.lookup(0, SLOT, 0)
        drv = _Driver(self.m, SLOT)
        drv.fn = types.SimpleNamespace(device=types.SimpleNamespace(num_queues=1))
        drv.initialize(bit(F_FLUSH) | bit(F_RING_EVENT_IDX))
        drv.fn = fn
        # The kick rings the server's doorbell as bound at its place in the BAR; the
        # harness gives queue 0 MSI-X vector 1.
        self._setup_rings(drv, size, depth, fn.doorbell_fd_at("mmio", drv.notify_address(0), 2, 0),
                          fn.msix.irqfd(1).fd)
        self.fn = fn

    def close(self):
        try:
            super().close()
        finally:
            self.server.terminate()
            self.server.wait(10)
            self.server.stderr.close()


@pytest.fixture(scope="module")
def image_copy(image):
    """The server's image, written as `image` is (1 MiB write() calls), not by
    shutil.copyfile: a copy made by sendfile() sits in the page cache in 64 KiB folios
    instead of 1 MiB ones (counted with /proc/kpageflags on this host's ext4) and is slower
    to read back (4 KiB random preadv: 2.7-5.2 us against 2.0-2.5 us for either file written
    by write()), which charged the out-of-process side for its file, not for being out of
    process."""
    copy = image.with_name("disk-copy.img")
    with open(image, "rb") as src, open(copy, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    return copy


@pytest.mark.parametrize("case", list(CASES))
def test_out_of_process_vs_in_process(benchmark, image, image_copy, case, tmp_path):
    rawloop.loops()                 # skips here (before a machine is made) if it cannot build
    size, depth, rand = CASES[case]
    offsets = offsets_for(size, depth, rand)

    def rounds_of(rig):
        rig.set_direction(False)
        headers = rig.headers_for(T_IN, offsets)

        def one_round():
            rig.batches(headers)
        one_round()                                   # warm the page cache and the rings
        return one_round

    inside = Rig(image, size, depth)
    outside = None
    try:
        outside = OutOfProcessRig(image_copy, size, depth, tmp_path / "vblk.sock")
        in_round, out_round = rounds_of(inside), rounds_of(outside)
        times = []

        def timed_in_round():
            t = time.perf_counter()
            in_round()
            times.append(time.perf_counter() - t)

        relayed = outside.fn._relay.msix_relayed
        benchmark.pedantic(out_round, setup=timed_in_round, rounds=ROUNDS, iterations=1)
        inproc = min(times)
        relayed = outside.fn._relay.msix_relayed - relayed
    finally:
        inside.close()
        if outside is not None:
            outside.close()
    oop = benchmark.stats.stats.min
    n = len(offsets)
    fraction = inproc / oop
    benchmark.extra_info.update({
        "requests_per_round": n,
        "in_process_iops": round(n / inproc), "out_of_process_iops": round(n / oop),
        "in_process_MBps": round(n * size / inproc / 1e6, 1),
        "out_of_process_MBps": round(n * size / oop / 1e6, 1),
        "fraction": round(fraction, 3), "aim": AIM, "completions_relayed": relayed})
    print(f"\n{case}: in process {n / inproc:.0f} req/s, out of process {n / oop:.0f} req/s, "
          f"fraction {fraction:.3f} (aim {AIM}; {relayed} completions through the relay)")
