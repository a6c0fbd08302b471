"""cffi build of virtio-blk's native data path, `hvframe_virtio_blk._native`, against
hvframe's native API (hvframe.native_build); run by setup.py's cffi_modules at install."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# This package, and hvframe: the build environment's, else the checkout this plugin lives in.
sys.path[:0] = [HERE]
sys.path.append(os.path.dirname(os.path.dirname(HERE)))
from hvframe.native_build import can_link, plugin_ffi  # noqa: E402
from hvframe_virtio_blk import layout  # noqa: E402

# Batched reads through io_uring need liburing's development files (Debian's liburing-dev);
# without them (or with HVFRAME_NO_URING=1) the module is built without, and every read is a
# preadv of its own.
# The probe uses what vblk.c does (liburing 2.2 and later).
URING_CALLS = """
    struct io_uring r;
    io_uring_queue_init(1, &r, IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL);
    struct io_uring_probe *p = io_uring_get_probe_ring(&r);
    (void)io_uring_opcode_supported(p, IORING_OP_READ);
    io_uring_free_probe(p);
    struct io_uring_sqe *s = io_uring_get_sqe(&r);
    io_uring_prep_read(s, 0, 0, 0, 0);
    io_uring_prep_readv(s, 0, 0, 0, 0);
    io_uring_sqe_set_data64(s, 1);
    io_uring_sqe_set_flags(s, IOSQE_FIXED_FILE);
    int fd = 0;
    io_uring_register_files(&r, &fd, 1);
    io_uring_unregister_files(&r);
    struct io_uring_cqe *c;
    io_uring_submit_and_wait(&r, 1);
    io_uring_wait_cqe(&r, &c);
    (void)io_uring_cqe_get_data64(c);
    io_uring_cqe_seen(&r, c);
    io_uring_queue_exit(&r);
"""
URING = (os.environ.get("HVFRAME_NO_URING", "") in ("", "0")
         and can_link("liburing.h", "uring", URING_CALLS))

ffibuilder = plugin_ffi(
    "hvframe_virtio_blk._native", os.path.join(HERE, "hvframe_virtio_blk"), ["vblk.c"],
    cdef="""
        int vblk_bind(const struct hv_api *api);
        struct vblk_disk { int fd; int readonly, direct, write_through;
                           uint32_t logical_sector; uint64_t size; int wb_errno; };
        int64_t vblk_serve_chain(void *ctx, struct hv_vq *q, struct hv_chain *ch);
        struct vblk_batch;
        int vblk_uring_built(void);
        struct vblk_batch *vblk_batch_new(struct vblk_disk *disk, int *err);
        void vblk_batch_free(struct vblk_batch *bt);
        int vblk_batch_error(const struct vblk_batch *bt);
        int vblk_batch_file_registered(const struct vblk_batch *bt);
        int vblk_batch_split(struct vblk_batch *bt, int mode);
        int vblk_batch_fail_next_submit(struct vblk_batch *bt, int partner, int err);
        int vblk_batch_unsubmitted(struct vblk_batch *bt, int partner);
        uint64_t vblk_batch_partner_reads(const struct vblk_batch *bt, uint64_t *taken_back);
        int vblk_serve_batch(void *ctx, struct hv_vq *q, int max);
    """,
    libraries=["uring"] if URING else [],
    define_macros=[("VBLK_HAVE_URING", None)] if URING else [],
    structs={"vblk_req_hdr": layout.VirtioBlkReqHeader},
    constants={"VBLK_T_IN": layout.T_IN, "VBLK_T_OUT": layout.T_OUT, "VBLK_S_OK": layout.S_OK,
               "VBLK_S_IOERR": layout.S_IOERR, "VBLK_SECTOR": layout.SECTOR})
