"""Two VMs on one disk image: while `hvframe run` has a virtio-blk disk open read-write, a
second `hvframe run` on the same image stops at once with exit status 4 and one line saying
the image is locked and by whom; once the first one exits the image is free again."""
import os
import subprocess
import time

import pytest

from conftest import hvframe_cmd, requires_kvm, run_hvframe
from hvframe.block import BlockBackend

BIOS = "/usr/share/seabios/bios.bin"

pytestmark = [requires_kvm, pytest.mark.kvm]


def lock_key(path):
    st = os.stat(path)
    return f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "


def wait_until_locked(path, proc, deadline=60.0):
    """Poll /proc/locks until someone holds a lock on path (the first VM opened its disk)."""
    key = lock_key(path)
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        with open("/proc/locks") as f:
            if key in f.read():
                return
        time.sleep(0.05)
    pytest.fail(f"{path} was never locked")


def test_second_vm_on_a_locked_image_exits_4_with_one_line(tmp_path):
    if not os.path.exists(BIOS):
        pytest.skip(f"{BIOS} is missing (apt-get install seabios)")
    disk = str(tmp_path / "shared.img")
    with open(disk, "wb") as f:
        f.truncate(1 << 20)              # no boot sector: SeaBIOS waits, the VM stays up
    first = subprocess.Popen(
        hvframe_cmd() + ["run", "-m", "64M", "-s", "0,hostbridge", "-s", "31,lpc",
                         "-s", f"2,virtio-blk,{disk}", "-l", "com1,stdio",
                         "-l", f"bootrom,{BIOS}", "--timeout", "120"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until_locked(disk, first)
        for conf in ("", ",ro"):         # its write lock keeps readers out too
            p = run_hvframe(["run", "-m", "64M", "-s", "0,hostbridge",
                             "-s", f"2,virtio-blk,{disk}{conf}"], input="", timeout=60)
            assert p.returncode == 4, (p.returncode, p.stderr)
            lines = p.stderr.strip().splitlines()
            assert len(lines) == 1, p.stderr
            assert "Traceback" not in p.stderr
            line = lines[0]
            assert line.startswith("hvframe: ") and disk in line
            assert "lock" in line and "in use by another process" in line
            assert f"pid {first.pid}" in line, line
        assert first.poll() is None      # the first VM is not disturbed
    finally:
        first.terminate()
        try:
            first.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            first.kill()
            first.communicate()
    BlockBackend.open(disk).close()      # its exit released the lock
