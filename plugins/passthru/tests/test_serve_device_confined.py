"""`hvframe serve-device` is restricted before it serves (hvframe_passthru.confine): Landlock
for the filesystem, a seccomp deny list for the rest. The probes run inside the real server
process (its main(): device built, socket listening, confinement applied), at the point where
it would serve its first client; the device itself is then shown to still work."""
import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from hvframe_passthru import confine
from test_passthru import T_IN, T_OUT, Rig, make_disk

pytestmark = [
    pytest.mark.skipif(confine.landlock_abi() < 1,
                       reason="this kernel has no Landlock (or it is disabled)"),
    pytest.mark.skipif(confine.seccomp is None,
                       reason="pyseccomp/libseccomp (Debian libseccomp2) not available"),
]

# Replaces DeviceServer.serve in the server process: tries what a compromised device model
# might, and sends what happened to the client.
PROBE = r"""
import json, os, socket, subprocess, sys, threading
from hvframe_passthru import server

def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return e.errno

def probe(self, sock):
    other, image, newfile = sys.argv[1], sys.argv[2], sys.argv[3]
    t = threading.Thread(target=lambda: None)
    got = {
        "read another file": attempt(lambda: open(other, "rb").read()),
        "create a file": attempt(lambda: open(newfile, "wb")),
        "reopen its image": attempt(lambda: open(image, "r+b").read(512)),
        "execute a program": attempt(lambda: os.execv("/bin/true", ["true"])),
        "fork": attempt(lambda: os.fork()),
        "new socket": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)),
        "start a thread": attempt(lambda: (t.start(), t.join())),
    }
    sock.sendall(json.dumps(got).encode())
    sock.close()
    return "probed"

server.DeviceServer.serve = probe
sys.exit(server.main(["-s", "virtio-blk," + sys.argv[2], "--socket", sys.argv[4], "--once"]))
"""


def test_the_served_process_cannot_leave_its_bounds(tmp_path, sockdir):
    disk = make_disk(tmp_path / "disk.img")
    other = tmp_path / "secret.txt"
    other.write_text("not the device's")
    sock = os.path.join(sockdir, "s")
    proc = subprocess.Popen([sys.executable, "-c", PROBE, str(other), str(disk),
                             str(tmp_path / "new.txt"), sock],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "(confined: landlock ABI" in line and "seccomp" in line, line
        c = socket.socket(socket.AF_UNIX)
        c.connect(sock)
        got = json.loads(c.makefile("rb").read())
        c.close()
    finally:
        proc.wait(30)
        proc.stderr.close()
    assert got == {
        "read another file": errno.EACCES,        # Landlock
        "create a file": errno.EACCES,
        "reopen its image": "ok",
        "execute a program": errno.EPERM,         # seccomp
        "fork": errno.EPERM,
        "new socket": errno.EPERM,
        "start a thread": "ok",
    }
    assert not (tmp_path / "new.txt").exists()


def test_a_confined_server_still_serves_the_guest(tmp_path):
    rig = Rig(tmp_path)
    try:
        status = dict(line.split(":\t", 1) for line in
                      open(f"/proc/{rig.server.pid}/status").read().splitlines()
                      if ":\t" in line)
        assert status["Seccomp"].strip() == "2" and status["NoNewPrivs"].strip() == "1"
        payload = bytes(range(256)) * 2
        assert rig.request(T_OUT, 9, data=payload) == 0
        assert rig.request(T_IN, 9, read_len=512) == 0 and rig.last == payload
        assert rig.disk.read_bytes()[9 * 512:10 * 512] == payload
    finally:
        rig.close()
