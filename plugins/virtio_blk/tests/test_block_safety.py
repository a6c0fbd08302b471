"""What the block layer promises whatever a guest (or a second VM) does: a failed write-back
keeps failing flushes until the device is reset, two VMs cannot open one image for writing,
opening a disk never hangs, a guest cannot make the host copy more than the device's limits
allow, and a full request queue refuses instead of blocking."""
import errno
import fcntl
import logging
import os
import socket
import struct
import threading
import time
import tracemalloc

import pytest

from hvframe.testing.helpers import requires_kvm, run_hvframe
from hvframe.block import BlockBackend, BlockError
from hvframe.block import backend as backend_mod
from hvframe.errors import ConfigError
from hvframe.virtio import native as virtio_native
from test_virtio_blk import ALL, DISK_SECTORS, Rig, blk_type
from hvframe_virtio_blk.virtio_blk import (MAX_DISCARD_SEGMENTS, MAX_WRITE_ZEROES_SEGMENTS,
                                           S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_IN,
                                           T_OUT, T_WRITE_ZEROES)

MiB = 1 << 20


def make_image(tmp_path, size=MiB, name="disk.img"):
    p = tmp_path / name
    p.write_bytes(bytes((i * 5 + 3) & 0xFF for i in range(size)))
    return str(p)


def fail_fdatasync_once(monkeypatch):
    """os.fdatasync raises EIO on its next call only (as the kernel reports a lost write-back
    once), then works again."""
    real = os.fdatasync
    calls = []

    def fdatasync(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd)

    monkeypatch.setattr(backend_mod.os, "fdatasync", fdatasync)
    return calls


def within(seconds, fn, *args):
    """fn(*args) on a thread; its result or exception, or a failure if it has not returned in
    time (so that a regression that blocks fails the test instead of hanging the suite)."""
    out = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn.__name__}{args} is still blocked"
    if "error" in out:
        raise out["error"]
    return out["value"]


# ------------------------------------------------------------------ sticky write-back errors
def test_failed_flush_keeps_failing_until_cleared(tmp_path, monkeypatch, caplog):
    path = make_image(tmp_path)
    calls = fail_fdatasync_once(monkeypatch)
    with BlockBackend.open(path) as be, caplog.at_level(logging.ERROR, backend_mod.__name__):
        be.write(0, [b"\x11" * 512])
        for _ in range(3):         # fdatasync itself would succeed from the second time on
            with pytest.raises(BlockError) as ei:
                be.flush()
            assert ei.value.kind == BlockError.IO and ei.value.errno == errno.EIO
            assert path in str(ei.value)
        assert be.failed
        assert len(calls) == 1     # the failure is remembered, not re-asked
        # a write-through write promises durability, which a failed flush cannot give
        with pytest.raises(BlockError) as ei:
            be.write(0, [b"\x22" * 512], fua=True)
        assert ei.value.kind == BlockError.IO
        be.write(512, [b"\x33" * 512])           # plain writes still go to the image
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and path in errors[0].getMessage()   # logged once
        be.clear_error()
        assert not be.failed
        be.flush()
        be.write(0, [b"\x44" * 512], fua=True)


def test_write_through_backend_flush_failure_is_sticky(tmp_path, monkeypatch):
    path = make_image(tmp_path)
    fail_fdatasync_once(monkeypatch)
    with BlockBackend.open(path, write_through=True) as be:
        for _ in range(2):
            with pytest.raises(BlockError) as ei:
                be.write(0, [b"\x55" * 512])
            assert ei.value.kind == BlockError.IO
        be.clear_error()
        assert be.write(0, [b"\x55" * 512]) == 512


def test_virtio_blk_flush_error_is_sticky_until_device_reset(tmp_path, monkeypatch):
    r = Rig(tmp_path)
    try:
        assert r.request(T_FLUSH, 0)[0] == S_OK
        fail_fdatasync_once(monkeypatch)
        assert r.request(T_OUT, 1, data=b"\x66" * 512)[0] == S_OK
        assert r.request(T_FLUSH, 0)[0] == S_IOERR
        assert r.request(T_FLUSH, 0)[0] == S_IOERR      # not OK: the data never got there
        assert r.request(T_IN, 1, read_len=512)[0] == S_OK
        r.drv.initialize(ALL)                            # device reset, driver starts over
        assert r.request(T_FLUSH, 0)[0] == S_OK
    finally:
        r.close()


def test_virtio_blk_write_through_writes_fail_after_a_flush_error(tmp_path, monkeypatch):
    # write-through (bhyve's `direct`) writes are normally served natively: after a failed
    # flush they must fail too, not sync again and report success.
    r = Rig(tmp_path, "direct")
    try:
        assert r.request(T_OUT, 2, data=b"\x01" * 512)[0] == S_OK
        fail_fdatasync_once(monkeypatch)
        assert r.request(T_FLUSH, 0)[0] == S_IOERR
        assert r.request(T_OUT, 2, data=b"\x02" * 512)[0] == S_IOERR
        assert r.request(T_FLUSH, 0)[0] == S_IOERR
        r.drv.initialize(ALL)
        assert r.request(T_OUT, 2, data=b"\x03" * 512)[0] == S_OK
        assert r.image()[1024:1536] == b"\x03" * 512
    finally:
        r.close()


@pytest.mark.parametrize("worker_poll", ["default", "long"])
def test_native_write_through_flush_failure_is_sticky(tmp_path, monkeypatch, worker_poll):
    """The native path's own fdatasync (write-through) fails: that write gets IOERR, and later
    writes and FLUSHes fail too although the disk's next fdatasync would succeed (the kernel
    reports a lost write-back once). /dev/null, put under the image's descriptor number, takes
    the write, then refuses fdatasync. dup2 rather than swapping ``backend.fd``: a queue
    worker already polling in its native cycle holds the number it was given. "long" keeps
    the worker in that cycle from one request to the next (interrupts through irqfd, a long
    poll), so the native path itself must refuse the write after the failure."""
    if worker_poll == "long":
        monkeypatch.setattr(virtio_native, "POLL_NS", 500_000_000)
    r = Rig(tmp_path, "direct", irqfd_eventfds=worker_poll == "long")
    be = r.fn.device.backend
    devnull = os.open("/dev/null", os.O_RDWR)
    image = os.dup(be.fd)                   # keeps the image's description (and its lock)
    try:
        assert r.request(T_OUT, 2, data=b"\x01" * 512)[0] == S_OK
        os.dup2(devnull, be.fd)
        try:
            assert r.request(T_OUT, 2, data=b"\x02" * 512)[0] == S_IOERR
        finally:
            os.dup2(image, be.fd)
        # the image's own fdatasync would succeed now: the error must not be forgotten
        assert r.request(T_OUT, 2, data=b"\x03" * 512)[0] == S_IOERR
        assert r.request(T_FLUSH, 0)[0] == S_IOERR
        assert r.request(T_FLUSH, 0)[0] == S_IOERR
        assert r.request(T_IN, 2, read_len=512)[0] == S_OK
        r.drv.initialize(ALL)
        assert r.request(T_FLUSH, 0)[0] == S_OK
        assert r.request(T_OUT, 2, data=b"\x04" * 512)[0] == S_OK
        assert r.image()[1024:1536] == b"\x04" * 512
    finally:
        os.close(image)
        os.close(devnull)
        r.close()


# ------------------------------------------------------------------ image locks
def test_two_read_write_opens_conflict(tmp_path):
    path = make_image(tmp_path)
    with BlockBackend.open(path) as be:
        assert be.locked
        for readonly in (False, True):
            with pytest.raises(ConfigError) as ei:
                BlockBackend.open(path, readonly=readonly)
            msg = str(ei.value)
            assert "\n" not in msg and msg.startswith(path + ": ")
            assert "lock" in msg and "in use by another process" in msg
            assert f"pid {os.getpid()}" in msg          # who holds it, from /proc
            assert "locking=off" in msg
        # an OFD lock stays while other descriptors of the file come and go
        with open(path, "rb") as f:
            f.read(512)
        with pytest.raises(ConfigError, match="lock"):
            BlockBackend.open(path)
    BlockBackend.open(path).close()                     # closing released it


def test_read_only_opens_share_and_keep_writers_out(tmp_path):
    path = make_image(tmp_path)
    with BlockBackend.open(path, readonly=True) as a, BlockBackend.open(path, readonly=True) as b:
        assert a.locked and b.locked
        with pytest.raises(ConfigError, match='"write" lock'):
            BlockBackend.open(path)
    with BlockBackend.open(path) as be:
        assert not be.readonly


def test_locking_off(tmp_path):
    path = make_image(tmp_path)
    with BlockBackend.open(path) as a, BlockBackend.open(path, locking=False) as b:
        assert a.locked and not b.locked
        b.write(0, [b"\x77" * 512])
    from hvframe.block import open_from_options
    dt = blk_type()
    opts = dt.validate(dt.parse_conf(f"{path},locking=off"), where="test")
    with open_from_options(opts) as a, open_from_options(opts) as b:
        assert not a.locked and not b.locked
    opts = dt.validate(dt.parse_conf(f"{path}"), where="test")
    with open_from_options(opts) as a:
        assert a.locked


def test_a_filesystem_without_locks_is_used_unlocked(tmp_path, monkeypatch, caplog):
    path = make_image(tmp_path)

    def no_locks(fd, lock_type):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(backend_mod, "_ofd_lock", no_locks)
    with caplog.at_level(logging.WARNING, backend_mod.__name__), BlockBackend.open(path) as be:
        assert not be.locked
    assert any("unlocked" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ opening never blocks
@pytest.mark.parametrize("readonly", [True, False])
def test_fifo_is_refused_at_once(tmp_path, readonly):
    fifo = str(tmp_path / "disk.fifo")
    os.mkfifo(fifo)
    with pytest.raises(ConfigError) as ei:
        within(10, lambda: BlockBackend.open(fifo, readonly=readonly))
    msg = str(ei.value)
    assert msg.startswith(fifo + ": ") and "FIFO" in msg and "\n" not in msg


def test_socket_and_character_device_are_refused(tmp_path):
    sock_path = str(tmp_path / "disk.sock")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(sock_path)
        with pytest.raises(ConfigError, match="is a socket, not a disk image"):
            within(10, lambda: BlockBackend.open(sock_path))
    finally:
        s.close()
    for readonly in (True, False):
        with pytest.raises(ConfigError, match="is a character device, not a disk image"):
            within(10, lambda: BlockBackend.open("/dev/null", readonly=readonly))


def test_opened_disk_does_blocking_io(tmp_path):
    path = make_image(tmp_path)
    with BlockBackend.open(path) as be:
        assert not fcntl.fcntl(be.fd, fcntl.F_GETFL) & os.O_NONBLOCK


@requires_kvm
@pytest.mark.parametrize("conf", [",ro", ""])
def test_cli_refuses_a_fifo_disk_at_once(tmp_path, conf):
    fifo = str(tmp_path / "disk.fifo")
    os.mkfifo(fifo)
    # run_hvframe's timeout is the deadline: a blocking open fails the test, not the suite
    p = run_hvframe(["run", "-s", "0,hostbridge", "-s", f"2,virtio-blk,{fifo}{conf}"],
                    input="", timeout=60)
    assert p.returncode == 4, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and fifo in lines[0] and "FIFO" in lines[0], p.stderr
    assert "Traceback" not in p.stderr


# ------------------------------------------------------------------ bounded payload copies
def submit_segments(r, rtype, buffers):
    """A DISCARD/WRITE_ZEROES request whose payload is `buffers` [(gpa, length)], through an
    indirect table; returns the status byte."""
    mem, base = r.mem, r.buf
    mem.write(base, struct.pack("<IIQ", rtype, 0, 0))
    status_at = base + 0x800
    mem.write(status_at, b"\xee")
    bufs = [(base, 16, False), *[(gpa, n, False) for gpa, n in buffers], (status_at, 1, True)]
    r.drv.submit(0, bufs, indirect_at=base + 0x1000)
    r.drv.kick(0)
    r.drv.wait_used(0, 1)
    return mem.read(status_at, 1)[0]


@pytest.mark.parametrize("rtype", [T_DISCARD, T_WRITE_ZEROES])
def test_huge_discard_payload_is_refused_without_copying_it(tmp_path, rtype):
    r = Rig(tmp_path)
    try:
        before = r.image()
        ram = r.mem.size
        # 8 descriptors each naming all of guest RAM: a 512 MiB payload from a 64 MiB guest
        huge = [(0, ram)] * 8
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            status = submit_segments(r, rtype, huge)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert status == S_UNSUPP
        assert peak < 8 * MiB, f"serving the request allocated {peak} bytes"
        assert r.image() == before
        assert r.request(T_IN, 0, read_len=512)[0] == S_OK   # still serving
    finally:
        r.close()


def test_segment_limits(tmp_path):
    r = Rig(tmp_path)
    try:
        seg = struct.pack("<QII", 8, 8, 0)
        assert r.request(T_DISCARD, 0, data=seg * MAX_DISCARD_SEGMENTS)[0] == S_OK
        assert r.request(T_DISCARD, 0, data=seg * (MAX_DISCARD_SEGMENTS + 1))[0] == S_UNSUPP
        assert r.request(T_WRITE_ZEROES, 0, data=seg * MAX_WRITE_ZEROES_SEGMENTS)[0] == S_OK
        assert r.request(T_WRITE_ZEROES, 0,
                         data=seg * (MAX_WRITE_ZEROES_SEGMENTS + 1))[0] == S_UNSUPP
        # one past the end among 64 good ones: nothing is changed
        before = r.image()
        bad = struct.pack("<QII", DISK_SECTORS - 1, 2, 0)
        assert r.request(T_DISCARD, 0, data=struct.pack("<QII", 100, 8, 0) * 63 + bad)[0] \
            == S_IOERR
        assert r.image() == before
    finally:
        r.close()


def test_direct_io_bounces_through_a_bounded_buffer(tmp_path, monkeypatch):
    # O_DIRECT with unaligned guest buffers goes through a bounce buffer: its size must not
    # follow the request's (a guest chooses that), only the chunk size.
    path = make_image(tmp_path, 8 * MiB)
    try:
        BlockBackend.open(path, direct=True).close()
    except ConfigError:
        pytest.skip("this filesystem does not support O_DIRECT")
    monkeypatch.setattr(backend_mod, "_BOUNCE_CHUNK", 64 << 10)
    sizes = []
    real_mmap = backend_mod.mmap.mmap
    monkeypatch.setattr(backend_mod.mmap, "mmap",
                        lambda fd, n, *a, **k: (sizes.append(n), real_mmap(fd, n, *a, **k))[1])
    data = bytearray(os.urandom(1 * MiB + 1))
    with BlockBackend.open(path, direct=True) as be:
        src = memoryview(data)[1:]                   # misaligned: needs the bounce
        assert be.write(512, [src[:300 * 1024], src[300 * 1024:]]) == MiB
        out = bytearray(MiB + 1)
        dst = memoryview(out)[1:]
        assert be.read(512, [dst[:1000], dst[1000:]]) == MiB
        assert dst == src
    assert sizes and max(sizes) <= 64 << 10
    with open(path, "rb") as f:
        f.seek(512)
        assert f.read(MiB) == bytes(src)


def test_overlapping_flushes_both_hear_of_a_lost_write_back(tmp_path, monkeypatch):
    """Two flushes at once (two virtio queues, say): the kernel reports a lost write-back to
    one fdatasync only, so the other must wait for it and fail too, not answer OK."""
    path = make_image(tmp_path)
    real = os.fdatasync
    calls = []

    def fdatasync(fd):
        calls.append(fd)
        if len(calls) == 1:
            time.sleep(0.3)
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with BlockBackend.open(path) as be:
        results = {}

        def flush(name):
            try:
                be.flush()
                results[name] = "OK"
            except BlockError as e:
                results[name] = e.kind
        first = threading.Thread(target=flush, args=("first",))
        first.start()
        time.sleep(0.05)
        flush("second")
        first.join(10)
        assert results == {"first": BlockError.IO, "second": BlockError.IO}
