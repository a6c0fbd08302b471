"""The kernel VFIO backend (`-s N,passthru,sysfsdev=PATH` / BUS/SLOT/FUNC) where the host has
no /dev/vfio: its ioctl sequence runs against vfio_fake.py beside it, a stand-in that keeps the
kernel's documented rules and answers for the device from `hvframe serve-device` (virtio-blk).
Everything above the ioctls is the layer the vfio-user backend uses, so the same guest-side
driver reads and writes the image through it. On a host with VFIO this is no substitute for a
real device; no test here opens /dev/vfio."""
import time

import pytest

from hvframe.errors import ConfigError
from hvframe.pci.bus import add_pci_devices
from hvframe.plugins import Registry
from hvframe.synthetic import SyntheticMachine
from hvframe_passthru import vfio_kernel as vk
from test_passthru import (SECTORS, SLOT, T_IN, T_OUT, Rig, drain, make_disk, start_server,
                           wait_for)
from vfio_fake import FakeVfio

SYSFS = "/sys/bus/pci/devices/0000:00:19.0"

OPEN_SEQUENCE = [
    "iommu_group", f"open {vk.VFIO_DEV}", "VFIO_GET_API_VERSION", "VFIO_CHECK_EXTENSION",
    "open /dev/vfio/7", "VFIO_GROUP_GET_STATUS", "VFIO_GROUP_SET_CONTAINER", "VFIO_SET_IOMMU",
    "VFIO_GROUP_GET_DEVICE_FD", "VFIO_DEVICE_GET_INFO"]


def use_fake(monkeypatch, fake):
    monkeypatch.setattr(vk, "vfio_available", lambda: True)
    monkeypatch.setattr(vk, "HostVfio", lambda: fake)


class KernelRig(Rig):
    """test_passthru's rig with the device reached through the kernel backend."""

    def __init__(self, tmp_path, monkeypatch, irqfd_eventfds=False, **fake_options):
        self.disk = make_disk(tmp_path / "disk.img")
        self.sock = tmp_path / "vblk.sock"
        self.server = start_server(self.disk, self.sock)
        self.m = SyntheticMachine(64 << 20, shared_memory=True, irqfd_eventfds=irqfd_eventfds)
        self.fake = FakeVfio(str(self.sock), memory=self.m.memory, **fake_options)
        use_fake(monkeypatch, self.fake)
        add_pci_devices(self.m, Registry(platform=False),
                        {"0": {str(SLOT): {"0": {"device": "passthru", "sysfsdev": SYSFS}}}},
                        direct_boot=False)
        self.m.start_devices()
        self.fn = self.m.pci.lookup(0, SLOT, 0)
        self.init_driver()

    def close(self):
        super().close()
        self.fake.close_server()


@pytest.fixture
def krig(tmp_path, monkeypatch):
    r = KernelRig(tmp_path, monkeypatch)
    yield r
    r.close()


def test_open_follows_the_documented_sequence(krig):
    calls = krig.fake.calls
    assert calls[:len(OPEN_SEQUENCE)] == OPEN_SEQUENCE
    # Every guest RAM region is DMA-mapped at its guest-physical address, after SET_IOMMU.
    assert sorted(krig.fake.dma) == sorted((r.gpa, r.size) for r in krig.m.memory.regions)
    assert calls.count("VFIO_IOMMU_MAP_DMA") == len(krig.m.memory.regions)
    # The driver turned MSI-X on: the vectors' eventfds went down with SET_IRQS.
    assert "VFIO_DEVICE_SET_IRQS" in calls


def test_read_and_write_through_the_kernel_backend(krig):
    original = krig.disk.read_bytes()
    assert krig.request(T_IN, 3, read_len=512) == 0
    assert krig.last == original[3 * 512:4 * 512]
    payload = bytes(range(256)) * 2
    assert krig.request(T_OUT, 5, data=payload) == 0
    assert krig.disk.read_bytes()[5 * 512:6 * 512] == payload
    assert krig.request(T_IN, SECTORS, read_len=512) == 1         # past the end: IOERR


def test_identity_and_msix_come_from_the_device(krig):
    fn = krig.fn
    assert (fn.config["vendor_id"], fn.config["device_id"]) == (0x1AF4, 0x1001)
    assert fn.msix is not None and fn.msix.vectors == 2
    krig.m.msis.clear()
    krig.request(T_IN, 0, read_len=512)
    deadline = time.monotonic() + 5
    while not krig.m.msis and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (0xFEE00000, 0x41) in krig.m.msis


def test_kernel_backend_hands_the_guest_irqfd_and_takes_it_back_on_mask(tmp_path, monkeypatch):
    r = KernelRig(tmp_path, monkeypatch, irqfd_eventfds=True)
    try:
        irq = r.fn.msix.irqfd(1)
        assert r.fn._msix_irqfds[1] == irq.fd
        relayed = r.fn._relay.msix_relayed
        drain(irq.fd)
        assert r.request(T_IN, 0, read_len=512) == 0
        assert wait_for(lambda: drain(irq.fd) == 1)
        assert r.fn._relay.msix_relayed == relayed          # straight to the irqfd
        table = r.drv.bar(1)
        r.m.mmio_write(table + 16 + 12, 4, 1)              # masked: back to the relay
        assert r.request(T_IN, 1, read_len=512) == 0
        assert wait_for(lambda: r.fn.msix.is_pending(1))
        assert r.fn._relay.msix_relayed == relayed + 1 and drain(irq.fd) == 0
        r.m.mmio_write(table + 16 + 12, 4, 0)
        time.sleep(0.1)
        assert drain(irq.fd) == 1
    finally:
        r.close()


def test_close_unmaps_and_closes_every_fd(tmp_path, monkeypatch):
    r = KernelRig(tmp_path, monkeypatch)
    fake = r.fake
    try:
        assert set(fake.fds.values()) == {"container", "group", "device"}
    finally:
        r.close()
    assert fake.fds == {} and fake.dma == []
    assert fake.calls[-3:] == ["close device", "close group", "close container"]


def test_non_viable_group_is_one_line_config_error(tmp_path, monkeypatch):
    disk = make_disk(tmp_path / "d.img")
    sock = tmp_path / "s.sock"
    server = start_server(disk, sock)
    m = SyntheticMachine(16 << 20, shared_memory=True)
    fake = FakeVfio(str(sock), memory=m.memory, viable=False)
    use_fake(monkeypatch, fake)
    try:
        with pytest.raises(ConfigError, match=r"^passthru at 0:3:0: vfio 0000:00:19.0: IOMMU "
                                              r"group 7 is not viable") as e:
            add_pci_devices(m, Registry(platform=False),
                            {"0": {"3": {"0": {"device": "passthru", "sysfsdev": SYSFS}}}})
        assert "\n" not in str(e.value)
        assert fake.fds == {}            # what was opened before the refusal is closed
        assert "VFIO_GROUP_SET_CONTAINER" not in fake.calls
    finally:
        m.close()
        fake.close_server()
        server.terminate()
        server.wait(10)
        server.stderr.close()


def test_bus_slot_func_names_the_sysfs_device():
    assert vk.host_sysfs_path("0/25/0", None, "w") == "/sys/bus/pci/devices/0000:00:19.0"
    assert vk.host_sysfs_path("3/0/7", None, "w") == "/sys/bus/pci/devices/0000:03:00.7"
    with pytest.raises(ConfigError, match="out of range"):
        vk.host_sysfs_path("0/32/0", None, "w")


@pytest.mark.skipif(not vk.vfio_available(),
                    reason="this host has no /dev/vfio (no IOMMU): the real kernel path "
                           "cannot run here")
def test_real_vfio_refuses_a_device_that_is_not_there():
    with pytest.raises(ConfigError):
        vk.open_host_device("w", host=None, sysfsdev="/sys/bus/pci/devices/0000:ff:1f.7")
