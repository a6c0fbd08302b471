"""Checkpoint records stay byte for byte what earlier releases wrote: the digests below were
taken from 9503274, before the records were declared late (hvframe.packed.declared_later). A
save/load round trip cannot see a changed record layout (both sides change together); a
checkpoint written by an older hvframe would then be refused or misread."""
import hashlib

from hvframe.snapshot.pci import PCI_FUNCTION_STATE
from hvframe.virtio.pci import VirtioPciFunction
from hvframe_ahci.ata import AtaDisk
from hvframe_ahci.atapi import AtapiCdrom
from hvframe_ahci.hba import AhciHba
from hvframe_virtio_blk.virtio_blk import VirtioBlk

# name -> (length, first 16 hex digits of the record's sha256), as 9503274 built them
EXPECTED = {
    "ahci": (4383, "2ed0556ee8ec0b31"),
    "ata": (3, "a28b839c8ba1f1cd"),
    "atapi": (7, "50f000b3c9059512"),
    "pci": (4134, "df35cca1bae4378c"),
    "virtio-blk": (1, "4bf5122f344554c5"),
    "virtio-pci": (4253, "2ab82c179956bf09"),
}


def _records() -> dict[str, bytes]:
    pci = dict(config=bytes(i & 0xFF for i in range(4096)), intx_level=True,
               msix_entries=[[0xFEE00000, 0, 0x41, 1], [0xFEE01000, 0, 0x42, 0]],
               msix_pending=b"\x02")

    def queue(i):
        return dict(size=256, msix_vector=i, enabled=True, desc=0x1000 * i, driver=0x2000 * i,
                    device=0x3000 * i, pfn=i, broken=False, live=True, last_avail_idx=7 * i,
                    used_idx=5 * i)

    blk = VirtioBlk.state_layout.build(dict(writeback_failed=True))
    virtio = dict(pci=pci, status=15, device_feature_select=1, driver_feature_select=0,
                  driver_features=1 << 32 | 6, features=1 << 32 | 6, config_vector=0,
                  config_generation=2, queue_select=1, isr=1, live=True,
                  queues=[queue(1), queue(2)], device=blk)
    regs = ("clb", "clbu", "fb", "fbu", "pxis", "ie", "cmd", "ccs", "tfd", "sig", "ssts", "sctl",
            "serr", "sntf", "sact", "ci")

    def port(i, device):
        return dict({n: 0x1000 * i + k for k, n in enumerate(regs)}, halted=bool(i & 1),
                    pending=[1, 2] if i else [], held=i, atapi=bool(i), device=device)

    disk = AtaDisk.state_layout.build(dict(write_cache=True, udma_mode=5, writeback_failed=False))
    cd = AtapiCdrom.state_layout.build(dict(sense_key=6, asc=0x28, ascq=0, tray_open=False,
                                            prevent=True, unit_attention=True, media_event=2))
    hba = {"pci": pci, "ghc": 0x80000002, "is": 3, "irq_level": True,
           "ports": [port(0, disk), port(1, cd), port(2, b"")]}
    return {"virtio-pci": VirtioPciFunction.state_layout.build(virtio),
            "ahci": AhciHba.state_layout.build(hba), "ata": disk, "atapi": cd,
            "virtio-blk": blk, "pci": PCI_FUNCTION_STATE.build(pci)}


def test_checkpoint_records_are_those_earlier_releases_wrote():
    got = {k: (len(r), hashlib.sha256(r).hexdigest()[:16]) for k, r in _records().items()}
    assert got == EXPECTED


def test_the_records_keep_their_module_level_names():
    from hvframe.virtio import pci as virtio_pci
    from hvframe_ahci import ata, atapi, hba
    assert virtio_pci.VIRTIO_PCI_STATE is VirtioPciFunction.state_layout
    assert virtio_pci.VIRTIO_QUEUE_STATE.sizeof() == 39
    assert hba.AHCI_HBA_STATE is AhciHba.state_layout
    assert hba.AHCI_PORT_STATE.parse(hba.AHCI_PORT_STATE.build(dict(
        {n: 0 for n in hba._PORT_REGS}, halted=False, pending=[], held=0, atapi=False,
        device=b"")))["device"] == b""
    assert ata.ATA_DISK_STATE is AtaDisk.state_layout
    assert atapi.ATAPI_CDROM_STATE is AtapiCdrom.state_layout
    from hvframe.snapshot.format import SnapshotError
    assert hba.SnapshotError is SnapshotError
