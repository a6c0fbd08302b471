"""Raw disk images (regular files or block devices) for the disk devices.

`BlockBackend.open(path, ...)` checks the image once and raises ConfigError (one line naming
the path) for anything the user has to fix. Afterwards every request goes through
`read`/`write`/`flush`/`discard`/`write_zeroes`, which take byte offsets and lists of
buffers (memoryviews of guest memory) and either transfer everything or raise `BlockError`,
whose `kind` the device turns into its own status code. No OSError escapes a request.

`BlockQueue` is a bounded pool of worker threads: a device submits a request from the vCPU
thread and gets `callback(result_or_BlockError)` on a worker once the request is done, so an
acknowledged write has returned from pwritev (and from fdatasync when write-through was asked).
"""
from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import os
import queue
import stat
import threading
from typing import Any, Callable, Sequence

from cffi import FFI

from ..device import Option
from ..errors import ConfigError

log = logging.getLogger(__name__)

# fallocate(2) is not wrapped by Python's os module (only posix_fallocate, which cannot
# punch holes), so it is called through cffi in ABI mode.
_ffi = FFI()
_ffi.cdef("int fallocate(int fd, int mode, int64_t offset, int64_t len);")
try:
    _libc: Any = _ffi.dlopen(None)
    _libc.fallocate  # noqa: B018 - resolve the symbol now
except (OSError, AttributeError):  # pragma: no cover - non-glibc oddities
    _libc = None

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

IOV_MAX = 1024
SECTOR_SIZES = (512, 1024, 2048, 4096)
SERIAL_MAX = 20
_ZERO_CHUNK = 1 << 20
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENOTTY, errno.EINVAL,
                  errno.ENODEV)


class BlockError(Exception):
    """A failed request. `kind` is one of the class constants; devices map it to a status."""

    RANGE = "range"              # offset/length outside the disk or not sector aligned
    IO = "io"                    # the host read/write/flush failed (errno kept in .errno)
    READONLY = "readonly"        # a modifying request on a read-only backend
    UNSUPPORTED = "unsupported"  # discard/write-zeroes the backend cannot do
    CLOSED = "closed"            # the backend or queue is closed

    def __init__(self, kind: str, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.errno = err

    def __repr__(self) -> str:
        return f"BlockError({self.kind!r}, {str(self)!r})"


def _as_bytes_view(buf: Any) -> memoryview:
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv


def views_after(bufs: list[memoryview], n: int) -> list[memoryview]:
    """The buffers left after their first n bytes (transferred, or a header already read)."""
    i = 0
    while i < len(bufs) and n >= len(bufs[i]):
        n -= len(bufs[i])
        i += 1
    rest = bufs[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest


def _address(mv: memoryview) -> int:
    return int(_ffi.cast("uintptr_t", _ffi.from_buffer(mv)))


def default_serial(path: str) -> str:
    """A stable serial number for an image: the same path gives the same serial."""
    real = os.path.realpath(path)
    return "HV" + hashlib.sha1(real.encode("utf-8", "surrogateescape")).hexdigest()[:SERIAL_MAX - 2].upper()


class BlockBackend:
    """An open raw image. Build with `BlockBackend.open(...)`."""

    def __init__(self, fd: int, path: str, *, size: int, readonly: bool, direct: bool,
                 logical_sector: int, physical_sector: int, nodelete: bool, serial: str,
                 is_blockdev: bool, write_through: bool = False) -> None:
        self.fd = fd
        self.path = path
        self.size = size
        self.readonly = readonly
        self.direct = direct
        self.logical_sector = logical_sector
        self.physical_sector = physical_sector
        self.nodelete = nodelete
        self.serial = serial
        self.is_blockdev = is_blockdev
        self.write_through = write_through
        self._discard_ok = True       # cleared when the host says it cannot punch holes
        self._zero_range_ok = True    # cleared when FALLOC_FL_ZERO_RANGE is refused
        self._zeros: mmap.mmap | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str, *, readonly: bool = False, direct: bool = False,
             logical_sector: int = 512, physical_sector: int | None = None,
             nodelete: bool = False, serial: str | None = None,
             write_through: bool = False) -> "BlockBackend":
        path = os.fspath(path)
        if logical_sector not in SECTOR_SIZES:
            raise ConfigError(f"{path}: bad logical sector size {logical_sector} "
                              f"(use one of {', '.join(map(str, SECTOR_SIZES))})")
        if physical_sector is None:
            physical_sector = logical_sector
        if physical_sector not in SECTOR_SIZES:
            raise ConfigError(f"{path}: bad physical sector size {physical_sector} "
                              f"(use one of {', '.join(map(str, SECTOR_SIZES))})")
        if physical_sector < logical_sector:
            raise ConfigError(f"{path}: physical sector size {physical_sector} is smaller than "
                              f"the logical sector size {logical_sector}")
        if serial is None:
            serial = default_serial(path)
        elif len(serial) > SERIAL_MAX or not all(32 <= ord(c) < 127 for c in serial):
            raise ConfigError(f"{path}: serial {serial!r} must be at most {SERIAL_MAX} "
                              f"printable ASCII characters")

        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory, not a disk image") from None
        except PermissionError:
            if readonly:
                raise ConfigError(f"{path}: not readable (permission denied)") from None
            raise ConfigError(f"{path}: not writable (permission denied); "
                              f"open it read-only with ro") from None
        except OSError as e:
            if e.errno == errno.EROFS:
                raise ConfigError(f"{path}: on a read-only filesystem; open it read-only "
                                  f"with ro") from None
            if direct and e.errno == errno.EINVAL:
                raise ConfigError(f"{path}: this filesystem does not support O_DIRECT; "
                                  f"open it without direct") from None
            raise ConfigError(f"{path}: cannot open: {e.strerror}") from None
        try:
            return cls._checked(fd, path, readonly=readonly, direct=direct,
                                logical_sector=logical_sector,
                                physical_sector=physical_sector, nodelete=nodelete,
                                serial=serial, write_through=write_through)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _checked(cls, fd: int, path: str, **kw: Any) -> "BlockBackend":
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            is_blockdev = True
            size = os.lseek(fd, 0, os.SEEK_END)
        elif stat.S_ISREG(st.st_mode):
            is_blockdev = False
            size = st.st_size
        else:
            raise ConfigError(f"{path}: not a regular file or block device")
        logical = kw["logical_sector"]
        if size == 0:
            raise ConfigError(f"{path}: the image is empty (size 0)")
        if size % logical:
            raise ConfigError(f"{path}: size {size} is not a multiple of the "
                              f"{logical}-byte sector size")
        be = cls(fd, path, size=size, is_blockdev=is_blockdev, **kw)
        if kw["direct"]:
            be._probe_direct()
        return be

    def _probe_direct(self) -> None:
        """Read the first sector with O_DIRECT: some filesystems accept the flag at open time
        and only refuse the I/O, and a device with larger sectors refuses small ones."""
        probe = mmap.mmap(-1, max(self.logical_sector, mmap.PAGESIZE))
        try:
            os.preadv(self.fd, [memoryview(probe)[:self.logical_sector]], 0)
        except OSError as e:
            raise ConfigError(f"{self.path}: direct I/O with {self.logical_sector}-byte sectors "
                              f"failed ({e.strerror}); the filesystem or device does not "
                              f"support it, open it without direct") from None
        finally:
            probe.close()

    # ---------------------------------------------------------------- properties
    @property
    def sectors(self) -> int:
        """Capacity in logical sectors."""
        return self.size // self.logical_sector

    @property
    def supports_discard(self) -> bool:
        return not (self.nodelete or self.readonly) and self._discard_ok and _libc is not None

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def __repr__(self) -> str:
        return (f"BlockBackend({self.path!r}, size={self.size}, sector={self.logical_sector}/"
                f"{self.physical_sector}{', ro' if self.readonly else ''}"
                f"{', direct' if self.direct else ''})")

    # ---------------------------------------------------------------- checks
    def _check(self, offset: int, length: int, *, write: bool) -> None:
        if self.fd < 0:
            raise BlockError(BlockError.CLOSED, f"{self.path}: backend is closed")
        if write and self.readonly:
            raise BlockError(BlockError.READONLY, f"{self.path}: disk is read-only")
        ls = self.logical_sector
        if offset < 0 or length < 0 or offset % ls or length % ls:
            raise BlockError(BlockError.RANGE, f"{self.path}: offset {offset} length {length} "
                             f"is not aligned to {ls}-byte sectors")
        if offset + length > self.size:
            raise BlockError(BlockError.RANGE, f"{self.path}: offset {offset} length {length} "
                             f"is past the end of the disk ({self.size} bytes)")

    def _io_error(self, what: str, e: OSError) -> BlockError:
        return BlockError(BlockError.IO, f"{self.path}: {what} failed: {e.strerror or e}",
                          e.errno)

    def _needs_bounce(self, bufs: list[memoryview]) -> bool:
        if not self.direct:
            return False
        ls = self.logical_sector
        return any(len(b) % ls or _address(b) % ls for b in bufs)

    # ---------------------------------------------------------------- I/O
    def read(self, offset: int, bufs: Sequence[Any]) -> int:
        """Fill bufs, in order, from the disk at byte `offset`; returns the byte count."""
        views = [v for v in map(_as_bytes_view, bufs) if len(v)]
        total = sum(len(v) for v in views)
        self._check(offset, total, write=False)
        if not total:
            return 0
        if self._needs_bounce(views):
            bounce = mmap.mmap(-1, total)
            try:
                self._preadv_all(offset, [memoryview(bounce)])
                pos = 0
                for v in views:
                    v[:] = bounce[pos:pos + len(v)]
                    pos += len(v)
            finally:
                bounce.close()
            return total
        self._preadv_all(offset, views)
        return total

    def _preadv_all(self, offset: int, views: list[memoryview]) -> None:
        self._rw_all(os.preadv, "read", offset, views,
                     "short read at {} (end of file; was the image truncated?)")

    def write(self, offset: int, bufs: Sequence[Any], *, fua: bool = False) -> int:
        """Write bufs, in order, at byte `offset`; returns the byte count. With fua (or a
        write-through backend) the data is also on stable storage when this returns."""
        views = [v for v in map(_as_bytes_view, bufs) if len(v)]
        total = sum(len(v) for v in views)
        self._check(offset, total, write=True)
        if total:
            if self._needs_bounce(views):
                bounce = mmap.mmap(-1, total)
                try:
                    pos = 0
                    for v in views:
                        bounce[pos:pos + len(v)] = v
                        pos += len(v)
                    self._pwritev_all(offset, [memoryview(bounce)])
                finally:
                    bounce.close()
            else:
                self._pwritev_all(offset, views)
        if fua or self.write_through:
            self.flush()
        return total

    def _pwritev_all(self, offset: int, views: list[memoryview]) -> None:
        self._rw_all(os.pwritev, "write", offset, views, "write at {} made no progress")

    def _rw_all(self, op, what: str, offset: int, views: list[memoryview],
                stalled: str) -> None:
        """op (os.preadv or os.pwritev) until every view is done; a call that moves nothing
        is an EIO BlockError with the `stalled` message (formatted with the offset)."""
        while views:
            try:
                n = op(self.fd, views[:IOV_MAX], offset)
            except OSError as e:
                raise self._io_error(f"{what} at {offset}", e) from None
            if n <= 0:
                raise BlockError(BlockError.IO, f"{self.path}: {stalled.format(offset)}",
                                 errno.EIO)
            offset += n
            views = views_after(views, n)

    def flush(self) -> None:
        """Make every completed write durable."""
        if self.fd < 0:
            raise BlockError(BlockError.CLOSED, f"{self.path}: backend is closed")
        if self.readonly:
            return
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise self._io_error("flush", e) from None

    def _fallocate(self, mode: int, offset: int, length: int) -> int:
        """0, or the errno of a failed fallocate."""
        if _libc is None:
            return errno.ENOSYS
        while True:
            if _libc.fallocate(self.fd, mode, offset, length) == 0:
                return 0
            err = _ffi.errno
            if err != errno.EINTR:
                return err

    def discard(self, offset: int, length: int) -> None:
        """Drop the range's storage (punch a hole; later reads return zeros)."""
        self._check(offset, length, write=True)
        if not self.supports_discard:
            raise BlockError(BlockError.UNSUPPORTED, f"{self.path}: discard is not enabled")
        if not length:
            return
        err = self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        if err in _NOT_SUPPORTED:
            self._discard_ok = False
            raise BlockError(BlockError.UNSUPPORTED,
                             f"{self.path}: the host cannot discard here", err)
        if err:
            raise BlockError(BlockError.IO, f"{self.path}: discard at {offset} failed: "
                             f"{os.strerror(err)}", err)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Make the range read back as zeros; with unmap (and discard allowed) free it too."""
        self._check(offset, length, write=True)
        if not length:
            return
        if unmap and self.supports_discard:
            err = self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            if err == 0:
                return
            if err in _NOT_SUPPORTED:
                self._discard_ok = False
            else:
                raise BlockError(BlockError.IO, f"{self.path}: write zeroes at {offset} "
                                 f"failed: {os.strerror(err)}", err)
        if self._zero_range_ok:
            err = self._fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
            if err == 0:
                return
            if err in _NOT_SUPPORTED:
                self._zero_range_ok = False
            else:
                raise BlockError(BlockError.IO, f"{self.path}: write zeroes at {offset} "
                                 f"failed: {os.strerror(err)}", err)
        self._write_zero_buffers(offset, length)

    def _write_zero_buffers(self, offset: int, length: int) -> None:
        with self._lock:
            if self._zeros is None:
                self._zeros = mmap.mmap(-1, _ZERO_CHUNK)   # page aligned, fine for O_DIRECT
        zeros = memoryview(self._zeros)
        end = offset + length
        while offset < end:
            n = min(_ZERO_CHUNK, end - offset)
            self._pwritev_all(offset, [zeros[:n]])
            offset += n

    def refresh_size(self) -> bool:
        """Re-read the image size; True when it changed (report a capacity change). A size
        that is not a whole number of sectors is rounded down."""
        if self.fd < 0:
            return False
        try:
            if self.is_blockdev:
                size = os.lseek(self.fd, 0, os.SEEK_END)
            else:
                size = os.fstat(self.fd).st_size
        except OSError as e:
            log.warning("%s: cannot re-read the size: %s", self.path, e.strerror)
            return False
        size -= size % self.logical_sector
        if size == self.size:
            return False
        log.info("%s: size changed from %d to %d bytes", self.path, self.size, size)
        self.size = size
        return True

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
        if self._zeros is not None:
            self._zeros.close()
            self._zeros = None

    def __enter__(self) -> "BlockBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# The disk options both disk devices take, named as bhyve's block_if names them:
#   -s 3,virtio-blk,disk.img,ro,nocache,sectorsize=512/4096,ser=ABC
# Note the bhyve meanings: `nocache` is O_DIRECT (skip the host page cache) and `direct`
# is write-through (every write is durable before it completes, like bhyve's O_SYNC).
BLOCK_OPTIONS: tuple[Option, ...] = (
    Option("path", "str", None, "raw disk image (file or block device)", required=True),
    Option("ro", "bool", False, "read-only disk"),
    Option("nocache", "bool", False, "open with O_DIRECT (bypass the host page cache)"),
    Option("direct", "bool", False, "write-through: writes are durable when acknowledged"),
    Option("nodelete", "bool", False, "ignore discard (TRIM/UNMAP) requests"),
    Option("sectorsize", "str", None, "logical[/physical] sector size, e.g. 512/4096"),
    Option("ser", "str", None, "serial number (at most 20 characters)"),
)
BLOCK_POSITIONAL = ("path",)


def parse_sectorsize(text: str, where: str = "") -> tuple[int, int | None]:
    """'512' -> (512, None); '512/4096' -> (512, 4096). Sizes are checked by open()."""
    logical, slash, physical = str(text).partition("/")
    try:
        return int(logical, 0), (int(physical, 0) if slash else None)
    except ValueError:
        raise ConfigError(f"{where + ': ' if where else ''}sectorsize: {text!r} is not "
                          f"logical[/physical], e.g. 512 or 512/4096") from None


def open_from_options(options: dict[str, Any], where: str = "") -> BlockBackend:
    """A backend from a device's validated BLOCK_OPTIONS (ConfigError on any problem)."""
    logical, physical = 512, None
    if options.get("sectorsize"):
        logical, physical = parse_sectorsize(options["sectorsize"], where)
    return BlockBackend.open(options["path"], readonly=bool(options.get("ro")),
                             direct=bool(options.get("nocache")),
                             write_through=bool(options.get("direct")),
                             logical_sector=logical, physical_sector=physical,
                             nodelete=bool(options.get("nodelete")),
                             serial=options.get("ser"))


_STOP = object()


def run_request(fn: Callable[..., Any], args: Sequence[Any]) -> Any:
    """fn(*args), or the BlockError a completion callback should get instead of an exception
    (an OSError becomes BlockError(IO); any other exception is a bug, logged, and IO too)."""
    try:
        return fn(*args)
    except BlockError as e:
        return e
    except OSError as e:
        return BlockError(BlockError.IO, f"block request failed: {e.strerror or e}", e.errno)
    except Exception as e:
        log.exception("block request %r failed", fn)
        return BlockError(BlockError.IO, f"block request failed: {e}")


def _complete(callback: Callable[[Any], None], result: Any) -> None:
    try:
        callback(result)
    except Exception:
        log.exception("block completion callback %r failed", callback)


def _run_each(requests) -> None:
    for fn, args, callback in requests:
        _complete(callback, run_request(fn, args))


def _ignore(_result: Any) -> None:
    pass


class BlockQueue:
    """A bounded pool of worker threads running block requests.

    `submit(fn, *args, callback=cb)` queues `fn(*args)` (typically a bound backend method,
    e.g. `backend.write, offset, bufs`) and returns at once unless `depth` requests are
    already waiting, in which case it blocks until one is taken. On a worker thread the
    request runs and `cb(result)` is called with its return value, or with the BlockError it
    raised (any other exception becomes BlockError(IO)). Callbacks run in completion order,
    on the worker that ran the request. `close()` runs everything already submitted, then
    stops the workers.
    """

    def __init__(self, backend: BlockBackend | None = None, workers: int = 4,
                 depth: int = 256, name: str = "blk") -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.backend = backend
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._cond = threading.Condition()
        self._pending = 0
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"{name}-worker-{i}",
                                          daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    @property
    def pending(self) -> int:
        """Requests submitted whose callback has not returned yet."""
        return self._pending

    def submit(self, fn: Callable[..., Any], *args: Any,
               callback: Callable[[Any], None]) -> None:
        with self._cond:
            if self._closed:
                raise BlockError(BlockError.CLOSED, "block queue is closed")
            self._pending += 1
        self._q.put((fn, args, callback))

    def submit_many(self, requests: Sequence[tuple]) -> None:
        """Queue [(fn, args, callback), ...] as one job: one worker runs them in turn, each
        callback as soon as its own request ends (fewer hand-offs than one submit each)."""
        if requests:
            self.submit(_run_each, list(requests), callback=_ignore)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted request has completed; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        """Finish the queued requests (their callbacks run), then stop the workers."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        for _ in self._threads:
            self._q.put(_STOP)
        me = threading.current_thread()
        for t in self._threads:
            if t is not me:
                t.join()

    def __enter__(self) -> "BlockQueue":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            fn, args, callback = item
            try:
                _complete(callback, run_request(fn, args))
            finally:
                with self._cond:
                    self._pending -= 1
                    if self._pending == 0:
                        self._cond.notify_all()
