"""The block layer shared by the disk devices: raw image backends and the worker pool."""
import errno
import os
import threading
import time

import pytest

from hvframe.block import BlockBackend, BlockError, BlockQueue
from hvframe.block import backend as backend_mod
from hvframe.errors import ConfigError

MiB = 1 << 20


def make_image(tmp_path, size, name="disk.img", data=None):
    p = tmp_path / name
    with open(p, "wb") as f:
        if data is not None:
            f.write(data)
        f.truncate(size)
    return str(p)


def pattern(n, seed=1):
    return bytes((i * 7 + seed + (i >> 9)) & 0xFF for i in range(n))


def split_views(buf, cuts):
    """memoryviews into buf cut at the given (odd) positions."""
    mv = memoryview(buf)
    out, prev = [], 0
    for c in [*cuts, len(buf)]:
        out.append(mv[prev:c])
        prev = c
    return out


# ------------------------------------------------------------------ open / validation
def test_open_properties(tmp_path):
    path = make_image(tmp_path, 8 * MiB)
    with BlockBackend.open(path) as be:
        assert be.size == 8 * MiB
        assert be.sectors == 8 * MiB // 512
        assert be.logical_sector == 512 and be.physical_sector == 512
        assert not be.readonly and be.supports_discard
        assert 0 < len(be.serial) <= 20
    with BlockBackend.open(path, logical_sector=4096, readonly=True) as be:
        assert be.sectors == 2048 and be.physical_sector == 4096
        assert be.readonly and not be.supports_discard
    with BlockBackend.open(path, physical_sector=4096, nodelete=True, serial="ABC123") as be:
        assert be.logical_sector == 512 and be.physical_sector == 4096
        assert not be.supports_discard and be.serial == "ABC123"


def test_default_serial_is_stable(tmp_path):
    a = make_image(tmp_path, MiB, "a.img")
    b = make_image(tmp_path, MiB, "b.img")
    # ro: two read-write opens of one image would conflict on its lock
    with BlockBackend.open(a, readonly=True) as x, BlockBackend.open(a, readonly=True) as y, \
            BlockBackend.open(b) as z:
        assert x.serial == y.serial != z.serial
        assert len(x.serial) <= 20 and x.serial.isprintable()


@pytest.mark.parametrize("kw, words", [
    (dict(logical_sector=1000), "logical sector size 1000"),
    (dict(logical_sector=8192), "logical sector size 8192"),
    (dict(physical_sector=256), "physical sector size 256"),
    (dict(logical_sector=4096, physical_sector=512), "smaller than"),
    (dict(serial="X" * 21), "serial"),
])
def test_bad_parameters_are_config_errors(tmp_path, kw, words):
    path = make_image(tmp_path, MiB)
    with pytest.raises(ConfigError) as ei:
        BlockBackend.open(path, **kw)
    msg = str(ei.value)
    assert path in msg and words in msg and "\n" not in msg


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.img")
    with pytest.raises(ConfigError, match="no such file") as ei:
        BlockBackend.open(path)
    assert path in str(ei.value)


def test_directory_and_empty_and_odd_size(tmp_path):
    with pytest.raises(ConfigError, match="directory"):
        BlockBackend.open(str(tmp_path))
    empty = make_image(tmp_path, 0, "empty.img")
    with pytest.raises(ConfigError, match="empty") as ei:
        BlockBackend.open(empty)
    assert empty in str(ei.value)
    odd = make_image(tmp_path, MiB + 100, "odd.img")
    with pytest.raises(ConfigError, match="not a multiple of the 512-byte") as ei:
        BlockBackend.open(odd)
    assert odd in str(ei.value)
    half = make_image(tmp_path, 4096 + 512, "half.img")
    BlockBackend.open(half).close()
    with pytest.raises(ConfigError, match="4096-byte"):
        BlockBackend.open(half, logical_sector=4096)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_permissions(tmp_path):
    path = make_image(tmp_path, MiB)
    os.chmod(path, 0o444)
    with pytest.raises(ConfigError, match="not writable.*ro") as ei:
        BlockBackend.open(path)
    assert path in str(ei.value)
    BlockBackend.open(path, readonly=True).close()
    os.chmod(path, 0o000)
    with pytest.raises(ConfigError, match="not readable"):
        BlockBackend.open(path, readonly=True)


@pytest.mark.parametrize("err, readonly, words", [
    (PermissionError(errno.EACCES, "Permission denied"), False, "not writable"),
    (PermissionError(errno.EACCES, "Permission denied"), True, "not readable"),
    (OSError(errno.EROFS, "Read-only file system"), False, "read-only filesystem"),
    (OSError(errno.ELOOP, "Too many levels of symbolic links"), False, "symbolic links"),
])
def test_open_errors_name_the_path(tmp_path, monkeypatch, err, readonly, words):
    path = make_image(tmp_path, MiB)

    def fake_open(p, flags, *a):
        raise err

    monkeypatch.setattr(backend_mod.os, "open", fake_open)
    with pytest.raises(ConfigError, match=words) as ei:
        BlockBackend.open(path, readonly=readonly)
    assert str(ei.value).startswith(path + ":") and "\n" not in str(ei.value)


def test_odirect_unsupported_is_config_error(tmp_path, monkeypatch):
    path = make_image(tmp_path, MiB)
    real_open = os.open

    def fake_open(p, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), p)
        return real_open(p, flags, *a)

    monkeypatch.setattr(backend_mod.os, "open", fake_open)
    with pytest.raises(ConfigError, match="O_DIRECT") as ei:
        BlockBackend.open(path, direct=True)
    assert path in str(ei.value) and "\n" not in str(ei.value)
    BlockBackend.open(path).close()          # without direct it opens


# ------------------------------------------------------------------ I/O
def test_scatter_gather_round_trip(tmp_path):
    path = make_image(tmp_path, 4 * MiB)
    data = bytearray(pattern(3 * 4096))
    with BlockBackend.open(path) as be:
        src = split_views(data, [1, 511, 1000, 4097, 7777])
        assert be.write(8192, src) == len(data)
        out = bytearray(len(data))
        dst = split_views(out, [3, 4096, 4099, 10000])
        assert be.read(8192, dst) == len(data)
        assert out == data
        # an untouched region reads back zeros
        z = bytearray(b"\xff" * 1024)
        be.read(MiB, [z])
        assert z == bytes(1024)
    with open(path, "rb") as f:
        f.seek(8192)
        assert f.read(len(data)) == data


def test_many_buffers_beyond_iov_max(tmp_path):
    path = make_image(tmp_path, 4 * MiB)
    n = backend_mod.IOV_MAX * 2 + 3
    data = pattern(512 * n, seed=5)
    with BlockBackend.open(path) as be:
        be.write(0, [memoryview(data)[i * 512:(i + 1) * 512] for i in range(n)])
        out = bytearray(len(data))
        be.read(0, split_views(out, list(range(256, len(out), 512))))
        assert out == data


def test_direct_io_with_unaligned_buffers(tmp_path):
    path = make_image(tmp_path, 4 * MiB)
    try:
        be = BlockBackend.open(path, direct=True)
    except ConfigError as e:
        pytest.skip(f"no O_DIRECT here: {e}")
    data = bytearray(pattern(8192, seed=9))
    with be:
        be.write(4096, split_views(data, [7, 600, 5000]))
        out = bytearray(8192)
        be.read(4096, split_views(out, [13, 4100]))
        assert out == data


def test_readonly_refuses_writes(tmp_path):
    path = make_image(tmp_path, MiB, data=b"keep" * 128)
    with BlockBackend.open(path, readonly=True) as be:
        for call in (lambda: be.write(0, [bytes(512)]),
                     lambda: be.discard(0, 512),
                     lambda: be.write_zeroes(0, 512)):
            with pytest.raises(BlockError) as ei:
                call()
            assert ei.value.kind == BlockError.READONLY
        buf = bytearray(512)
        be.read(0, [buf])
        assert buf == b"keep" * 128
        be.flush()                          # harmless on a read-only disk


@pytest.mark.parametrize("offset, length", [
    (MiB, 512),                 # starts at the end
    (MiB - 512, 1024),          # runs past the end
    (-512, 512),
    (100, 512),                 # offset not sector aligned
    (0, 100),                   # length not sector aligned
])
def test_out_of_range_refused(tmp_path, offset, length):
    path = make_image(tmp_path, MiB)
    with BlockBackend.open(path) as be:
        for call in (lambda: be.read(offset, [bytearray(length)]),
                     lambda: be.write(offset, [bytes(length)]),
                     lambda: be.discard(offset, length),
                     lambda: be.write_zeroes(offset, length)):
            with pytest.raises(BlockError) as ei:
                call()
            assert ei.value.kind == BlockError.RANGE
    assert os.path.getsize(path) == MiB


def test_short_read_after_truncation_is_io_error(tmp_path):
    path = make_image(tmp_path, MiB)
    with BlockBackend.open(path) as be:
        os.truncate(path, MiB // 2)
        with pytest.raises(BlockError) as ei:
            be.read(MiB - 1024, [bytearray(1024)])
        assert ei.value.kind == BlockError.IO


def test_io_errors_are_block_errors(tmp_path, monkeypatch):
    path = make_image(tmp_path, MiB)

    def fail(*a):
        raise OSError(errno.EIO, "Input/output error")

    with BlockBackend.open(path) as be:
        monkeypatch.setattr(backend_mod.os, "preadv", fail)
        monkeypatch.setattr(backend_mod.os, "pwritev", fail)
        monkeypatch.setattr(backend_mod.os, "fdatasync", fail)
        for call in (lambda: be.read(0, [bytearray(512)]),
                     lambda: be.write(0, [bytes(512)]),
                     be.flush):
            with pytest.raises(BlockError) as ei:
                call()
            assert ei.value.kind == BlockError.IO and ei.value.errno == errno.EIO


def written_image(tmp_path, size):
    """A fully allocated image (no holes)."""
    path = str(tmp_path / "full.img")
    with open(path, "wb") as f:
        f.write(pattern(size, seed=3))
        f.flush()
        os.fsync(f.fileno())
    return path


def test_discard_keeps_file_sparse(tmp_path):
    path = written_image(tmp_path, 4 * MiB)
    before = os.stat(path).st_blocks
    with BlockBackend.open(path) as be:
        be.discard(MiB, 2 * MiB)
        be.flush()
        after = os.stat(path).st_blocks
        assert after * 512 <= before * 512 - 2 * MiB + 64 * 1024
        assert os.path.getsize(path) == 4 * MiB and be.size == 4 * MiB
        buf = bytearray(b"\x55" * 4096)
        be.read(2 * MiB, [buf])
        assert buf == bytes(4096)
        head = bytearray(512)
        be.read(0, [head])
        assert head == pattern(4 * MiB, seed=3)[:512]


def test_discard_refused_with_nodelete(tmp_path):
    path = written_image(tmp_path, MiB)
    with BlockBackend.open(path, nodelete=True) as be:
        with pytest.raises(BlockError) as ei:
            be.discard(0, 4096)
        assert ei.value.kind == BlockError.UNSUPPORTED
        # write_zeroes still works, but unmap is ignored (the data is zeroed in place)
        be.write_zeroes(0, 4096, unmap=True)
        buf = bytearray(b"\x01" * 4096)
        be.read(0, [buf])
        assert buf == bytes(4096)


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes_reads_back_zeros(tmp_path, unmap):
    path = written_image(tmp_path, 2 * MiB)
    data = pattern(2 * MiB, seed=3)
    with BlockBackend.open(path) as be:
        be.write_zeroes(4096, 8192, unmap=unmap)
        out = bytearray(16384)
        be.read(0, [out])
        assert out[:4096] == data[:4096]
        assert out[4096:12288] == bytes(8192)
        assert out[12288:] == data[12288:16384]
        assert be.size == 2 * MiB and os.path.getsize(path) == 2 * MiB


def test_write_zeroes_falls_back_to_writing(tmp_path, monkeypatch):
    path = written_image(tmp_path, 2 * MiB)
    # A file system with no fallocate(2) modes at all: punching and zeroing both refused.
    monkeypatch.setattr(BlockBackend, "_fallocate", lambda self, *a: errno.EOPNOTSUPP)
    data = pattern(2 * MiB, seed=3)
    with BlockBackend.open(path) as be:
        be.write_zeroes(512, MiB + 512, unmap=True)
        assert not be.supports_discard          # learnt: discard is no longer offered
        out = bytearray(2 * MiB)
        be.read(0, [out])
        assert out[:512] == data[:512]
        assert out[512:MiB + 1024] == bytes(MiB + 512)
        assert out[MiB + 1024:] == data[MiB + 1024:]


def test_refresh_size_detects_resize(tmp_path):
    path = make_image(tmp_path, MiB)
    with BlockBackend.open(path) as be:
        assert not be.refresh_size()
        os.truncate(path, 2 * MiB)
        assert be.refresh_size()
        assert be.size == 2 * MiB and be.sectors == 4096
        assert not be.refresh_size()
        be.write(MiB, [bytes(512)])           # the new space is usable
        os.truncate(path, 2 * MiB + 100)      # a partial sector is not exposed
        assert not be.refresh_size()
        os.truncate(path, MiB // 2)
        assert be.refresh_size() and be.size == MiB // 2
        with pytest.raises(BlockError) as ei:
            be.read(MiB // 2, [bytearray(512)])
        assert ei.value.kind == BlockError.RANGE


def test_closed_backend(tmp_path):
    path = make_image(tmp_path, MiB)
    be = BlockBackend.open(path)
    be.close()
    be.close()
    with pytest.raises(BlockError) as ei:
        be.read(0, [bytearray(512)])
    assert ei.value.kind == BlockError.CLOSED


def test_settle_flushes_for_a_checkpoint_and_keeps_a_failed_write_back(tmp_path, monkeypatch):
    """What a device's quiesce calls: writes made durable; a closed or read-only image is
    left alone; a failed write-back does not raise there but stays, so the next flush
    still fails (and the device's record carries `failed`)."""
    path = make_image(tmp_path, MiB)
    be = BlockBackend.open(path)
    syncs = []
    real = os.fdatasync
    monkeypatch.setattr(backend_mod.os, "fdatasync", lambda fd: syncs.append(fd) or real(fd))
    be.settle()
    assert len(syncs) == 1 and not be.failed

    def fail(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(backend_mod.os, "fdatasync", fail)
    be.settle()                                    # not raised...
    assert be.failed
    with pytest.raises(BlockError) as ei:          # ...and not forgotten
        be.flush()
    assert ei.value.kind == BlockError.IO
    be.close()
    be.settle()                                    # closed: nothing to do, nothing raised
    ro = BlockBackend.open(path, readonly=True)
    monkeypatch.setattr(backend_mod.os, "fdatasync", lambda fd: syncs.append(fd))
    ro.settle()
    assert len(syncs) == 1
    ro.close()


# ------------------------------------------------------------------ worker pool
def test_queue_runs_off_the_calling_thread(tmp_path):
    path = make_image(tmp_path, MiB)
    me = threading.get_ident()
    seen = []
    done = threading.Event()
    with BlockBackend.open(path) as be, BlockQueue(be, workers=2) as q:
        def req():
            seen.append(("run", threading.get_ident()))
            return be.write(0, [bytes(1024)])

        def cb(result):
            seen.append(("cb", threading.get_ident(), result))
            done.set()

        q.submit(req, callback=cb)
        assert done.wait(5)
    assert seen[0][0] == "run" and seen[0][1] != me
    assert seen[1] == ("cb", seen[0][1], 1024)


def test_queue_callbacks_in_completion_order_and_errors(tmp_path):
    path = make_image(tmp_path, MiB)
    gate = threading.Event()
    order = []
    with BlockBackend.open(path) as be, BlockQueue(be, workers=2) as q:
        def slow():
            assert gate.wait(5)
            return "slow"

        q.submit(slow, callback=order.append)
        q.submit(lambda: "fast", callback=order.append)
        deadline = time.monotonic() + 5
        while not order and time.monotonic() < deadline:
            time.sleep(0.005)
        assert order == ["fast"]
        gate.set()
        assert q.drain(5)
        assert order == ["fast", "slow"]
        # errors arrive as BlockError values, never as exceptions on the worker
        got = []
        q.submit(be.read, MiB, [bytearray(512)], callback=got.append)
        q.submit(lambda: os.read(-1, 1), callback=got.append)

        def buggy():
            raise ValueError("oops")

        q.submit(buggy, callback=got.append)
        assert q.drain(5)
        assert len(got) == 3 and all(isinstance(r, BlockError) for r in got)
        assert {r.kind for r in got} == {BlockError.RANGE, BlockError.IO}
        assert q.pending == 0


def test_write_acknowledged_only_after_data_is_on_the_backend(tmp_path, monkeypatch):
    path = make_image(tmp_path, MiB)
    events = []
    real_sync = os.fdatasync
    monkeypatch.setattr(backend_mod.os, "fdatasync",
                        lambda fd: (events.append("sync"), real_sync(fd))[1])
    data = pattern(4096, seed=11)
    with BlockBackend.open(path, write_through=True) as be, BlockQueue(be, workers=1) as q:
        def cb(result):
            with open(path, "rb") as f:
                events.append(("cb", result, f.read(4096) == data))

        q.submit(be.write, 0, [data], callback=cb)
        assert q.drain(5)
    assert events == ["sync", ("cb", 4096, True)]
    events.clear()
    with BlockBackend.open(path) as be:
        be.write(0, [data])
        assert events == []
        be.write(0, [data], fua=True)
        assert events == ["sync"]


def test_full_queue_refuses_at_once(tmp_path):
    # A device submits while holding its own lock, which a worker may need to finish: a full
    # queue must answer BUSY (the device's error status) instead of waiting for room.
    gate, started = threading.Event(), threading.Event()
    q = BlockQueue(None, workers=1, depth=1)
    results = []

    def busy():
        started.set()
        return gate.wait(5)

    q.submit(busy, callback=results.append)                # the worker is busy with this
    assert started.wait(5)
    q.submit(lambda: 2, callback=results.append)           # fills the queue
    refused = []

    def third():
        try:
            q.submit(lambda: 3, callback=results.append)
        except BlockError as e:
            refused.append(e)

    t = threading.Thread(target=third)
    t.start()
    t.join(5)                                              # a deadline, should it block
    assert not t.is_alive()
    assert [e.kind for e in refused] == [BlockError.BUSY]
    with pytest.raises(BlockError) as ei:
        q.submit_many([(lambda: 4, (), results.append)])
    assert ei.value.kind == BlockError.BUSY
    assert q.pending == 2                                  # the refused ones never count
    gate.set()
    assert q.drain(5)
    q.submit(lambda: 5, callback=results.append)           # room again
    q.close()
    assert results == [True, 2, 5]                         # the refused requests never ran


def test_close_drains_pending_work(tmp_path):
    path = make_image(tmp_path, MiB)
    done = []
    lock = threading.Lock()
    with BlockBackend.open(path) as be:
        q = BlockQueue(be, workers=3, depth=64)           # room for all 40: a full queue refuses

        def req(i):
            time.sleep(0.002)
            return be.write(i * 512, [bytes([i]) * 512])

        def cb(result):
            with lock:
                done.append(result)

        for i in range(40):
            q.submit(req, i, callback=cb)
        q.close()
        assert len(done) == 40 and all(r == 512 for r in done)
        assert q.pending == 0
        with pytest.raises(BlockError) as ei:
            q.submit(req, 0, callback=cb)
        assert ei.value.kind == BlockError.CLOSED
        q.close()                                          # closing twice is fine
        buf = bytearray(512)
        be.read(39 * 512, [buf])
        assert buf == bytes([39]) * 512


# ------------------------------------------------------------------ worker pool: failures
class WorkerBug(BaseException):
    """Escapes run_request (which turns Exceptions into BlockError): kills the worker."""


def queue_threads(name):
    from hvframe import concurrency
    return [t for t in concurrency.live_threads() if t.name.startswith(f"{name}-worker-")]


class Answers:
    """Callbacks that record (tag, result); wait() until n arrived."""

    def __init__(self):
        self.got = []
        self.cond = threading.Condition()

    def cb(self, tag):
        def callback(result):
            with self.cond:
                self.got.append((tag, result))
                self.cond.notify_all()
        return callback

    def wait(self, n, timeout=5):
        with self.cond:
            self.cond.wait_for(lambda: len(self.got) >= n, timeout)
            return dict(self.got)


def test_a_worker_dying_of_a_bug_still_answers_its_request_and_the_rest_keep_serving(caplog):
    q = BlockQueue(None, workers=2, depth=64, name="bugq")
    answers = Answers()

    def bug():
        raise WorkerBug("device model bug")

    q.submit(bug, callback=answers.cb("bug"))
    for i in range(20):
        q.submit(lambda i=i: i, callback=answers.cb(i))
    got = answers.wait(21)
    assert len(answers.got) == 21                         # every request answered, once
    err = got["bug"]
    assert isinstance(err, BlockError) and err.kind == BlockError.IO
    assert "WorkerBug" in str(err)
    assert [got[i] for i in range(20)] == list(range(20))
    assert q.drain(5) and q.pending == 0
    assert q.workers_alive == 1                            # one died, one keeps serving
    assert "bugq-worker-" in caplog.text and "died" in caplog.text
    more = Answers()
    for i in range(5):
        q.submit(lambda i=i: i * 10, callback=more.cb(i))
    assert more.wait(5) == {i: i * 10 for i in range(5)}
    started = time.monotonic()
    q.close()
    assert time.monotonic() - started < 2.0
    assert queue_threads("bugq") == []


def test_a_bug_in_the_worker_path_fails_the_request_with_io(monkeypatch):
    # Not the request: the worker's own code raises (a plain Exception this time).
    real = backend_mod.run_request
    calls = []

    def buggy_run_request(fn, args):
        calls.append(fn)
        if len(calls) == 1:
            raise RuntimeError("bug in the worker path")
        return real(fn, args)

    monkeypatch.setattr(backend_mod, "run_request", buggy_run_request)
    q = BlockQueue(None, workers=2, name="pathbug")
    answers = Answers()
    q.submit(lambda: "first", callback=answers.cb("first"))
    q.submit(lambda: "second", callback=answers.cb("second"))
    got = answers.wait(2)
    assert got["second"] == "second"
    assert isinstance(got["first"], BlockError) and got["first"].kind == BlockError.IO
    assert "bug in the worker path" in str(got["first"])
    q.close()
    assert queue_threads("pathbug") == []


def test_with_every_worker_dead_queued_requests_fail_and_new_ones_are_refused():
    gate, started = threading.Event(), threading.Event()
    q = BlockQueue(None, workers=1, depth=16, name="deadq")
    answers = Answers()

    def bug():
        started.set()
        assert gate.wait(5)
        raise WorkerBug("worker killed")

    q.submit(bug, callback=answers.cb("bug"))
    assert started.wait(5)
    for i in range(3):                                     # queued behind the doomed worker
        q.submit(lambda i=i: i, callback=answers.cb(i))
    q.submit_many([(lambda: "m0", (), answers.cb("m0")), (lambda: "m1", (), answers.cb("m1"))])
    gate.set()
    got = answers.wait(6)
    assert set(got) == {"bug", 0, 1, 2, "m0", "m1"}
    assert all(isinstance(r, BlockError) and r.kind == BlockError.IO for r in got.values())
    assert q.drain(5) and q.pending == 0
    with pytest.raises(BlockError) as ei:                  # refused with a clear error
        q.submit(lambda: 0, callback=answers.cb("late"))
    assert ei.value.kind == BlockError.IO
    assert "no workers left" in str(ei.value) and "worker killed" in str(ei.value)
    assert "late" not in dict(answers.got)
    started_at = time.monotonic()
    q.close()
    assert time.monotonic() - started_at < 2.0
    assert queue_threads("deadq") == []


def test_a_bug_inside_a_batch_answers_the_rest_of_the_batch():
    q = BlockQueue(None, workers=1, name="batchq")
    answers = Answers()

    def bug():
        raise WorkerBug("in the middle")

    q.submit_many([(lambda: "a", (), answers.cb("a")), (bug, (), answers.cb("bug")),
                   (lambda: "c", (), answers.cb("c"))])
    got = answers.wait(3)
    assert len(answers.got) == 3                           # each answered exactly once
    assert got["a"] == "a"                                 # ran before the bug: its result
    assert got["bug"].kind == BlockError.IO and got["c"].kind == BlockError.IO
    q.close()
    assert queue_threads("batchq") == []


def test_a_callback_that_kills_its_worker_is_not_called_twice():
    q = BlockQueue(None, workers=2, name="cbq")
    calls = []

    def deadly(result):
        calls.append(result)
        raise WorkerBug("callback bug")

    q.submit(lambda: 1, callback=deadly)
    assert q.drain(5)
    assert calls == [1]
    answers = Answers()
    q.submit(lambda: 2, callback=answers.cb("next"))       # the other worker serves it
    assert answers.wait(1) == {"next": 2}
    q.close()
    assert queue_threads("cbq") == []


def test_close_does_not_hang_on_a_stuck_request():
    release = threading.Event()
    q = BlockQueue(None, workers=1, depth=8, name="stuckq")
    answers = Answers()
    q.submit(lambda: release.wait(10), callback=answers.cb("stuck"))
    q.submit(lambda: "never", callback=answers.cb("queued"))
    started = time.monotonic()
    q.close(deadline=0.3)                                  # no progress for 0.3 s: give up
    assert time.monotonic() - started < 2.0
    got = answers.wait(1)
    assert got["queued"].kind == BlockError.CLOSED        # never ran, still answered
    release.set()
    assert answers.wait(2)["stuck"] is True                # the stuck one finishes later
    deadline = time.monotonic() + 5
    while queue_threads("stuckq") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert queue_threads("stuckq") == []


def test_close_from_a_completion_callback_returns():
    q = BlockQueue(None, workers=2, name="selfq")
    closed = threading.Event()

    def cb(result):
        q.close()
        closed.set()

    q.submit(lambda: 1, callback=cb)
    assert closed.wait(5)
    with pytest.raises(BlockError) as ei:
        q.submit(lambda: 2, callback=cb)
    assert ei.value.kind == BlockError.CLOSED
    deadline = time.monotonic() + 5
    while queue_threads("selfq") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert queue_threads("selfq") == []


def test_a_paused_queue_runs_nothing_until_resumed():
    q = BlockQueue(None, workers=2, name="pauseq")
    try:
        for t in q._threads:
            assert t.pause(2.0)                            # idle workers park promptly
        answers = Answers()
        q.submit(lambda: "x", callback=answers.cb("x"))
        time.sleep(0.2)
        assert answers.got == []
        for t in q._threads:
            t.resume()
        assert answers.wait(1) == {"x": "x"}
    finally:
        q.close()
    assert queue_threads("pauseq") == []


# ------------------------------------------------------------------ shared device options
def test_block_options_parse_like_bhyve(tmp_path):
    from hvframe.block import BlockOptions, open_from_options
    from hvframe.device import DeviceType

    path = make_image(tmp_path, MiB)
    # Any device's options can include the block options (virtio-blk's and AHCI's ports do).
    dt = DeviceType("test-disk", "lpc", factory=lambda m, o: None, options=BlockOptions)
    opts = dt.validate(dt.parse_conf(f"{path},ro,nocache,sectorsize=512/4096,ser=XY1"))
    with open_from_options(opts) as be:
        assert be.readonly and be.direct and not be.write_through
        assert (be.logical_sector, be.physical_sector) == (512, 4096)
        assert be.serial == "XY1"
    opts = dt.validate(dt.parse_conf(f"{path},direct,nodelete,sectorsize=4096"))
    with open_from_options(opts) as be:
        assert be.write_through and not be.direct and not be.supports_discard
        assert be.logical_sector == be.physical_sector == 4096
    with pytest.raises(ConfigError, match="sectorsize"):
        open_from_options(dt.validate(dt.parse_conf(f"{path},sectorsize=big")), "-s 3")
    with pytest.raises(ConfigError, match="needs path"):
        dt.validate(dt.parse_conf("ro"))


def test_the_cores_fallocate_returns_the_errno_of_a_failure(tmp_path):
    """hv_fallocate, the backend's fallocate(2): 0 when done, else the call's errno (which
    the backend maps to its errors), never an exception or a silent success."""
    from hvframe.block.backend import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
    from hvframe.core_native import lib
    punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    path = written_image(tmp_path, MiB)
    fd = os.open(path, os.O_RDWR)
    try:
        err = lib.hv_fallocate(fd, punch, 4096, 8192)
        if err == errno.EOPNOTSUPP:
            pytest.skip(f"{tmp_path}'s file system cannot punch holes")
        assert err == 0
        with open(path, "rb") as f:
            f.seek(4096)
            assert f.read(8192) == bytes(8192)
        assert lib.hv_fallocate(fd, punch, -1, 4096) == errno.EINVAL
        ro = os.open(path, os.O_RDONLY)
        try:
            assert lib.hv_fallocate(ro, punch, 0, 4096) == errno.EBADF
        finally:
            os.close(ro)
        r, w = os.pipe()
        try:
            assert lib.hv_fallocate(w, punch, 0, 4096) == errno.ESPIPE
        finally:
            os.close(r)
            os.close(w)
    finally:
        os.close(fd)
    assert lib.hv_fallocate(-1, punch, 0, 4096) == errno.EBADF      # no descriptor
