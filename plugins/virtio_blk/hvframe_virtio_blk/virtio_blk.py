"""virtio-blk (virtio 1.2, section 5.2) over the shared block layer.

    -s N,virtio-blk,PATH[,ro][,sectorsize=L[/P]][,ser=ID][,nocache][,direct][,nodelete]
        [,num-queues=N][,queue-size=N][,aio=io_uring|threads]

Requests are served on the queue's worker thread (hvframe.virtio.pci): READ and WRITE as one
preadv/pwritev straight between the image and guest RAM, FLUSH as fdatasync, GET_ID, DISCARD
and WRITE_ZEROES. A chain goes back to the driver only after the backend call returned, so an
acknowledged write is on the backend (and durable with `direct`, or after a FLUSH).
READ and WRITE chains are served natively when possible (vblk_serve_chain in
vblk.c in this package, GIL released), with the same checks and answers as
handle_chain: serve_cycle runs the worker's whole loop natively (hv_vq_cycle), serve_fast one
pass. With aio=io_uring (the default) the worker's loop hands each run of READs to the kernel
in one io_uring submission (vblk_serve_batch, hv_vq_cycle_batch) instead of a preadv each,
and shares half of a large run with a partner thread that has a ring of its own; where
io_uring is unavailable it says so once and reads as with aio=threads. A batch gives the
guest what serving its requests one by one would: a READ whose buffers meet the rings, or
what another request of the batch reads or writes, starts a batch of its own. Anything else,
and any chain the native code declines, goes through handle_chain. Everything in a request
is checked: a bad header, sector range, alignment or segment list gets VIRTIO_BLK_S_IOERR /
S_UNSUPP in the request's own status byte; a chain with no room for a status byte cannot be
answered and is returned with nothing written.
"""
from __future__ import annotations

import errno
import os
import threading

from hvframe import concurrency
from hvframe.snapshot.state import DeviceState
from hvframe.block.backend import BlockBackend, BlockError, views_after
from hvframe.virtio.device import VirtioDevice, bit
from hvframe.packed import declared_later

try:
    from hvframe.core_native import bind as _bind
    from hvframe.virtio.native import CYCLE_PYTHON as _CYCLE_PYTHON, queue_state
    from ._native import ffi as _ffi, lib as _lib
    _bind(_lib.vblk_bind)
    _SERVE_CHAIN = _ffi.addressof(_lib, "vblk_serve_chain")
    _SERVE_BATCH = _ffi.addressof(_lib, "vblk_serve_batch")
except ImportError:  # pragma: no cover - a broken install: the Python path serves all
    _lib = None


from .layout import (  # noqa: F401  (re-exported: the names tests and tools know)
    F_BLK_SIZE, F_CONFIG_WCE, F_DISCARD, F_FLUSH, F_GEOMETRY, F_MQ, F_RO, F_SEG_MAX,
    F_SIZE_MAX, F_TOPOLOGY, F_WRITE_ZEROES, ID_BYTES, MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEGMENTS, MAX_WRITE_ZEROES_SEGMENTS, S_IOERR, S_OK, S_UNSUPP, SECTOR,
    T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES, VIRTIO_ID_BLOCK,
    WRITE_ZEROES_UNMAP, LAYOUTS)

# How READs reach the image (QEMU's -drive aio= names): a run of them in one io_uring
# submission (where the kernel and the build allow it; else as threads), or one preadv each
# on the queue's worker thread.
AIO_MODES = ("io_uring", "threads")

# VirtioBlkConfig and the other construct declarations, as the layout module gives them.
__getattr__ = LAYOUTS.module_getattr
_HEADER = LAYOUTS.VirtioBlkReqHeader.struct
_SEGMENT = LAYOUTS.VirtioBlkDiscardSegment.struct
HEADER_SIZE = _HEADER.size
SEGMENT_SIZE = _SEGMENT.size


def _split_status(views: list):
    """(data views, 1-byte status view): the status byte is the chain's last writable byte."""
    for i in range(len(views) - 1, -1, -1):
        v = views[i]
        if len(v):
            data = views[:i] + ([v[:len(v) - 1]] if len(v) > 1 else [])
            return data, v[len(v) - 1:]
    return views, None


class VirtioBlk(VirtioDevice, DeviceState):
    # The disk's contents are not in a checkpoint (the image is, as with QEMU, the same file
    # on both sides); a write-back failure the guest has not reset away is.
    state_version = 1

    @declared_later
    def state_layout():
        from construct import Flag, Struct
        return Struct("writeback_failed" / Flag)

    name = "virtio-blk"
    device_type = VIRTIO_ID_BLOCK
    pci_class = 0x010000            # mass storage, SCSI: what drivers and firmware expect
    config_layout = LAYOUTS.VirtioBlkConfig
    # With io_uring, a large batch of READs is shared with a partner thread of the queue's,
    # where a second CPU is free (vblk.c, "a partner for large batches").
    split_reads = True

    def __init__(self, backend: BlockBackend, *, num_queues: int = 1, queue_size: int = 256,
                 aio: str = "io_uring"):
        if aio not in AIO_MODES:
            raise ValueError(f"aio={aio!r} must be one of {', '.join(AIO_MODES)}")
        self.backend = backend
        self.aio = aio
        self.num_queues = num_queues
        self.queue_max_size = queue_size
        self.readonly = backend.readonly
        self.serial = backend.serial.encode("ascii")[:ID_BYTES]
        self.discard = not backend.readonly and not backend.nodelete
        features = (bit(F_SEG_MAX) | bit(F_BLK_SIZE) | bit(F_FLUSH) | bit(F_TOPOLOGY))
        if num_queues > 1:
            features |= bit(F_MQ)
        if self.readonly:
            features |= bit(F_RO)
        else:
            features |= bit(F_WRITE_ZEROES)
            if self.discard:
                features |= bit(F_DISCARD)
        self.device_features = features
        self._config = b""
        self._watch_wake = threading.Event()
        self._watcher: concurrency.DeviceThread | None = None
        self._build_config()
        self._blk = _ffi.new("struct vblk_disk *") if _lib is not None else None
        # Each queue's batch server state (struct vblk_batch), made by its worker on first
        # use; None once io_uring turned out to be unavailable (or aio=threads).
        self._batches: dict[int, object] | None = {} if aio == "io_uring" else None
        # Two queues' workers may find io_uring gone at once: one of them says so.
        self._uring_lock = concurrency.lock(concurrency.LEAF, "virtio-blk io_uring switch")
        if self._blk is None:
            self.serve_fast = self.serve_cycle = None
        else:   # fixed for the backend's life; fd and size are refreshed per call
            blk = self._blk
            blk.readonly = backend.readonly
            blk.direct = backend.direct
            blk.write_through = backend.write_through
            blk.logical_sector = backend.logical_sector

    # -- configuration space --------------------------------------------------------------
    def _build_config(self) -> None:
        be = self.backend
        logical, physical = be.logical_sector, be.physical_sector
        exp = (physical // logical).bit_length() - 1
        cfg = LAYOUTS.VirtioBlkConfig.build(dict(
            capacity=be.size // SECTOR,
            size_max=0,
            seg_max=max(1, self.queue_max_size - 2),   # header and status take two
            geometry_cylinders=0, geometry_heads=0, geometry_sectors=0,
            blk_size=logical,
            physical_block_exp=exp,
            alignment_offset=0,
            min_io_size=1,
            opt_io_size=0,
            writeback=0,
            unused0=0,
            num_queues=self.num_queues,
            max_discard_sectors=MAX_DISCARD_SECTORS,
            max_discard_seg=MAX_DISCARD_SEGMENTS,
            discard_sector_alignment=physical // SECTOR,
            max_write_zeroes_sectors=MAX_DISCARD_SECTORS,
            max_write_zeroes_seg=MAX_WRITE_ZEROES_SEGMENTS,
            write_zeroes_may_unmap=1 if self.discard else 0,
            unused1=[0, 0, 0],
        ))
        self._config = cfg          # one reference swap: readers see old or new, whole

    def config_bytes(self) -> bytes:
        return self._config

    def check_capacity(self) -> bool:
        """Re-read the image size; on a change, tell the driver (config interrupt)."""
        if not self.backend.refresh_size():
            return False
        self._build_config()
        if self.transport is not None:
            self.transport.config_changed()
        self.log.info("%s: capacity is now %d sectors", self.backend.path, self.backend.size // SECTOR)
        return True

    def _watch_capacity(self, thread: concurrency.DeviceThread) -> None:
        """(the capacity watcher, a DeviceThread this device owns) Re-read the image size
        once a second; close() stops it through stop() (wake sets _watch_wake)."""
        while not thread.stopping:
            concurrency.may_block("the next capacity check")
            self._watch_wake.wait(1.0)
            self._watch_wake.clear()
            if thread.stopping:
                return
            thread.checkpoint()       # woken by pause(): park here
            if thread.stopping:
                return
            try:
                self.check_capacity()
            except Exception:
                self.log.exception("%s: capacity check failed", self.backend.path)

    def _watcher_failed(self, exc: BaseException) -> None:
        self.log.error("%s: the capacity watcher died; size changes of the image are no longer "
                  "reported to the guest", self.backend.path)

    def start(self) -> None:
        self._start_watcher()

    def activate(self, features: int) -> None:
        self._start_watcher()           # a machine that was never started (tests) starts it here

    def _start_watcher(self) -> None:
        if self._watcher is None:
            self._watcher = concurrency.DeviceThread(
                "virtio-blk-resize", self._watch_capacity, wake=self._watch_wake.set,
                on_error=self._watcher_failed).start()

    # -- requests -------------------------------------------------------------------------
    def _current_blk(self):
        """The native ``struct vblk_disk`` with the backend's fd and size as they are now
        (refresh_size() may change the size), or None once the backend is closed."""
        be, blk = self.backend, self._blk
        fd = be.fd
        if fd < 0 or be.failed:
            return None               # after a failed flush, write-through writes fail in Python
        blk.fd = fd
        blk.size = be.size
        return blk

    def serve_fast(self, queue: int, vq, limit: int | None = None) -> int:
        """Serve the READ/WRITE chains at the head of ``vq`` natively (GIL released); stops
        at the first chain it leaves to handle_chain/pop (another type, an invalid chain,
        an O_DIRECT bounce) or after ``limit`` chains (default: one queue's worth).
        Returns the number of chains served (and pushed)."""
        blk = self._current_blk()
        if blk is None:
            return 0                  # closed: handle_chain answers IOERR
        try:
            nq = queue_state(vq)
            return nq.serve(_SERVE_CHAIN, blk, vq.size if limit is None else limit)
        except (ValueError, BufferError):
            return 0                  # guest memory closed or unusable: the Python path decides
        finally:
            self._keep_writeback_error(blk)

    def serve_cycle(self, queue: int, vq, gate, poll_ns: int | None = None) -> int:
        """The queue worker's native loop (hv_vq_cycle over vblk_serve_chain): serve READ/WRITE
        chains, interrupt through ``gate``, poll for the next batch. Returns the CYCLE_* code
        (CYCLE_PYTHON when the next chain, or everything, is the Python path's)."""
        blk = self._current_blk()
        if blk is None:
            return _CYCLE_PYTHON      # closed: handle_chain answers IOERR
        batch = self._batch(queue, blk)
        try:
            if batch is not None:
                code = queue_state(vq).cycle_batch(_SERVE_BATCH, batch, gate, poll_ns)
                err = _lib.vblk_batch_error(batch)
                if err:
                    self._uring_failed(err)
                return code
            return queue_state(vq).cycle(_SERVE_CHAIN, blk, gate, poll_ns)
        except (ValueError, BufferError):
            return _CYCLE_PYTHON      # guest memory closed or unusable
        finally:
            self._keep_writeback_error(blk)

    def _batch(self, queue: int, blk):
        """Queue ``queue``'s batch server state, made on first use (by the queue's worker,
        the lock of the queue held), or None: every read a preadv of its own."""
        batches = self._batches
        if batches is None:
            return None
        batch = batches.get(queue)
        if batch is None:
            err = _ffi.new("int *")
            made = _lib.vblk_batch_new(blk, err)
            if made == _ffi.NULL:
                self._uring_failed(err[0])
                return None
            if self.split_reads:
                _lib.vblk_batch_split(made, 1)
            # Freed when the last reference goes: a worker inside a call keeps its own.
            batch = batches[queue] = _ffi.gc(made, _lib.vblk_batch_free)
        return batch

    def _uring_failed(self, err: int) -> None:
        """io_uring cannot be had (or failed): READs go one preadv each from now on."""
        with self._uring_lock:
            if self._batches is None:
                return
            self._batches = None
        if err == errno.ENOSYS:       # as built: not news for every disk
            self.log.info("%s: built without liburing: each read is a system call of its own",
                          self.backend.path)
        else:
            self.log.warning("%s: io_uring unavailable (%s): each read is a system call of its "
                             "own", self.backend.path, os.strerror(err))

    def quiesce(self) -> None:
        """Acknowledged writes on stable storage before the state is taken."""
        self.backend.settle()

    def save_state(self) -> dict:
        return dict(writeback_failed=self.backend.failed)

    def load_state(self, s) -> None:
        if s.writeback_failed:
            self.backend.writeback_failed(errno.EIO)

    def _keep_writeback_error(self, blk) -> None:
        """A write-through fdatasync the native path made failed: the backend keeps the
        error, so every later FLUSH fails too (the kernel would report it only once)."""
        if blk is not None and blk.wb_errno:
            err, blk.wb_errno = blk.wb_errno, 0
            self.backend.writeback_failed(err)

    def handle_chain(self, queue: int, chain) -> int:
        data_in, status = _split_status(chain.writable)
        if status is None:
            self.log.warning("%s: request without a status byte dropped", self.backend.path)
            return 0
        header = chain.gather(HEADER_SIZE)
        if len(header) < HEADER_SIZE:
            status[0] = S_IOERR
            return 1
        rtype, _, sector = _HEADER.unpack(header)
        written = 0
        try:
            if rtype == T_IN:
                if sum(len(v) for v in data_in) % SECTOR:
                    raise BlockError(BlockError.RANGE, "read length is not whole sectors")
                written = self.backend.read(sector * SECTOR, data_in)
                code = S_OK
            elif rtype == T_OUT:
                data = views_after(chain.readable, HEADER_SIZE)
                if sum(len(v) for v in data) % SECTOR:
                    raise BlockError(BlockError.RANGE, "write length is not whole sectors")
                self.backend.write(sector * SECTOR, data)
                code = S_OK
            elif rtype == T_FLUSH:
                self._keep_writeback_error(self._blk)
                self.backend.flush()
                # The native path on another queue may have heard of a lost write-back
                # (and kept it in its struct) while this fdatasync ran: look again.
                self._keep_writeback_error(self._blk)
                if self.backend.failed:
                    raise BlockError(BlockError.IO, "a write-through flush failed meanwhile")
                code = S_OK
            elif rtype == T_GET_ID:
                ident = self.serial.ljust(ID_BYTES, b"\0")
                done = 0
                for v in data_in:
                    n = min(len(v), ID_BYTES - done)
                    v[:n] = ident[done:done + n]
                    done += n
                written = done
                code = S_OK
            elif rtype in (T_DISCARD, T_WRITE_ZEROES):
                code = self._discard_or_zero(rtype, chain)
            else:
                code = S_UNSUPP
        except BlockError as e:
            code = S_UNSUPP if e.kind == BlockError.UNSUPPORTED else S_IOERR
            written = 0
            self.log.debug("%s: request type %d sector %d failed: %s", self.backend.path, rtype,
                      sector, e)
        status[0] = code
        return written + 1

    def _discard_or_zero(self, rtype: int, chain) -> int:
        if rtype == T_DISCARD and not self.discard:
            return S_UNSUPP
        if self.readonly:
            return S_IOERR
        # The guest chooses the chain's length (up to 4 GiB, naming its RAM many times over):
        # check it against the advertised segment limit before copying a byte.
        views = views_after(chain.readable, HEADER_SIZE)
        length = sum(len(v) for v in views)
        limit = MAX_DISCARD_SEGMENTS if rtype == T_DISCARD else MAX_WRITE_ZEROES_SEGMENTS
        if not length or length % SEGMENT_SIZE or length > limit * SEGMENT_SIZE:
            return S_UNSUPP
        payload = b"".join(views)
        count = length // SEGMENT_SIZE
        segments = [_SEGMENT.unpack_from(payload, i * SEGMENT_SIZE) for i in range(count)]
        for sector, num, flags in segments:   # check them all before changing anything
            if num > MAX_DISCARD_SECTORS:
                return S_IOERR
            allowed = WRITE_ZEROES_UNMAP if rtype == T_WRITE_ZEROES else 0
            if flags & ~allowed:
                return S_UNSUPP
            if (sector + num) * SECTOR > self.backend.size:
                return S_IOERR
        for sector, num, flags in segments:
            if rtype == T_DISCARD:
                self.backend.discard(sector * SECTOR, num * SECTOR)
            else:
                self.backend.write_zeroes(sector * SECTOR, num * SECTOR,
                                          unmap=bool(flags & WRITE_ZEROES_UNMAP) and self.discard)
        return S_OK

    def reset(self) -> None:
        # The driver starts over and is told about write-back failures afresh.
        self.backend.clear_error()

    def close(self) -> None:
        # Each ring closes once no worker call holds it; none is made after this.
        self._batches = None
        if self._watcher is not None:   # kept: activate() after close() starts no other
            self._watcher.stop()      # joins with a deadline; returns at once on itself
        self.backend.close()
