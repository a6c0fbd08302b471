"""Raw disk images (regular files or block devices) for the disk devices.

`BlockBackend.open(path, ...)` checks the image once and raises ConfigError (one line naming
the path) for anything the user has to fix. Afterwards every request goes through
`read`/`write`/`flush`/`discard`/`write_zeroes`, which take byte offsets and lists of
buffers (memoryviews of guest memory) and either transfer everything or raise `BlockError`,
whose `kind` the device turns into its own status code. No OSError escapes a request.

Opening never blocks (O_NONBLOCK, so a FIFO or a tty cannot hang the command line) and
takes an OFD lock on the image (shared for `ro`, exclusive otherwise) so that two VMs cannot
write one disk; `locking=False` skips it. A failed write-back (fdatasync) is sticky: the kernel
reports it once and marks the lost pages clean, so every later flush fails too until the
device is reset and calls `clear_error()`.

`BlockQueue` is a bounded pool of worker threads: a device submits a request from the vCPU
thread and gets `callback(result_or_BlockError)` on a worker once the request is done, so an
acknowledged write has returned from pwritev (and from fdatasync when write-through was asked).
A full queue refuses at once with BlockError(BUSY) instead of blocking the caller.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import stat
import struct
import threading
import itertools
import time
import weakref
from collections import deque
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Sequence

from .. import concurrency
from ..core_native import ffi as _ffi, lib as _lib   # compiled: no C declarations parsed at start-up
from ..device import DeviceOptions, Option, option
from ..errors import ConfigError
from ..logs import LazyLogger

log = LazyLogger(__name__)    # logging is imported when something is logged

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

IOV_MAX = 1024
SECTOR_SIZES = (512, 1024, 2048, 4096)
SERIAL_MAX = 20
_ZERO_CHUNK = 1 << 20
_BOUNCE_CHUNK = 1 << 20           # O_DIRECT bounce buffer: a request's size is the guest's
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENOTTY, errno.EINVAL,
                  errno.ENODEV)


class BlockError(Exception):
    """A failed request. `kind` is one of the class constants; devices map it to a status."""

    RANGE = "range"              # offset/length outside the disk or not sector aligned
    IO = "io"                    # the host read/write/flush failed (errno kept in .errno)
    READONLY = "readonly"        # a modifying request on a read-only backend
    UNSUPPORTED = "unsupported"  # discard/write-zeroes the backend cannot do
    CLOSED = "closed"            # the backend or queue is closed
    BUSY = "busy"                # the request queue is full; nothing was queued

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


def _copy_views(views: list[memoryview], buf: memoryview, *, to_views: bool) -> None:
    """Copy between buf and the first len(buf) bytes of views (either way)."""
    pos = 0
    for v in views:
        if pos >= len(buf):
            break
        n = min(len(v), len(buf) - pos)
        if to_views:
            v[:n] = buf[pos:pos + n]
        else:
            buf[pos:pos + n] = v[:n]
        pos += n


def _address(mv: memoryview) -> int:
    return int(_ffi.cast("uintptr_t", _ffi.from_buffer(mv)))


def default_serial(path: str) -> str:
    """A stable serial number for an image: the same path gives the same serial."""
    real = os.path.realpath(path)
    return "HV" + hashlib.sha1(real.encode("utf-8", "surrogateescape")).hexdigest()[:SERIAL_MAX - 2].upper()


def _file_kind(mode: int) -> str:
    """What a non-disk file is, for the error message."""
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device")):
        if test(mode):
            return kind
    return "not a regular file or block device"


def _not_a_disk(path: str, mode: int) -> ConfigError:
    return ConfigError(f"{path}: is {_file_kind(mode)}, not a disk image "
                       f"(use a regular file or block device)")


# OFD locks (fcntl F_OFD_SETLK) belong to the open file description, not the process: a second
# open in this same process conflicts too, and closing another descriptor of the same file
# (as POSIX locks would) does not drop them.
_FLOCK = struct.Struct("hhqqi4x")        # struct flock on Linux: type, whence, start, len, pid
_LOCK_CONFLICT = (errno.EAGAIN, errno.EACCES)


def _ofd_lock(fd: int, lock_type: int) -> None:
    """Lock (or with F_UNLCK unlock) the whole file; OSError when refused."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(lock_type, os.SEEK_SET, 0, 0, 0))


def _lock_holder(st: os.stat_result) -> str | None:
    """'pid N, comm' of a process holding a lock on the file, if /proc shows one we can read.
    OFD locks carry no pid in /proc/locks, but each holder's /proc/PID/fdinfo lists them."""
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    try:
        with open("/proc/locks") as f:
            if key not in f.read():
                return None
        pids = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fdinfo")
        except OSError:
            continue              # gone, or not ours to look at
        for fd in fds:
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    info = f.read()
            except OSError:
                continue
            if any(line.startswith("lock:") and key in line for line in info.splitlines()):
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        return f"pid {pid}, {f.read().strip()}"
                except OSError:
                    return f"pid {pid}"
    return None


_open_backends: "weakref.WeakSet[BlockBackend]" = weakref.WeakSet()
_open_seq = itertools.count()


def open_backends() -> list["BlockBackend"]:
    """The images open in this process, oldest first (QMP's query-block)."""
    return sorted((b for b in list(_open_backends) if b.fd >= 0), key=lambda b: b.opened_seq)


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
        self._lock = concurrency.lock(concurrency.LEAF, f"{path} state")
        # Serialises flushes (held across fdatasync: only other flushes wait for it).
        self._flush_lock = threading.Lock()
        self._failed: BlockError | None = None   # the write-back failure flushes report
        self.locked = False                       # holds an OFD lock on the image
        self._relock = False                      # release_lock() gave it up for a while
        self.opened_seq = next(_open_seq)
        _open_backends.add(self)

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str, *, readonly: bool = False, direct: bool = False,
             logical_sector: int = 512, physical_sector: int | None = None,
             nodelete: bool = False, serial: str | None = None,
             write_through: bool = False, locking: bool = True) -> "BlockBackend":
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

        # O_NONBLOCK: opening a FIFO (or a serial line) must not wait for a peer; the type
        # check after the open refuses it. O_NOCTTY: a tty never becomes our terminal.
        flags = ((os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK
                 | os.O_NOCTTY)
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
            try:
                mode = os.stat(path).st_mode
            except OSError:
                mode = stat.S_IFREG
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise _not_a_disk(path, mode) from None   # e.g. ENXIO for a socket
            if e.errno == errno.EROFS:
                raise ConfigError(f"{path}: on a read-only filesystem; open it read-only "
                                  f"with ro") from None
            if direct and e.errno == errno.EINVAL:
                raise ConfigError(f"{path}: this filesystem does not support O_DIRECT; "
                                  f"open it without direct") from None
            raise ConfigError(f"{path}: cannot open: {e.strerror}") from None
        try:
            return cls._checked(fd, path, locking, readonly=readonly, direct=direct,
                                logical_sector=logical_sector,
                                physical_sector=physical_sector, nodelete=nodelete,
                                serial=serial, write_through=write_through)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _checked(cls, fd: int, path: str, locking: bool, **kw: Any) -> "BlockBackend":
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            is_blockdev = True
            size = os.lseek(fd, 0, os.SEEK_END)
        elif stat.S_ISREG(st.st_mode):
            is_blockdev = False
            size = st.st_size
        else:
            raise _not_a_disk(path, st.st_mode)
        # Only needed to open without waiting; disk I/O should block as usual.
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        logical = kw["logical_sector"]
        if size == 0:
            raise ConfigError(f"{path}: the image is empty (size 0)")
        if size % logical:
            raise ConfigError(f"{path}: size {size} is not a multiple of the "
                              f"{logical}-byte sector size")
        be = cls(fd, path, size=size, is_blockdev=is_blockdev, **kw)
        if locking:
            be._lock_image(st)
        if kw["direct"]:
            be._probe_direct()
        return be

    def _lock_image(self, st: os.stat_result) -> None:
        """A shared lock for a read-only disk, an exclusive one otherwise: any number of
        readers, or one writer. A filesystem without OFD locks is used unlocked."""
        mode = "read" if self.readonly else "write"
        try:
            _ofd_lock(self.fd, fcntl.F_RDLCK if self.readonly else fcntl.F_WRLCK)
        except OSError as e:
            if e.errno not in _LOCK_CONFLICT:
                log.warning("%s: cannot lock the image (%s); using it unlocked", self.path,
                            e.strerror)
                return
            holder = _lock_holder(st)
            raise ConfigError(f'{self.path}: failed to get the "{mode}" lock: the image is in '
                              f'use by another process{f" ({holder})" if holder else ""}; '
                              f'stop it, or use locking=off to share it') from None
        self.locked = True

    def release_lock(self) -> None:
        """Give up the image lock while another process takes the VM over (a migration's
        hand-over, as QEMU inactivates its images); take_lock() takes it back."""
        if self.locked and self.fd >= 0:
            try:
                _ofd_lock(self.fd, fcntl.F_UNLCK)
            except OSError:
                return
            self.locked = False
            self._relock = True

    def take_lock(self) -> None:
        """The lock release_lock() gave up (ConfigError if another process has it now)."""
        if self._relock and self.fd >= 0:
            self._lock_image(os.fstat(self.fd))
            self._relock = False

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
        return not (self.nodelete or self.readonly) and self._discard_ok

    @property
    def closed(self) -> bool:
        return self.fd < 0

    @property
    def failed(self) -> bool:
        """A write-back failed: flushes fail until clear_error()."""
        return self._failed is not None

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
            self._bounced(offset, views, total, write=False)
        else:
            self._preadv_all(offset, views)
        return total

    def read_cached(self, offset: int, bufs: Sequence[Any]) -> bool:
        """Fill bufs from the disk at byte `offset` now, but only if the page cache holds all
        of it (preadv with RWF_NOWAIT: no waiting for a disk, so a vCPU may call this in its
        exit). False: nothing is promised about bufs; read() them the waiting way."""
        views = [v for v in map(_as_bytes_view, bufs) if len(v)]
        total = sum(len(v) for v in views)
        if self.direct or self.fd < 0 or not views or len(views) > IOV_MAX:
            return False
        try:
            self._check(offset, total, write=False)
            return os.preadv(self.fd, views, offset, os.RWF_NOWAIT) == total
        except (BlockError, OSError):
            return False                 # not cached, or an error read() will report

    def _bounced(self, offset: int, views: list[memoryview], total: int, *, write: bool) -> None:
        """O_DIRECT I/O through an aligned buffer of at most _BOUNCE_CHUNK bytes: the request's
        size comes from the guest, so it must not size a host allocation."""
        bounce = mmap.mmap(-1, min(total, _BOUNCE_CHUNK))
        buf = memoryview(bounce)
        try:
            while total:
                n = min(len(buf), total)   # both whole sectors, so every piece is too
                piece = buf[:n]
                if write:
                    _copy_views(views, piece, to_views=False)
                    self._pwritev_all(offset, [piece])
                else:
                    self._preadv_all(offset, [piece])
                    _copy_views(views, piece, to_views=True)
                piece.release()
                offset += n
                total -= n
                views = views_after(views, n)
        finally:
            buf.release()
            bounce.close()

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
                self._bounced(offset, views, total, write=True)
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

    def settle(self) -> None:
        """Before a checkpoint (a device's quiesce): acknowledged writes on stable storage,
        if the image is open and writable. A failed write-back is not raised: it stays in
        `failed`, which the device's record carries, and flushes keep failing after a
        restore until the guest is told."""
        if self.fd < 0 or self.readonly:
            return
        try:
            self.flush()
        except BlockError:
            pass

    def flush(self) -> None:
        """Make every completed write durable. Once a write-back failed this fails every time
        (until clear_error()): the kernel reports the error to one fdatasync only and marks
        the lost pages clean, so a later fdatasync succeeds without the data on disk."""
        if self.fd < 0:
            raise BlockError(BlockError.CLOSED, f"{self.path}: backend is closed")
        if self.readonly:
            return
        # One flush at a time: of two overlapping fdatasyncs only one hears of a lost
        # write-back, and the other must not answer OK before that is recorded.
        with self._flush_lock:
            failed = self._failed
            if failed is not None:
                raise BlockError(BlockError.IO, f"{self.path}: an earlier flush failed "
                                 f"({os.strerror(failed.errno or errno.EIO)}); writes since "
                                 f"the last good flush may be lost until the disk is reset",
                                 failed.errno)
            try:
                os.fdatasync(self.fd)
            except OSError as e:
                err = self._io_error("flush", e)
                with self._lock:
                    self._failed = err
                # once on the host; the guest sees every later flush fail
                log.error("%s; every flush fails until the disk is reset", err)
                raise err from None

    def writeback_failed(self, err: int) -> None:
        """A native path's fdatasync failed with errno `err`: keep it, as flush() does."""
        error = self._io_error("write-through flush", OSError(err, os.strerror(err)))
        with self._lock:
            first = self._failed is None
            if first:
                self._failed = error
        if first:
            log.error("%s; every flush fails until the disk is reset", error)

    def clear_error(self) -> None:
        """Forget a write-back failure (the device was reset: its driver starts over)."""
        with self._lock:
            failed, self._failed = self._failed, None
        if failed is not None:
            log.warning("%s: device reset, flushes are attempted again", self.path)

    def _fallocate(self, mode: int, offset: int, length: int) -> int:
        """0, or the errno of a failed fallocate(2) (the core's: Python's os module has only
        posix_fallocate, which cannot punch holes)."""
        return _lib.hv_fallocate(self.fd, mode, offset, length)

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
            if self.locked:   # a dup of fd elsewhere would otherwise keep the image locked
                try:
                    _ofd_lock(fd, fcntl.F_UNLCK)
                except OSError as e:
                    log.warning("%s: cannot unlock the image: %s", self.path, e.strerror)
                self.locked = False
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
class BlockOptions(DeviceOptions):
    """The disk options of a device with one disk (virtio-blk; each AHCI port)."""
    path: str | None = option(None, required=True, positional=True, example="disk.img",
                              help="raw disk image (file or block device)")
    ro: bool = option(False, help="read-only disk")
    nocache: bool = option(False, help="open with O_DIRECT (bypass the host page cache)")
    direct: bool = option(False, help="write-through: writes are durable when acknowledged")
    nodelete: bool = option(False, help="ignore discard (TRIM/UNMAP) requests")
    sectorsize: str | None = option(None, example="512/4096", unit="bytes",
                                    help="logical[/physical] sector size, e.g. 512/4096")
    ser: str | None = option(None, help="serial number (at most 20 characters)")
    locking: bool = option(True, help="lock the image (shared for ro, else exclusive); "
                                      "locking=off to share it with another process")


BLOCK_OPTIONS: tuple[Option, ...] = BlockOptions.options()
BLOCK_POSITIONAL = ("path",)


def parse_sectorsize(text: str, where: str = "") -> tuple[int, int | None]:
    """'512' -> (512, None); '512/4096' -> (512, 4096). Sizes are checked by open()."""
    logical, slash, physical = str(text).partition("/")
    try:
        return int(logical, 0), (int(physical, 0) if slash else None)
    except ValueError:
        raise ConfigError(f"{where + ': ' if where else ''}sectorsize: {text!r} is not "
                          f"logical[/physical], e.g. 512 or 512/4096") from None


def open_from_options(options: BlockOptions, where: str = "") -> BlockBackend:
    """A backend from a device's validated BlockOptions (ConfigError on any problem)."""
    logical, physical = 512, None
    if options.sectorsize:
        logical, physical = parse_sectorsize(options.sectorsize, where)
    return BlockBackend.open(options.path, readonly=options.ro, direct=options.nocache,
                             write_through=options.direct,
                             logical_sector=logical, physical_sector=physical,
                             nodelete=options.nodelete, serial=options.ser,
                             locking=options.locking)


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


class BlockQueue:
    """A bounded pool of worker threads running block requests.

    `submit(fn, *args, callback=cb)` queues `fn(*args)` (typically a bound backend method,
    e.g. `backend.write, offset, bufs`) and returns at once; when `depth` requests are
    already waiting it raises BlockError(BUSY) instead (the caller may hold a lock a worker
    needs, so it must never wait) and the device answers with its error status. On a worker
    thread the request runs and `cb(result)` is called with its return value, or with the
    BlockError it raised (any other exception becomes BlockError(IO)). Callbacks run in
    completion order, on the worker that ran the request, with no queue lock held.

    The workers are `DeviceThread`s the queue owns. Every submitted request gets exactly one
    callback: should a worker die of a bug (an exception the request path does not turn into
    a BlockError), its owner hook answers what that worker had not answered yet with
    BlockError(IO) and the other workers keep serving; once every worker has died, what is
    still queued fails the same way and `submit` refuses with BlockError(IO) saying so.

    `close()` runs everything already submitted (as long as requests keep completing: one
    that makes no progress for `deadline` seconds is given up on), then stops the workers;
    a request that never got to run then is answered with BlockError(CLOSED).
    """

    class _Job:
        """One submit (or submit_many): its requests, and how many were answered."""

        __slots__ = ("requests", "answered")

        def __init__(self, requests: list) -> None:
            self.requests = requests
            self.answered = 0      # requests[:answered] had their callback called (or started)

    def __init__(self, backend: BlockBackend | None = None, workers: int = 4,
                 depth: int = 256, name: str = "blk") -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.backend = backend
        self.name = name
        self._depth = max(1, depth)
        self._lock = concurrency.lock(concurrency.LEAF, f"{name} block queue")
        self._work = concurrency.condition(self._lock)   # workers: a job, close or a wake
        self._idle = concurrency.condition(self._lock)   # drain/close: a job finished
        self._jobs: deque = deque()                      # submitted, not taken by a worker
        self._running: list = [None] * workers           # the job each worker is serving
        self._pending = 0
        self._closed = False
        self._kicks = 0            # bumped by wake(): idle workers pass their checkpoint
        self._dead = 0             # workers that died of a bug
        self._broken: str | None = None                  # why no worker is left
        self._threads = [
            concurrency.DeviceThread(f"{name}-worker-{i}", lambda th, i=i: self._run(i, th),
                                     wake=self._wake,
                                     on_error=lambda e, i=i: self._worker_failed(i, e))
            for i in range(workers)]
        for t in self._threads:
            t.start()

    @property
    def pending(self) -> int:
        """Requests submitted whose callback has not returned yet."""
        return self._pending

    @property
    def workers_alive(self) -> int:
        """Workers still serving (fewer than asked for once one died of a bug)."""
        return sum(1 for t in self._threads if t.is_alive())

    def submit(self, fn: Callable[..., Any], *args: Any,
               callback: Callable[[Any], None]) -> None:
        """Queue fn(*args); BlockError(BUSY) at once when the queue is full (callback is not
        called then), BlockError(CLOSED) after close(), BlockError(IO) once every worker
        has died of a bug."""
        self._put([(fn, args, callback)])

    def submit_many(self, requests: Sequence[tuple]) -> None:
        """Queue [(fn, args, callback), ...] as one job: one worker runs them in turn, each
        callback as soon as its own request ends (fewer hand-offs than one submit each).
        Like submit, BlockError(BUSY) at once when full: then none of them runs."""
        if requests:
            self._put(list(requests))

    def _put(self, requests: list) -> None:
        with self._lock:
            if self._closed:
                raise BlockError(BlockError.CLOSED, "block queue is closed")
            if self._broken is not None:
                raise BlockError(BlockError.IO, f"{self.name}: block queue has no workers "
                                 f"left ({self._broken}); every request fails")
            if len(self._jobs) >= self._depth:
                raise BlockError(BlockError.BUSY, f"block queue is full "
                                 f"({self._depth} requests waiting)")
            self._jobs.append(BlockQueue._Job(requests))
            self._pending += 1
            self._work.notify()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted request has completed; False on timeout."""
        concurrency.may_block(f"{self.name} block requests to finish")
        with self._lock:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, deadline: float = concurrency.JOIN_DEADLINE) -> None:
        """Finish the queued requests (their callbacks run), then stop the workers. Gives up
        waiting when no request completes for `deadline` seconds: the workers are stopped
        (one stuck in a request is reported, not waited for) and requests that never ran are
        answered with BlockError(CLOSED). Idempotent; callable from a callback."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._work.notify_all()
        if not any(t.is_current() for t in self._threads):
            self._wait_for_progress(deadline)
        end = time.monotonic() + deadline
        for t in self._threads:
            t.stop(max(0.0, end - time.monotonic()))
        with self._lock:
            left = list(self._jobs)
            self._jobs.clear()
        if left:
            log.error("%s: block queue closed with %d requests not run", self.name,
                      sum(len(job.requests) for job in left))
            self._fail_jobs(left, BlockError(BlockError.CLOSED, f"{self.name}: block queue "
                                             f"closed before the request ran"))

    def __enter__(self) -> "BlockQueue":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _wait_for_progress(self, deadline: float) -> bool:
        """(close) Wait until nothing is pending, as long as requests keep completing."""
        concurrency.may_block(f"{self.name} block requests to finish")
        with self._lock:
            while self._pending:
                before = self._pending
                if not self._idle.wait_for(lambda: self._pending < before, deadline):
                    log.error("%s: %d block requests made no progress in %.1f s; closing "
                              "anyway", self.name, self._pending, deadline)
                    return False
        return True

    def _wake(self) -> None:
        """(DeviceThread.wake) Get idle workers out of their wait: to stop, or to park."""
        with self._lock:
            self._kicks += 1
            self._work.notify_all()

    def _run(self, index: int, thread: concurrency.DeviceThread) -> None:
        while True:
            thread.checkpoint()
            concurrency.may_block(f"{thread.name}: block requests")
            with self._lock:
                kicks = self._kicks
                while not (self._jobs or self._closed or thread.stopping
                           or self._kicks != kicks):
                    self._work.wait()
                if thread.stopping or (self._closed and not self._jobs):
                    return
                if not self._jobs:
                    continue          # woken to pass the checkpoint
                job = self._jobs.popleft()
                self._running[index] = job
            self._serve(job)
            with self._lock:
                self._running[index] = None
                self._pending -= 1
                self._idle.notify_all()

    @staticmethod
    def _serve(job: "BlockQueue._Job") -> None:
        for fn, args, callback in job.requests:
            result = run_request(fn, args)
            job.answered += 1         # from here on its callback is never called again
            _complete(callback, result)

    def _fail_jobs(self, jobs: list, err: BlockError) -> None:
        """Answer what `jobs` have not answered with err, and count them done."""
        try:
            for job in jobs:
                while job.answered < len(job.requests):
                    _fn, _args, callback = job.requests[job.answered]
                    job.answered += 1
                    _complete(callback, err)
        finally:
            with self._lock:
                self._pending -= len(jobs)
                self._idle.notify_all()

    def _worker_failed(self, index: int, exc: BaseException) -> None:
        """(DeviceThread.on_error, on the dying worker) Answer its request with BlockError(IO);
        the others keep serving. With no worker left, fail what is queued and refuse more."""
        reason = f"{self._threads[index].name} failed: {type(exc).__name__}: {exc}"
        with self._lock:
            job, self._running[index] = self._running[index], None
            self._dead += 1
            orphans: list = []
            if self._dead == len(self._threads):
                self._broken = reason
                orphans = list(self._jobs)
                self._jobs.clear()
            left = len(self._threads) - self._dead
        if left:
            log.error("%s: a block queue worker died (%s); %d left serving", self.name,
                      reason, left)
        else:
            log.error("%s: every block queue worker died (the last: %s); the disk's requests "
                      "fail from now on", self.name, reason)
        jobs = ([job] if job is not None else []) + orphans
        if jobs:
            self._fail_jobs(jobs, BlockError(BlockError.IO, f"{self.name}: block request "
                                             f"lost: {reason}", errno.EIO))
