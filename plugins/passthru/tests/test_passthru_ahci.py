"""AHCI served out of process: `hvframe serve-device -s ahci,hd:IMAGE` reached through a
synthetic machine's `passthru` function, driven by hvframe_ahci's test driver through the
same dispatch core a vCPU uses (config through 0xcf8/0xcfc, ABAR as MMIO). When the server is
killed, commands end with the HBA's own error status (a task file error: ERR and ABRT in
PxTFD, TFES in PxIS, PxCI clear), the port's error recovery completes, and once a server is
back the driver carries on without resetting the HBA (its set-up is handed to the new one)."""
import signal
import subprocess
import sys
import time

import pytest

from hvframe.pci.bus import add_pci_devices
from hvframe.plugins import Registry
from hvframe.synthetic import SyntheticMachine
from hvframe_ahci.ata import READ_DMA_EXT, WRITE_DMA_EXT
from hvframe_ahci.regs import ERR_ABRT, IS_TFES, ST_DRDY, ST_ERR
from hvframe_ahci.testdriver import AhciDriver, h2d

SLOT = 4
SECTORS = 2048
BUF = 0x800000


def serve(disk, sock):
    proc = subprocess.Popen([sys.executable, "-m", "hvframe", "serve-device", "-s",
                             f"ahci,hd:{disk}", "--socket", str(sock)],
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    assert "on " + str(sock) in line, line
    return proc


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
    proc.wait(10)
    proc.stderr.close()


class Rig:
    def __init__(self, tmp_path):
        self.disk = tmp_path / "disk.img"
        self.disk.write_bytes(bytes(SECTORS * 512))
        self.sock = tmp_path / "ahci.sock"
        self.server = serve(self.disk, self.sock)
        self.m = SyntheticMachine(64 << 20, shared_memory=True)
        add_pci_devices(self.m, Registry(platform=False),
                        {"0": {str(SLOT): {"0": {"device": "passthru",
                                                 "vfio-user": str(self.sock)}}}},
                        direct_boot=False)
        self.m.start_devices()
        self.fn = self.m.pci.lookup(0, SLOT, 0)
        self.drv = AhciDriver(self.m, SLOT)
        self.port = self.drv.port(0)
        self.port.start()

    def rw(self, write, lba, data=b""):
        mem = self.m.memory
        if write:
            mem.write(BUF, data)
        else:
            mem.write(BUF, b"\xcc" * 512)
        is_ = self.port.run(0, h2d(WRITE_DMA_EXT if write else READ_DMA_EXT, lba=lba, count=1),
                            [(BUF, 512)], write=write)
        return is_, self.port.read("tfd"), mem.read(BUF, 512)

    def close(self):
        self.m.close()
        stop(self.server)


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def test_the_hba_is_the_servers(rig):
    assert (rig.fn.config["vendor_id"], rig.fn.config["device_id"]) == (0x8086, 0x2922)
    data = bytes(range(256)) * 2
    is_, tfd, _ = rig.rw(True, 3, data)
    assert not is_ & IS_TFES and not tfd & ST_ERR
    assert rig.disk.read_bytes()[3 * 512:4 * 512] == data
    is_, tfd, got = rig.rw(False, 3)
    assert got == data and not tfd & ST_ERR


def test_killed_server_fails_commands_with_a_task_file_error_then_recovers(rig):
    before = bytes([0xA5]) * 512
    assert not rig.rw(True, 7, before)[1] & ST_ERR
    rig.server.send_signal(signal.SIGKILL)
    rig.server.wait(10)
    is_, tfd, _ = rig.rw(False, 7)
    assert is_ & IS_TFES
    assert tfd == ST_ERR | ST_DRDY | ERR_ABRT << 8
    assert rig.port.read("ci") == 0 and rig.port.read("sact") == 0
    assert rig.drv.read("is") & 1                        # the port's bit in GHC.IS
    rig.port.recover()                                   # CR follows ST while the device is away
    assert rig.rw(True, 8, bytes(512))[0] & IS_TFES      # still away: fails again
    rig.port.recover()
    assert rig.disk.read_bytes()[7 * 512:8 * 512] == before    # acknowledged: on the disk
    rig.server.stderr.close()
    rig.server = serve(rig.disk, rig.sock)
    deadline = time.monotonic() + 10
    while rig.fn.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not rig.fn.lost
    # The driver carries on with the port it set up: no HBA reset, no new command list.
    is_, tfd, got = rig.rw(False, 7)
    assert not is_ & IS_TFES and not tfd & ST_ERR and got == before
    after = bytes([0x5A]) * 512
    assert not rig.rw(True, 9, after)[1] & ST_ERR
    assert rig.disk.read_bytes()[9 * 512:10 * 512] == after
