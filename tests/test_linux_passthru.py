"""Linux's own drivers against devices served out of process: the test kernel mounts its ext2
root from a virtio-blk, then from an AHCI disk, each run by `hvframe serve-device` and reached
through `-s N,passthru,vfio-user=PATH`; the superblock in the image file shows the mount.
Minutes per boot on nested KVM (every instruction of the kernel is emulated): out of the
default run, HVFRAME_SLOW_TESTS=1 runs them (one boot at a time).

Seen passing on 2026-12-02 (virtio-blk 327 s, AHCI 308 s) once the emulator-safe CPU policy
stopped offering the TSC-deadline timer; before that the boot stalled after "vgaarb: loaded"."""
import os
import subprocess
import sys

import pytest

from test_linux import KERNEL, boot_linux, e2fs_tool, superblock
from linux_kernel import CMDLINE

pytestmark = [
    pytest.mark.skipif(KERNEL is None, reason="the Linux test kernel is not built: run "
                       "scripts/build-test-kernel.sh (about 5 minutes, cached)"),
    pytest.mark.skipif(e2fs_tool("mke2fs") is None or e2fs_tool("dumpe2fs") is None,
                       reason="needs e2fsprogs (mke2fs, dumpe2fs)"),
    pytest.mark.skipif(not os.environ.get("HVFRAME_SLOW_TESTS"),
                       reason="one Linux boot takes minutes on these hosts; "
                              "HVFRAME_SLOW_TESTS=1 to run them"),
]


def root_image(tmp_path):
    image = tmp_path / "root.img"
    with open(image, "wb") as f:
        f.truncate(24 << 20)
    subprocess.run([e2fs_tool("mke2fs"), "-q", "-F", "-t", "ext2", "-L", "hvroot", str(image)],
                   check=True)
    return image


def serve(spec, sock):
    proc = subprocess.Popen([sys.executable, "-m", "hvframe", "serve-device", "-s", spec,
                             "--socket", str(sock)], stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    assert "on " + str(sock) in line, line
    return proc


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
    proc.wait(10)
    proc.stderr.close()


@pytest.mark.parametrize("device, slot, root, blocks_line, mounted_on", [
    ("virtio-blk,{image}", 2, "/dev/vda",
     "virtio_blk virtio0: [vda] 49152 512-byte logical blocks", "254:0"),
    ("ahci,hd:{image},ser=HVFOOP1", 4, "/dev/sda",
     "sd 0:0:0:0: [sda] 49152 512-byte logical blocks", "8:0"),
])
def test_linux_mounts_ext2_root_served_out_of_process(tmp_path, device, slot, root,
                                                      blocks_line, mounted_on):
    image = root_image(tmp_path)
    before = superblock(image)
    assert before["Mount count"].strip() == "0"
    sock = tmp_path / "dev.sock"
    server = serve(device.format(image=image), sock)
    try:
        out = boot_linux(None, ["-s", "0,hostbridge", "-s", f"{slot},passthru,vfio-user={sock}"],
                         CMDLINE + f" acpi=off root={root} rw", timeout=1200)
    finally:
        stop(server)
    assert blocks_line in out
    assert f"VFS: Mounted root (ext2 filesystem) on device {mounted_on}." in out
    after = superblock(image)
    assert after["Mount count"].strip() == "1"                # written by the server
    assert after["Filesystem state"].strip() == "not clean"    # mounted, never unmounted
